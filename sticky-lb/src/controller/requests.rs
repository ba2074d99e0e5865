//! Operator requests from the control socket. Backend changes become run-time changes of the
//! desired state and take the one reconcile path; stick-table requests are in `table`.

use super::{
    Controller,
    desired::{Desired, WantedBackend},
    first_look::{FirstLook, first_look},
    model::{Admin, state_name},
    reload::ReloadDone,
};
use crate::{
    config::BackendRemoval,
    control::{BackendAction, Reply, Request},
    dataplane::PinnedMaps,
    state::AddedBackend,
};
use std::net::IpAddr;
use tracing::info;

use tokio::sync::oneshot;

/// A request whose answer needs a wait off the main loop; it comes back here when ready.
pub(super) enum Pending {
    /// `backend add`, with the backend's MAC and the verdict of its first check.
    BackendAdd {
        service: String,
        backend: String,
        added: AddedBackend,
        look: FirstLook,
        reply: oneshot::Sender<Reply>,
    },
    /// A reload, with a first look at each backend it adds.
    Reload {
        desired: Box<Desired>,
        looks: Vec<FirstLook>,
        /// Reloads are numbered as they start: one that finishes after a later one is refused.
        generation: u64,
        reply: Option<oneshot::Sender<Reply>>,
    },
}

impl Controller {
    /// Answers an operator request (`reload` and `detach` are the main loop's). Requests that
    /// wait (the first check of an added backend, a flush walking the whole table) answer from
    /// their own task.
    pub(super) fn handle(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        let answer = match request {
            Request::Backend {
                service,
                backend,
                action,
            } => self.backend_action(&service, &backend, action),
            Request::BackendAdd {
                service,
                backend,
                address,
                weight,
                mac,
                port,
            } => match self.begin_add(&service, &backend, address, weight, mac, port) {
                Ok(pending) => {
                    self.check_before_adding(pending, reply);
                    return;
                }
                Err(reply) => reply,
            },
            Request::BackendRemove { service, backend } => self.remove_backend(&service, &backend),
            Request::AllNodes { request } => {
                self.all_nodes(*request, reply);
                return;
            }
            Request::TableGet { client, service } => self
                .table_get(client, service.as_deref())
                .unwrap_or_else(|e| Reply::error(format!("{e:#}"))),
            Request::TableSet {
                client,
                service,
                backend,
            } => self
                .table_set(client, &service, &backend)
                .unwrap_or_else(|e| Reply::error(format!("{e:#}"))),
            Request::TableDelete { client, service } => {
                self.table_delete(client, service.as_deref())
            }
            Request::TableFlush { service } => {
                self.table_flush(service.as_deref(), reply);
                return;
            }
            Request::TokenList { service, limit } => {
                self.token_list(&service, limit, reply);
                return;
            }
            Request::TokenGet { service, token } => {
                self.token_get(&service, token, reply);
                return;
            }
            Request::TokenDelete { service, token } => {
                self.token_delete(&service, token, reply);
                return;
            }
            Request::TokenFlush { service, backend } => {
                self.token_flush(&service, backend, reply);
                return;
            }
            Request::Stats => self
                .stats()
                .unwrap_or_else(|e| Reply::error(format!("{e:#}"))),
            Request::Reload => {
                self.begin_reload(Some(reply));
                return;
            }
            Request::Detach => Reply::ok(format!("detaching from {}", self.config().interface)),
            // Answered by the main loop, which stops after it; a remote node cannot ask it.
            Request::HandOver => Reply::error("hand-over is for `run --take-over` on this host"),
        };
        let _ = reply.send(answer);
    }

    fn backend_action(&mut self, service: &str, backend: &str, action: BackendAction) -> Reply {
        let (i, j) = match self.find_named(service, backend) {
            Ok(found) => found,
            Err(reply) => return reply,
        };
        let mut desired = self.desired.clone();
        if self.services[i].backends[j].retiring {
            // `enable` takes back a `backend remove` of a backend the config lists: it stays,
            // with its id and its clients. Anything else waits for the drain to end.
            let removed_here = desired
                .changes
                .get(service)
                .and_then(|c| c.get(backend))
                .is_some_and(|c| c.removed);
            if !(removed_here && action == BackendAction::Enable) {
                return Reply::error(format!(
                    "{service}/{backend} is being removed and drains out; {}",
                    if removed_here {
                        "`backend enable` keeps it"
                    } else {
                        "it left the config: put it back and reload to keep it"
                    }
                ));
            }
            desired.change(service, backend).removed = false;
        }
        match action {
            BackendAction::Drain => desired.change(service, backend).admin = Some("drain".into()),
            BackendAction::Enable => desired.change(service, backend).admin = None,
            BackendAction::Disable => {
                desired.change(service, backend).admin = Some("disabled".into())
            }
            BackendAction::Weight(weight) => {
                if weight > 1_000_000 {
                    return Reply::error("weight must be at most 1000000");
                }
                desired.set_weight(service, backend, weight);
            }
        }
        if let Err(e) = self.reconcile(desired) {
            return Reply::error(format!("{service}/{backend}: not changed: {e}"));
        }
        let (i, j) = self.find_named(service, backend).unwrap_or((i, j));
        let b = &self.services[i].backends[j];
        let message = format!(
            "{service}/{backend}: {} (weight {})",
            state_name(b.state),
            b.weight
        );
        info!("operator: {message}");
        Reply::ok(message)
    }

    /// Checks a `backend add` before anything changes: the service exists, the name and
    /// address are new to it, the weight and MAC are valid.
    fn begin_add(
        &self,
        service: &str,
        backend: &str,
        address: IpAddr,
        weight: u32,
        mac: Option<String>,
        port: Option<u16>,
    ) -> Result<(String, String, AddedBackend), Reply> {
        self.may_add(service, backend, address)?;
        if let Some(port) = port {
            let own_port = self
                .services
                .iter()
                .find(|s| s.name() == service)
                .is_some_and(|s| {
                    s.proxied() || s.config.forwarding == crate::config::Forwarding::Nat
                });
            if !own_port || port == 0 {
                return Err(Reply::error(
                    "--port needs a service with forwarding: nat or mode: http and a port of 1 to 65535 (other modes forward the packet's port unchanged)",
                ));
            }
        }
        if backend.is_empty() || backend.contains('/') || weight > 1_000_000 {
            return Err(Reply::error(
                "a backend needs a name without '/' and a weight of at most 1000000",
            ));
        }
        if let Some(m) = &mac
            && let Err(e) = crate::config::parse_mac(m)
        {
            return Err(Reply::error(e));
        }
        Ok((
            service.to_string(),
            backend.to_string(),
            AddedBackend {
                address,
                weight,
                mac,
                port,
            },
        ))
    }

    /// Whether `service` may take backend `backend` at `address`: checked when the request
    /// arrives and again when its first look is done (another add may have come in between).
    /// The address follows the config's rules (the service's family, a usable unicast
    /// address); a name the config lists may come back only at the config's address.
    fn may_add(&self, service: &str, backend: &str, address: IpAddr) -> Result<(), Reply> {
        let Some(s) = self.services.iter().find(|s| s.name() == service) else {
            return Err(Reply::error(format!("no service '{service}'")));
        };
        crate::config::check_backend_address(s.config.vip, address).map_err(Reply::error)?;
        if let Some(existing) = s
            .backends
            .iter()
            .find(|b| b.name == backend || b.address == address)
        {
            return Err(Reply::error(format!(
                "service '{service}' already has backend '{}' ({}){}",
                existing.name,
                existing.address,
                if existing.retiring {
                    ", draining out"
                } else {
                    ""
                }
            )));
        }
        if let Some(configured) = self.desired.configured(service, backend)
            && configured.address != address
        {
            return Err(Reply::error(format!(
                "the config gives {service}/{backend} the address {}",
                configured.address
            )));
        }
        Ok(())
    }

    /// Looks at the new backend (MAC, first check) on a task; the result comes back as
    /// [`Pending::BackendAdd`], so the backend takes clients only once it is known to answer.
    fn check_before_adding(
        &self,
        (service, backend, added): (String, String, AddedBackend),
        reply: oneshot::Sender<Reply>,
    ) {
        let Some(s) = self.services.iter().find(|s| s.name() == service) else {
            let _ = reply.send(Reply::error(format!("no service '{service}'")));
            return;
        };
        let wanted = WantedBackend {
            name: backend.clone(),
            address: added.address,
            mac: added
                .mac
                .as_deref()
                .and_then(|m| crate::config::parse_mac(m).ok()),
            weight: added.weight,
            admin: Admin::Enabled,
            check: s.config.service_health_check(added.port),
            port: s.config.backend_port(added.port),
            from_api: true,
            forwarding: s.config.forwarding,
        };
        let neighbours = self.neighbours.clone();
        let pending = self.pending_tx.clone();
        tokio::spawn(async move {
            let mut looks = first_look(neighbours, vec![(service.clone(), wanted)]).await;
            let Some(look) = looks.pop() else {
                let _ = reply.send(Reply::error("looking at the new backend failed"));
                return;
            };
            let _ = pending
                .send(Pending::BackendAdd {
                    service,
                    backend,
                    added,
                    look,
                    reply,
                })
                .await;
        });
    }

    /// Completes a request that waited off the main loop. A reload comes back to the main loop
    /// to be answered once the metrics listener followed it.
    pub(super) fn finish(&mut self, pending: Pending) -> Option<ReloadDone> {
        match pending {
            Pending::Reload {
                desired,
                looks,
                generation,
                reply,
            } => {
                for look in &looks {
                    self.observed.record(look);
                }
                Some(self.finish_reload(*desired, generation, reply))
            }
            Pending::BackendAdd {
                service,
                backend,
                added,
                look,
                reply,
            } => {
                let (address, weight) = (added.address, added.weight);
                if let Err(refused) = self.may_add(&service, &backend, address) {
                    let _ = reply.send(refused);
                    return None;
                }
                self.observed.record(&look);
                let mut desired = self.desired.clone();
                let change = desired.change(&service, &backend);
                change.removed = false;
                if desired.configured(&service, &backend).is_none() {
                    desired.change(&service, &backend).added = Some(added);
                }
                let answer = match self.reconcile(desired) {
                    Ok(_) => {
                        let state = self
                            .find_named(&service, &backend)
                            .map(|(i, j)| self.services[i].backends[j].state)
                            .unwrap_or(sticky_lb_common::BackendState::Unused);
                        let message = format!(
                            "{service}/{backend} added ({address}, weight {weight}): {}{}",
                            state_name(state),
                            match (look.mac, look.healthy) {
                                (None, _) =>
                                    " (no neighbour answer yet: it takes clients once it answers)",
                                (_, Some(false)) =>
                                    " (its first check failed: it takes clients once checks pass)",
                                _ => "",
                            }
                        );
                        info!("operator: {message}");
                        Reply::ok(message)
                    }
                    Err(e) => Reply::error(format!("{service}/{backend}: not added: {e}")),
                };
                let _ = reply.send(answer);
                None
            }
        }
    }

    /// `backend remove`: drains the backend until no client is stuck to it and no connection is
    /// open on it, or takes it out at once (`backend_removal`).
    fn remove_backend(&mut self, service: &str, backend: &str) -> Reply {
        if let Err(reply) = self.find_named(service, backend) {
            return reply;
        }
        let mut desired = self.desired.clone();
        if desired.configured(service, backend).is_some() {
            let change = desired.change(service, backend);
            change.added = None;
            change.removed = true;
        } else if let Some(backends) = desired.changes.get_mut(service) {
            // Added at run time: gone with its record, so a later config backend of that
            // name is not held back by it.
            backends.remove(backend);
        }
        if let Err(e) = self.reconcile(desired) {
            return Reply::error(format!("{service}/{backend}: not removed: {e}"));
        }
        let message = match (
            self.config().backend_removal,
            self.find_named(service, backend),
        ) {
            (BackendRemoval::Drain, Ok(_)) => format!(
                "{service}/{backend} drains: removed once no client is stuck to it and no connection is open on it"
            ),
            _ => format!("{service}/{backend} removed"),
        };
        info!("operator: {message}");
        Reply::ok(message)
    }

    pub(super) fn stats(&self) -> anyhow::Result<Reply> {
        let maps = PinnedMaps::open(&self.pins)?;
        let counters = maps.counters()?;
        let mut services = Vec::new();
        for s in &self.services {
            if s.proxied() {
                services.push(self.http_stats(s));
                continue;
            }
            let c = maps.service_counters(s.id())?;
            let mut backends = Vec::new();
            for b in &s.backends {
                let bc = maps.backend_counters(b.id)?;
                backends.push(
                    serde_json::json!({"name": b.name, "packets": bc.packets, "bytes": bc.bytes}),
                );
            }
            services.push(serde_json::json!({
                "name": s.name(),
                "stick_hits": c.stick_hits,
                "stick_misses": c.stick_misses,
                "stick_inserts": c.stick_inserts,
                "redispatches": c.redispatches,
                "races_lost": c.races_lost,
                "inserts_skipped": c.inserts_skipped,
                "connections_untracked": c.flows_untracked,
                "backends": backends,
            }));
        }
        let global: serde_json::Map<String, serde_json::Value> = sticky_lb_common::Counter::ALL
            .iter()
            .map(|c| (c.name().to_string(), counters[*c as usize].into()))
            .collect();
        let mut lines = vec![
            global
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join("  "),
        ];
        for s in &services {
            if s["mode"] == "http" {
                lines.push(format!(
                    "{} (http): responses 2xx {} 3xx {} 4xx {} 5xx {}  sessions new {} kept {} redispatched {}  cookies issued {}  rejected {}  refused {}  upstream errors {} timeouts {}  upgrades {}",
                    s["name"].as_str().unwrap_or(""),
                    s["responses"]["2xx"],
                    s["responses"]["3xx"],
                    s["responses"]["4xx"],
                    s["responses"]["5xx"],
                    s["sessions_new"],
                    s["sessions_kept"],
                    s["redispatched"],
                    s["cookies_issued"],
                    s["rejected"].as_object().map_or(0, |r| r.values().filter_map(|v| v.as_u64()).sum::<u64>()),
                    s["refused"],
                    s["upstream_errors"],
                    s["upstream_timeouts"],
                    s["upgrades"],
                ));
                continue;
            }
            lines.push(format!(
                "{}: hits {} misses {} inserts {} redispatches {} races_lost {} inserts_skipped {} connections_untracked {}",
                s["name"].as_str().unwrap_or(""),
                s["stick_hits"],
                s["stick_misses"],
                s["stick_inserts"],
                s["redispatches"],
                s["races_lost"],
                s["inserts_skipped"],
                s["connections_untracked"]
            ));
        }
        let shared = self.shared.as_ref().map(|shared| {
            let stats = shared.stats();
            let counters: serde_json::Map<String, serde_json::Value> = stats
                .counters()
                .into_iter()
                .map(|(name, _, value)| {
                    (name.trim_start_matches("shared_").to_string(), value.into())
                })
                .collect();
            let connected = stats.connected.load(std::sync::atomic::Ordering::Relaxed);
            lines.push(format!(
                "shared table: node {} Redis {} {}  {}",
                shared.node(),
                shared.config().redis_for_logs(),
                if connected {
                    "connected"
                } else {
                    "unreachable"
                },
                counters
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            ));
            serde_json::json!({
                "node": shared.node(),
                "redis": shared.config().redis_for_logs(),
                "connected": connected,
                "counters": counters,
            })
        });
        Ok(Reply::with_data(
            lines.join("\n"),
            serde_json::json!({"counters": global, "services": services, "shared_table": shared}),
        ))
    }

    /// The proxy's counters of `mode: http` service `s`, for `stats`.
    fn http_stats(&self, s: &super::model::ServiceSlot) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.http.stats();
        let c = stats.service(s.name());
        let responses: serde_json::Map<String, serde_json::Value> =
            ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .iter()
                .zip(&c.responses)
                .map(|(class, n)| (class.to_string(), n.load(Relaxed).into()))
                .collect();
        let rejected: serde_json::Map<String, serde_json::Value> =
            crate::http::stats::REJECT_REASONS
                .iter()
                .zip(&c.rejected)
                .map(|(reason, n)| (reason.to_string(), n.load(Relaxed).into()))
                .collect();
        let backends: Vec<serde_json::Value> = stats
            .backends()
            .into_iter()
            .filter(|((service, _), _)| service == s.name())
            .map(|((_, name), load)| {
                serde_json::json!({
                    "name": name,
                    "requests": load.requests.load(Relaxed),
                    "open_requests": load.open.load(Relaxed),
                })
            })
            .collect();
        serde_json::json!({
            "name": s.name(),
            "mode": "http",
            "responses": responses,
            "sessions_new": c.sessions_new.load(Relaxed),
            "sessions_kept": c.sessions_kept.load(Relaxed),
            "redispatched": c.redispatched.load(Relaxed),
            "cookies_issued": c.cookies_issued.load(Relaxed),
            "rejected": rejected,
            "refused": c.refused.load(Relaxed),
            "upstream_errors": c.upstream_errors.load(Relaxed),
            "upstream_timeouts": c.upstream_timeouts.load(Relaxed),
            "upgrades": c.upgrades.load(Relaxed),
            "backends": backends,
        })
    }
}
