//! The controller's model of the data path: services and backends with their ids and the state
//! the maps were last given. Plans produce the next model; apply writes it.

use crate::config::{self, HealthCheck, ServiceConfig, StickMode};
use std::net::IpAddr;
use sticky_lb_common::{
    Backend, BackendId, BackendState, Family, Forwarding, PROTO_TCP, Policy, SERVICE_NO_STICK,
    SERVICE_SHARED, SERVICE_SOURCE_NAT, Service, ServiceId, ServiceKey, StickKey, addr,
};

/// What the operator has said about a backend (the control socket); health is separate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admin {
    Enabled,
    Drain,
    Disabled,
}

impl Admin {
    pub(super) fn name(self) -> &'static str {
        match self {
            Admin::Enabled => "enabled",
            Admin::Drain => "drain",
            Admin::Disabled => "disabled",
        }
    }

    pub(super) fn parse(name: &str) -> Admin {
        match name {
            "drain" => Admin::Drain,
            "disabled" => Admin::Disabled,
            _ => Admin::Enabled,
        }
    }
}

/// One backend as the data path holds it (or will, once a plan is applied).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct BackendSlot {
    /// Index into the backends map; stick entries and connections name backends by it.
    pub id: BackendId,
    pub name: String,
    /// Of its service's family.
    pub address: IpAddr,
    /// The port the data path sends to: a NAT backend's own, else the service's (host order).
    pub port: u16,
    /// `None` until the neighbour table has one (the backend takes no clients meanwhile).
    pub mac: Option<[u8; 6]>,
    /// The MAC given in the config or with `backend add` (the neighbour table is not asked).
    pub configured_mac: Option<[u8; 6]>,
    pub weight: u32,
    pub admin: Admin,
    /// The health checks' verdict (true when checks are off).
    pub healthy: bool,
    pub check: HealthCheck,
    /// Added with `backend add` rather than from the config.
    pub from_api: bool,
    /// No longer wanted: draining until no stick entry or connection names it, then removed.
    pub retiring: bool,
    /// When it started retiring (CLOCK_MONOTONIC_COARSE, ns): only a sweep that started later
    /// can find it drained out.
    pub retiring_since_ns: u64,
    /// A `mode: http` service's: the proxy connects to it through the kernel, so it needs no
    /// MAC.
    pub proxied: bool,
    /// The data-path state that follows from the fields above.
    pub state: BackendState,
}

impl BackendSlot {
    /// The data-path state that follows from MAC, operator and health: disabled and failed
    /// backends lose their stuck clients, drained ones (or weight 0, IPVS's quiescent) keep them
    /// but take no new ones.
    pub(super) fn effective_state(&self) -> BackendState {
        if self.admin == Admin::Disabled {
            BackendState::Disabled
        } else if (self.mac.is_none() && !self.proxied) || !self.healthy {
            BackendState::Down
        } else if self.admin == Admin::Drain || self.weight == 0 || self.retiring {
            BackendState::Drain
        } else {
            BackendState::Up
        }
    }

    /// The backends-map value for this backend of service `service`.
    pub(super) fn entry(&self, service: ServiceId) -> Backend {
        Backend {
            addr: addr::words(&self.address),
            mac: self.mac.unwrap_or([0; 6]),
            state: self.state as u8,
            _pad: 0,
            service,
            weight: self.weight,
            port: self.port.to_be(),
            _pad2: 0,
        }
    }

    pub(super) fn is_up(&self) -> bool {
        self.state == BackendState::Up
    }
}

/// One service as the data path holds it.
#[derive(Clone, Debug)]
pub(super) struct ServiceSlot {
    pub key: ServiceKey,
    /// The service's parameters; ring base and size are those of the last publish.
    pub params: Service,
    pub config: ServiceConfig,
    pub backends: Vec<BackendSlot>,
}

impl ServiceSlot {
    pub(super) fn id(&self) -> ServiceId {
        self.params.id
    }

    pub(super) fn name(&self) -> &str {
        &self.config.name
    }

    /// A `mode: http` service: served by the proxy, never in the data path's service index.
    pub(super) fn proxied(&self) -> bool {
        self.config.mode == config::ServiceMode::Http
    }

    pub(super) fn family(&self) -> Family {
        Family::from_u8(self.key.family)
    }

    /// The stick-table key of `client` in this service: its address masked with the
    /// service's `client_mask`, as the data path masks it. A client of the other family can
    /// never have an entry in this service: the error says so, for the operator who asked. An
    /// IPv4-mapped IPv6 address (`::ffff:198.18.1.1`) is the IPv4 client it maps: that is how
    /// such a client reaches the balancer.
    pub(super) fn stick_key(&self, client: IpAddr) -> Result<StickKey, String> {
        let client = client.to_canonical();
        let family = Family::of(&client);
        if family != self.family() {
            return Err(format!(
                "client {client} is {family} but service {} is {}",
                self.name(),
                self.family()
            ));
        }
        Ok(StickKey {
            service: self.id(),
            client: addr::masked(addr::words(&client), self.params.client_mask),
        })
    }

    /// A stick key's client as people read it: the masked address with the service's prefix
    /// length (`198.18.1.0/24`, `2001:db8:1:2::/64`; bare at the full length).
    pub(super) fn client_prefix(&self, key: &StickKey) -> String {
        crate::view::client_prefix(
            self.family(),
            key.client,
            addr::prefix_len(self.params.client_mask),
        )
    }

    /// What the service's table is built from: its up backends' ids, names and weights, in
    /// order. Two slots with equal inputs publish equal tables.
    pub(super) fn table_inputs(&self) -> Vec<(BackendId, &str, u32)> {
        self.backends
            .iter()
            .filter(|b| b.is_up())
            .map(|b| (b.id, b.name.as_str(), b.weight))
            .collect()
    }

    /// The service's table: a Maglev table for `ip-hash`, the up backends for `least-conn`.
    pub(super) fn table(&self) -> Vec<BackendId> {
        match self.config.policy {
            config::Policy::IpHash => {
                let members: Vec<crate::maglev::Member<'_>> = self
                    .table_inputs()
                    .into_iter()
                    .map(|(id, name, weight)| crate::maglev::Member { id, name, weight })
                    .collect();
                crate::maglev::Table::build(self.config.maglev_table_size, &members)
                    .slots()
                    .to_vec()
            }
            config::Policy::LeastConn => self.table_inputs().into_iter().map(|b| b.0).collect(),
        }
    }
}

/// What the interface is, as far as service parameters depend on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Link {
    /// Its MTU (bytes): what a tunnel service's encapsulated packets must fit.
    pub mtu: u16,
    /// Its addresses: `source_nat: true` takes the first of the service's family.
    pub addresses: Vec<IpAddr>,
}

/// The service key and parameters a service config gives on interface `link`, its stick
/// entries shared with other nodes when `shared_table` is configured. Address, ring base and
/// size are filled in when the service is published.
pub(super) fn service_entry(
    service: &ServiceConfig,
    id: ServiceId,
    link: &Link,
    shared_table: bool,
) -> (ServiceKey, Service) {
    let family = service.family();
    let key = ServiceKey {
        vip: addr::words(&service.vip),
        port: service.port.to_be(),
        protocol: PROTO_TCP,
        family: family as u8,
    };
    let mut params = Service {
        id,
        policy: match service.policy {
            config::Policy::IpHash => Policy::IpHash as u8,
            config::Policy::LeastConn => Policy::LeastConn as u8,
        },
        forwarding: match service.forwarding {
            config::Forwarding::Dsr => Forwarding::Dsr as u8,
            config::Forwarding::Tunnel => Forwarding::Tunnel as u8,
            config::Forwarding::Nat => Forwarding::Nat as u8,
        },
        stick_timeout_ns: service.stick.timeout.as_nanos() as u64,
        insert_interval_ns: match service.stick.insert_rate_limit {
            0 => 0,
            rate => 1_000_000_000 / rate,
        },
        family: family as u8,
        // Network byte order, like the client address it masks.
        client_mask: addr::prefix_mask(family, service.client_mask()),
        ..Default::default()
    };
    if let Some((source, len)) = service.tunnel.as_ref().and_then(|t| t.source().ok()) {
        params.tunnel_source = addr::words(&source);
        // The host bits sit in the last word: word 0 of an IPv4 address, word 3 of an IPv6 one
        // (the config allows at most 32 of them).
        let last = if family == Family::Ipv6 { 3 } else { 0 };
        params.tunnel_host_bits = !addr::prefix_mask(family, len)[last];
        params.mtu = link.mtu;
    }
    match service.stick.mode {
        StickMode::None => params.flags |= SERVICE_NO_STICK,
        StickMode::ClientAddress if shared_table => params.flags |= SERVICE_SHARED,
        StickMode::ClientAddress => {}
    }
    if let Some(nat) = service.source_nat() {
        params.flags |= SERVICE_SOURCE_NAT;
        // Unresolved (no address of the family on the interface) stays all zero, which the
        // plan's validation refuses.
        let address = nat.address.or_else(|| {
            link.addresses
                .iter()
                .copied()
                .find(|a| Family::of(a) == family && !is_link_local(a))
        });
        if let Some(address) = address {
            params.nat_source = addr::words(&address);
        }
        params.nat_port_first = nat.ports.0;
        params.nat_port_count = (nat.ports.1 - nat.ports.0) as u32 + 1;
    }
    (key, params)
}

/// Link-local IPv6 addresses are never a source for translated connections: backends are
/// reached by routed addresses.
fn is_link_local(address: &IpAddr) -> bool {
    matches!(address, IpAddr::V6(a) if a.is_unicast_link_local())
}

/// Whether two service parameter sets differ in anything but what publishing fills in.
pub(super) fn params_differ(a: &Service, b: &Service) -> bool {
    let strip = |s: &Service| Service {
        ring_base: 0,
        ring_size: 0,
        vip: [0; 4],
        port: 0,
        protocol: 0,
        family: 0,
        ..*s
    };
    strip(a) != strip(b)
}

pub fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Unused => "unused",
        BackendState::Up => "up",
        BackendState::Drain => "drain",
        BackendState::Down => "down",
        BackendState::Disabled => "disabled",
    }
}
