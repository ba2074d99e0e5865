//! A real HTTP backend for the `mode: http` tests: hyper (HTTP/1.1 keep-alive and HTTP/2 over
//! cleartext) on its own thread and runtime inside a rig namespace.
//!
//! Every response names the backend (`x-backend: NAME`, and the body's first line) and the
//! address the request's connection came from (`x-peer: ADDR`: with several balancers, the
//! one that proxied it), and the body then lists the request's headers as the backend
//! received them (`name: value` lines, lower case), so a test sees what the balancer added and
//! removed. Paths:
//! - `/login`: the response also sets the application's own session cookie
//!   `APPSESSION=NAME-N` (N counts logins), for learning tokens from responses;
//! - `/slow/MS`: answers after MS milliseconds;
//! - `/page`: the same as an HTML page for a browser (see [`page`]): the backend's name in
//!   `<p id="backend">`, what a page script reads from `document.cookie` in
//!   `<pre id="script-cookies">`, the request's headers in `<pre id="request">`; it also sets
//!   the application's own cookie `visit=NAME` (persistent, no attributes), which scripts see;
//! - `/go?to=URL`: a page whose script navigates the browser to URL (a link followed from this
//!   backend's own address, i.e. from another site than the VIP's);
//! - any request with `Connection: upgrade` + `Upgrade`: 101, then every byte is echoed back
//!   (a stand-in for a WebSocket server: the balancer relays bytes without reading them).
//!
//! [`WebBackend::stop`] (and drop) closes the listener and every connection at once, as a
//! crashed server would; [`WebBackend::start`] again on the same address brings it back.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::sync::oneshot;

use crate::netns::spawn_in_netns;

/// A running backend. Dropping it stops it.
pub struct WebBackend {
    name: String,
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WebBackend {
    /// Starts backend `name` in namespace `ns` on `addr`; returns once it listens.
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<WebBackend> {
        WebBackend::start_with(ns, addr, name, false)
    }

    /// A backend that expects a PROXY protocol v2 header first on every connection (and
    /// closes one without it), and names the client it gives in `x-proxy-client: IP:PORT`.
    pub fn start_proxied(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<WebBackend> {
        WebBackend::start_with(ns, addr, name, true)
    }

    fn start_with(
        ns: &str,
        addr: SocketAddr,
        name: &str,
        proxy_protocol: bool,
    ) -> anyhow::Result<WebBackend> {
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = {
            let (name, requests) = (name.to_string(), requests.clone());
            spawn_in_netns(ns.to_string(), move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(serve(
                    addr,
                    name,
                    requests,
                    ready_tx,
                    stopped,
                    proxy_protocol,
                ));
                // Open connections end with the runtime.
                runtime.shutdown_timeout(Duration::from_millis(100));
            })
        };
        ready
            .recv_timeout(Duration::from_secs(5))
            .context("the web backend did not start")??;
        Ok(WebBackend {
            name: name.to_string(),
            addr,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection; returns once the port is closed.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WebBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve(
    addr: SocketAddr,
    name: String,
    requests: Arc<AtomicU64>,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
    mut stopped: oneshot::Receiver<()>,
    proxy_protocol: bool,
) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("bind {addr}: {e}")));
            return;
        }
    };
    let logins = Arc::new(AtomicU64::new(0));
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => {
                let Ok((mut stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let (name, requests, logins) = (name.clone(), requests.clone(), logins.clone());
                tokio::spawn(async move {
                    let proxied = if proxy_protocol {
                        match read_proxy_v2(&mut stream).await {
                            Some(client) => Some(client),
                            None => return,
                        }
                    } else {
                        None
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let reply =
                            respond(request, name.clone(), peer, requests.clone(), logins.clone());
                        async move {
                            let mut response = reply.await?;
                            if let Some(client) = proxied {
                                response.headers_mut().insert(
                                    "x-proxy-client",
                                    header::HeaderValue::from_str(&client.to_string())
                                        .expect("an address is a header value"),
                                );
                            }
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Reads a PROXY protocol v2 header (PROXY command, TCP over IPv4 or IPv6): the client's
/// address and port. `None` for anything else (a health check's bare connect, say).
async fn read_proxy_v2(stream: &mut tokio::net::TcpStream) -> Option<SocketAddr> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    if &head[..12] != b"\r\n\r\n\0\r\nQUIT\n" || head[12] != 0x21 {
        return None;
    }
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    match (head[13], len) {
        (0x11, 12..) => Some(SocketAddr::new(
            std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]).into(),
            u16::from_be_bytes([body[8], body[9]]),
        )),
        (0x21, 36..) => Some(SocketAddr::new(
            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&body[..16]).ok()?).into(),
            u16::from_be_bytes([body[32], body[33]]),
        )),
        _ => None,
    }
}

async fn respond(
    mut request: Request<Incoming>,
    name: String,
    peer: SocketAddr,
    requests: Arc<AtomicU64>,
    logins: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    requests.fetch_add(1, Ordering::Relaxed);
    let mut body = format!("{name}\n");
    for (field, value) in request.headers() {
        body.push_str(&format!(
            "{}: {}\n",
            field.as_str(),
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    if let Some(ms) = path.strip_prefix("/slow/").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let upgrade = request.headers().get(header::UPGRADE).cloned();
    let body = match path.as_str() {
        "/page" => page(&name, &body),
        _ => body,
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        "x-backend",
        header::HeaderValue::from_str(&name).expect("backend names are header values"),
    );
    response.headers_mut().insert(
        "x-peer",
        header::HeaderValue::from_str(&peer.ip().to_string())
            .expect("an address is a header value"),
    );
    if let Some(protocol) = upgrade {
        let upgraded = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgraded.await {
                let io = TokioIo::new(upgraded);
                let (mut reader, mut writer) = tokio::io::split(io);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.body_mut() = Full::new(Bytes::new());
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, protocol);
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        return Ok(response);
    }
    if path == "/page" {
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(
            header::SET_COOKIE,
            header::HeaderValue::from_str(&format!("visit={name}; Max-Age=3600; Path=/"))
                .expect("a cookie is a header value"),
        );
    }
    if path == "/go" {
        match go(&query) {
            Some(html) => {
                *response.body_mut() = Full::new(Bytes::from(html));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/html; charset=utf-8"),
                );
            }
            None => *response.status_mut() = StatusCode::BAD_REQUEST,
        }
    }
    if path == "/login" {
        let n = logins.fetch_add(1, Ordering::Relaxed) + 1;
        response.headers_mut().insert(
            header::SET_COOKIE,
            header::HeaderValue::from_str(&format!("APPSESSION={name}-{n}; Path=/; HttpOnly"))
                .expect("a cookie is a header value"),
        );
    }
    Ok(response)
}

/// The HTML of `/page` from backend `name`, with `echo` (the plain body: name, then the
/// request's headers) in `<pre id="request">`. Its script writes `document.cookie: ` and what
/// it reads there into `<pre id="script-cookies">`, so a browser's dumped DOM shows which
/// cookies a page script can see (an HttpOnly one is not among them). The icon is inline so
/// the browser asks for nothing else.
pub fn page(name: &str, echo: &str) -> String {
    let request = echo.split_once('\n').map_or("", |(_, headers)| headers);
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{name}</title><link rel=\"icon\" href=\"data:,\"></head>\n<body>\n<p id=\"backend\">{name}</p>\n<pre id=\"script-cookies\"></pre>\n<pre id=\"request\">{}</pre>\n<script>document.getElementById(\"script-cookies\").textContent = \"document.cookie: \" + document.cookie;</script>\n</body></html>\n",
        html_escape(request)
    )
}

/// The page of `/go?to=URL`: its script sends the browser to URL. Only URLs of plain
/// characters are taken (they go into a script unescaped); anything else is None (400).
fn go(query: &str) -> Option<String> {
    let to = query.strip_prefix("to=")?;
    let plain = |c: char| c.is_ascii_alphanumeric() || ":/.-_?=&%".contains(c);
    if !(to.starts_with("http://") || to.starts_with("https://")) || !to.chars().all(plain) {
        return None;
    }
    Some(format!(
        "<!doctype html>\n<html><head><link rel=\"icon\" href=\"data:,\"></head><body><script>location.href = \"{to}\";</script></body></html>\n"
    ))
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One answer as a client saw it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The backend that answered (`x-backend`), or "" for the balancer's own responses.
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The address the backend saw the request come from (`x-peer`: the balancer that
    /// proxied it), or "" for the balancer's own responses.
    pub fn peer(&self) -> &str {
        self.headers
            .get("x-peer")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The `Set-Cookie` lines of the response.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }

    /// The value `Set-Cookie` gives cookie `name`, if the response sets it.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.set_cookies().iter().find_map(|line| {
            let pair = line.split(';').next()?.trim();
            let (n, v) = pair.split_once('=')?;
            (n == name).then(|| v.to_string())
        })
    }

    /// The request header `name` as the backend received it (from the body's echo), if sent.
    pub fn received(&self, name: &str) -> Option<String> {
        self.body.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(": ")?;
            (n == name).then(|| v.to_string())
        })
    }
}

/// The two ways a [`WebClient`] talks.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One client connection, from `source` in a namespace to the VIP, that sends requests one
/// after another on it (HTTP/1.1 keep-alive, or HTTP/2 with prior knowledge), as a browser's
/// connection does. Its runtime is its own.
pub struct WebClient {
    runtime: tokio::runtime::Runtime,
    sender: Sender,
    authority: String,
}

impl WebClient {
    /// Connects from `source` (inside `ns`) to `target`.
    pub fn connect(
        ns: &str,
        source: std::net::IpAddr,
        target: SocketAddr,
        http2: bool,
    ) -> anyhow::Result<WebClient> {
        let stream = crate::netns::in_netns(ns, || {
            crate::socket::connect_from(source, target, Duration::from_secs(3))
        })
        .with_context(|| format!("connecting from {source} to {target}"))?;
        stream.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sender = runtime.block_on(async {
            let io = TokioIo::new(tokio::net::TcpStream::from_std(stream)?);
            anyhow::Ok(if http2 {
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                Sender::Http2(sender)
            } else {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                Sender::Http1(sender)
            })
        })?;
        Ok(WebClient {
            runtime,
            sender,
            authority: target.to_string(),
        })
    }

    /// Sends `GET path` with `headers` and reads the whole answer (at most 5 s).
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
        let mut request = Request::builder().method("GET");
        request = match self.sender {
            Sender::Http1(_) => request.uri(path).header(header::HOST, &self.authority),
            Sender::Http2(_) => request.uri(format!("http://{}{path}", self.authority)),
        };
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::new()))?;
        let sender = &mut self.sender;
        self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let response = match sender {
                    Sender::Http1(s) => {
                        s.ready().await?;
                        s.send_request(request).await?
                    }
                    Sender::Http2(s) => {
                        s.ready().await?;
                        s.send_request(request).await?
                    }
                };
                let (parts, body) = response.into_parts();
                let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
                anyhow::Ok(Reply {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            })
            .await
            .context("no answer within 5 s")?
        })
    }
}

/// The port the [`WebBackend`]s of [`start_backends`] listen on (the service's is 80: a
/// `mode: http` backend has its own port, as with NAT).
pub const BACKEND_PORT: u16 = 8080;
/// Where the balancer of [`http_config`] serves its metrics, inside the balancer namespace.
pub const METRICS: &str = "127.0.0.1:9180";

/// A [`WebBackend`] named `bK` on every backend of the rig, on [`BACKEND_PORT`].
pub fn start_backends(s: &crate::scenario::Setup) -> Vec<WebBackend> {
    (1..=s.rig.backend_count())
        .map(|k| {
            WebBackend::start(
                s.rig.backend_ns(k),
                SocketAddr::new(s.backend_addr(k), BACKEND_PORT),
                &format!("b{k}"),
            )
            .expect("web backend")
        })
        .collect()
}

/// A cookie key file in `dir` holding `keys` (id, 64 hex digits), the first sealing.
pub fn write_keys(dir: &std::path::Path, file: &str, keys: &[(u8, &str)]) -> std::path::PathBuf {
    let mut text = String::from("keys:\n");
    for (id, secret) in keys {
        text += &format!("  - id: {id}\n    secret: {secret}\n");
    }
    let path = dir.join(file);
    std::fs::write(&path, text).expect("writing the key file");
    path
}

/// 64 hex digits made of `byte`: a key for tests.
pub fn test_secret(byte: u8) -> String {
    format!("{byte:02x}").repeat(32)
}

/// A config with one `mode: http` service `web` on VIP:80 with `service` lines added (at
/// service indentation), every rig backend on [`BACKEND_PORT`] with health checks every
/// 200 ms, `top` lines added at the top, and metrics on [`METRICS`].
pub fn http_config(s: &crate::scenario::Setup, top: &str, service: &str) -> String {
    http_config_on(s, 80, top, service)
}

/// [`http_config`] with the service on VIP:`port` (443 for HTTPS).
pub fn http_config_on(s: &crate::scenario::Setup, port: u16, top: &str, service: &str) -> String {
    let mut yaml = format!(
        "interface: {}\nxdp_mode: {}\nsweep_interval: 500ms\nmetrics:\n  listen: {METRICS}\n{top}services:\n  - name: web\n    mode: http\n    vip: {}\n    port: {port}\n    health_check:\n      interval: 200ms\n      timeout: 150ms\n{service}    backends:\n",
        s.rig.lb_dev(),
        s.mode.yaml(),
        s.rig.vip_in(s.family)
    );
    for k in 1..=s.rig.backend_count() {
        yaml += &format!(
            "      - name: b{k}\n        address: {}\n        port: {BACKEND_PORT}\n",
            s.backend_addr(k)
        );
    }
    yaml
}

/// Runs `curl -s -i ARGS` in the client namespace from `source`; the output (headers and body).
pub fn curl(s: &crate::scenario::Setup, source: std::net::IpAddr, args: &[&str]) -> String {
    curl_in(s.rig.client_ns(), source, args)
}

/// Runs `curl -s -i ARGS` in namespace `ns` from `source`; the output (headers and body).
pub fn curl_in(ns: &str, source: std::net::IpAddr, args: &[&str]) -> String {
    let source = source.to_string();
    let mut all = vec![
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-i",
        "--max-time",
        "5",
        "--interface",
        &source,
    ];
    all.extend_from_slice(args);
    let out = std::process::Command::new("ip")
        .args(&all)
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The backend named by `x-backend` in curl's `-i` output.
pub fn curl_backend(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("x-backend")
            .then(|| value.trim().to_string())
    })
}

/// The value of a sample of the balancer's metrics (`name{labels}` exactly as printed), 0 if
/// absent.
pub fn metric(s: &crate::scenario::Setup, sample: &str) -> f64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            s.rig.lb_ns(),
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://{METRICS}/metrics"),
        ])
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
