//! Table requests on a `stick.token` service (`table show/get/delete/flush` naming one): they
//! go to the token store in Redis instead of the pinned stick table. The store's calls are
//! async and bounded ([`crate::http::token::OPERATOR_TIMEOUT`] per command), and each answers
//! from a task of its own, so the main loop never waits for Redis.

use super::Controller;
use crate::{
    control::Reply,
    http::token::{TokenEntry, TokenStore},
    shared,
    view::{TokenRow, token_table},
};
use std::{collections::BTreeMap, future::Future, net::SocketAddr};
use tokio::sync::oneshot;
use tracing::info;

/// What a token request works on: the store and the service's backends by name (for the
/// addresses in listings).
pub(super) struct TokenService {
    pub name: String,
    pub store: TokenStore,
    pub backends: BTreeMap<String, SocketAddr>,
}

/// What the main loop knows of a service a token request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Not a service here.
    Unknown,
    /// Placed by the XDP stick table (`mode: tcp`).
    StickTable,
    /// `mode: http` with sealed cookies: nothing is stored.
    Cookies,
    /// `mode: http` without persistence.
    NoSessions,
    /// `mode: http` with `stick.token`.
    Tokens,
}

/// The one-line refusal of a token request on a service of `kind`, or `None` if it has
/// tokens.
pub(super) fn refusal(service: &str, kind: Kind) -> Option<String> {
    match kind {
        Kind::Tokens => None,
        Kind::Unknown => Some(format!("no service '{service}'")),
        Kind::StickTable => Some(format!(
            "service {service} keeps its clients in the stick table, not tokens (give a client address)"
        )),
        Kind::Cookies => Some(format!(
            "service {service} has no tokens: its sessions are sealed cookies the balancer does not store (rotate cookie_keys to end them)"
        )),
        Kind::NoSessions => Some(format!(
            "service {service} has no tokens: it has no stick.token (nor stick.cookie)"
        )),
    }
}

/// A token entry as the operator sees it; `now_ms` is this node's wall clock (Unix ms).
pub(super) fn row(
    service: &str,
    entry: TokenEntry,
    backends: &BTreeMap<String, SocketAddr>,
    now_ms: u64,
) -> TokenRow {
    TokenRow {
        service: service.to_string(),
        backend_address: backends.get(&entry.backend).copied(),
        age_ms: (entry.created_ms > 0).then(|| now_ms.saturating_sub(entry.created_ms)),
        ttl_ms: entry.ttl_ms,
        node: entry.node,
        backend: entry.backend,
        token: entry.token,
    }
}

/// "1 token", "3 tokens".
fn tokens(n: usize) -> String {
    format!("{n} token{}", if n == 1 { "" } else { "s" })
}

impl Controller {
    /// How service `name` keeps sessions.
    pub(super) fn session_kind(&self, name: &str) -> Kind {
        let Some(s) = self.services.iter().find(|s| s.name() == name) else {
            return Kind::Unknown;
        };
        let stick = &s.config.stick;
        match (s.proxied(), &stick.token, &stick.cookie) {
            (false, _, _) => Kind::StickTable,
            (true, Some(_), _) => Kind::Tokens,
            (true, None, Some(_)) => Kind::Cookies,
            (true, None, None) => Kind::NoSessions,
        }
    }

    /// The token store and backends of token service `name`, or the error reply.
    pub(super) fn token_service(&self, name: &str) -> Result<TokenService, Reply> {
        if let Some(refused) = refusal(name, self.session_kind(name)) {
            return Err(Reply::error(refused));
        }
        let Some(store) = self.http.token_store(name) else {
            return Err(Reply::error(format!(
                "service {name}: its token store is not running"
            )));
        };
        let backends = self
            .services
            .iter()
            .filter(|s| s.name() == name)
            .flat_map(|s| &s.backends)
            .map(|b| (b.name.clone(), SocketAddr::new(b.address, b.port)))
            .collect();
        Ok(TokenService {
            name: name.to_string(),
            store,
            backends,
        })
    }

    /// The token services of the running config (for a flush of everything).
    pub(super) fn token_services(&self) -> Vec<TokenService> {
        self.services
            .iter()
            .filter(|s| self.session_kind(s.name()) == Kind::Tokens)
            .filter_map(|s| self.token_service(s.name()).ok())
            .collect()
    }

    /// `table show --service S` on a token service: its tokens in the store.
    pub(super) fn token_list(&self, service: &str, limit: usize, reply: oneshot::Sender<Reply>) {
        let svc = match self.token_service(service) {
            Ok(svc) => svc,
            Err(refused) => return answer(reply, refused),
        };
        let limit = limit.clamp(1, crate::control::TOKEN_LIST_LIMIT);
        spawn_answer(reply, async move {
            let entries = svc.store.list(&svc.name, limit).await?;
            let now = shared::unix_ms();
            let rows: Vec<TokenRow> = entries
                .into_iter()
                .map(|e| row(&svc.name, e, &svc.backends, now))
                .collect();
            let mut message = token_table(&rows);
            if rows.len() >= limit {
                message += &format!(" (the first {limit}; there may be more)");
            }
            Ok(Reply::with_data(message, serde_json::to_value(&rows)?))
        });
    }

    /// `table get TOKEN --service S`.
    pub(super) fn token_get(&self, service: &str, token: String, reply: oneshot::Sender<Reply>) {
        let svc = match self.token_service(service) {
            Ok(svc) => svc,
            Err(refused) => return answer(reply, refused),
        };
        spawn_answer(reply, async move {
            let entry = svc.store.get(&svc.name, &token).await?;
            let rows: Vec<TokenRow> = entry
                .into_iter()
                .map(|e| row(&svc.name, e, &svc.backends, shared::unix_ms()))
                .collect();
            let message = match rows.first() {
                None => format!("{token}: no such token in {}", svc.name),
                Some(r) => format!(
                    "{} {} -> {} (ttl {} ms, placed by {})",
                    r.service,
                    r.token,
                    r.backend,
                    r.ttl_ms.map_or_else(|| "none".into(), |ms| ms.to_string()),
                    if r.node.is_empty() { "-" } else { &r.node }
                ),
            };
            Ok(Reply::with_data(message, serde_json::to_value(&rows)?))
        });
    }

    /// `table delete TOKEN --service S`: on every node (the store is shared; other nodes'
    /// caches may use it for a moment more).
    pub(super) fn token_delete(&self, service: &str, token: String, reply: oneshot::Sender<Reply>) {
        let svc = match self.token_service(service) {
            Ok(svc) => svc,
            Err(refused) => return answer(reply, refused),
        };
        spawn_answer(reply, async move {
            let deleted = usize::from(svc.store.delete(&svc.name, &token).await?);
            let message = format!("{} deleted", tokens(deleted));
            info!("operator: table delete {} {token}: {message}", svc.name);
            Ok(Reply::with_data(
                message,
                serde_json::json!({ "deleted": deleted }),
            ))
        });
    }

    /// `table flush --service S [--backend B]`: every token of S, or those on B (their next
    /// requests are placed anew).
    pub(super) fn token_flush(
        &self,
        service: &str,
        backend: Option<String>,
        reply: oneshot::Sender<Reply>,
    ) {
        let svc = match self.token_service(service) {
            Ok(svc) => svc,
            Err(refused) => return answer(reply, refused),
        };
        spawn_answer(reply, async move {
            let deleted = match &backend {
                Some(b) => svc.store.flush_backend(&svc.name, b).await?,
                None => svc.store.flush(&svc.name).await?,
            };
            let message = match &backend {
                Some(b) => format!("{} of {}/{b} deleted", tokens(deleted), svc.name),
                None => format!("{} of {} deleted", tokens(deleted), svc.name),
            };
            info!("operator: table flush: {message}");
            Ok(Reply::with_data(
                message,
                serde_json::json!({ "deleted": deleted }),
            ))
        });
    }
}

/// Flushes every token of `services` (a `table flush` of everything); the tokens deleted.
pub(super) async fn flush_all(services: Vec<TokenService>) -> anyhow::Result<usize> {
    let mut deleted = 0;
    for svc in services {
        deleted += svc.store.flush(&svc.name).await?;
    }
    Ok(deleted)
}

fn answer(reply: oneshot::Sender<Reply>, answer: Reply) {
    let _ = reply.send(answer);
}

/// Runs `work` on its own task and sends its result (an error as a one-line error reply).
fn spawn_answer(
    reply: oneshot::Sender<Reply>,
    work: impl Future<Output = anyhow::Result<Reply>> + Send + 'static,
) {
    tokio::spawn(async move {
        let answer = work
            .await
            .unwrap_or_else(|e| Reply::error(format!("the token store: {e:#}")));
        let _ = reply.send(answer);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_the_backend_address_age_and_ttl() {
        let backends = BTreeMap::from([("b1".to_string(), "198.18.0.11:8080".parse().unwrap())]);
        let entry = |backend: &str, created_ms, ttl_ms| TokenEntry {
            token: "t".into(),
            backend: backend.into(),
            created_ms,
            node: "lb1".into(),
            ttl_ms,
        };
        let r = row("web", entry("b1", 1_000, Some(5_000)), &backends, 3_500);
        assert_eq!(r.backend_address, Some("198.18.0.11:8080".parse().unwrap()));
        assert_eq!((r.age_ms, r.ttl_ms), (Some(2_500), Some(5_000)));
        // A backend the service no longer has, a value written by hand, a clock behind.
        let r = row("web", entry("gone", 0, None), &backends, 3_500);
        assert_eq!((r.backend_address, r.age_ms, r.ttl_ms), (None, None, None));
        assert_eq!(
            row("web", entry("b1", 9_000, None), &backends, 3_500).age_ms,
            Some(0)
        );
    }

    #[test]
    fn only_token_services_take_token_requests() {
        assert_eq!(refusal("web", Kind::Tokens), None);
        for (kind, words) in [
            (Kind::Unknown, "no service 'web'"),
            (Kind::StickTable, "stick table"),
            (Kind::Cookies, "sealed cookies"),
            (Kind::NoSessions, "no stick.token"),
        ] {
            let text = refusal("web", kind).unwrap();
            assert!(text.contains(words), "{kind:?}: {text}");
            assert!(!text.contains('\n'));
        }
    }
}
