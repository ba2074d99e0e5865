//! The YAML configuration: its model and defaults, and the entry points that read, parse and
//! validate it.
//!
//! Everything is checked before the kernel is touched. An error names the field by its path
//! (`services[0].backends[2].weight`) and, where it can be found, the line.
//!
//! - `validate`: the rules a parsed config must follow beyond its types;
//! - `location`: the line of a field path in the YAML text, for validation errors;
//! - `units`: durations and MAC addresses as the config writes them.

mod http;
pub(crate) mod location;
mod units;
mod validate;

pub use http::{
    BackendProtocol, CookieConfig, HttpConfig, OnFailure, SameSite, ServiceMode, TlsConfig,
    TokenConfig, is_token,
};
pub use units::{format_mac, parse_duration, parse_mac};
pub use validate::{
    MAX_MAGLEV_TABLE_SIZE, MIN_FLOW_TIMEOUT, MIN_STICK_TIMEOUT, check_backend_address,
    check_least_conn_size, interface_index,
};

use serde::Deserialize;
use std::{fmt, net::IpAddr, path::Path, time::Duration};
use sticky_lb_common::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_STICK_TABLE_SIZE, Family,
};
use units::{duration, mac, opt_duration};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The interface clients reach the VIPs through; the XDP program attaches here.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// What SIGINT/SIGTERM do to the data path; by default it keeps forwarding.
    #[serde(default)]
    pub on_exit: OnExit,
    /// Entries in the stick table, shared by all services (one LRU map).
    #[serde(default = "default_stick_table_size")]
    pub stick_table_size: u32,
    /// How often the expiry sweep walks the stick table and the connection table.
    #[serde(default = "default_sweep_interval", deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// Open connections the connection table holds at once, across all services.
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    /// An established connection with no packet from the client for this long is over.
    #[serde(default = "default_flow_idle_timeout", deserialize_with = "duration")]
    pub flow_idle_timeout: Duration,
    /// A connection that sent only its SYN, idle this long, is over (IPVS SYN_RECV).
    #[serde(
        default = "default_flow_opening_timeout",
        deserialize_with = "duration"
    )]
    pub flow_opening_timeout: Duration,
    /// A connection whose client sent its FIN, idle this long, is deleted (IPVS FIN_WAIT);
    /// until then its last segments still reach its backend.
    #[serde(
        default = "default_flow_closing_timeout",
        deserialize_with = "duration"
    )]
    pub flow_closing_timeout: Duration,
    /// On reload: whether operator changes made at run time survive (HAProxy's server-state).
    #[serde(default)]
    pub runtime_changes: RuntimeChanges,
    /// On reload: what happens to a backend no longer in the config.
    #[serde(default)]
    pub backend_removal: BackendRemoval,
    /// Prometheus metrics over HTTP; off unless configured.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// This balancer's name among the nodes sharing a stick table (default: the host name).
    /// Required to differ between nodes: a node ignores what it published itself.
    #[serde(default)]
    pub node: Option<String>,
    /// Share the stick table with the other balancer nodes through Redis (several balancers
    /// behind ECMP or anycast); off unless configured.
    #[serde(default)]
    pub shared_table: Option<SharedTableConfig>,
    /// Worker threads of the controller's runtime, which also runs the proxy of `mode: http`
    /// services (HAProxy's `nbthread`). Default: the CPUs this process may run on.
    #[serde(default)]
    pub threads: Option<usize>,
    /// The key file that seals `stick.cookie` cookies (required when a service uses them); the
    /// same file on every node. Read at start and on every reload.
    #[serde(default)]
    pub cookie_keys: Option<std::path::PathBuf>,
    pub services: Vec<ServiceConfig>,
}

/// `shared_table:` the store the balancer nodes share their stick entries through.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedTableConfig {
    /// `redis://[user:password@]host[:port][/db]` (plain TCP: TLS is not supported yet).
    pub redis: String,
    /// Prefix of every Redis key and channel, so several balancer clusters can share one
    /// Redis: keys are `PREFIX:stick:SERVICE:CLIENT`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Updates held in memory while Redis is unreachable or slow (entries); beyond it they are
    /// dropped (counted) and the resync after the reconnect brings them over.
    #[serde(default = "default_shared_queue")]
    pub queue: usize,
    /// At start, how long the node loads entries from Redis before it attaches anyway (and
    /// catches up once attached).
    #[serde(default = "default_load_timeout", deserialize_with = "duration")]
    pub load_timeout: Duration,
}

/// Where XDP runs: the config's `xdp_mode`, and `sticky-lb decap --mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Try native (driver) mode, fall back to generic with a log line.
    #[default]
    Auto,
    /// In the driver (fails if the driver has no XDP support).
    Native,
    /// In the kernel's generic path (skb mode): any interface, slower.
    Generic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExit {
    /// Detach the program and remove the pinned maps: the stick and connection tables are gone.
    Detach,
    /// Leave the data path forwarding with its pinned state; a new controller adopts it. The
    /// default: persistence is what the balancer is for, so a plain restart (or an upgrade) must
    /// not drop every session. `sticky-lb detach` removes the data path.
    #[default]
    KeepRunning,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeChanges {
    /// Backends still in the config keep their run-time state (drain, disable, weight) and
    /// backends added at run time stay.
    #[default]
    Keep,
    /// The config is the whole truth: run-time changes are dropped.
    Reset,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendRemoval {
    /// Drain it: stuck clients stay until their entries expire and open connections until they
    /// close, then it is removed.
    #[default]
    Drain,
    /// Remove it at once: its stuck clients move on their next packet.
    Immediate,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address:port of the HTTP listener serving `/metrics` (e.g. 127.0.0.1:9180).
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// IPv4 or IPv6; the service's backends and clients are of the same family.
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// `tcp` (default: the XDP data path) or `http` (proxied per request by the controller).
    #[serde(default)]
    pub mode: ServiceMode,
    /// `mode: http` only: the proxy's settings.
    #[serde(default)]
    pub http: Option<HttpConfig>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Settings of `forwarding: tunnel` (required with it, refused without it).
    #[serde(default)]
    pub tunnel: Option<TunnelConfig>,
    /// `forwarding: nat` only: full NAT (IPVS FNAT). `true` takes the interface's first address
    /// of the service's family; `{address: ADDR, ports: FIRST-LAST}` says which.
    #[serde(default)]
    pub source_nat: Option<SourceNatConfig>,
    #[serde(default = "default_maglev_table_size")]
    pub maglev_table_size: u32,
    #[serde(default)]
    pub stick: StickConfig,
    /// Health checks for every backend of the service (a backend may override any field).
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Tcp,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Maglev consistent hash of the (masked) client address.
    #[default]
    IpHash,
    /// Fewest active connections per unit of weight.
    LeastConn,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarding {
    /// L2 direct server return (IPVS `-g`): MAC rewrite, the backend answers the client
    /// directly. Backends are on the balancer's L2 segment and hold the VIP on loopback.
    #[default]
    Dsr,
    /// IP-in-IP tunnel (IPVS `-i`): the client's packet inside an outer IPv4 (IPIP) or IPv6
    /// (IPv6-in-IPv6) header to the backend, sent to its next hop from the routing table, so
    /// backends may be in any routed subnet. Backends decapsulate (an `ipip`/`ip6tnl` device or
    /// `sticky-lb decap`), hold the VIP on loopback and answer the client directly.
    Tunnel,
    /// NAT (IPVS `-m`): the destination VIP:port becomes the backend's address and port; the
    /// backend's replies come back through the balancer (its route back) and are translated
    /// back. Backends need no VIP and no decapsulation. With `source_nat` (full NAT) the source
    /// becomes a balancer address and port too, so backends need no route back either, but see
    /// the balancer's address instead of the client's.
    Nat,
}

impl Forwarding {
    /// The name the config, `status` and the state file use.
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Dsr => "dsr",
            Forwarding::Tunnel => "tunnel",
            Forwarding::Nat => "nat",
        }
    }

    /// Whether a backend's frames go to its next hop from the routing table (a router, or the
    /// backend itself when on-link), rather than to the backend on our segment.
    pub fn routed(self) -> bool {
        matches!(self, Forwarding::Tunnel | Forwarding::Nat)
    }
}

/// `source_nat:` as written: `true`/`false`, or the address and port range.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SourceNatConfig {
    Enabled(bool),
    Settings(SourceNatSettings),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceNatSettings {
    /// The balancer address connections leave from; default the interface's first address of
    /// the service's family. Backends' replies must reach the balancer at it.
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// `FIRST-LAST`: the source ports (each backend has all of them: a port is unique per
    /// backend); default 1024-32767, below Linux's ephemeral ports, so the balancer's own
    /// connections from the same address never collide.
    #[serde(default)]
    pub ports: Option<String>,
}

/// Source NAT with everything decided but the address when it is the interface's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceNat {
    /// `None`: the interface's first address of the service's family.
    pub address: Option<IpAddr>,
    /// First and last port, host order.
    pub ports: (u16, u16),
}

impl SourceNatConfig {
    /// The settings, `None` when off. Errors name what is wrong with the port range.
    pub fn resolve(&self) -> Result<Option<SourceNat>, String> {
        match self {
            SourceNatConfig::Enabled(false) => Ok(None),
            SourceNatConfig::Enabled(true) => Ok(Some(SourceNat {
                address: None,
                ports: sticky_lb_common::DEFAULT_NAT_PORTS,
            })),
            SourceNatConfig::Settings(s) => {
                let ports = match &s.ports {
                    None => sticky_lb_common::DEFAULT_NAT_PORTS,
                    Some(text) => {
                        let bad =
                            || format!("'{text}' is not a port range FIRST-LAST (1 to 65535)");
                        let (a, b) = text.split_once('-').ok_or_else(bad)?;
                        let a: u16 = a.trim().parse().map_err(|_| bad())?;
                        let b: u16 = b.trim().parse().map_err(|_| bad())?;
                        if a == 0 || a > b {
                            return Err(bad());
                        }
                        (a, b)
                    }
                };
                Ok(Some(SourceNat {
                    address: s.address,
                    ports,
                }))
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Outer source of encapsulated packets: an address of the balancer (`198.18.0.2`), or a
    /// prefix (`198.18.240.0/24`, `2001:db8:f::/64`) from which each client's packets get one
    /// address, picked by a hash of the client, so a backend's NIC spreads clients over its
    /// receive queues (RSS hashes the outer addresses). Of the service's family. See
    /// [`TunnelConfig::source`].
    pub source: String,
}

impl TunnelConfig {
    /// The source prefix: address (host bits cleared) and length. Errors name what is wrong.
    pub fn source(&self) -> Result<(IpAddr, u8), String> {
        let (address, len) = match self.source.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (self.source.as_str(), None),
        };
        let address: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("'{}' is not an address or prefix", self.source))?;
        let family = Family::of(&address);
        let len = match len {
            None => family.bits(),
            Some(l) => match l.trim().parse::<u8>() {
                Ok(l) if l <= family.bits() => l,
                _ => {
                    return Err(format!(
                        "'{}': the prefix length must be 0 to {}",
                        self.source,
                        family.bits()
                    ));
                }
            },
        };
        // At most 32 host bits: the data path fills them from a 32-bit hash in one word.
        if family.bits() - len > 32 {
            return Err(format!(
                "'{}': at most 32 host bits (a prefix of at least /{})",
                self.source,
                family.bits() - 32
            ));
        }
        if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
            return Err(format!(
                "'{}' cannot be a source: unspecified, multicast or loopback",
                self.source
            ));
        }
        let masked = sticky_lb_common::addr::from_words(
            family,
            sticky_lb_common::addr::masked(
                sticky_lb_common::addr::words(&address),
                sticky_lb_common::addr::prefix_mask(family, len),
            ),
        );
        Ok((masked, len))
    }
}

impl SharedTableConfig {
    /// The Redis URL without its password, for logs and messages.
    pub fn redis_for_logs(&self) -> String {
        let url = self.redis.as_str();
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &url[..scheme], &url[at + 1..])
            }
            _ => url.to_string(),
        }
    }
}

/// `stick.mode`: what a new connection's client is stuck by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StickMode {
    /// The client's (masked) address keys the stick table (IPVS persistence, HAProxy
    /// `stick on src`).
    #[default]
    ClientAddress,
    /// No stickiness: every new connection is placed by the policy alone, and no entry is kept
    /// (applications that keep their sessions in a shared store). Each connection still stays
    /// on its backend; health checks, drain and weights work as usual.
    None,
}

impl StickMode {
    pub fn name(self) -> &'static str {
        match self {
            StickMode::ClientAddress => "client-address",
            StickMode::None => "none",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickConfig {
    /// `client-address` (the default) or `none`.
    #[serde(default)]
    pub mode: StickMode,
    /// Idle time after which a client's entry expires (`30m`, `2s`, `1h30m`, or bare seconds);
    /// at least [`MIN_STICK_TIMEOUT`].
    #[serde(default = "default_stick_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Prefix length applied to the client address before it keys the table (IPVS `-M`,
    /// HAProxy `ipmask`): 0 to 32 bits for an IPv4 service, 0 to 128 for IPv6. 0 sticks every
    /// client of the service to one backend until that backend fails (active/backup). Unset:
    /// the family's default, [`Family::default_client_mask`] (32 for IPv4, each address its own
    /// entry; 64 for IPv6, because privacy addresses rotate inside a /64). See
    /// [`ServiceConfig::client_mask`].
    #[serde(default)]
    pub client_mask: Option<u8>,
    /// Flood guard: new entries per second per CPU; above it a new client is placed by the
    /// policy's hash without an entry, so a SYN flood cannot evict real clients. 0 = no limit.
    #[serde(default = "default_insert_rate_limit")]
    pub insert_rate_limit: u32,
    /// `mode: http` only: persistence by a sealed cookie the balancer inserts.
    #[serde(default)]
    pub cookie: Option<CookieConfig>,
    /// `mode: http` only: persistence by a session token kept in the shared store.
    #[serde(default)]
    pub token: Option<TokenConfig>,
    /// `mode: http` only: a request whose backend is down or disabled is placed again
    /// (`redispatch`, default) or answered 503 (`strict`).
    #[serde(default)]
    pub on_failure: OnFailure,
}

impl Default for StickConfig {
    fn default() -> Self {
        StickConfig {
            mode: StickMode::default(),
            timeout: default_stick_timeout(),
            client_mask: None,
            insert_rate_limit: default_insert_rate_limit(),
            cookie: None,
            token: None,
            on_failure: OnFailure::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    /// Of the service's family (the VIP's).
    pub address: IpAddr,
    /// NAT: the port the backend listens on (default the service's); other modes forward the
    /// packet's port unchanged.
    #[serde(default)]
    pub port: Option<u16>,
    /// Destination MAC: the backend's (DSR) or its next hop's (tunnel, NAT); looked up in the
    /// neighbour table when absent.
    #[serde(default, deserialize_with = "mac")]
    pub mac: Option<[u8; 6]>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Overrides of the service's health check for this backend.
    #[serde(default)]
    pub health_check: HealthCheckConfig,
}

/// A health check as written in the config: every field optional, so a backend can override
/// only what differs from its service, and the service only what differs from the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(rename = "type")]
    pub kind: Option<CheckKind>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Consecutive successes that bring a down backend up.
    pub rise: Option<u32>,
    /// Consecutive failures that take an up backend down.
    pub fall: Option<u32>,
    /// Port to check on the backend's own address; default the service (VIP) port.
    pub port: Option<u16>,
    /// HTTP: the path to GET.
    pub path: Option<String>,
    /// HTTP: the status expected, a class (`2xx`) or a code (`204`).
    pub expect: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckKind {
    /// The check passes when a TCP connection is accepted.
    Tcp,
    /// The check passes when `GET path` answers with the expected status.
    Http,
    /// No checks: the backend is always considered healthy.
    None,
}

/// A health check with every field decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub port: u16,
    pub path: String,
    pub expect: String,
}

impl HealthCheckConfig {
    /// This config's fields where set, `base`'s otherwise.
    fn over(&self, base: &HealthCheckConfig) -> HealthCheckConfig {
        HealthCheckConfig {
            kind: self.kind.or(base.kind),
            interval: self.interval.or(base.interval),
            timeout: self.timeout.or(base.timeout),
            rise: self.rise.or(base.rise),
            fall: self.fall.or(base.fall),
            port: self.port.or(base.port),
            path: self.path.clone().or_else(|| base.path.clone()),
            expect: self.expect.clone().or_else(|| base.expect.clone()),
        }
    }
}

impl HealthCheckConfig {
    fn is_set(&self) -> bool {
        self.kind.is_some()
            || self.interval.is_some()
            || self.timeout.is_some()
            || self.rise.is_some()
            || self.fall.is_some()
            || self.port.is_some()
            || self.path.is_some()
            || self.expect.is_some()
    }
}

impl ServiceConfig {
    /// The service's address family: its VIP's (validation holds its backends to it).
    pub fn family(&self) -> Family {
        Family::of(&self.vip)
    }

    /// The client prefix length in bits: `stick.client_mask`, or the family's default (32 for
    /// IPv4, 64 for IPv6).
    pub fn client_mask(&self) -> u8 {
        self.stick
            .client_mask
            .unwrap_or_else(|| self.family().default_client_mask())
    }

    /// The check for backend `i`: its overrides over the service's over the defaults (TCP
    /// connect to the backend's address on the service port every 2 s, timeout 1 s, rise 2,
    /// fall 3, like HAProxy's `check inter 2s rise 2 fall 3`).
    pub fn health_check(&self, i: usize) -> HealthCheck {
        self.resolve_check(
            &self.backends[i].health_check.over(&self.health_check),
            self.backend_port(self.backends[i].port),
        )
    }

    /// The port a backend with `port` in its config listens on: its own with NAT or HTTP, else
    /// the service's (the packet's port is not changed).
    pub fn backend_port(&self, port: Option<u16>) -> u16 {
        match (self.mode, self.forwarding) {
            (ServiceMode::Http, _) | (_, Forwarding::Nat) => port.unwrap_or(self.port),
            _ => self.port,
        }
    }

    /// The source NAT of a NAT service, if on (validated: the range parses).
    pub fn source_nat(&self) -> Option<SourceNat> {
        match (self.forwarding, &self.source_nat) {
            (Forwarding::Nat, Some(s)) => s.resolve().ok().flatten(),
            _ => None,
        }
    }

    /// The check a backend without overrides gets (one added at run time, with `port` if it
    /// was given one).
    pub fn service_health_check(&self, port: Option<u16>) -> HealthCheck {
        self.resolve_check(&self.health_check, self.backend_port(port))
    }

    /// The check `c` decides, on `port` unless it names one.
    fn resolve_check(&self, c: &HealthCheckConfig, port: u16) -> HealthCheck {
        let c = c.clone();
        HealthCheck {
            kind: c.kind.unwrap_or(CheckKind::Tcp),
            interval: c.interval.unwrap_or(Duration::from_secs(2)),
            timeout: c.timeout.unwrap_or(Duration::from_secs(1)),
            rise: c.rise.unwrap_or(2),
            fall: c.fall.unwrap_or(3),
            port: c.port.unwrap_or(port),
            path: c.path.unwrap_or_else(|| "/".into()),
            expect: c.expect.unwrap_or_else(|| "2xx".into()),
        }
    }
}

/// Whether an HTTP status matches an `expect` of the form `2xx` or `204`.
pub fn status_matches(expect: &str, status: u16) -> bool {
    let expect = expect.as_bytes();
    let code = status.to_string();
    expect.len() == 3
        && code.len() == 3
        && expect
            .iter()
            .zip(code.as_bytes())
            .all(|(e, c)| *e == b'x' || e == c)
}

fn default_key_prefix() -> String {
    "sticky-lb".into()
}

fn default_shared_queue() -> usize {
    65_536
}

fn default_load_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_stick_table_size() -> u32 {
    DEFAULT_STICK_TABLE_SIZE
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_flow_table_size() -> u32 {
    DEFAULT_FLOW_TABLE_SIZE
}
fn default_flow_idle_timeout() -> Duration {
    // IPVS's default for established TCP connections.
    Duration::from_secs(15 * 60)
}
fn default_flow_opening_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_flow_closing_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_insert_rate_limit() -> u32 {
    5_000
}
fn default_maglev_table_size() -> u32 {
    DEFAULT_MAGLEV_TABLE_SIZE
}
fn default_stick_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_weight() -> u32 {
    1
}

/// A configuration error: the field path, the line if known, and what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.field.is_empty(), self.line) {
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => write!(f, "{}", self.message),
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.field, self.message),
            (false, None) => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// A type or syntax error of serde_yaml, with the field and line it names. Also used for
    /// the other YAML files the config points at (`cookie_keys`).
    pub(crate) fn from_yaml(e: serde_yaml::Error) -> ConfigError {
        let line = e.location().map(|l| l.line());
        // serde_yaml appends "at line L column C"; we print the line our own way.
        let mut message = e.to_string();
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        // serde_yaml prefixes the path ("services[0].vip: ..."); keep it as the field.
        let (field, message) = match message.split_once(": ") {
            Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest.to_string()),
            _ => (String::new(), message),
        };
        ConfigError {
            field,
            line,
            message,
        }
    }
}

impl Config {
    /// The runtime's worker threads: `threads`, or the CPUs this process may run on (its
    /// affinity mask and cgroup quota), at least 1.
    pub fn worker_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// Reads, parses and validates a config file. `check_interface` also requires the interface
    /// to exist in the current network namespace.
    pub fn load(path: &Path, check_interface: bool) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: String::new(),
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Config::parse(&text, check_interface)
    }

    /// Parses and validates config text (see [`Config::load`]). A type error (an unknown field,
    /// a bad address, a duration or MAC that does not parse) names the field and the line the
    /// YAML parser reports; a broken rule names the field and the line found in `text`.
    pub fn parse(text: &str, check_interface: bool) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(ConfigError::from_yaml)?;
        config.validate(text, check_interface)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid config the tests of every part of this module edit to break one rule.
    pub(super) const GOOD: &str = "\
interface: lo
xdp_mode: generic
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    stick:
      timeout: 2s
      client_mask: 24
    backends:
      - name: web-1
        address: 198.18.0.11
        weight: 2
      - name: web-2
        address: 198.18.0.12
        mac: 02:00:00:00:00:12
";

    /// The error `text` gets, as printed.
    pub(super) fn error(text: &str) -> String {
        Config::parse(text, false).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = Config::parse(GOOD, false).unwrap();
        assert_eq!(config.xdp_mode, XdpMode::Generic);
        assert_eq!(config.on_exit, OnExit::KeepRunning);
        assert_eq!(config.stick_table_size, DEFAULT_STICK_TABLE_SIZE);
        let service = &config.services[0];
        assert_eq!(service.maglev_table_size, 65537);
        assert_eq!(service.stick.timeout, Duration::from_secs(2));
        assert_eq!(service.client_mask(), 24);
        assert_eq!(service.backends[0].weight, 2);
        assert_eq!(service.backends[1].weight, 1);
        assert_eq!(service.backends[1].mac, Some([2, 0, 0, 0, 0, 0x12]));
    }

    #[test]
    fn on_exit_detach_is_still_accepted() {
        let text = GOOD.replace(
            "xdp_mode: generic\n",
            "xdp_mode: generic\non_exit: detach\n",
        );
        assert_eq!(Config::parse(&text, false).unwrap().on_exit, OnExit::Detach);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let text = GOOD.replace("        weight: 2", "        wieght: 2");
        let e = error(&text);
        assert!(e.contains("unknown field `wieght`"), "{e}");
        assert!(e.contains("line 13"), "{e}");
    }

    #[test]
    fn bad_address_is_named_with_its_line() {
        let e = error(&GOOD.replace("198.18.0.12", "198.18.0.300"));
        assert!(e.contains("services[0].backends[1].address"), "{e}");
        assert!(e.contains("line 15"), "{e}");
    }

    #[test]
    fn compound_duration_parses() {
        let text = GOOD.replace("timeout: 2s", "timeout: 1h30m");
        let config = Config::parse(&text, false).unwrap();
        assert_eq!(
            config.services[0].stick.timeout,
            Duration::from_secs(90 * 60)
        );
    }

    #[test]
    fn bad_duration_is_named_with_its_line() {
        let e = error(&GOOD.replace("timeout: 2s", "timeout: 2 fortnights"));
        assert!(
            e.starts_with("services[0].stick.timeout (line 8): '2 fortnights' is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn bad_mac_is_named_with_its_line() {
        let e = error(&GOOD.replace("02:00:00:00:00:12", "02:00:00:00:00"));
        assert!(
            e.starts_with("services[0].backends[1].mac (line 16): '02:00:00:00:00' is not a MAC"),
            "{e}"
        );
    }

    #[test]
    fn health_checks_merge_backend_over_service_over_defaults() {
        let text = GOOD
            .replace("    backends:\n", "    health_check:\n      type: http\n      interval: 500ms\n      timeout: 200ms\n      path: /healthz\n    backends:\n")
            .replace("        weight: 2\n", "        weight: 2\n        health_check:\n          port: 8080\n          expect: 204\n");
        let config = Config::parse(&text, false).unwrap();
        let service = &config.services[0];
        let first = service.health_check(0);
        assert_eq!(
            (
                first.kind,
                first.port,
                first.expect.as_str(),
                first.path.as_str()
            ),
            (CheckKind::Http, 8080, "204", "/healthz")
        );
        assert_eq!(
            (first.interval, first.rise, first.fall),
            (Duration::from_millis(500), 2, 3)
        );
        let second = service.health_check(1);
        assert_eq!((second.port, second.expect.as_str()), (80, "2xx"));
        let defaults = Config::parse(GOOD, false).unwrap().services[0].health_check(0);
        assert_eq!(
            (defaults.kind, defaults.interval, defaults.timeout),
            (
                CheckKind::Tcp,
                Duration::from_secs(2),
                Duration::from_secs(1)
            )
        );
    }

    #[test]
    fn shared_table_parses_with_defaults() {
        let text = GOOD.replace(
            "xdp_mode: generic\n",
            "xdp_mode: generic\nnode: lb-1\nshared_table:\n  redis: redis://198.18.0.250:6379/\n",
        );
        let config = Config::parse(&text, false).unwrap();
        assert_eq!(config.node.as_deref(), Some("lb-1"));
        assert_eq!(
            config.shared_table,
            Some(SharedTableConfig {
                redis: "redis://198.18.0.250:6379/".into(),
                key_prefix: "sticky-lb".into(),
                queue: 65_536,
                load_timeout: Duration::from_secs(2),
            })
        );
        let plain = Config::parse(GOOD, false).unwrap();
        assert!(plain.node.is_none() && plain.shared_table.is_none());
    }

    #[test]
    fn stick_mode_none_parses_and_an_unknown_mode_is_named() {
        let config = Config::parse(GOOD, false).unwrap();
        assert_eq!(config.services[0].stick.mode, StickMode::ClientAddress);
        let text = GOOD.replace("    stick:\n", "    stick:\n      mode: none\n");
        let config = Config::parse(&text, false).unwrap();
        assert_eq!(config.services[0].stick.mode, StickMode::None);
        let e = error(&GOOD.replace("    stick:\n", "    stick:\n      mode: sometimes\n"));
        assert!(
            e.starts_with("services[0].stick.mode (line 8): unknown variant `sometimes`"),
            "{e}"
        );
    }

    #[test]
    fn status_classes() {
        assert!(status_matches("2xx", 204));
        assert!(status_matches("204", 204));
        assert!(!status_matches("2xx", 500));
        assert!(!status_matches("200", 204));
    }
}

#[cfg(test)]
mod example_configs {
    use super::*;

    /// The configs shipped in config/ stay valid as the format evolves.
    #[test]
    fn shipped_configs_parse() {
        for (name, text) in [
            (
                "sticky-lb.yaml",
                include_str!("../../../config/sticky-lb.yaml"),
            ),
            ("demo.yaml", include_str!("../../../config/demo.yaml")),
            (
                "demo-cluster.yaml",
                include_str!("../../../config/demo-cluster.yaml"),
            ),
            (
                "demo-web.yaml",
                include_str!("../../../config/demo-web.yaml"),
            ),
        ] {
            Config::parse(text, false).unwrap_or_else(|e| panic!("config/{name}: {e}"));
        }
    }

    #[test]
    fn redis_passwords_stay_out_of_logs() {
        let shared = |redis: &str| SharedTableConfig {
            redis: redis.into(),
            key_prefix: default_key_prefix(),
            queue: default_shared_queue(),
            load_timeout: default_load_timeout(),
        };
        assert_eq!(
            shared("redis://user:secret@198.18.0.250:6379/0").redis_for_logs(),
            "redis://***@198.18.0.250:6379/0"
        );
        assert_eq!(
            shared("redis://198.18.0.250/").redis_for_logs(),
            "redis://198.18.0.250/"
        );
    }
}
