//! Stick-table requests (`table get/set/delete/flush`): they read and write the pinned stick
//! table directly, since it is the data path's own state rather than part of a plan. A flush
//! walks the whole table on a blocking thread, so health events never wait behind it. A
//! `mode: http` service has no stick entries: its tokens are `tokens`' business.

use super::{
    Controller,
    model::{ServiceSlot, state_name},
};
use crate::config::StickMode;
use crate::{
    control::Reply,
    dataplane::{PinnedMaps, monotonic_ns},
};
use std::net::IpAddr;
use sticky_lb_common::{ServiceId, StickEntry, StickKey, addr};
use tokio::sync::oneshot;
use tracing::info;

impl Controller {
    /// The stick keys of `client` in service `service`, or in every service of the client's
    /// family when `service` is `None` (an IPv6 client has no entry in an IPv4 service). A named
    /// service that does not exist, or is of the other family, is the error reply.
    fn stick_keys(
        &self,
        client: IpAddr,
        service: Option<&str>,
    ) -> Result<Vec<(&ServiceSlot, StickKey)>, Reply> {
        let Some(name) = service else {
            return Ok(self
                .services
                .iter()
                .filter(|s| !s.proxied())
                .filter_map(|s| Some((s, s.stick_key(client).ok()?)))
                .collect());
        };
        let Some(s) = self.services.iter().find(|s| s.name() == name) else {
            return Err(Reply::error(format!("no service '{name}'")));
        };
        if s.proxied() {
            return Err(Reply::error(format!(
                "service {name} is mode: http: no stick entries by client address (a token service's tokens: `table get TOKEN --service {name}`)"
            )));
        }
        let key = s.stick_key(client).map_err(Reply::error)?;
        Ok(vec![(s, key)])
    }

    pub(super) fn table_get(&self, client: IpAddr, service: Option<&str>) -> anyhow::Result<Reply> {
        let keys = match self.stick_keys(client, service) {
            Ok(keys) => keys,
            Err(reply) => return Ok(reply),
        };
        let maps = PinnedMaps::open(&self.pins)?;
        let now = monotonic_ns();
        let mut rows = Vec::new();
        for (s, key) in keys {
            if let Ok(entry) = maps.stick.get(&key, 0) {
                let backend = s.backends.iter().find(|b| b.id == entry.backend);
                rows.push(serde_json::json!({
                    "service": s.name(),
                    "client": s.client_prefix(&key),
                    "backend": backend.map(|b| b.name.clone()).unwrap_or_else(|| format!("#{}", entry.backend)),
                    "backend_address": backend.map(|b| b.address.to_string()),
                    "idle_ms": now.saturating_sub(entry.last_seen_ns) / 1_000_000,
                    "age_ms": now.saturating_sub(entry.created_ns) / 1_000_000,
                }));
            }
        }
        let message = if rows.is_empty() {
            format!("{client}: no stick entry")
        } else {
            rows.iter()
                .map(|r| {
                    format!(
                        "{} {} -> {} (idle {} ms)",
                        r["service"].as_str().unwrap_or(""),
                        r["client"].as_str().unwrap_or(""),
                        r["backend"].as_str().unwrap_or(""),
                        r["idle_ms"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        Ok(Reply::with_data(message, serde_json::Value::Array(rows)))
    }

    pub(super) fn table_set(
        &mut self,
        client: IpAddr,
        service: &str,
        backend: &str,
    ) -> anyhow::Result<Reply> {
        let (i, j) = match self.find_named(service, backend) {
            Ok(found) => found,
            Err(reply) => return Ok(reply),
        };
        let s = &self.services[i];
        let b = &s.backends[j];
        if s.proxied() {
            return Ok(Reply::error(format!(
                "service {service} is mode: http: its requests are placed by their cookie or token, not by client address"
            )));
        }
        let key = match s.stick_key(client) {
            Ok(key) => key,
            Err(message) => return Ok(Reply::error(message)),
        };
        if s.config.stick.mode == StickMode::None {
            return Ok(Reply::error(format!(
                "service {service} has stick mode none: it keeps no entries"
            )));
        }
        if !b.state.keeps_stuck_clients() {
            return Ok(Reply::error(format!(
                "{service}/{backend} is {}: it would not keep the client",
                state_name(b.state)
            )));
        }
        let mut maps = PinnedMaps::open(&self.pins)?;
        let now = monotonic_ns();
        let entry = StickEntry::placed(b.id, now);
        maps.stick.insert(&key, &entry, 0)?;
        // The entry is the client's prefix: every address in it now goes there.
        let message = format!("{service} {} -> {backend}", s.client_prefix(&key));
        info!("operator: table set {message}");
        let masked = addr::from_words(s.family(), key.client);
        self.share_set(service, masked, backend, &entry);
        Ok(Reply::ok(message))
    }

    /// Deletes one client's entries (of one service or all): its next connection is placed
    /// anew. The keys are computed, so nothing walks the table.
    pub(super) fn table_delete(&mut self, client: IpAddr, service: Option<&str>) -> Reply {
        let keys = match self.stick_keys(client, service) {
            Ok(keys) => keys,
            Err(reply) => return reply,
        };
        let mut maps = match PinnedMaps::open(&self.pins) {
            Ok(maps) => maps,
            Err(e) => return Reply::error(format!("{e:#}")),
        };
        let deleted = keys
            .iter()
            .filter(|(_, key)| maps.stick.remove(key).is_ok())
            .count();
        // Every node forgets the client, whether this one had an entry or not.
        for (s, key) in &keys {
            self.share_delete(s.name(), addr::from_words(s.family(), key.client));
        }
        let message = format!(
            "{deleted} stick entr{} deleted",
            if deleted == 1 { "y" } else { "ies" }
        );
        info!("operator: table delete {client}: {message}");
        Reply::with_data(message, serde_json::json!({ "deleted": deleted }))
    }

    /// Deletes every entry (of one service or all) on a blocking thread: a million-entry table
    /// takes a while, and health events must not wait behind it. A named `mode: http` service
    /// is its tokens' flush; without a name, every token service's tokens go too.
    pub(super) fn table_flush(&self, service: Option<&str>, reply: oneshot::Sender<Reply>) {
        if let Some(name) = service {
            match self.services.iter().find(|s| s.name() == name) {
                None => {
                    let _ = reply.send(Reply::error(format!("no service '{name}'")));
                    return;
                }
                Some(s) if s.proxied() => return self.token_flush(name, None, reply),
                Some(_) => {}
            }
        }
        let flushed = |s: &&super::model::ServiceSlot| {
            !s.proxied() && service.is_none_or(|name| s.name() == name)
        };
        let ids: Vec<ServiceId> = self
            .services
            .iter()
            .filter(flushed)
            .map(|s| s.id())
            .collect();
        let names: Vec<String> = self
            .services
            .iter()
            .filter(flushed)
            .map(|s| s.name().to_string())
            .collect();
        let token_services = match service {
            None => self.token_services(),
            Some(_) => Vec::new(),
        };
        self.share_flush(&names);
        let pins = self.pins.clone();
        let entries = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut maps = PinnedMaps::open(&pins)?;
            let keys: Vec<StickKey> = crate::batch::lookup_all(&maps.stick, 8192)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| ids.contains(&k.service))
                .collect();
            Ok(keys.iter().filter(|k| maps.stick.remove(k).is_ok()).count() as u64)
        });
        tokio::spawn(async move {
            let has_tokens = !token_services.is_empty();
            let deleted = match entries.await {
                Ok(Ok(deleted)) => deleted,
                Ok(Err(e)) => {
                    let _ = reply.send(Reply::error(format!("{e:#}")));
                    return;
                }
                Err(e) => {
                    let _ = reply.send(Reply::error(format!("the flush did not finish: {e}")));
                    return;
                }
            };
            let mut message = format!(
                "{deleted} stick entr{} deleted",
                if deleted == 1 { "y" } else { "ies" }
            );
            let mut data = serde_json::json!({ "deleted": deleted });
            if has_tokens {
                match super::tokens::flush_all(token_services).await {
                    Ok(tokens) => {
                        message += &format!(
                            ", {tokens} token{} deleted",
                            if tokens == 1 { "" } else { "s" }
                        );
                        data["tokens_deleted"] = tokens.into();
                    }
                    Err(e) => {
                        let _ = reply.send(Reply::error(format!(
                            "{message}; the tokens were not flushed: {e:#}"
                        )));
                        return;
                    }
                }
            }
            info!("operator: table flush: {message}");
            let _ = reply.send(Reply::with_data(message, data));
        });
    }
}
