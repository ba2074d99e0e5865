//! `table show` and `status`: read the pinned maps and the state file, print for people or JSON.
//! Both work while `run` is active, and after it left the data path running.

use crate::{
    dataplane::{PinDir, PinnedMaps, monotonic_ns},
    state::{self, RuntimeState},
};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};
use sticky_lb_common::{BackendId, Counter, Family, addr};

/// Which data path a read command looks at.
pub struct Target {
    pub netns: Option<String>,
    pub interface: String,
}

impl Target {
    /// `--interface` if given, else the only interface with a running sticky-lb.
    pub fn pick(netns: Option<String>, interface: Option<String>) -> Result<Target> {
        let interface = match interface {
            Some(i) => i,
            None => {
                let known = state::known_interfaces(netns.as_deref());
                match known.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        bail!("no sticky-lb data path is running here (no state in /run/sticky-lb)")
                    }
                    many => bail!(
                        "sticky-lb runs on several interfaces here ({}): pass --interface",
                        many.join(", ")
                    ),
                }
            }
        };
        Ok(Target { netns, interface })
    }

    fn open(&self) -> Result<(RuntimeState, PinnedMaps)> {
        let path = state::path(self.netns.as_deref(), &self.interface);
        let state = RuntimeState::read(&path)
            .with_context(|| format!("no sticky-lb data path is running on {}", self.interface))?;
        let maps = PinnedMaps::open(&PinDir::new(self.netns.as_deref(), &self.interface))?;
        Ok((state, maps))
    }
}

/// One row of `table show`.
#[derive(Serialize)]
pub struct StickRow {
    pub service: String,
    /// The masked client prefix (`198.18.1.0/24`, `2001:db8:1:2::/64`), or the bare address
    /// when the service keys whole addresses; see [`client_prefix`].
    pub client: String,
    pub backend: String,
    pub backend_address: Option<IpAddr>,
    pub idle_ms: u64,
    pub age_ms: u64,
    /// Idle past the service's timeout: the data path no longer honours it; the next sweep
    /// deletes it.
    pub expired: bool,
}

/// Whether `service` is a `mode: http` service, by the state file of the running data path
/// (the table commands then go to its tokens). `false` for a name the state does not know
/// (the controller answers for it).
pub fn is_http_service(target: &Target, service: &str) -> Result<bool> {
    let path = state::path(target.netns.as_deref(), &target.interface);
    let state = RuntimeState::read(&path)
        .with_context(|| format!("no sticky-lb data path is running on {}", target.interface))?;
    Ok(state
        .services
        .iter()
        .any(|s| s.name == service && s.mode == "http"))
}

/// One token of a `stick.token` service, as `table show`, `table get` and their `--json`
/// give it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TokenRow {
    pub service: String,
    pub token: String,
    pub backend: String,
    /// The backend's address and port, if the service has a backend of that name.
    pub backend_address: Option<SocketAddr>,
    /// Time left before the store forgets it (ms); `None`: no TTL (written by hand).
    pub ttl_ms: Option<u64>,
    /// Since it was placed (ms, by the placing node's wall clock); `None` if not recorded.
    pub age_ms: Option<u64>,
    /// The node that placed it ("" if not recorded).
    pub node: String,
}

/// Tokens as `table show` prints them: a header, one line per token, and the count.
pub fn token_table(rows: &[TokenRow]) -> String {
    // Our tokens have 22 characters; a learned application cookie may be longer.
    let width = rows.iter().map(|r| r.token.len()).fold(22, usize::max);
    let optional = |ms: Option<u64>| ms.map_or_else(|| "-".to_string(), seconds);
    let mut text = format!(
        "{:<16} {:<width$} {:<16} {:>10} {:>10} NODE\n",
        "SERVICE", "TOKEN", "BACKEND", "TTL", "AGE"
    );
    for r in rows {
        text += &format!(
            "{:<16} {:<width$} {:<16} {:>10} {:>10} {}\n",
            r.service,
            r.token,
            r.backend,
            optional(r.ttl_ms),
            optional(r.age_ms),
            if r.node.is_empty() { "-" } else { &r.node }
        );
    }
    text += &format!(
        "{} token{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    text
}

/// Stick entries, optionally of one service and/or one client address (masked as its service
/// masks it).
pub fn stick_rows(
    target: &Target,
    service: Option<&str>,
    client: Option<IpAddr>,
) -> Result<Vec<StickRow>> {
    let (state, maps) = target.open()?;
    if let Some(name) = service
        && !state.services.iter().any(|s| s.name == name)
    {
        bail!("no service '{name}'");
    }
    let now = monotonic_ns();
    let mut rows = Vec::new();
    let mut order = Vec::new();
    for (key, entry) in crate::batch::lookup_all(&maps.stick, 8192)? {
        let service_record = state.service(key.service);
        if let Some(name) = service
            && service_record.is_none_or(|s| s.name != name)
        {
            continue;
        }
        let service = service_record;
        let family = match service {
            Some(s) => Family::of(&s.vip),
            // An entry of a service the state no longer names (it is swept soon): the words
            // cannot say the family for sure, but an IPv4 address never fills words 1..4.
            None if key.client[1..].iter().any(|w| *w != 0) => Family::Ipv6,
            None => Family::Ipv4,
        };
        let mask = service.map_or(family.bits(), |s| s.client_mask);
        if let Some(wanted) = client
            && (Family::of(&wanted) != family
                || addr::masked(addr::words(&wanted), addr::prefix_mask(family, mask))
                    != key.client)
        {
            continue;
        }
        let backend = state.backend(entry.backend);
        let idle_ms = now.saturating_sub(entry.last_seen_ns) / 1_000_000;
        order.push((key.service, addr::from_words(family, key.client)));
        rows.push(StickRow {
            service: service
                .map(|s| s.name.clone())
                .unwrap_or_else(|| format!("#{}", key.service)),
            client: client_prefix(family, key.client, mask),
            backend: backend
                .map(|(_, b)| b.name.clone())
                .unwrap_or_else(|| format!("#{}", entry.backend)),
            backend_address: backend.map(|(_, b)| b.address),
            idle_ms,
            age_ms: now.saturating_sub(entry.created_ns) / 1_000_000,
            expired: service.is_some_and(|s| idle_ms >= s.stick_timeout_ms),
        });
    }
    // By service, then by address (numerically: 198.18.1.2 before 198.18.1.10).
    let mut rows: Vec<_> = order.into_iter().zip(rows).collect();
    rows.sort_by_key(|(order, _)| *order);
    Ok(rows.into_iter().map(|(_, row)| row).collect())
}

/// A masked client (stick-key words, see [`sticky_lb_common::addr`]) as people and `--json`
/// read it: `198.18.1.0/24`, `2001:db8:1:2::/64`, `::/0`; the bare address when `bits` is the
/// family's full length (32 or 128), as each entry is then one client.
pub fn client_prefix(family: Family, client: [u32; 4], bits: u8) -> String {
    let address = addr::from_words(family, client);
    if bits >= family.bits() {
        address.to_string()
    } else {
        format!("{address}/{bits}")
    }
}

pub fn print_table(rows: &[StickRow]) {
    // Wide enough for the longest client (an IPv6 prefix can take 43 characters).
    let width = rows.iter().map(|r| r.client.len()).fold(20, usize::max);
    println!(
        "{:<16} {:<width$} {:<16} {:>10} {:>10}",
        "SERVICE", "CLIENT", "BACKEND", "IDLE", "AGE"
    );
    for r in rows {
        println!(
            "{:<16} {:<width$} {:<16} {:>10} {:>10}{}",
            r.service,
            r.client,
            r.backend,
            seconds(r.idle_ms),
            seconds(r.age_ms),
            if r.expired { "  (expired)" } else { "" }
        );
    }
    println!("{} entries", rows.len());
}

fn seconds(ms: u64) -> String {
    format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
}

#[derive(Serialize)]
pub struct Status {
    pub interface: String,
    pub netns: Option<String>,
    pub xdp_mode: String,
    pub controller_pid: u32,
    pub controller_running: bool,
    pub config: String,
    pub stick_entries: u64,
    pub counters: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `tcp` (the XDP data path) or `http` (the proxy).
    pub mode: String,
    pub policy: String,
    pub forwarding: String,
    /// A tunnel's source prefix, source NAT's address and ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarding_detail: Option<String>,
    pub stick_timeout_ms: u64,
    pub client_mask: u8,
    pub stick_hits: u64,
    pub stick_misses: u64,
    pub stick_inserts: u64,
    pub redispatches: u64,
    pub races_lost: u64,
    pub inserts_skipped: u64,
    pub connections_untracked: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: IpAddr,
    /// The port the data path sends to (a NAT backend's own, else the service's).
    pub port: u16,
    pub mac: Option<String>,
    pub weight: u32,
    pub state: String,
    pub packets: u64,
    pub bytes: u64,
    pub stick_entries: u64,
    /// Open connections counted by the data path (from the SYN to the client's FIN or RST).
    pub active_connections: i64,
}

pub fn status(target: &Target) -> Result<Status> {
    let (state, maps) = target.open()?;
    let mut per_backend: BTreeMap<BackendId, u64> = BTreeMap::new();
    let mut stick_entries = 0;
    for (_, entry) in crate::batch::lookup_all(&maps.stick, 8192)? {
        stick_entries += 1;
        *per_backend.entry(entry.backend).or_default() += 1;
    }
    let counters = maps.counters()?;
    let mut services = Vec::new();
    for s in &state.services {
        let c = maps.service_counters(s.id)?;
        let mut backends = Vec::new();
        for b in &s.backends {
            let bc = maps.backend_counters(b.id)?;
            backends.push(BackendStatus {
                name: b.name.clone(),
                address: b.address,
                port: b.port.unwrap_or(s.port),
                mac: b.mac.clone(),
                weight: b.weight,
                state: b.state.clone(),
                packets: bc.packets,
                bytes: bc.bytes,
                stick_entries: per_backend.get(&b.id).copied().unwrap_or(0),
                // Raw, not clamped: the counts are exact, and a negative one would be a bug to see.
                active_connections: maps.active.get(&b.id, 0).unwrap_or(0),
            });
        }
        services.push(ServiceStatus {
            name: s.name.clone(),
            vip: s.vip,
            port: s.port,
            mode: s.mode.clone(),
            policy: s.policy.clone(),
            forwarding: s.forwarding.clone(),
            forwarding_detail: s.forwarding_detail.clone(),
            stick_timeout_ms: s.stick_timeout_ms,
            client_mask: s.client_mask,
            stick_hits: c.stick_hits,
            stick_misses: c.stick_misses,
            stick_inserts: c.stick_inserts,
            redispatches: c.redispatches,
            races_lost: c.races_lost,
            inserts_skipped: c.inserts_skipped,
            connections_untracked: c.flows_untracked,
            backends,
        });
    }
    Ok(Status {
        interface: state.interface.clone(),
        netns: state.netns.clone(),
        xdp_mode: state.xdp_mode.clone(),
        controller_pid: state.pid,
        // kill(pid, 0) asks whether the process exists without signalling it.
        controller_running: unsafe { libc::kill(state.pid as i32, 0) } == 0,
        config: state.config.clone(),
        stick_entries,
        counters: Counter::ALL
            .iter()
            .map(|c| (c.name(), counters[*c as usize]))
            .collect(),
        services,
    })
}

pub fn print_status(s: &Status) {
    println!(
        "interface {}{}  mode {}  controller {}",
        s.interface,
        s.netns
            .as_ref()
            .map(|n| format!(" (netns {n})"))
            .unwrap_or_default(),
        s.xdp_mode,
        if s.controller_running {
            format!("running (pid {})", s.controller_pid)
        } else {
            "not running (data path left running)".into()
        }
    );
    println!("config {}  stick entries {}", s.config, s.stick_entries);
    for svc in &s.services {
        println!();
        println!(
            "service {}  {}/{}  {} {}{}  stick timeout {}  client mask /{}",
            svc.name,
            SocketAddr::new(svc.vip, svc.port),
            svc.mode,
            svc.policy,
            if svc.mode == "http" {
                "proxied"
            } else {
                svc.forwarding.as_str()
            },
            svc.forwarding_detail
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            seconds(svc.stick_timeout_ms),
            svc.client_mask
        );
        println!(
            "  stick hits {}  misses {}  inserts {}  redispatches {}  races lost {}  inserts skipped {}  connections untracked {}",
            svc.stick_hits,
            svc.stick_misses,
            svc.stick_inserts,
            svc.redispatches,
            svc.races_lost,
            svc.inserts_skipped,
            svc.connections_untracked
        );
        print_backend_rows(svc);
    }
    println!();
    let counters: Vec<String> = s.counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("counters: {}", counters.join("  "));
}

fn print_backend_rows(svc: &ServiceStatus) {
    // Wide enough for the longest address (IPv6 ones can take 39 characters).
    let width = svc
        .backends
        .iter()
        .map(|b| address_text(svc, b).len())
        .fold(16, usize::max);
    println!(
        "  {:<16} {:<width$} {:<18} {:>6} {:<8} {:>10} {:>12} {:>8} {:>8}",
        "BACKEND", "ADDRESS", "MAC", "WEIGHT", "STATE", "PACKETS", "BYTES", "STUCK", "ACTIVE"
    );
    for b in &svc.backends {
        println!(
            "  {:<16} {:<width$} {:<18} {:>6} {:<8} {:>10} {:>12} {:>8} {:>8}",
            b.name,
            address_text(svc, b),
            b.mac.as_deref().unwrap_or("-"),
            b.weight,
            b.state,
            b.packets,
            b.bytes,
            b.stick_entries,
            b.active_connections
        );
    }
}

/// A backend's address, with its port when it is not the service's (NAT).
fn address_text(svc: &ServiceStatus, b: &BackendStatus) -> String {
    match b.port == svc.port {
        true => b.address.to_string(),
        false => SocketAddr::new(b.address, b.port).to_string(),
    }
}

/// `backend list`: the backends of every service.
pub fn print_backends(s: &Status) {
    for svc in &s.services {
        println!(
            "service {} ({}, {})",
            svc.name,
            SocketAddr::new(svc.vip, svc.port),
            svc.policy
        );
        print_backend_rows(svc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> [u32; 4] {
        addr::words(&text.parse().unwrap())
    }

    #[test]
    fn ipv4_clients_print_as_today() {
        let masked = addr::masked(words("198.18.1.77"), addr::prefix_mask(Family::Ipv4, 24));
        assert_eq!(client_prefix(Family::Ipv4, masked, 24), "198.18.1.0/24");
        assert_eq!(
            client_prefix(Family::Ipv4, words("198.18.1.77"), 32),
            "198.18.1.77"
        );
        assert_eq!(client_prefix(Family::Ipv4, [0; 4], 0), "0.0.0.0/0");
    }

    #[test]
    fn ipv6_clients_print_as_prefixes() {
        let client = words("2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        let at = |bits| {
            let masked = addr::masked(client, addr::prefix_mask(Family::Ipv6, bits));
            client_prefix(Family::Ipv6, masked, bits)
        };
        assert_eq!(at(64), "2001:db8:1:2::/64");
        assert_eq!(at(0), "::/0");
        assert_eq!(at(128), "2001:db8:1:2:aaaa:bbbb:cccc:dddd");
        assert_eq!(at(56), "2001:db8:1::/56");
    }

    #[test]
    fn tokens_print_one_line_each_with_ttl_age_and_node() {
        let row = |token: &str, ttl_ms, age_ms, node: &str| TokenRow {
            service: "web".into(),
            token: token.into(),
            backend: "b1".into(),
            backend_address: Some("198.18.0.11:8080".parse().unwrap()),
            ttl_ms,
            age_ms,
            node: node.into(),
        };
        let text = token_table(&[
            row("Zm9vYmFyYmF6cXV4cXV1eA", Some(1_799_950), Some(50), "lb1"),
            row("hand", None, None, ""),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("SERVICE") && lines[0].ends_with("NODE"));
        let first: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            first,
            [
                "web",
                "Zm9vYmFyYmF6cXV4cXV1eA",
                "b1",
                "1799.9s",
                "0.0s",
                "lb1"
            ]
        );
        let second: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(second, ["web", "hand", "b1", "-", "-", "-"]);
        assert_eq!(lines[3], "2 tokens");
        assert_eq!(token_table(&[]).lines().last(), Some("0 tokens"));
        // A long learned token widens the column instead of shifting the others.
        let long = "x".repeat(40);
        let text = token_table(&[row(&long, Some(1000), Some(0), "lb2")]);
        let header = text.lines().next().unwrap();
        let line = text.lines().nth(1).unwrap();
        assert_eq!(header.find("BACKEND"), line.find("b1"));
        let json = serde_json::to_value(row("t", Some(5), None, "lb1")).unwrap();
        assert_eq!(json["backend_address"], "198.18.0.11:8080");
        assert_eq!(json["age_ms"], serde_json::Value::Null);
    }

    #[test]
    fn a_stick_row_serializes_the_prefix_and_the_backend_address() {
        let row = StickRow {
            service: "web6".into(),
            client: client_prefix(Family::Ipv6, words("2001:db8:1:2::"), 64),
            backend: "a".into(),
            backend_address: Some("2001:db8:1::11".parse().unwrap()),
            idle_ms: 1,
            age_ms: 2,
            expired: false,
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["client"], "2001:db8:1:2::/64");
        assert_eq!(json["backend_address"], "2001:db8:1::11");
    }
}
