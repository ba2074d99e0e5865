//! Observations as the controller takes them in: health checks (one task per backend, restarted
//! only when its check changes) and neighbour-table answers. Each new fact goes into
//! [`Observed`](super::desired::Observed) and through the one reconcile path.

use super::{Checker, Controller};
use crate::{config::CheckKind, health, neighbour};
use tracing::{debug, info, warn};
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};
use sticky_lb_common::BackendId;

impl Controller {
    /// Starts checks for new backends, restarts changed ones, stops those of removed backends.
    pub(super) fn sync_checkers(&mut self) {
        let mut wanted = HashMap::new();
        for b in self.services.iter().flat_map(|s| &s.backends) {
            if b.check.kind != CheckKind::None {
                // The backend's own address: the VIP is local on the balancer, so a check sent
                // to it would never leave this host.
                let target = SocketAddrV4::new(b.address, b.check.port);
                wanted.insert(b.id, (target, b.check.clone()));
            }
        }
        self.checkers.retain(|id, checker| {
            let keep = wanted
                .get(id)
                .is_some_and(|(t, c)| *t == checker.target && *c == checker.check);
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (id, (target, check)) in wanted {
            if self.checkers.contains_key(&id) {
                continue;
            }
            let task = health::spawn(
                id,
                target,
                check.clone(),
                self.observed.health.get(&id).copied(),
                self.health_tx.clone(),
                self.latencies.clone(),
            );
            self.checkers.insert(
                id,
                Checker {
                    target,
                    check,
                    task,
                },
            );
        }
    }

    /// A health check changed its verdict: log it once, with the reason, and reconcile.
    pub(super) fn apply_health(&mut self, t: health::Transition) {
        let Some((i, j)) = self.find(t.backend) else {
            return; // removed since the check ran
        };
        let service = &self.services[i];
        let b = &service.backends[j];
        let (sname, bname) = (service.name(), b.name.as_str());
        if t.healthy {
            info!(
                service = sname,
                backend = bname,
                reason = %t.reason,
                "backend {}/{} ({}) is UP: {}",
                service.name(),
                b.name,
                b.address,
                t.reason
            );
        } else {
            warn!(
                service = sname,
                backend = bname,
                reason = %t.reason,
                "backend {}/{} ({}) is DOWN: {} ({} failed checks); its clients are redispatched",
                service.name(),
                b.name,
                b.address,
                t.reason,
                b.check.fall
            );
        }
        self.observed.health.insert(t.backend, t.healthy);
        self.reconcile_observed("health change");
    }

    /// A neighbour-table answer: a backend's MAC appeared, changed or went away.
    pub(super) fn apply_neighbour(&mut self, address: Ipv4Addr, mac: Option<[u8; 6]>) {
        let known = self.observed.macs.get(&address).copied();
        if mac.is_none() || known == mac {
            return; // a failed lookup keeps the last MAC: the health checks judge reachability
        }
        let mac = mac.unwrap_or_default();
        let names: Vec<String> = self
            .services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(|b| b.address == address)
                    .map(move |b| format!("{}/{}", s.name(), b.name))
            })
            .collect();
        match known {
            None => info!(
                "backend {} ({address}) answered: MAC {}",
                names.join(", "),
                crate::config::format_mac(&mac)
            ),
            Some(old) => info!(
                "backend {} ({address}) moved from MAC {} to {}",
                names.join(", "),
                crate::config::format_mac(&old),
                crate::config::format_mac(&mac)
            ),
        }
        self.observed.macs.insert(address, mac);
        self.reconcile_observed("neighbour change");
    }

    /// Reads the neighbour table for every backend without a configured MAC, on a blocking
    /// thread; answers come back through the main loop. Backends with no entry yet are probed.
    pub(super) fn refresh_neighbours(&self) {
        let configured: Vec<(BackendId, Ipv4Addr)> = self
            .services
            .iter()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(|b| self.desired_mac(s.name(), &b.name).is_none())
                    .map(|b| (b.id, b.address))
            })
            .collect();
        if configured.is_empty() {
            return;
        }
        let interface = self.config().interface.clone();
        let answers = self.neighbour_tx.clone();
        let missing: Vec<Ipv4Addr> = configured
            .iter()
            .filter(|(_, a)| !self.observed.macs.contains_key(a))
            .map(|(_, a)| *a)
            .collect();
        tokio::task::spawn_blocking(move || {
            for (_, address) in configured {
                let mac = if missing.contains(&address) {
                    neighbour::resolve(address, &interface, Duration::ZERO)
                } else {
                    neighbour::lookup(address, &interface)
                };
                if answers.blocking_send((address, mac)).is_err() {
                    debug!("controller gone; neighbour answers dropped");
                    return;
                }
            }
        });
    }

    /// The MAC given for a backend in the config or with `backend add`.
    fn desired_mac(&self, service: &str, backend: &str) -> Option<[u8; 6]> {
        self.desired
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| self.desired.backends(s).into_iter().find(|b| b.name == backend))
            .and_then(|b| b.mac)
    }
}
