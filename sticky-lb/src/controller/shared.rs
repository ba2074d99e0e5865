//! The controller's side of the shared stick table (`shared_table`): which services it shares
//! and under which names, starting and stopping its tasks as the config says, the operator's
//! table changes and `--all-nodes` commands, and refreshes from the sweep.

use super::Controller;
use crate::{
    control::{Reply, Request},
    dataplane::monotonic_ns,
    shared::{BackendView, Directory, Placed, ServiceView, SharedTable, Update, unix_ms_of},
};
use std::{collections::BTreeMap, net::IpAddr};
use sticky_lb_common::{SERVICE_SHARED, ServiceId, StickEntry, StickKey};
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Entries refreshed per update (one pipeline each).
const REFRESH_BATCH: usize = 1024;

/// This node's name: the config's `node`, else the host name.
pub(super) fn node_name(configured: Option<&str>) -> String {
    configured.map(str::to_string).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "sticky-lb".into())
    })
}

impl Controller {
    /// The shared services as the applied state has them.
    pub(super) fn directory(&self) -> Directory {
        Directory {
            services: self
                .services
                .iter()
                .filter(|s| s.params.flags & SERVICE_SHARED != 0)
                .map(|s| ServiceView {
                    id: s.id(),
                    name: s.name().to_string(),
                    family: s.family(),
                    client_mask: s.params.client_mask,
                    timeout_ns: s.params.stick_timeout_ns,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendView {
                            id: b.id,
                            name: b.name.clone(),
                            serves: b.state.keeps_stuck_clients(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// After every applied change: gives the running shared table the new names and states,
    /// or starts, restarts or stops it as `shared_table` and `node` now say. Only once the data
    /// path is attached (the start loads Redis's entries itself, before attaching).
    pub(super) fn sync_shared(&mut self) {
        if self.attached_index.is_none() && self.shared.is_none() {
            return;
        }
        let wanted = self.config().shared_table.clone();
        let node = node_name(self.config().node.as_deref());
        if let (Some(running), Some(wanted)) = (&self.shared, &wanted)
            && running.config() == wanted
            && running.node() == node
        {
            running.set_directory(self.directory());
            return;
        }
        if let Some(old) = self.shared.take() {
            old.stop();
            info!("shared table stopped");
        }
        if let Some(wanted) = wanted {
            match SharedTable::start(
                &wanted,
                &node,
                &self.pins,
                self.directory(),
                self.operator_tx.clone(),
            ) {
                Ok(shared) => self.shared = Some(shared),
                Err(e) => warn!("shared table not started: {e:#}; this node serves on its own"),
            }
        }
        if let Ok(mut m) = self.metrics.lock() {
            m.shared = self.shared.as_ref().map(SharedTable::stats);
        }
    }

    /// Whether `service` is shared (so operator changes to its entries go to every node).
    fn shared_service(&self, service: &str) -> bool {
        self.shared.is_some()
            && self
                .services
                .iter()
                .any(|s| s.name() == service && s.params.flags & SERVICE_SHARED != 0)
    }

    /// `table set` went through here: every node places the client the same way.
    pub(super) fn share_set(
        &self,
        service: &str,
        client: IpAddr,
        backend: &str,
        entry: &StickEntry,
    ) {
        let Some(shared) = &self.shared else { return };
        if !self.shared_service(service) {
            return;
        }
        let ttl_ms = self
            .services
            .iter()
            .find(|s| s.name() == service)
            .map_or(1, |s| s.params.stick_timeout_ns / 1_000_000);
        shared.send(Update::Set(Placed {
            service: service.to_string(),
            client,
            backend: backend.to_string(),
            previous: None,
            created_ms: unix_ms_of(entry.created_ns),
            ttl_ms,
        }));
    }

    /// `table delete` of `client` (masked) in `service`.
    pub(super) fn share_delete(&self, service: &str, client: IpAddr) {
        if let Some(shared) = &self.shared
            && self.shared_service(service)
        {
            shared.send(Update::Delete {
                service: service.to_string(),
                client,
            });
        }
    }

    /// `table flush` of these services.
    pub(super) fn share_flush(&self, services: &[String]) {
        let Some(shared) = &self.shared else { return };
        for service in services.iter().filter(|s| self.shared_service(s)) {
            shared.send(Update::Flush {
                service: service.clone(),
            });
        }
    }

    /// `--all-nodes`: checks the change names what exists here, publishes it to the other
    /// nodes, and applies it here; the reply is this node's.
    pub(super) fn all_nodes(&mut self, request: Request, reply: oneshot::Sender<Reply>) {
        let Some(shared) = &self.shared else {
            let _ = reply.send(Reply::error(
                "--all-nodes needs a shared table (shared_table in the config)",
            ));
            return;
        };
        let known = match &request {
            Request::Backend {
                service, backend, ..
            }
            | Request::BackendRemove { service, backend } => {
                self.find_named(service, backend).map(|_| ())
            }
            Request::BackendAdd { service, .. } => {
                if self.services.iter().any(|s| s.name() == service) {
                    Ok(())
                } else {
                    Err(Reply::error(format!("no service '{service}'")))
                }
            }
            _ => Err(Reply::error("--all-nodes applies to backend changes only")),
        };
        if let Err(refused) = known {
            let _ = reply.send(refused);
            return;
        }
        shared.send(Update::Operator(request.clone()));
        info!("operator: sent to every node: {request:?}");
        let (local_tx, local_rx) = oneshot::channel();
        self.handle(request, local_tx);
        tokio::spawn(async move {
            let answer = match local_rx.await {
                Ok(mut answer) => {
                    answer.message.push_str(" (sent to every node)");
                    answer
                }
                Err(_) => Reply::error("no answer (sent to every node)"),
            };
            let _ = reply.send(answer);
        });
    }

    /// An operator command another node published (`--all-nodes`): applied here as if given
    /// here; the outcome is logged.
    pub(super) fn handle_remote(&mut self, request: Request) {
        if matches!(request, Request::AllNodes { .. }) {
            return; // never re-published
        }
        let (tx, rx) = oneshot::channel();
        self.handle(request, tx);
        tokio::spawn(async move {
            match rx.await {
                Ok(answer) if answer.ok => info!("operator (another node): {}", answer.message),
                Ok(answer) => warn!("operator (another node): refused here: {}", answer.message),
                Err(_) => {}
            }
        });
    }

    /// Services whose keys are due a refresh, with the time (ns) since which their entries'
    /// use counts: at most once per quarter timeout each.
    pub(super) fn refresh_due(&mut self) -> BTreeMap<ServiceId, u64> {
        if self.shared.is_none() {
            return BTreeMap::new();
        }
        let now = monotonic_ns();
        let mut due = BTreeMap::new();
        for s in self
            .services
            .iter()
            .filter(|s| s.params.flags & SERVICE_SHARED != 0)
        {
            let last = self.refresh_rounds.get(&s.id()).copied().unwrap_or(0);
            if now.saturating_sub(last) >= s.params.stick_timeout_ns / 4 {
                due.insert(s.id(), last);
                self.refresh_rounds.insert(s.id(), now);
            }
        }
        due
    }

    /// The entries the sweep found in use since their service's last refresh: their keys'
    /// TTLs are renewed.
    pub(super) fn refresh_shared(&self, used: &[(StickKey, StickEntry)]) {
        let Some(shared) = &self.shared else { return };
        let directory = shared.directory();
        let placed: Vec<Placed> = used
            .iter()
            .filter_map(|(key, entry)| {
                let service = directory.by_id(key.service)?;
                Some(Placed {
                    service: service.name.clone(),
                    client: service.client(key),
                    backend: service.backend_name(entry.backend)?.to_string(),
                    previous: None,
                    created_ms: unix_ms_of(entry.created_ns),
                    ttl_ms: service.timeout_ms(),
                })
            })
            .collect();
        for chunk in placed.chunks(REFRESH_BATCH) {
            shared.send(Update::Refresh(chunk.to_vec()));
        }
    }
}
