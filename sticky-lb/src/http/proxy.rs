//! Forwarding one request: the headers a reverse proxy owes the backend and the client
//! (RFC 9110 section 7.6.1 hop-by-hop fields, `X-Forwarded-For`, `Forwarded` of RFC 7239), the
//! exchange with the backend over the service's connection pool, the session's cookie on the
//! way back, and a WebSocket (any `Upgrade`) relayed as bytes once the backend agreed (101).

use super::{
    Frontend, cookie,
    session::{self, Placement, Refusal},
    stats::ServiceStats,
    token,
};
use crate::config::{BackendProtocol, OnFailure};
use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};
use tracing::debug;

/// What goes to a backend: the client's body, or none (a retried request that had none).
pub(super) type UpstreamBody = Either<Incoming, Empty<Bytes>>;
/// What goes to the client: the backend's body, or one of ours (errors).
pub(super) type ResponseBody = Either<Incoming, Full<Bytes>>;

/// Fields that describe one connection, not the message (RFC 9110 section 7.6.1): never
/// forwarded either way. `Upgrade` and `Connection: upgrade` are set again for an upgrade.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Answers one client request: place, forward, return the backend's response with the
/// session's cookie. Every failure becomes a response (502, 503, 504), never a broken
/// connection. `https`: the request came over TLS (its connection's, not the frontend's
/// current setting).
pub(super) async fn handle(
    fe: Arc<Frontend>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
    https: bool,
) -> Result<Response<ResponseBody>, Infallible> {
    let now = unix_seconds();
    let stats = fe.stats.clone();
    let placement = match session::place(&fe, request.headers(), peer.ip(), now, None).await {
        Ok(p) => p,
        Err(refusal) => return Ok(refused(&stats, refusal)),
    };
    let upgrade = wants_upgrade(&request);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    forward_headers(
        &fe,
        &mut parts.headers,
        &parts.uri,
        peer.ip(),
        https,
        upgrade,
    );
    // A request without a body can be sent again to another backend if the first refuses
    // the connection (HAProxy `option redispatch` with `retries`).
    let resendable = body.is_end_stream();
    let head = (
        parts.method.clone(),
        parts.uri.clone(),
        parts.headers.clone(),
    );
    let mut outcome = exchange(&fe, &placement, parts, Either::Left(body), peer).await;
    let mut placement = placement;
    if let Err(Failure::Connect(failed)) = &outcome
        && resendable
        && fe.route.config.stick.on_failure == OnFailure::Redispatch
    {
        debug!(
            "{}: {failed} refused the connection; placing the request again",
            fe.route.name()
        );
        if let Ok(again) = session::place(&fe, &head.2, peer.ip(), now, Some(failed)).await {
            ServiceStats::count(&stats.redispatched);
            let mut retry = Request::new(Either::Right(Empty::new()));
            *retry.method_mut() = head.0;
            *retry.uri_mut() = head.1;
            *retry.headers_mut() = head.2;
            let (parts, body) = retry.into_parts();
            outcome = exchange(&fe, &again, parts, body, peer).await;
            placement = again;
        }
    }
    let mut response = match outcome {
        Ok(r) => r,
        Err(Failure::Timeout) => {
            ServiceStats::count(&stats.upstream_timeouts);
            return Ok(local(&stats, StatusCode::GATEWAY_TIMEOUT, None));
        }
        Err(Failure::Connect(_) | Failure::Exchange) => {
            ServiceStats::count(&stats.upstream_errors);
            return Ok(local(&stats, StatusCode::BAD_GATEWAY, None));
        }
    };
    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded && let Some(client_upgrade) = client_upgrade {
        let backend_upgrade = hyper::upgrade::on(&mut response);
        ServiceStats::count(&stats.upgrades);
        let name = fe.route.name().to_string();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((client, backend)) => {
                    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                        debug!("{name}: upgraded connection from {peer}: {e}");
                    }
                }
                Err(e) => debug!("{name}: upgrade from {peer}: {e}"),
            }
        });
    }
    let headers = response.headers_mut();
    if !upgraded {
        strip_hop_by_hop(headers);
    }
    if let Some(set_cookie) = placement.set_cookie.take() {
        headers.append(header::SET_COOKIE, set_cookie);
        if fe
            .route
            .config
            .stick
            .cookie
            .as_ref()
            .is_some_and(|c| c.nocache)
        {
            headers.append(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache=\"Set-Cookie\""),
            );
        }
    }
    if let Some((name, value)) = placement.set_header.take() {
        headers.insert(name, value);
    }
    if let (Some(name), Some(store)) = (placement.learn, &fe.tokens)
        && let Some(token) = cookie::response_cookie(headers, name)
        && token::acceptable(&token)
    {
        // Written before the response leaves, so the client's next request (on any node)
        // finds it.
        let claim = store
            .claim(
                fe.route.name(),
                &token,
                placement.backend.name(),
                fe.route.config.stick.timeout,
            )
            .await;
        if matches!(claim, token::Claim::Won) {
            ServiceStats::count(&stats.sessions_new);
        }
    }
    stats.response(response.status().as_u16());
    Ok(response.map(Either::Left))
}

/// Why no response came from the backend.
enum Failure {
    /// The connection to this backend (by name) could not be made: nothing was sent.
    Connect(String),
    Exchange,
    Timeout,
}

/// Sends the request to the placed backend over the pool and waits for its response's headers
/// (bounded by `response_timeout`). Counts the backend's open requests while it waits.
async fn exchange(
    fe: &Frontend,
    placement: &Placement<'_>,
    mut parts: http::request::Parts,
    body: UpstreamBody,
    peer: SocketAddr,
) -> Result<Response<Incoming>, Failure> {
    let backend = placement.backend;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(super::connect::authority(
            backend.view.address,
            fe.route.http.proxy_protocol.then(|| {
                (
                    peer,
                    SocketAddr::new(fe.route.config.vip, fe.route.config.port),
                )
            }),
        ))
        .path_and_query(path)
        .build()
        .map_err(|_| Failure::Exchange)?;
    parts.version = match fe.route.http.backend_protocol {
        BackendProtocol::Http1 => Version::HTTP_11,
        BackendProtocol::Http2 => Version::HTTP_2,
    };
    let load = backend.load.clone();
    load.open.fetch_add(1, Ordering::Relaxed);
    load.requests.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let sent = tokio::time::timeout(
        fe.route.response_timeout(),
        fe.client.request(Request::from_parts(parts, body)),
    )
    .await;
    load.open.fetch_sub(1, Ordering::Relaxed);
    match sent {
        Ok(Ok(response)) => {
            fe.stats
                .upstream_latency
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        }
        Ok(Err(e)) if e.is_connect() => Err(Failure::Connect(backend.name().to_string())),
        Ok(Err(e)) => {
            debug!("{}: {}: {e}", fe.route.name(), backend.name());
            Err(Failure::Exchange)
        }
        Err(_) => Err(Failure::Timeout),
    }
}

/// Whether the client asks to switch protocols (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
fn wants_upgrade(request: &Request<Incoming>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && connection_has(request.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes the hop-by-hop fields, including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// The request's headers as the backend gets them: hop-by-hop fields out (the upgrade's own
/// back in), `Host` kept (or taken from an HTTP/2 request's authority), the balancer's cookie
/// out under `indirect`, and the client named in `X-Forwarded-For`, `X-Forwarded-Proto` and
/// `Forwarded` (appended to what earlier proxies wrote), with the protocol the client used
/// (`https` if it came over TLS).
fn forward_headers(
    fe: &Frontend,
    headers: &mut HeaderMap,
    uri: &Uri,
    client: IpAddr,
    https: bool,
    upgrade: bool,
) {
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if upgrade && let Some(value) = upgrade_value {
        headers.insert(header::UPGRADE, value);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if !headers.contains_key(header::HOST)
        && let Some(authority) = uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    if let Some(cfg) = &fe.route.config.stick.cookie
        && cfg.indirect
    {
        cookie::strip(headers, &cfg.name);
    }
    if !fe.route.http.forwarded {
        return;
    }
    let proto = if https { "https" } else { "http" };
    append_list(
        headers,
        HeaderName::from_static("x-forwarded-for"),
        &client.to_string(),
    );
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    // RFC 7239 section 6: an IPv6 node is quoted and bracketed.
    let node = match client {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("\"[{a}]\""),
    };
    append_list(
        headers,
        header::FORWARDED,
        &format!("for={node};proto={proto}"),
    );
}

/// Appends `value` to the comma-separated list in `name` (one field, as proxies do).
fn append_list(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => format!("{existing}, {value}"),
        _ => value.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

fn refused(stats: &ServiceStats, refusal: Refusal) -> Response<ResponseBody> {
    let retry_after = match refusal {
        Refusal::NoBackend { retry_after } => {
            ServiceStats::count(&stats.refused);
            retry_after
        }
        Refusal::Strict { retry_after } => retry_after,
    };
    local(stats, StatusCode::SERVICE_UNAVAILABLE, Some(retry_after))
}

/// A response of the balancer's own, counted.
fn local(
    stats: &ServiceStats,
    status: StatusCode,
    retry_after: Option<u64>,
) -> Response<ResponseBody> {
    stats.response(status.as_u16());
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "{}\n",
        status.canonical_reason().unwrap_or("error")
    )))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(seconds) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Wall-clock seconds since 1970: the time cookies are sealed with (every node's clock).
pub(super) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
