//! Observations as the controller takes them in: health checks (one task per backend, restarted
//! only when its check changes) and neighbour-table answers. Each new fact goes into
//! [`Observed`](super::desired::Observed) and through the one reconcile path.

use super::{Checker, Controller};
use crate::{config::CheckKind, health, neighbour};
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use tracing::{debug, info, warn};

impl Controller {
    /// Starts checks for new backends, restarts changed ones, stops those of removed backends.
    pub(super) fn sync_checkers(&mut self) {
        let mut wanted = HashMap::new();
        for b in self.services.iter().flat_map(|s| &s.backends) {
            if b.check.kind != CheckKind::None {
                // The backend's own address: the VIP is local on the balancer, so a check sent
                // to it would never leave this host.
                let target = SocketAddr::new(b.address, b.check.port);
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

    /// A neighbour-table answer about `address`: the MAC of the backends sent to it (DSR
    /// backends are their own neighbour; tunnel backends are sent to their next hop, a router
    /// or themselves) appeared, changed or went away.
    pub(super) fn apply_neighbour(&mut self, address: IpAddr, mac: Option<[u8; 6]>) {
        let Some(mac) = mac else {
            return; // a failed lookup keeps the last MAC: the health checks judge reachability
        };
        let mut changed = false;
        for s in &self.services {
            for b in &s.backends {
                if b.configured_mac.is_some() || self.observed.next_hop(b.address) != address {
                    continue; // a client, or a router none of our backends is behind
                }
                let known = self.observed.macs.get(&b.address).copied();
                if known == Some(mac) {
                    continue;
                }
                let via = match address == b.address {
                    true => String::new(),
                    false => format!(" via {address}"),
                };
                match known {
                    None => info!(
                        "backend {}/{} ({}{via}) answered: MAC {}",
                        s.name(),
                        b.name,
                        b.address,
                        crate::config::format_mac(&mac)
                    ),
                    Some(old) => info!(
                        "backend {}/{} ({}{via}) moved from MAC {} to {}",
                        s.name(),
                        b.name,
                        b.address,
                        crate::config::format_mac(&old),
                        crate::config::format_mac(&mac)
                    ),
                }
                self.observed.macs.insert(b.address, mac);
                changed = true;
            }
        }
        if changed {
            self.reconcile_observed("neighbour change");
        }
    }

    /// An rtnetlink event about the interface or a neighbour on it.
    pub(super) fn apply_neighbour_event(&mut self, event: neighbour::Event) {
        match event {
            neighbour::Event::Neighbour { address, mac } => self.apply_neighbour(address, mac),
            neighbour::Event::LinkGone { interface } => {
                self.attached_index = None;
                warn!(
                    interface = %interface,
                    "interface {interface} is gone, and the data path with it; sticky-lb attaches again when an interface of that name comes back (stick table and connections kept)"
                );
            }
            neighbour::Event::LinkUp { interface, index } => {
                if self.attached_index == Some(index) {
                    // Same device: only a new MAC of its own matters (the program writes it as
                    // the source of every forwarded frame, fixed when the program is loaded).
                    let mac = neighbour::interface_mac(&interface).ok();
                    if mac.is_none_or(|m| m == self.dataplane.options().interface_mac) {
                        debug!("interface {interface} changed flags or state");
                        return;
                    }
                    info!(
                        interface = %interface,
                        "interface {interface} has a new MAC: loading the data path again with it"
                    );
                }
                if self.attached_index != Some(index) {
                    info!(
                        interface = %interface,
                        "interface {interface} is back (index {index}): attaching the data path to it"
                    );
                }
                match self.reattach(index) {
                    Ok(()) => info!(
                        interface = %interface,
                        "attached to the new {interface} in {} mode; services and stick table as before",
                        self.mode
                    ),
                    Err(e) => warn!(
                        interface = %interface,
                        "attaching to the new {interface} failed: {e:#}; retried when it changes again"
                    ),
                }
                self.refresh_neighbours_all();
            }
        }
    }

    /// Asks the neighbour table for the MAC of every backend that has none (and no configured
    /// one). Answers come back through the main loop; the requests make the kernel resolve and
    /// keep revalidating the entries.
    pub(super) fn refresh_neighbours(&self) {
        self.ask_neighbours(false);
    }

    /// The same for every backend: managed neighbour entries go with a deleted interface.
    fn refresh_neighbours_all(&self) {
        self.ask_neighbours(true);
    }

    fn ask_neighbours(&self, all: bool) {
        let addresses: Vec<IpAddr> = self
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .filter(|b| b.configured_mac.is_none())
            .filter(|b| all || !self.observed.macs.contains_key(&b.address))
            .map(|b| self.observed.next_hop(b.address))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if addresses.is_empty() {
            return;
        }
        let neighbours = self.neighbours.clone();
        let answers = self.neighbour_tx.clone();
        tokio::spawn(async move {
            for address in addresses {
                let mac = neighbours.resolve(address, Duration::ZERO).await;
                if answers.send((address, mac)).await.is_err() {
                    return; // the controller is gone
                }
            }
        });
    }
}
