//! The rules a parsed config must follow beyond its types: limits of the data path's maps,
//! unique names and addresses, timeouts the data path's clocks can honour, health checks that
//! make sense. An error names the field by its path and, where it can be found, its line.

use super::{
    CheckKind, Config, ConfigError, HealthCheckConfig, Policy,
    location::{PathPart, locate, render_path},
};
use crate::maglev::is_prime;
use std::time::Duration;
use sticky_lb_common::{MAX_BACKENDS, MAX_LEAST_CONN_BACKENDS, MAX_SERVICES};

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
            if service.stick.client_mask > 32 {
                let mask = [K("services"), I(i), K("stick"), K("client_mask")];
                return Err(err(&mask, "must be a prefix length from 0 to 32".into()));
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
        assert_eq!(config.services[0].stick.client_mask, 0);
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
}
