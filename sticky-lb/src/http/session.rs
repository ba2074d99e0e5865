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

use super::{
    Frontend,
    cookie::{self, Limits, Session},
    route::Backend,
    stats::ServiceStats,
};
use crate::config::{CookieConfig, OnFailure};
use http::{HeaderMap, HeaderValue};
use std::net::IpAddr;

/// Where a request goes and what its response adds.
pub(super) struct Placement<'r> {
    pub backend: &'r Backend,
    /// A `Set-Cookie` for the response: a new session, a re-placed one, or a refreshed
    /// last-seen time.
    pub set_cookie: Option<HeaderValue>,
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
pub(super) fn place<'r>(
    fe: &'r Frontend,
    headers: &HeaderMap,
    client: IpAddr,
    now: u64,
    avoid: Option<&str>,
) -> Result<Placement<'r>, Refusal> {
    match (&fe.route.config.stick.cookie, &fe.keys) {
        (Some(cfg), Some(keys)) => by_cookie(fe, cfg, keys, headers, client, now, avoid),
        _ => {
            let backend = fe.route.pick(client, avoid).ok_or(Refusal::NoBackend {
                retry_after: fe.route.retry_after(None),
            })?;
            Ok(Placement {
                backend,
                set_cookie: None,
            })
        }
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
                    backend: b,
                    set_cookie,
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
        backend,
        set_cookie: issue(fe, cfg, keys, &session),
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
            tracing::warn!("{}: no cookie for {}: {e}", session.service, session.backend);
            None
        }
    }
}
