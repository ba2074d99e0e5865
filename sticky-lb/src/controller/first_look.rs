//! The first look at a backend the data path does not have yet: its MAC and one health check,
//! both bounded, before it may take clients. Starts, reloads and `backend add` use it.

use super::{
    desired::{Desired, Observed, WantedBackend},
    model::ServiceSlot,
};
use crate::{config::CheckKind, health, neighbour::Neighbours};
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};
use tracing::warn;

/// How long a new backend's MAC is waited for before it is added without one (it comes up
/// when the neighbour table answers).
pub(super) const RESOLVE_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a first look at a new backend found.
pub(super) struct FirstLook {
    pub service: String,
    pub backend: String,
    pub address: IpAddr,
    /// A tunnel backend's next hop (a router, or itself when on-link), when the route was found.
    pub next_hop: Option<IpAddr>,
    /// The MAC its frames go to: its own (DSR) or its next hop's (tunnel).
    pub mac: Option<[u8; 6]>,
    /// The first check's verdict; `None` with checks off.
    pub healthy: Option<bool>,
    /// Why the first check failed.
    pub failure: Option<String>,
}

/// Looks at new backends concurrently: each one's MAC (from the config, or the neighbour table
/// within 1.5 s) and one health check (within its timeout).
pub(super) async fn first_look(
    neighbours: Arc<Neighbours>,
    backends: Vec<(String, WantedBackend)>,
) -> Vec<FirstLook> {
    let looks: Vec<_> = backends
        .into_iter()
        .map(|(service, b)| {
            let neighbours = neighbours.clone();
            tokio::spawn(async move {
                let address = b.address;
                let next_hop = match b.forwarding.routed() {
                    false => None,
                    true => match neighbours.next_hop(address).await {
                        Ok(hop) => Some(hop),
                        Err(e) => {
                            warn!(
                                service = %service,
                                backend = %b.name,
                                "backend {service}/{} ({address}) has no next hop: {e:#}; it takes no clients until a reload finds one",
                                b.name
                            );
                            None
                        }
                    },
                };
                let mac = match (b.mac, b.forwarding.routed(), next_hop) {
                    (Some(mac), _, _) => Some(mac),
                    (None, true, None) => None,
                    (None, _, hop) => {
                        neighbours
                            .resolve(hop.unwrap_or(address), RESOLVE_TIMEOUT)
                            .await
                    }
                };
                let (healthy, failure) = match b.check.kind {
                    CheckKind::None => (None, None),
                    _ => {
                        match health::probe(SocketAddr::new(address, b.check.port), &b.check).await
                        {
                            Ok(_) => (Some(true), None),
                            Err(failure) => (Some(false), Some(failure.to_string())),
                        }
                    }
                };
                FirstLook {
                    service,
                    backend: b.name,
                    address,
                    next_hop,
                    mac,
                    healthy,
                    failure,
                }
            })
        })
        .collect();
    let mut found = Vec::with_capacity(looks.len());
    for look in looks {
        if let Ok(look) = look.await {
            found.push(look);
        }
    }
    found
}

/// The backends `desired` has that `current` does not (or has at another address), by service
/// name.
pub(super) fn new_backends(
    current: &[ServiceSlot],
    desired: &Desired,
) -> Vec<(String, WantedBackend)> {
    let mut new = Vec::new();
    for s in &desired.config.services {
        let old = current.iter().find(|c| c.name() == s.name);
        for b in desired.backends(s) {
            // A service that changes its forwarding mode looks again: a tunnel backend's frames
            // go to its next hop, a DSR backend's to itself.
            let known = old.is_some_and(|o| {
                o.config.forwarding == s.forwarding
                    && o.backends
                        .iter()
                        .any(|ob| ob.name == b.name && ob.address == b.address)
            });
            if !known {
                new.push((s.name.clone(), b));
            }
        }
    }
    new
}

impl Observed {
    /// Takes in what a first look found: the MAC, and the check's verdict (by name, until the
    /// backend has an id).
    pub(super) fn record(&mut self, look: &FirstLook) {
        if let Some(hop) = look.next_hop {
            self.next_hops.insert(look.address, hop);
        }
        if let Some(mac) = look.mac {
            self.macs.insert(look.address, mac);
        }
        let Some(verdict) = look.healthy else {
            return;
        };
        if !verdict {
            let reason = look.failure.as_deref().unwrap_or("failed");
            warn!(
                service = %look.service,
                backend = %look.backend,
                reason,
                "backend {}/{} ({}) is DOWN: {reason} (its first check); it takes no clients until checks pass",
                look.service,
                look.backend,
                look.address,
            );
        }
        self.first_verdicts.insert(
            (look.service.clone(), look.backend.clone()),
            (look.address, verdict),
        );
    }
}
