//! The YAML configuration: its model, its parsing and its validation.
//!
//! Everything is checked before the kernel is touched. An error names the field by its path
//! (`services[0].backends[2].weight`) and, where it can be found, the line.

use crate::maglev::is_prime;
use serde::{Deserialize, Deserializer, de};
use std::{fmt, net::Ipv4Addr, path::Path, time::Duration};
use sticky_lb_common::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_STICK_TABLE_SIZE, MAX_BACKENDS,
    MAX_LEAST_CONN_BACKENDS, MAX_SERVICES,
};

/// Largest Maglev table accepted (a prime); 16 services x 2 copies x this x 4 bytes stays small.
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 1_000_003;
/// Shortest stick timeout: entries are refreshed every half timeout by a clock that ticks every
/// 1 to 10 ms (jiffies).
pub const MIN_STICK_TIMEOUT: Duration = Duration::from_millis(100);
/// Shortest connection timeouts: twice the longest refresh interval (`STICK_REFRESH_NS`).
pub const MIN_FLOW_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The interface clients reach the VIPs through; the XDP program attaches here.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
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
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpMode {
    /// Try native (driver) mode, fall back to generic with a log line.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExit {
    /// Detach the program and remove the pinned maps on SIGINT/SIGTERM.
    #[default]
    Detach,
    /// Leave the data path forwarding with its pinned state; a new controller adopts it.
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
    pub vip: Ipv4Addr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub forwarding: Forwarding,
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
    /// L2 direct server return: MAC rewrite, the backend answers the client directly.
    #[default]
    Dsr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickConfig {
    /// Idle time after which a client's entry expires (`30m`, `2s`, `1h`, or seconds).
    #[serde(default = "default_stick_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Prefix length applied to the client address before it keys the table: 32 sticks each
    /// address, 24 sticks a whole /24 (IPVS `-M`, HAProxy `ipmask`).
    #[serde(default = "default_client_mask")]
    pub client_mask: u8,
    /// Flood guard: new entries per second per CPU; above it a new client is placed by the
    /// policy's hash without an entry, so a SYN flood cannot evict real clients. 0 = no limit.
    #[serde(default = "default_insert_rate_limit")]
    pub insert_rate_limit: u32,
}

impl Default for StickConfig {
    fn default() -> Self {
        StickConfig {
            timeout: default_stick_timeout(),
            client_mask: default_client_mask(),
            insert_rate_limit: default_insert_rate_limit(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: String,
    pub address: Ipv4Addr,
    /// Destination MAC for DSR; looked up in the neighbour table when absent.
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
    /// The check for backend `i`: its overrides over the service's over the defaults (TCP
    /// connect to the backend's address on the service port every 2 s, timeout 1 s, rise 2,
    /// fall 3, like HAProxy's `check inter 2s rise 2 fall 3`).
    pub fn health_check(&self, i: usize) -> HealthCheck {
        self.resolve_check(&self.backends[i].health_check.over(&self.health_check))
    }

    /// The check a backend without overrides gets (one added at run time).
    pub fn service_health_check(&self) -> HealthCheck {
        self.resolve_check(&self.health_check)
    }

    fn resolve_check(&self, c: &HealthCheckConfig) -> HealthCheck {
        let c = c.clone();
        HealthCheck {
            kind: c.kind.unwrap_or(CheckKind::Tcp),
            interval: c.interval.unwrap_or(Duration::from_secs(2)),
            timeout: c.timeout.unwrap_or(Duration::from_secs(1)),
            rise: c.rise.unwrap_or(2),
            fall: c.fall.unwrap_or(3),
            port: c.port.unwrap_or(self.port),
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

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
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
fn default_client_mask() -> u8 {
    32
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

impl Config {
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

    pub fn parse(text: &str, check_interface: bool) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
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
        })?;
        config.validate(text, check_interface)?;
        Ok(config)
    }

    fn validate(&self, text: &str, check_interface: bool) -> Result<(), ConfigError> {
        let err = |path: &[PathPart], message: String| ConfigError {
            field: render_path(path),
            line: locate(text, path),
            message,
        };
        use PathPart::{Index as I, Key as K};

        if self.interface.is_empty() || self.interface.len() > 15 {
            return Err(err(
                &[K("interface")],
                "must be an interface name of 1 to 15 characters".into(),
            ));
        }
        if check_interface && interface_index(&self.interface).is_none() {
            return Err(err(
                &[K("interface")],
                format!(
                    "no interface named '{}' in this network namespace",
                    self.interface
                ),
            ));
        }
        if self.stick_table_size == 0 {
            return Err(err(&[K("stick_table_size")], "must be at least 1".into()));
        }
        if self.flow_table_size == 0 {
            return Err(err(&[K("flow_table_size")], "must be at least 1".into()));
        }
        // A connection's last-seen time is refreshed once a second at most (STICK_REFRESH_NS):
        // a shorter timeout would expire connections that are in use.
        for (field, value) in [
            ("flow_idle_timeout", self.flow_idle_timeout),
            ("flow_opening_timeout", self.flow_opening_timeout),
            ("flow_closing_timeout", self.flow_closing_timeout),
        ] {
            if value < MIN_FLOW_TIMEOUT {
                return Err(err(
                    &[K(field)],
                    "must be at least 2s (a connection's last-seen time is refreshed once a second)"
                        .into(),
                ));
            }
        }
        if self.sweep_interval.is_zero() {
            return Err(err(&[K("sweep_interval")], "must be longer than 0".into()));
        }
        if self.services.is_empty() {
            return Err(err(
                &[K("services")],
                "at least one service is required".into(),
            ));
        }
        if self.services.len() > MAX_SERVICES as usize {
            return Err(err(
                &[K("services")],
                format!("at most {MAX_SERVICES} services are supported"),
            ));
        }
        let total_backends: usize = self.services.iter().map(|s| s.backends.len()).sum();
        if total_backends > MAX_BACKENDS as usize {
            return Err(err(
                &[K("services")],
                format!("at most {MAX_BACKENDS} backends in all are supported"),
            ));
        }
        for (i, service) in self.services.iter().enumerate() {
            let at = |field: &'static str| [K("services"), I(i), K(field)];
            if service.name.is_empty() {
                return Err(err(&at("name"), "must not be empty".into()));
            }
            if let Some(j) = self.services[..i]
                .iter()
                .position(|s| s.name == service.name)
            {
                return Err(err(
                    &at("name"),
                    format!(
                        "duplicate service name '{}' (also services[{j}])",
                        service.name
                    ),
                ));
            }
            if let Some(j) = self.services[..i]
                .iter()
                .position(|s| s.vip == service.vip && s.port == service.port)
            {
                return Err(err(
                    &at("port"),
                    format!(
                        "duplicate service {}:{} (also services[{j}])",
                        service.vip, service.port
                    ),
                ));
            }
            if service.vip.is_unspecified()
                || service.vip.is_multicast()
                || service.vip.is_broadcast()
            {
                return Err(err(&at("vip"), format!("{} cannot be a VIP", service.vip)));
            }
            if service.port == 0 {
                return Err(err(&at("port"), "must be 1 to 65535".into()));
            }
            if !is_prime(service.maglev_table_size)
                || service.maglev_table_size > MAX_MAGLEV_TABLE_SIZE
            {
                return Err(err(
                    &at("maglev_table_size"),
                    format!(
                        "{} is not a prime of at most {MAX_MAGLEV_TABLE_SIZE} (Maglev needs a prime; the usual is 65537)",
                        service.maglev_table_size
                    ),
                ));
            }
            let stick = [K("services"), I(i), K("stick"), K("client_mask")];
            if service.stick.client_mask == 0 || service.stick.client_mask > 32 {
                return Err(err(&stick, "must be a prefix length from 1 to 32".into()));
            }
            if service.stick.timeout < MIN_STICK_TIMEOUT {
                let timeout = [K("services"), I(i), K("stick"), K("timeout")];
                return Err(err(
                    &timeout,
                    "must be at least 100ms (the data path's clock ticks every few milliseconds)"
                        .into(),
                ));
            }
            if service.backends.is_empty() {
                return Err(err(
                    &at("backends"),
                    "at least one backend is required".into(),
                ));
            }
            for (j, backend) in service.backends.iter().enumerate() {
                let at = |field: &'static str| [K("services"), I(i), K("backends"), I(j), K(field)];
                if backend.name.is_empty() {
                    return Err(err(&at("name"), "must not be empty".into()));
                }
                if let Some(k) = service.backends[..j]
                    .iter()
                    .position(|b| b.name == backend.name)
                {
                    return Err(err(
                        &at("name"),
                        format!(
                            "duplicate backend name '{}' (also backends[{k}])",
                            backend.name
                        ),
                    ));
                }
                if let Some(k) = service.backends[..j]
                    .iter()
                    .position(|b| b.address == backend.address)
                {
                    return Err(err(
                        &at("address"),
                        format!(
                            "duplicate backend address {} (also backends[{k}])",
                            backend.address
                        ),
                    ));
                }
                if backend.address.is_unspecified()
                    || backend.address.is_multicast()
                    || backend.address.is_broadcast()
                {
                    return Err(err(
                        &at("address"),
                        format!("{} cannot be a backend", backend.address),
                    ));
                }
                if backend.weight > 1_000_000 {
                    return Err(err(&at("weight"), "must be at most 1000000".into()));
                }
            }
            for (j, backend) in service.backends.iter().enumerate() {
                let check = service.health_check(j);
                // Name the level where the bad value was written.
                let base: Vec<PathPart> = if backend
                    .health_check
                    .over(&HealthCheckConfig::default())
                    .is_set()
                {
                    vec![K("services"), I(i), K("backends"), I(j), K("health_check")]
                } else {
                    vec![K("services"), I(i), K("health_check")]
                };
                let at = |field: &'static str| {
                    let mut p = base.clone();
                    p.push(K(field));
                    p
                };
                if check.interval.is_zero() {
                    return Err(err(&at("interval"), "must be longer than 0".into()));
                }
                if check.timeout.is_zero() || check.timeout > check.interval {
                    return Err(err(
                        &at("timeout"),
                        "must be longer than 0 and at most the interval".into(),
                    ));
                }
                if check.rise == 0 || check.fall == 0 || check.rise > 100 || check.fall > 100 {
                    return Err(err(
                        &at(if check.rise == 0 || check.rise > 100 {
                            "rise"
                        } else {
                            "fall"
                        }),
                        "must be 1 to 100".into(),
                    ));
                }
                if check.port == 0 {
                    return Err(err(&at("port"), "must be 1 to 65535".into()));
                }
                if check.kind == CheckKind::Http {
                    if !check.path.starts_with('/') || check.path.contains(char::is_whitespace) {
                        return Err(err(
                            &at("path"),
                            format!("'{}' is not an absolute path without spaces", check.path),
                        ));
                    }
                    let e = check.expect.as_bytes();
                    if e.len() != 3
                        || !(b'1'..=b'5').contains(&e[0])
                        || !e[1..].iter().all(|c| c.is_ascii_digit() || *c == b'x')
                    {
                        return Err(err(
                            &at("expect"),
                            format!("'{}' is not a status (200) or class (2xx)", check.expect),
                        ));
                    }
                }
            }
            if service.policy == Policy::LeastConn
                && service.backends.len() > MAX_LEAST_CONN_BACKENDS as usize
            {
                return Err(err(
                    &at("backends"),
                    format!(
                        "least-conn supports at most {MAX_LEAST_CONN_BACKENDS} backends per service"
                    ),
                ));
            }
            if service.backends.iter().all(|b| b.weight == 0) {
                return Err(err(
                    &at("backends"),
                    "all weights are zero: no backend could take a client".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The interface's index in the current network namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Parses `30m`, `2s`, `500ms`, `1h`, `1d` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (use e.g. 30m, 2s, 500ms, 1h)"))?;
    let millis = match unit.trim() {
        "" | "s" => number.checked_mul(1000),
        "ms" => Some(number),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        "d" => number.checked_mul(86_400_000),
        _ => None,
    }
    .ok_or_else(|| format!("'{text}' is not a duration (use e.g. 30m, 2s, 500ms, 1h)"))?;
    Ok(Duration::from_millis(millis))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 30m, 2s, 500ms or 1h")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || format!("'{text}' is not a MAC address (aa:bb:cc:dd:ee:ff)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(format!("'{text}' is not a unicast MAC address"));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn mac<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
    let text = String::deserialize(d)?;
    parse_mac(&text).map(Some).map_err(de::Error::custom)
}

/// One step of a field path.
#[derive(Clone, Copy)]
enum PathPart {
    Key(&'static str),
    Index(usize),
}

fn render_path(path: &[PathPart]) -> String {
    let mut out = String::new();
    for part in path {
        match part {
            PathPart::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            PathPart::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Finds the 1-based line of a field in block-style YAML (the style of every example config).
/// serde_yaml reports lines for syntax and type errors only; semantic checks use this. Returns
/// `None` where the text does not look like plain block YAML, and the error goes without a line.
fn locate(text: &str, path: &[PathPart]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    // The window of lines the current node spans, and the indentation its children have at least.
    let (mut start, mut end, mut min_indent) = (0usize, lines.len(), 0usize);
    let mut found = None;
    for part in path {
        match part {
            PathPart::Key(key) => {
                let (line, indent) = (start..end).find_map(|n| {
                    let l = lines[n];
                    let body = l.trim_start();
                    let indent = l.len() - body.len();
                    let body = body.strip_prefix("- ").map(str::trim_start).unwrap_or(body);
                    let indent = if l.trim_start().starts_with("- ") {
                        l.len() - body.len()
                    } else {
                        indent
                    };
                    (indent >= min_indent
                        && body
                            .strip_prefix(key)
                            .is_some_and(|r| r.trim_start().starts_with(':')))
                    .then_some((n, indent))
                })?;
                found = Some(line);
                start = line + 1;
                // The value ends where a line is indented no deeper than the key.
                end = (start..end)
                    .find(|&n| {
                        let l = lines[n];
                        let t = l.trim_start();
                        !t.is_empty()
                            && !t.starts_with('#')
                            && l.len() - t.len() <= indent
                            && !(t.starts_with("- ") && l.len() - t.len() == indent)
                    })
                    .unwrap_or(end);
                min_indent = indent;
            }
            PathPart::Index(i) => {
                let items: Vec<(usize, usize)> = (start..end)
                    .filter_map(|n| {
                        let l = lines[n];
                        let t = l.trim_start();
                        t.starts_with("- ").then_some((n, l.len() - t.len()))
                    })
                    .collect();
                let item_indent = items.iter().map(|(_, ind)| *ind).min()?;
                let items: Vec<usize> = items
                    .into_iter()
                    .filter(|(_, ind)| *ind == item_indent)
                    .map(|(n, _)| n)
                    .collect();
                let line = *items.get(*i)?;
                found = Some(line);
                start = line;
                end = items.get(i + 1).copied().unwrap_or(end);
                min_indent = item_indent;
            }
        }
    }
    found.map(|n| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
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

    fn error(text: &str) -> String {
        Config::parse(text, false).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = Config::parse(GOOD, false).unwrap();
        assert_eq!(config.xdp_mode, XdpMode::Generic);
        assert_eq!(config.on_exit, OnExit::Detach);
        assert_eq!(config.stick_table_size, DEFAULT_STICK_TABLE_SIZE);
        let service = &config.services[0];
        assert_eq!(service.maglev_table_size, 65537);
        assert_eq!(service.stick.timeout, Duration::from_secs(2));
        assert_eq!(service.stick.client_mask, 24);
        assert_eq!(service.backends[0].weight, 2);
        assert_eq!(service.backends[1].weight, 1);
        assert_eq!(service.backends[1].mac, Some([2, 0, 0, 0, 0, 0x12]));
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
    fn duplicate_backend_name_is_named_with_its_line() {
        let e = error(&GOOD.replace("name: web-2", "name: web-1"));
        assert!(
            e.starts_with("services[0].backends[1].name (line 14): duplicate backend name"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_service_is_rejected() {
        let text = format!(
            "{GOOD}  - name: web2\n    vip: 198.18.0.100\n    port: 80\n    backends:\n      - name: a\n        address: 198.18.0.20\n"
        );
        let e = error(&text);
        assert!(
            e.starts_with("services[1].port (line 19): duplicate service 198.18.0.100:80"),
            "{e}"
        );
    }

    #[test]
    fn all_weights_zero_is_rejected() {
        let text = GOOD
            .replace("weight: 2", "weight: 0")
            .replace("        mac: 02:00:00:00:00:12\n", "        weight: 0\n");
        let e = error(&text);
        assert!(
            e.starts_with("services[0].backends (line 10): all weights are zero"),
            "{e}"
        );
    }

    #[test]
    fn non_prime_table_size_is_rejected() {
        let text = GOOD.replace(
            "    port: 80\n",
            "    port: 80\n    maglev_table_size: 65536\n",
        );
        let e = error(&text);
        assert!(
            e.starts_with("services[0].maglev_table_size (line 7): 65536 is not a prime"),
            "{e}"
        );
    }

    #[test]
    fn missing_interface_is_rejected_when_checked() {
        let text = GOOD.replace("interface: lo", "interface: slb-nonexist0");
        let e = Config::parse(&text, true).unwrap_err().to_string();
        assert!(
            e.starts_with("interface (line 1): no interface named 'slb-nonexist0'"),
            "{e}"
        );
    }

    #[test]
    fn bad_mac_and_duration_and_mask() {
        assert!(error(&GOOD.replace("02:00:00:00:00:12", "02:00:00:00:00")).contains("not a MAC"));
        assert!(
            error(&GOOD.replace("timeout: 2s", "timeout: 2 fortnights")).contains("not a duration")
        );
        let e = error(&GOOD.replace("client_mask: 24", "client_mask: 33"));
        assert!(
            e.starts_with("services[0].stick.client_mask (line 9)"),
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
    fn bad_health_check_is_named() {
        let text = GOOD.replace(
            "        weight: 2\n",
            "        weight: 2\n        health_check:\n          timeout: 5s\n",
        );
        let e = error(&text);
        assert!(e.starts_with("services[0].backends[0].health_check.timeout (line 15): must be longer than 0 and at most the interval"), "{e}");
        let text = GOOD.replace(
            "    backends:\n",
            "    health_check:\n      type: http\n      expect: 2xy\n    backends:\n",
        );
        assert!(
            error(&text).starts_with("services[0].health_check.expect (line 12)"),
            "{}",
            error(&text)
        );
    }

    #[test]
    fn status_classes() {
        assert!(status_matches("2xx", 204));
        assert!(status_matches("204", 204));
        assert!(!status_matches("2xx", 500));
        assert!(!status_matches("200", 204));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("m").is_err());
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
                include_str!("../../config/sticky-lb.yaml"),
            ),
            ("demo.yaml", include_str!("../../config/demo.yaml")),
        ] {
            Config::parse(text, false).unwrap_or_else(|e| panic!("config/{name}: {e}"));
        }
    }
}

/// The IPv4 client mask for a prefix length of `bits` (0..=32), as a host-order u32.
pub fn client_mask_v4(bits: u8) -> u32 {
    u32::MAX.checked_shl(32 - bits.min(32) as u32).unwrap_or(0)
}
