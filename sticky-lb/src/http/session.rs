//! Placing one request: the backend its session names (sealed cookie or token), or a new one by
//! the service's policy, and what the response must carry so the next request follows.
//!
//! The rules (HAProxy's `cookie insert` and `option redispatch`, nginx `sticky`):
//! - a valid session whose backend is up or draining keeps it (draining backends keep their
//!   sessions, take no new ones);
//! - its backend down or disabled: `on_failure: redispatch` places the client again and sends a
//!   new cookie (the client moves once and stays), `strict` answers 503 with `Retry-After`;
//! - an invalid cookie (tampered, foreign key, another service's, expired) counts as absent,
//!   counted by reason: the client is placed as new.
//!
//! Tokens (`stick.token`) follow the same rules with the store's answer in place of the cookie:
//! a token the store names a backend for goes there; a new or unknown one is placed by the
//! policy and claimed (the first node to claim it wins, the others follow); with the store down
//! (and the token not in this node's cache) it goes where [`Route::pick_by_token`] says, which
//! every node computes alike, so no request fails because of the store. A new token whose
//! claim finds the store gone, and an unknown one just after the store came back (see
//! [`TokenStore::settling`]), go there too: other nodes route them that way meanwhile.

use super::{
    Frontend,
    cookie::{self, Limits, Session},
    route::{Backend, Route},
    stats::ServiceStats,
    token::{self, Claim, Lookup, TokenStore},
};
use crate::config::{CookieConfig, OnFailure, TokenConfig};
use http::{HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// Where a request goes and what its response adds.
pub(super) struct Placement<'r> {
    pub backend: &'r Backend,
    /// A `Set-Cookie` for the response: a new session, a re-placed one, or a refreshed
    /// last-seen time.
    pub set_cookie: Option<HeaderValue>,
    /// A token issued in a response header (`stick.token.header`).
    pub set_header: Option<(HeaderName, HeaderValue)>,
    /// `stick.token.learn_from_response_cookie`: the application's session cookie, whose value
    /// in this response (if it sets one) becomes a token naming this backend.
    pub learn: Option<&'r str>,
}

impl<'r> Placement<'r> {
    fn to(backend: &'r Backend) -> Placement<'r> {
        Placement {
            backend,
            set_cookie: None,
            set_header: None,
            learn: None,
        }
    }
}

/// Why a request gets a 503 rather than a backend.
#[derive(Debug, PartialEq)]
pub(super) enum Refusal {
    /// No backend takes new clients.
    NoBackend { retry_after: u64 },
    /// `on_failure: strict`: the session's backend is down or disabled.
    Strict { retry_after: u64 },
}

/// Places a request with headers `headers` from `client`; `avoid` names a backend that just
/// failed this very request (its connection was refused), which the session leaves.
pub(super) async fn place<'r>(
    fe: &'r Frontend,
    headers: &HeaderMap,
    client: IpAddr,
    now: u64,
    avoid: Option<&str>,
) -> Result<Placement<'r>, Refusal> {
    let stick = &fe.route.config.stick;
    match (&stick.cookie, &fe.keys, &stick.token, &fe.tokens) {
        (Some(cfg), Some(keys), _, _) => by_cookie(fe, cfg, keys, headers, client, now, avoid),
        (_, _, Some(cfg), Some(store)) => {
            let mut placement = by_token(fe, cfg, store, headers, client, avoid).await?;
            // A session cookie the application sets (a login, a new session) is learned
            // whenever it appears, not only on a request without one.
            placement.learn = cfg.learn_from_response_cookie.as_deref();
            Ok(placement)
        }
        _ => pick(&fe.route, client, avoid).map(Placement::to),
    }
}

/// The policy's pick, or the 503 for no backend.
fn pick<'r>(route: &'r Route, client: IpAddr, avoid: Option<&str>) -> Result<&'r Backend, Refusal> {
    route.pick(client, avoid).ok_or(Refusal::NoBackend {
        retry_after: route.retry_after(None),
    })
}

/// The token a request presents: its cookie or header of the configured name (the learned
/// application cookie included), if it is one a key may hold.
fn presented(cfg: &TokenConfig, headers: &HeaderMap) -> Option<String> {
    match (&cfg.cookie, &cfg.header, &cfg.learn_from_response_cookie) {
        (Some(name), _, _) | (_, _, Some(name)) => cookie::request_values(headers, name)
            .find(|v| token::acceptable(v))
            .map(str::to_string),
        (_, Some(name), _) => headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|v| token::acceptable(v))
            .map(str::to_string),
        _ => None,
    }
}

async fn by_token<'r>(
    fe: &'r Frontend,
    cfg: &'r TokenConfig,
    store: &TokenStore,
    headers: &HeaderMap,
    client: IpAddr,
    avoid: Option<&str>,
) -> Result<Placement<'r>, Refusal> {
    let route = &fe.route;
    let stats = &fe.stats;
    let service = route.name();
    let ttl = route.config.stick.timeout;
    let Some(token) = presented(cfg, headers) else {
        if cfg.learn_from_response_cookie.is_some() {
            // No session yet: the policy places the request, and the application's cookie in
            // the response (if it starts a session) becomes the token.
            ServiceStats::count(&stats.sessions_new);
            return Ok(Placement::to(pick(route, client, avoid)?));
        }
        // A new token, issued here. With the store down it goes where every node would send
        // it; the claim is kept and written once the store is back.
        let token = token::new_token();
        let backend = if store.is_up() {
            let chosen = pick(route, client, avoid)?;
            claim_new(route, store, service, &token, chosen, ttl).await?
        } else {
            let hashed = by_hash(route, store, &token)?;
            store.claim(service, &token, hashed.name(), ttl).await;
            hashed
        };
        ServiceStats::count(&stats.sessions_new);
        let mut placement = Placement::to(backend);
        issue_token(fe, cfg, &token, &mut placement);
        return Ok(placement);
    };
    match store.lookup(service, &token, ttl).await {
        Lookup::Found(name) => match route.backend(&name) {
            Some(b) if b.keeps_sessions() && Some(b.name()) != avoid => {
                ServiceStats::count(&stats.sessions_kept);
                Ok(Placement::to(b))
            }
            named => {
                if named.is_some()
                    && route.config.stick.on_failure == OnFailure::Strict
                    && avoid.is_none()
                {
                    ServiceStats::count(&stats.refused);
                    return Err(Refusal::Strict {
                        retry_after: route.retry_after(named),
                    });
                }
                if named.is_none() {
                    stats.reject("unknown_backend");
                }
                // Moved, once: the first node to move it decides where.
                let next = pick(route, client, Some(avoid.unwrap_or(&name)))?;
                let claim = store
                    .replace(service, &token, &name, next.name(), ttl)
                    .await;
                ServiceStats::count(&stats.redispatched);
                Ok(Placement::to(follow(route, &claim, next)))
            }
        },
        Lookup::Absent => {
            // Just after the store came back, an unknown token may be another node's
            // placement made while it was away (by the hash) and not written back yet.
            let chosen = if store.settling() {
                by_hash(route, store, &token)?
            } else {
                pick(route, client, avoid)?
            };
            let backend = claim_new(route, store, service, &token, chosen, ttl).await?;
            ServiceStats::count(&stats.sessions_new);
            Ok(Placement::to(backend))
        }
        Lookup::StoreDown => by_hash(route, store, &token).map(Placement::to),
    }
}

/// Claims unplaced `token` on `chosen` (the policy's pick, made while the store was up); the
/// backend it goes to. If the store fails during this very claim, no other node can learn of
/// the token until it is back, and each of them routes it by the fallback hash meanwhile: so
/// it goes there here too (its pending claim with it), rather than where the policy said.
async fn claim_new<'r>(
    route: &'r Route,
    store: &TokenStore,
    service: &str,
    token: &str,
    chosen: &'r Backend,
    ttl: std::time::Duration,
) -> Result<&'r Backend, Refusal> {
    let claim = store.claim(service, token, chosen.name(), ttl).await;
    if claim != Claim::StoreDown {
        return Ok(follow(route, &claim, chosen));
    }
    let hashed = by_hash(route, store, token)?;
    if hashed.name() == chosen.name() {
        return Ok(hashed);
    }
    // With the store down this only replaces the pending claim and the cache entry.
    let again = store.claim(service, token, hashed.name(), ttl).await;
    Ok(follow(route, &again, hashed))
}

/// Where `token` goes while the store is down ([`Route::pick_by_token`], the same on every
/// node), counted in `token_fallback_routings`.
fn by_hash<'r>(route: &'r Route, store: &TokenStore, token: &str) -> Result<&'r Backend, Refusal> {
    let backend = route
        .pick_by_token(token)
        .ok_or(Refusal::NoBackend { retry_after: 1 })?;
    store
        .stats()
        .fallback_routings
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(backend)
}

/// The backend a claim leaves the token on: the winner's if it is here and takes its
/// sessions, else ours (a winner this node cannot use is no better than none).
fn follow<'r>(route: &'r Route, claim: &Claim, chosen: &'r Backend) -> &'r Backend {
    match claim {
        Claim::Lost(winner) => route
            .backend(winner)
            .filter(|b| b.keeps_sessions())
            .unwrap_or(chosen),
        Claim::Won | Claim::StoreDown => chosen,
    }
}

/// Sends a token issued here: in its cookie (path `/`, HttpOnly, SameSite=Lax, a session
/// cookie: the store's TTL decides how long it names a backend) or its response header.
fn issue_token(fe: &Frontend, cfg: &TokenConfig, token: &str, placement: &mut Placement<'_>) {
    ServiceStats::count(&fe.stats.cookies_issued);
    if let Some(name) = &cfg.cookie
        && let Ok(v) =
            HeaderValue::from_str(&format!("{name}={token}; Path=/; HttpOnly; SameSite=Lax"))
    {
        placement.set_cookie = Some(v);
    } else if let Some(name) = &cfg.header
        && let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(token),
        )
    {
        placement.set_header = Some((n, v));
    }
}

fn by_cookie<'r>(
    fe: &'r Frontend,
    cfg: &CookieConfig,
    keys: &super::keys::Keyring,
    headers: &HeaderMap,
    client: IpAddr,
    now: u64,
    avoid: Option<&str>,
) -> Result<Placement<'r>, Refusal> {
    let route = &fe.route;
    let stats = &fe.stats;
    let limits = Limits {
        max_idle: cfg.max_idle,
        max_life: cfg.max_life,
    };
    let mut session = None;
    let mut old_key = false;
    for value in cookie::request_values(headers, &cfg.name) {
        match cookie::open(keys, value, route.name(), now, limits) {
            Ok(s) => {
                // Sealed with a key that is no longer the first: sealed again with the first,
                // so active clients are off the old key before it is removed.
                old_key = !cookie::sealed_with_primary(keys, value);
                session = Some(s);
                break;
            }
            Err(reason) => stats.reject(reason.reason()),
        }
    }
    let mut leaving = avoid.map(str::to_string);
    if let Some(session) = session {
        match route.backend(&session.backend) {
            None => stats.reject("unknown_backend"),
            Some(b) if b.keeps_sessions() && Some(b.name()) != avoid => {
                ServiceStats::count(&stats.sessions_kept);
                let set_cookie = if cookie::refresh_due(&session, now, cfg) || old_key {
                    issue(
                        fe,
                        cfg,
                        keys,
                        &Session {
                            last_seen: now,
                            ..session
                        },
                    )
                } else {
                    None
                };
                return Ok(Placement {
                    set_cookie,
                    ..Placement::to(b)
                });
            }
            Some(b) => {
                if route.config.stick.on_failure == OnFailure::Strict && avoid.is_none() {
                    ServiceStats::count(&stats.refused);
                    return Err(Refusal::Strict {
                        retry_after: route.retry_after(Some(b)),
                    });
                }
                ServiceStats::count(&stats.redispatched);
                leaving = Some(b.name().to_string());
            }
        }
    }
    let backend = route
        .pick(client, leaving.as_deref())
        .ok_or(Refusal::NoBackend {
            retry_after: route.retry_after(None),
        })?;
    ServiceStats::count(&stats.sessions_new);
    let session = Session {
        service: route.name().to_string(),
        backend: backend.name().to_string(),
        issued: now,
        last_seen: now,
    };
    Ok(Placement {
        set_cookie: issue(fe, cfg, keys, &session),
        ..Placement::to(backend)
    })
}

/// The `Set-Cookie` for `session`; `None` (the request is served without one) only for a
/// name too long to seal (over 255 bytes: a backend added at run time).
fn issue(
    fe: &Frontend,
    cfg: &CookieConfig,
    keys: &super::keys::Keyring,
    session: &Session,
) -> Option<HeaderValue> {
    match cookie::seal(keys, session) {
        Ok(value) => {
            ServiceStats::count(&fe.stats.cookies_issued);
            Some(cookie::set_cookie(cfg, &value))
        }
        Err(e) => {
            tracing::warn!(
                "{}: no cookie for {}: {e}",
                session.service,
                session.backend
            );
            None
        }
    }
}
