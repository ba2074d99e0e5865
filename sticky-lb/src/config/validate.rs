//! The rules a parsed config must follow beyond its types: limits of the data path's maps,
//! unique names and addresses, timeouts the data path's clocks can honour, health checks that
//! make sense. An error names the field by its path and, where it can be found, its line.

use super::{
    CheckKind, Config, ConfigError, Forwarding, HealthCheckConfig, OnFailure, Policy, SameSite,
    ServiceConfig, ServiceMode, SourceNat, is_token,
    location::{PathPart, locate, render_path},
};
use crate::maglev::is_prime;
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};
use sticky_lb_common::{Family, MAX_BACKENDS, MAX_LEAST_CONN_BACKENDS, MAX_SERVICES};

/// Largest Maglev table accepted (a prime); 16 services x 2 copies x this x 4 bytes stays small.
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 1_000_003;
/// Shortest stick timeout: entries are refreshed every half timeout by a clock that ticks every
/// 1 to 10 ms (jiffies).
pub const MIN_STICK_TIMEOUT: Duration = Duration::from_millis(100);
/// Shortest connection timeouts: twice the longest refresh interval (`STICK_REFRESH_NS`).
pub const MIN_FLOW_TIMEOUT: Duration = Duration::from_secs(2);

impl Config {
    /// Checks every rule on a parsed config; the first broken one is the error, naming the field
    /// and its line in `text`. `check_interface` also requires the interface to exist in the
    /// current network namespace.
    pub(super) fn validate(&self, text: &str, check_interface: bool) -> Result<(), ConfigError> {
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
        if self.threads.is_some_and(|t| t == 0 || t > 1024) {
            return Err(err(&[K("threads")], "must be 1 to 1024".into()));
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
        if let Some(node) = &self.node
            && (node.is_empty() || node.len() > 64 || node.chars().any(|c| c.is_whitespace()))
        {
            return Err(err(
                &[K("node")],
                "must be a name of 1 to 64 characters without spaces".into(),
            ));
        }
        if let Some(shared) = &self.shared_table {
            let at = |field: &'static str| [K("shared_table"), K(field)];
            if let Err(e) = redis::Client::open(shared.redis.as_str()) {
                return Err(err(
                    &at("redis"),
                    format!("'{}' is not a Redis URL: {e}", shared.redis_for_logs()),
                ));
            }
            if shared.key_prefix.is_empty()
                || shared
                    .key_prefix
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '*' | '?' | '[' | ']' | '\\'))
            {
                return Err(err(
                    &at("key_prefix"),
                    "must be a non-empty prefix without spaces or glob characters".into(),
                ));
            }
            if shared.queue == 0 {
                return Err(err(&at("queue"), "must be at least 1".into()));
            }
            if shared.load_timeout > Duration::from_secs(60) {
                return Err(err(
                    &at("load_timeout"),
                    "must be at most 60s (the node attaches only after it)".into(),
                ));
            }
            // Names travel between nodes in tab-separated messages.
            for (i, service) in self.services.iter().enumerate() {
                if service.name.contains(['\t', '\n', '\r']) {
                    return Err(err(
                        &[K("services"), I(i), K("name")],
                        "must not hold a tab or line break with shared_table".into(),
                    ));
                }
                for (k, backend) in service.backends.iter().enumerate() {
                    if backend.name.contains(['\t', '\n', '\r']) {
                        return Err(err(
                            &[K("services"), I(i), K("backends"), I(k), K("name")],
                            "must not hold a tab or line break with shared_table".into(),
                        ));
                    }
                }
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
                        "duplicate service {} (also services[{j}])",
                        SocketAddr::new(service.vip, service.port)
                    ),
                ));
            }
            if let Err(message) = check_vip(service.vip) {
                return Err(err(&at("vip"), message));
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
            let family = service.family();
            if service
                .stick
                .client_mask
                .is_some_and(|bits| bits > family.bits())
            {
                let mask = [K("services"), I(i), K("stick"), K("client_mask")];
                return Err(err(
                    &mask,
                    format!("must be a prefix length from 0 to {}", family.bits()),
                ));
            }
            match (service.forwarding, &service.tunnel) {
                (Forwarding::Tunnel, None) => {
                    return Err(err(
                        &at("forwarding"),
                        "tunnel needs `tunnel: {source: ADDRESS or PREFIX}` beside it, the outer source of encapsulated packets".into(),
                    ));
                }
                (other, Some(_)) if other != Forwarding::Tunnel => {
                    return Err(err(
                        &at("tunnel"),
                        format!(
                            "applies only to forwarding: tunnel (this service uses {})",
                            other.name()
                        ),
                    ));
                }
                (Forwarding::Tunnel, Some(tunnel)) => {
                    let source = [K("services"), I(i), K("tunnel"), K("source")];
                    let (address, _) = tunnel.source().map_err(|m| err(&source, m))?;
                    if Family::of(&address) != family {
                        return Err(err(
                            &source,
                            format!(
                                "{} is {} but the service's vip {} is {family}: the outer header is of the service's family",
                                tunnel.source,
                                Family::of(&address),
                                service.vip
                            ),
                        ));
                    }
                }
                _ => {}
            }
            if let Some(source_nat) = &service.source_nat {
                let field = [K("services"), I(i), K("source_nat")];
                if service.forwarding != Forwarding::Nat {
                    return Err(err(
                        &field,
                        format!(
                            "applies only to forwarding: nat (this service uses {})",
                            service.forwarding.name()
                        ),
                    ));
                }
                match source_nat.resolve() {
                    Err(message) => {
                        let ports = [K("services"), I(i), K("source_nat"), K("ports")];
                        return Err(err(&ports, message));
                    }
                    Ok(Some(SourceNat {
                        address: Some(address),
                        ..
                    })) => {
                        let field = [K("services"), I(i), K("source_nat"), K("address")];
                        if Family::of(&address) != family {
                            return Err(err(
                                &field,
                                format!(
                                    "{address} is {} but the service's vip {} is {family}",
                                    Family::of(&address),
                                    service.vip
                                ),
                            ));
                        }
                        if address == service.vip
                            || address.is_unspecified()
                            || address.is_multicast()
                            || address.is_loopback()
                        {
                            return Err(err(
                                &field,
                                format!(
                                    "{address} cannot be a source: a balancer address other than the vip, where backends' replies reach the balancer"
                                ),
                            ));
                        }
                    }
                    Ok(_) => {}
                }
            }
            if service.stick.timeout < MIN_STICK_TIMEOUT {
                let timeout = [K("services"), I(i), K("stick"), K("timeout")];
                return Err(err(
                    &timeout,
                    "must be at least 100ms (the data path's clock ticks every few milliseconds)"
                        .into(),
                ));
            }
            self.check_http(i, service)
                .map_err(|(path, message)| err(&path, message))?;
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
                if let Err(message) = check_backend_address(service.vip, backend.address) {
                    return Err(err(&at("address"), message));
                }
                if let Some(port) = backend.port {
                    if service.forwarding != Forwarding::Nat && service.mode != ServiceMode::Http {
                        return Err(err(
                            &at("port"),
                            format!(
                                "a backend port other than the service's needs forwarding: nat ({} forwards the packet's port unchanged)",
                                service.forwarding.name()
                            ),
                        ));
                    }
                    if port == 0 {
                        return Err(err(&at("port"), "must be 1 to 65535".into()));
                    }
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
                && let Err(message) = check_least_conn_size(&service.name, service.backends.len())
            {
                return Err(err(&at("backends"), message));
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

impl Config {
    /// The rules of `mode: http` services and of the settings only they may use: the field
    /// (as a path) and what is wrong.
    fn check_http(&self, i: usize, service: &ServiceConfig) -> Result<(), (Vec<PathPart>, String)> {
        use PathPart::{Index as I, Key as K};
        let at = |fields: &[&'static str]| {
            let mut path = vec![K("services"), I(i)];
            path.extend(fields.iter().map(|f| K(f)));
            path
        };
        let http = service.mode == ServiceMode::Http;
        if !http {
            let only_http = "applies only to mode: http (the XDP data path never reads a request)";
            if service.http.is_some() {
                return Err((at(&["http"]), only_http.into()));
            }
            if service.stick.cookie.is_some() {
                return Err((at(&["stick", "cookie"]), only_http.into()));
            }
            if service.stick.token.is_some() {
                return Err((at(&["stick", "token"]), only_http.into()));
            }
            if service.stick.on_failure != OnFailure::Redispatch {
                return Err((at(&["stick", "on_failure"]), only_http.into()));
            }
            return Ok(());
        }
        if service.forwarding != Forwarding::Dsr || service.tunnel.is_some() {
            return Err((
                at(&["forwarding"]),
                "does not apply to mode: http (the proxy connects to the backends itself)".into(),
            ));
        }
        if service.source_nat.is_some() {
            return Err((
                at(&["source_nat"]),
                "does not apply to mode: http (backends see the balancer's address; the client's is in X-Forwarded-For)".into(),
            ));
        }
        if service.stick.client_mask.is_some() && service.stick.cookie.is_some() {
            return Err((
                at(&["stick", "client_mask"]),
                "does not apply with stick.cookie (the cookie, not the address, keys the session)"
                    .into(),
            ));
        }
        match (&service.stick.cookie, &service.stick.token) {
            (Some(_), Some(_)) => {
                return Err((
                    at(&["stick", "token"]),
                    "stick.cookie and stick.token are two persistence methods: choose one".into(),
                ));
            }
            (Some(cookie), None) => {
                if self.cookie_keys.is_none() {
                    return Err((
                        at(&["stick", "cookie"]),
                        "needs cookie_keys: the key file that seals the cookies (the same on every node)".into(),
                    ));
                }
                if !is_token(&cookie.name) {
                    return Err((
                        at(&["stick", "cookie", "name"]),
                        format!(
                            "'{}' is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)",
                            cookie.name
                        ),
                    ));
                }
                let attribute = |v: &str| {
                    !v.is_empty()
                        && v.bytes()
                            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
                };
                if cookie.domain.as_deref().is_some_and(|d| !attribute(d)) {
                    return Err((
                        at(&["stick", "cookie", "domain"]),
                        "must be a domain without spaces, ';' or ','".into(),
                    ));
                }
                if !cookie.path.starts_with('/') || !attribute(&cookie.path) {
                    return Err((
                        at(&["stick", "cookie", "path"]),
                        "must start with '/' and hold no spaces, ';' or ','".into(),
                    ));
                }
                if cookie.samesite == Some(SameSite::None) && !cookie.secure {
                    return Err((
                        at(&["stick", "cookie", "samesite"]),
                        "None needs secure: true (browsers drop a SameSite=None cookie without Secure)".into(),
                    ));
                }
                for (field, value) in [
                    ("max_idle", cookie.max_idle),
                    ("max_life", cookie.max_life),
                    ("max_age", cookie.max_age),
                ] {
                    if value.is_some_and(|v| v < Duration::from_secs(1)) {
                        return Err((
                            at(&["stick", "cookie", field]),
                            "must be at least 1s (the sealed times count seconds)".into(),
                        ));
                    }
                }
            }
            (None, Some(token)) => {
                let named = [
                    token.cookie.is_some(),
                    token.header.is_some(),
                    token.learn_from_response_cookie.is_some(),
                ];
                if named.iter().filter(|n| **n).count() != 1 {
                    return Err((
                        at(&["stick", "token"]),
                        "needs exactly one of cookie, header or learn_from_response_cookie".into(),
                    ));
                }
                for (field, name) in [
                    ("cookie", &token.cookie),
                    ("header", &token.header),
                    (
                        "learn_from_response_cookie",
                        &token.learn_from_response_cookie,
                    ),
                ] {
                    if let Some(name) = name
                        && !is_token(name)
                    {
                        return Err((
                            at(&["stick", "token", field]),
                            format!("'{name}' is not a cookie or header name"),
                        ));
                    }
                }
                if token.cache == 0 {
                    return Err((
                        at(&["stick", "token", "cache"]),
                        "must be at least 1".into(),
                    ));
                }
                if self.shared_table.is_none() {
                    return Err((
                        at(&["stick", "token"]),
                        "needs shared_table: tokens live in its Redis store, so every node routes them alike".into(),
                    ));
                }
            }
            (None, None) => {
                if service.stick.on_failure == OnFailure::Strict {
                    return Err((
                        at(&["stick", "on_failure"]),
                        "strict needs stick.cookie or stick.token (without them no request names a backend)".into(),
                    ));
                }
            }
        }
        let settings = service.http.clone().unwrap_or_default();
        if settings.response_timeout < Duration::from_millis(10) {
            return Err((
                at(&["http", "response_timeout"]),
                "must be at least 10ms".into(),
            ));
        }
        if let Some(tls) = &settings.tls {
            for (field, path) in [("certificate", &tls.certificate), ("key", &tls.key)] {
                if let Err(e) = std::fs::metadata(path) {
                    return Err((
                        at(&["http", "tls", field]),
                        format!("cannot read {}: {e}", path.display()),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether a least-conn service named `service` may have `backends` backends (counting one
/// about to be added): the data path compares at most [`MAX_LEAST_CONN_BACKENDS`] per pick. The
/// same rule holds for the config and for backends added at run time; the error names the
/// service and the limit.
pub fn check_least_conn_size(service: &str, backends: usize) -> Result<(), String> {
    if backends > MAX_LEAST_CONN_BACKENDS as usize {
        return Err(format!(
            "least-conn service '{service}' takes at most {MAX_LEAST_CONN_BACKENDS} backends, not {backends}"
        ));
    }
    Ok(())
}

/// Whether `vip` can be a service's address: a unicast address a client can reach through a
/// router. IPv6 also rules out loopback, link-local (fe80::/10: it needs a zone, and a router
/// does not forward it) and IPv4-mapped addresses (::ffff:0:0/96: such packets are IPv4 on the
/// wire, so the IPv6 service would never see one).
fn check_vip(vip: IpAddr) -> Result<(), String> {
    let why = match vip {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() => "",
        IpAddr::V4(_) => return Ok(()),
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => "",
        IpAddr::V6(v6) if v6.is_loopback() => ": a loopback address",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            ": a link-local address (fe80::/10) is not routed"
        }
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            ": an IPv4-mapped address (::ffff:0:0/96) arrives as IPv4; write the IPv4 address"
        }
        IpAddr::V6(_) => return Ok(()),
    };
    Err(format!("{vip} cannot be a VIP{why}"))
}

/// Whether `address` can be a backend of a service whose VIP is `vip`: of the VIP's family (a
/// service is one family: the data path forwards the client's packet as it came, so the
/// backend must take the same family) and a unicast address the controller can check and
/// resolve on the interface (not link-local for IPv6, which needs a zone, nor IPv4-mapped).
/// The same rule holds for the config and for backends added at run time.
pub fn check_backend_address(vip: IpAddr, address: IpAddr) -> Result<(), String> {
    let (family, vip_family) = (Family::of(&address), Family::of(&vip));
    if family != vip_family {
        return Err(format!(
            "{address} is {family} but the service's vip {vip} is {vip_family}: a service is one family"
        ));
    }
    if address == vip {
        return Err(format!(
            "{address} cannot be a backend: it is the service's own vip (backends answer for the \
             vip on loopback, but are reached at an address of their own)"
        ));
    }
    let why = match address {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() => "",
        // Frames for a backend leave on the balancer's interface: loopback is never there.
        IpAddr::V4(v4) if v4.is_loopback() => ": a loopback address",
        IpAddr::V4(_) => return Ok(()),
        IpAddr::V6(v6) if v6.is_loopback() => ": a loopback address",
        IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => "",
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            ": a link-local address (fe80::/10) needs a zone; use a global or unique local address"
        }
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            ": an IPv4-mapped address (::ffff:0:0/96) is IPv4 on the wire"
        }
        IpAddr::V6(_) => return Ok(()),
    };
    Err(format!("{address} cannot be a backend{why}"))
}

/// The interface's index in the current network namespace, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{GOOD, error};

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
    fn client_mask_takes_0_to_32() {
        let text = GOOD.replace("client_mask: 24", "client_mask: 0");
        let config = Config::parse(&text, false).unwrap();
        assert_eq!(config.services[0].stick.client_mask, Some(0));
        let e = error(&GOOD.replace("client_mask: 24", "client_mask: 33"));
        assert_eq!(
            e,
            "services[0].stick.client_mask (line 9): must be a prefix length from 0 to 32"
        );
    }

    #[test]
    fn stick_timeout_below_the_clock_is_rejected() {
        let e = error(&GOOD.replace("timeout: 2s", "timeout: 50ms"));
        assert!(
            e.starts_with("services[0].stick.timeout (line 8): must be at least 100ms"),
            "{e}"
        );
    }

    #[test]
    fn least_conn_size_is_limited() {
        assert!(check_least_conn_size("api", MAX_LEAST_CONN_BACKENDS as usize).is_ok());
        assert_eq!(
            check_least_conn_size("api", MAX_LEAST_CONN_BACKENDS as usize + 1).unwrap_err(),
            format!(
                "least-conn service 'api' takes at most {MAX_LEAST_CONN_BACKENDS} backends, not {}",
                MAX_LEAST_CONN_BACKENDS + 1
            )
        );
        let mut text = GOOD.replace("    port: 80\n", "    port: 80\n    policy: least-conn\n");
        for k in 3..=MAX_LEAST_CONN_BACKENDS + 1 {
            text += &format!("      - name: web-{k}\n        address: 198.18.1.{k}\n");
        }
        let e = error(&text);
        assert!(
            e.starts_with(&format!(
                "services[0].backends (line 11): least-conn service 'web' takes at most {MAX_LEAST_CONN_BACKENDS} backends"
            )),
            "{e}"
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

    /// [`GOOD`] as an IPv6 service (2001:db8::/32, the documentation prefix), lines unchanged.
    fn good_v6() -> String {
        GOOD.replace("198.18.0.100", "2001:db8::100")
            .replace("198.18.0.11", "2001:db8:1::11")
            .replace("198.18.0.12", "2001:db8:1::12")
    }

    /// GOOD with `lines` added to its service (after `port: 80`).
    fn with_service_lines(lines: &str) -> String {
        GOOD.replace("    port: 80\n", &format!("    port: 80\n{lines}"))
    }

    #[test]
    fn tunnel_needs_a_source_of_the_services_family() {
        let config = Config::parse(
            &with_service_lines("    forwarding: tunnel\n    tunnel: {source: 198.18.240.7/24}\n"),
            false,
        )
        .unwrap();
        let (source, len) = config.services[0]
            .tunnel
            .as_ref()
            .unwrap()
            .source()
            .unwrap();
        assert_eq!((source.to_string(), len), ("198.18.240.0".to_string(), 24));
        assert_eq!(
            error(&with_service_lines("    forwarding: tunnel\n")),
            "services[0].forwarding (line 7): tunnel needs `tunnel: {source: ADDRESS or PREFIX}` beside it, the outer source of encapsulated packets"
        );
        let e = error(&with_service_lines(
            "    forwarding: tunnel\n    tunnel:\n      source: 2001:db8::1\n",
        ));
        assert!(e.starts_with("services[0].tunnel.source (line 9): 2001:db8::1 is IPv6 but the service's vip 198.18.0.100 is IPv4"), "{e}");
        let e = error(
            &with_service_lines("    forwarding: tunnel\n    tunnel: {source: 2001:db8::/64}\n")
                .replace("198.18.0.1", "2001:db8::1"),
        );
        assert!(
            e.contains("at most 32 host bits (a prefix of at least /96)"),
            "{e}"
        );
        let e = error(&with_service_lines("    tunnel: {source: 198.18.0.2}\n"));
        assert!(e.starts_with("services[0].tunnel (line 7): applies only to forwarding: tunnel (this service uses dsr)"), "{e}");
    }

    #[test]
    fn source_nat_and_backend_ports_need_nat() {
        let text = with_service_lines(
            "    forwarding: nat\n    source_nat: {address: 198.18.0.2, ports: 2000-2999}\n",
        )
        .replace(
            "        weight: 2\n",
            "        weight: 2\n        port: 8080\n",
        );
        let config = Config::parse(&text, false).unwrap();
        let service = &config.services[0];
        let nat = service.source_nat().unwrap();
        assert_eq!(nat.ports, (2000, 2999));
        assert_eq!(service.backend_port(service.backends[0].port), 8080);
        assert_eq!(service.backend_port(service.backends[1].port), 80);
        assert_eq!(
            service.health_check(0).port,
            8080,
            "checks follow the backend's port"
        );
        let config = Config::parse(
            &with_service_lines("    forwarding: nat\n    source_nat: true\n"),
            false,
        )
        .unwrap();
        assert_eq!(
            config.services[0].source_nat().unwrap(),
            SourceNat {
                address: None,
                ports: (1024, 32767)
            }
        );
        let e = error(&with_service_lines("    source_nat: true\n"));
        assert!(e.starts_with("services[0].source_nat (line 7): applies only to forwarding: nat (this service uses dsr)"), "{e}");
        let e = error(&with_service_lines(
            "    forwarding: nat\n    source_nat: {ports: 3000-2000}\n",
        ));
        assert!(e.contains("is not a port range FIRST-LAST"), "{e}");
        let e = error(&with_service_lines(
            "    forwarding: nat\n    source_nat: {address: 198.18.0.100}\n",
        ));
        assert!(e.contains("cannot be a source"), "{e}");
        let e = error(&GOOD.replace(
            "        weight: 2\n",
            "        weight: 2\n        port: 8080\n",
        ));
        assert!(e.starts_with("services[0].backends[0].port (line 14): a backend port other than the service's needs forwarding: nat"), "{e}");
    }

    #[test]
    fn ipv6_service_parses_and_its_client_mask_defaults_to_64() {
        let config = Config::parse(&good_v6(), false).unwrap();
        let service = &config.services[0];
        assert_eq!(service.family(), Family::Ipv6);
        assert_eq!(service.client_mask(), 24);
        let text = good_v6().replace("      client_mask: 24\n", "");
        let config = Config::parse(&text, false).unwrap();
        assert_eq!(config.services[0].stick.client_mask, None);
        assert_eq!(config.services[0].client_mask(), 64);
        // The IPv4 default is still each whole address.
        let config = Config::parse(&GOOD.replace("      client_mask: 24\n", ""), false).unwrap();
        assert_eq!(config.services[0].client_mask(), 32);
    }

    #[test]
    fn ipv6_client_mask_takes_0_to_128() {
        for bits in [0, 64, 128] {
            let text = good_v6().replace("client_mask: 24", &format!("client_mask: {bits}"));
            assert_eq!(
                Config::parse(&text, false).unwrap().services[0].client_mask(),
                bits
            );
        }
        let e = error(&good_v6().replace("client_mask: 24", "client_mask: 129"));
        assert_eq!(
            e,
            "services[0].stick.client_mask (line 9): must be a prefix length from 0 to 128"
        );
    }

    #[test]
    fn a_backend_of_the_other_family_is_named_with_its_line() {
        let e = error(&GOOD.replace("198.18.0.12", "2001:db8:1::12"));
        assert_eq!(
            e,
            "services[0].backends[1].address (line 15): 2001:db8:1::12 is IPv6 but the service's vip 198.18.0.100 is IPv4: a service is one family"
        );
        let e = error(&good_v6().replace("2001:db8:1::11", "198.18.0.11"));
        assert_eq!(
            e,
            "services[0].backends[0].address (line 12): 198.18.0.11 is IPv4 but the service's vip 2001:db8::100 is IPv6: a service is one family"
        );
    }

    #[test]
    fn unusable_ipv6_vips_are_refused_with_the_reason() {
        for (vip, why) in [
            ("'::'", "cannot be a VIP"),
            ("ff02::1", "cannot be a VIP"),
            ("'::1'", "cannot be a VIP: a loopback address"),
            (
                "fe80::1",
                "cannot be a VIP: a link-local address (fe80::/10)",
            ),
            (
                "'::ffff:198.18.0.100'",
                "cannot be a VIP: an IPv4-mapped address (::ffff:0:0/96)",
            ),
        ] {
            let e = error(&good_v6().replace("2001:db8::100", vip));
            let shown = vip.trim_matches('\'');
            assert!(
                e.starts_with(&format!("services[0].vip (line 5): {shown} {why}")),
                "{vip}: {e}"
            );
        }
        // The IPv4 rules are unchanged.
        let e = error(&GOOD.replace("198.18.0.100", "255.255.255.255"));
        assert_eq!(
            e,
            "services[0].vip (line 5): 255.255.255.255 cannot be a VIP"
        );
    }

    #[test]
    fn unusable_ipv6_backends_are_refused_with_the_reason() {
        for (address, why) in [
            ("ff02::1", "cannot be a backend"),
            (
                "fe80::12",
                "cannot be a backend: a link-local address (fe80::/10) needs a zone",
            ),
            (
                "'::ffff:198.18.0.12'",
                "cannot be a backend: an IPv4-mapped address",
            ),
            ("'::1'", "cannot be a backend: a loopback address"),
            (
                "2001:db8::100",
                "cannot be a backend: it is the service's own vip",
            ),
        ] {
            let e = error(&good_v6().replace("2001:db8:1::12", address));
            let shown = address.trim_matches('\'');
            assert!(
                e.starts_with(&format!(
                    "services[0].backends[1].address (line 15): {shown} {why}"
                )),
                "{address}: {e}"
            );
        }
        // The same rule for `backend add`, and for IPv4.
        let vip = "2001:db8::100".parse().unwrap();
        assert!(check_backend_address(vip, "2001:db8:1::13".parse().unwrap()).is_ok());
        assert!(check_backend_address(vip, "198.18.0.13".parse().unwrap()).is_err());
        let vip4 = "198.18.0.100".parse().unwrap();
        assert!(check_backend_address(vip4, "127.0.0.1".parse().unwrap()).is_err());
        assert!(check_backend_address(vip4, vip4).is_err());
        assert!(check_backend_address(vip4, "198.18.0.13".parse().unwrap()).is_ok());
    }

    #[test]
    fn ipv6_duplicates_are_found_and_families_do_not_collide() {
        let second = |vip: &str, address: &str| {
            format!(
                "{}  - name: web2\n    vip: {vip}\n    port: 80\n    backends:\n      - name: a\n        address: {address}\n",
                good_v6()
            )
        };
        let e = error(&second("2001:db8::100", "2001:db8:1::20"));
        assert!(
            e.starts_with("services[1].port (line 19): duplicate service [2001:db8::100]:80"),
            "{e}"
        );
        // An IPv4 service on the same port is another service.
        let config = Config::parse(&second("198.18.0.100", "198.18.0.20"), false).unwrap();
        assert_eq!(config.services[1].family(), Family::Ipv4);
        let e = error(&good_v6().replace("2001:db8:1::12", "2001:db8:1::11"));
        assert!(
            e.starts_with(
                "services[0].backends[1].address (line 15): duplicate backend address 2001:db8:1::11"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_ipv6_address_is_named_with_its_line() {
        let e = error(&good_v6().replace("2001:db8:1::12", "2001:db8:::12"));
        assert!(
            e.starts_with("services[0].backends[1].address (line 15)"),
            "{e}"
        );
    }

    /// [`GOOD`] as node `node` sharing its table through `redis`, with `extra` lines in
    /// `shared_table`: `node` is line 3, `redis` line 5, the first extra line 6.
    fn shared(node: &str, redis: &str, extra: &str) -> String {
        GOOD.replace(
            "xdp_mode: generic\n",
            &format!("xdp_mode: generic\nnode: {node}\nshared_table:\n  redis: {redis}\n{extra}"),
        )
    }

    #[test]
    fn shared_table_settings_are_refused_with_their_field_and_line() {
        const URL: &str = "redis://198.18.0.250:6379/";
        const PREFIX: &str = "must be a non-empty prefix without spaces or glob characters";
        for (text, expected) in [
            (
                shared("lb-1", "http://198.18.0.250/", ""),
                "shared_table.redis (line 5): 'http://198.18.0.250/' is not a Redis URL".into(),
            ),
            (
                shared("lb-1", URL, "  key_prefix: \"\"\n"),
                format!("shared_table.key_prefix (line 6): {PREFIX}"),
            ),
            (
                shared("lb-1", URL, "  key_prefix: \"slb*\"\n"),
                format!("shared_table.key_prefix (line 6): {PREFIX}"),
            ),
            (
                shared("lb-1", URL, "  queue: 0\n"),
                "shared_table.queue (line 6): must be at least 1".into(),
            ),
            (
                shared("lb-1", URL, "  load_timeout: 61s\n"),
                "shared_table.load_timeout (line 6): must be at most 60s".into(),
            ),
            (
                shared("\"lb 1\"", URL, ""),
                "node (line 3): must be a name of 1 to 64 characters without spaces".into(),
            ),
        ] {
            let e = error(&text);
            assert!(e.starts_with(&expected), "{e}\nexpected: {expected}");
        }
        // The limits themselves pass.
        Config::parse(
            &shared("lb-1", URL, "  queue: 1\n  load_timeout: 60s\n"),
            false,
        )
        .unwrap();
    }

    #[test]
    fn a_backend_name_with_a_tab_is_refused_with_shared_table_only() {
        let tab = |text: &str| text.replace("name: web-1", "name: \"web\\t1\"");
        let alone = Config::parse(&tab(GOOD), false).unwrap();
        assert_eq!(alone.services[0].backends[0].name, "web\t1");
        let e = error(&tab(&shared("lb-1", "redis://198.18.0.250:6379/", "")));
        assert!(
            e.starts_with(
                "services[0].backends[0].name (line 14): must not hold a tab or line break with shared_table"
            ),
            "{e}"
        );
    }

    /// A `mode: http` service `web` with `service` lines (service indentation) and `top` lines.
    fn http_service(top: &str, service: &str) -> String {
        format!(
            "interface: lo\n{top}services:\n  - name: web\n    vip: 198.18.0.100\n    port: 80\n{service}    backends:\n      - name: b1\n        address: 198.18.0.11\n        port: 8080\n"
        )
    }

    #[test]
    fn http_settings_are_refused_with_their_field_and_line() {
        const KEYS: &str = "cookie_keys: /etc/sticky-lb/cookie-keys.yaml\n";
        const SHARED: &str = "shared_table:\n  redis: redis://198.18.0.250:6379/\n";
        for (text, expected) in [
            (
                http_service(KEYS, "    stick:\n      cookie: {}\n"),
                "services[0].stick.cookie (line 8): applies only to mode: http",
            ),
            (
                http_service("", "    mode: http\n    stick:\n      cookie: {}\n"),
                "services[0].stick.cookie (line 8): needs cookie_keys",
            ),
            (
                http_service(
                    KEYS,
                    "    mode: http\n    stick:\n      cookie:\n        name: \"a b\"\n",
                ),
                "services[0].stick.cookie.name (line 10): 'a b' is not a cookie name",
            ),
            (
                http_service(
                    KEYS,
                    "    mode: http\n    stick:\n      cookie:\n        samesite: None\n",
                ),
                "services[0].stick.cookie.samesite (line 10): None needs secure: true",
            ),
            (
                http_service(
                    KEYS,
                    "    mode: http\n    stick:\n      cookie:\n        max_idle: 500ms\n",
                ),
                "services[0].stick.cookie.max_idle (line 10): must be at least 1s",
            ),
            (
                http_service(
                    KEYS,
                    "    mode: http\n    stick:\n      cookie: {}\n      token: {cookie: T}\n",
                ),
                "services[0].stick.token (line 10): stick.cookie and stick.token are two persistence methods",
            ),
            (
                http_service("", "    mode: http\n    stick:\n      token: {cookie: T}\n"),
                "services[0].stick.token (line 8): needs shared_table",
            ),
            (
                http_service(
                    SHARED,
                    "    mode: http\n    stick:\n      token: {cookie: T, header: X-T}\n",
                ),
                "services[0].stick.token (line 10): needs exactly one of cookie, header or learn_from_response_cookie",
            ),
            (
                http_service("", "    mode: http\n    stick:\n      on_failure: strict\n"),
                "services[0].stick.on_failure (line 8): strict needs stick.cookie or stick.token",
            ),
            (
                http_service("", "    mode: http\n    forwarding: nat\n"),
                "services[0].forwarding (line 7): does not apply to mode: http",
            ),
            (
                http_service("", "    http:\n      forwarded: false\n"),
                "services[0].http (line 6): applies only to mode: http",
            ),
            (
                http_service(
                    "",
                    "    mode: http\n    http:\n      tls:\n        certificate: /nonexistent/cert.pem\n        key: /nonexistent/key.pem\n",
                ),
                "services[0].http.tls.certificate (line 9): cannot read /nonexistent/cert.pem",
            ),
        ] {
            let e = error(&text);
            assert!(e.starts_with(expected), "{e}\nexpected: {expected}");
        }
        // What is allowed passes, with a backend port of its own.
        let good = Config::parse(
            &http_service(
                &format!("{KEYS}{SHARED}"),
                "    mode: http\n    policy: least-conn\n    stick:\n      cookie: {name: SRV, samesite: Lax, max_idle: 30m}\n      on_failure: strict\n",
            ),
            false,
        )
        .unwrap();
        let service = &good.services[0];
        assert_eq!(service.backend_port(service.backends[0].port), 8080);
        assert!(service.stick.cookie.as_ref().unwrap().httponly);
    }
}
