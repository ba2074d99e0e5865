//! The desired state: the config file plus what operators changed at run time, and what the
//! controller observed (neighbour MACs, health verdicts, backends that drained out). A plan is
//! computed from these and the current model alone.

use super::model::{Admin, Link};
use crate::{
    config::{BackendConfig, Config, Forwarding, HealthCheck, RuntimeChanges, ServiceConfig},
    state::{BackendChange, WeightChange},
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};
use sticky_lb_common::BackendId;

/// Run-time changes by service name, then backend name.
pub(super) type Changes = BTreeMap<String, BTreeMap<String, BackendChange>>;

/// What the operator wants: the config, and the run-time changes made since.
#[derive(Clone, Debug)]
pub(super) struct Desired {
    pub config: Config,
    pub changes: Changes,
}

/// One backend a service should have.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct WantedBackend {
    pub name: String,
    pub address: IpAddr,
    /// The port the data path sends to (host order): a NAT backend's own, else the service's.
    pub port: u16,
    /// The MAC given in the config or with `backend add`, if any.
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
    pub admin: Admin,
    pub check: HealthCheck,
    pub from_api: bool,
    /// How the service reaches it: a tunnel backend's frames go to its next hop.
    pub forwarding: Forwarding,
}

/// What the controller learnt from the world, not from an operator.
#[derive(Clone, Debug, Default)]
pub(super) struct Observed {
    /// Usable neighbour entries on the interface.
    pub macs: HashMap<IpAddr, [u8; 6]>,
    /// The health checks' verdicts. A backend with checks and no verdict yet is not healthy:
    /// it takes no clients before its first check passes.
    pub health: HashMap<BackendId, bool>,
    /// First verdicts of backends that have no id yet (or a new address), by service and
    /// backend name: a start's round of checks, the check `backend add` or a reload makes before
    /// a backend may take clients. A plan prefers them to `health`; the controller moves them
    /// into `health` once ids exist.
    pub first_verdicts: HashMap<(String, String), (IpAddr, bool)>,
    /// Retiring backends the last sweep found with no stuck client and no open connection.
    pub drained_out: BTreeSet<BackendId>,
    /// Tunnel backends' next hops from the routing table (a router, or the backend itself when
    /// on-link), by backend address: whose MAC their frames go to. A DSR backend is its own.
    pub next_hops: HashMap<IpAddr, IpAddr>,
    /// The interface's MTU (bytes), read at start and reload.
    pub interface_mtu: Option<u16>,
    /// The interface's addresses, read at start and reload (`source_nat: true`).
    pub interface_addresses: Vec<IpAddr>,
}

/// The MTU assumed until the interface's is read: Ethernet's (bytes).
pub(super) const DEFAULT_MTU: u16 = 1500;

impl Observed {
    /// The interface as service parameters need it (Ethernet's MTU until it has been read),
    /// its addresses without `vips`: a VIP is never a source for translated connections (the
    /// interface holds the VIPs too, and may list one first).
    pub(super) fn link(&self, vips: &[IpAddr]) -> Link {
        Link {
            mtu: self.interface_mtu.unwrap_or(DEFAULT_MTU),
            addresses: self
                .interface_addresses
                .iter()
                .filter(|a| !vips.contains(a))
                .copied()
                .collect(),
        }
    }

    /// Reads the interface's MTU and addresses again (keeping what was read before on errors).
    pub(super) fn read_interface(&mut self, interface: &str) {
        match crate::neighbour::interface_mtu(interface) {
            Ok(mtu) => self.interface_mtu = Some(mtu),
            Err(e) => tracing::warn!("keeping the MTU read before: {e:#}"),
        }
        match crate::neighbour::interface_addresses(interface) {
            Ok(addresses) => self.interface_addresses = addresses,
            Err(e) => tracing::warn!("keeping the interface addresses read before: {e:#}"),
        }
    }

    /// The address whose MAC frames for the backend at `address` are sent to.
    pub(super) fn next_hop(&self, address: IpAddr) -> IpAddr {
        self.next_hops.get(&address).copied().unwrap_or(address)
    }
}

impl Desired {
    /// The config with the run-time changes that survive it: all of them with
    /// `runtime_changes: keep`, none with `reset`. Weights set at run time are dropped where the
    /// new config changed that backend's weight itself.
    pub(super) fn new(config: Config, previous: Changes) -> Desired {
        let mut changes = match config.runtime_changes {
            RuntimeChanges::Keep => previous,
            RuntimeChanges::Reset => Changes::new(),
        };
        for service in &config.services {
            let Some(backends) = changes.get_mut(&service.name) else {
                continue;
            };
            for b in &service.backends {
                if let Some(change) = backends.get_mut(&b.name) {
                    if change.weight.is_some_and(|w| w.config_weight != b.weight) {
                        change.weight = None;
                    }
                    // The config lists it now: its address and checks come from there.
                    change.added = None;
                }
            }
        }
        changes.retain(|_, backends| {
            backends.retain(|_, c| *c != BackendChange::default());
            !backends.is_empty()
        });
        Desired { config, changes }
    }

    /// The backends `service` should have, in order: the config's, then those added at run
    /// time; without those removed at run time.
    pub(super) fn backends(&self, service: &ServiceConfig) -> Vec<WantedBackend> {
        let none = BTreeMap::new();
        let changes = self.changes.get(&service.name).unwrap_or(&none);
        let apply = |mut b: WantedBackend| -> Option<WantedBackend> {
            if let Some(c) = changes.get(&b.name) {
                if c.removed {
                    return None;
                }
                if let Some(admin) = &c.admin {
                    b.admin = Admin::parse(admin);
                }
                if let Some(w) = c.weight {
                    b.weight = w.weight;
                }
            }
            Some(b)
        };
        let configured = service
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| WantedBackend {
                name: b.name.clone(),
                address: b.address,
                port: service.backend_port(b.port),
                mac: b.mac,
                weight: b.weight,
                admin: Admin::Enabled,
                check: service.health_check(i),
                from_api: false,
                forwarding: service.forwarding,
            });
        let added = changes.iter().filter_map(|(name, c)| {
            let a = c.added.as_ref()?;
            if service.backends.iter().any(|b| &b.name == name) {
                return None;
            }
            Some(WantedBackend {
                name: name.clone(),
                address: a.address,
                port: service.backend_port(a.port),
                mac: a
                    .mac
                    .as_deref()
                    .and_then(|m| crate::config::parse_mac(m).ok()),
                weight: a.weight,
                admin: Admin::Enabled,
                check: service.service_health_check(a.port),
                from_api: true,
                forwarding: service.forwarding,
            })
        });
        configured.chain(added).filter_map(apply).collect()
    }

    /// The config's entry for backend `name` of `service`, if the config lists it.
    pub(super) fn configured(&self, service: &str, name: &str) -> Option<&BackendConfig> {
        self.config
            .services
            .iter()
            .find(|s| s.name == service)?
            .backends
            .iter()
            .find(|b| b.name == name)
    }

    /// The record of run-time changes to `service`/`backend`, made if absent.
    pub(super) fn change(&mut self, service: &str, backend: &str) -> &mut BackendChange {
        self.changes
            .entry(service.to_string())
            .or_default()
            .entry(backend.to_string())
            .or_default()
    }

    /// Records a run-time weight (remembering the config's weight it overrides).
    pub(super) fn set_weight(&mut self, service: &str, backend: &str, weight: u32) {
        let config_weight = self.configured(service, backend).map(|b| b.weight);
        let change = self.change(service, backend);
        match (&mut change.added, config_weight) {
            (Some(added), _) => added.weight = weight,
            (None, Some(config_weight)) => {
                change.weight = Some(WeightChange {
                    weight,
                    config_weight,
                })
            }
            (None, None) => {}
        }
    }
}
