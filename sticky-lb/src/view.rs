//! `table show` and `status`: read the pinned maps and the state file, print for people or JSON.
//! Both work while `run` is active, and after it left the data path running.

use crate::{
    dataplane::{PinDir, PinnedMaps, monotonic_ns},
    state::{self, RuntimeState},
};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::{collections::BTreeMap, net::Ipv4Addr};
use sticky_lb_common::{BackendId, Counter};

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
    /// The masked client address (a /24 when the service sticks by /24).
    pub client: String,
    pub backend: String,
    pub backend_address: Option<Ipv4Addr>,
    pub idle_ms: u64,
    pub age_ms: u64,
    /// Idle past the service's timeout: the data path no longer honours it; the next sweep
    /// deletes it.
    pub expired: bool,
}

/// Stick entries, optionally of one service and/or one client address (masked as its service
/// masks it).
pub fn stick_rows(
    target: &Target,
    service: Option<&str>,
    client: Option<Ipv4Addr>,
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
        let mask = service.map(|s| s.client_mask).unwrap_or(32);
        let client_key = Ipv4Addr::from(key.client[0].to_ne_bytes());
        if let Some(wanted) = client {
            let bits = crate::config::client_mask_v4(mask);
            if u32::from(wanted) & bits != u32::from(client_key) {
                continue;
            }
        }
        let client = client_key;
        let backend = state.backend(entry.backend);
        let idle_ms = now.saturating_sub(entry.last_seen_ns) / 1_000_000;
        order.push((key.service, u32::from(client)));
        rows.push(StickRow {
            service: service
                .map(|s| s.name.clone())
                .unwrap_or_else(|| format!("#{}", key.service)),
            client: if mask == 32 {
                client.to_string()
            } else {
                format!("{client}/{mask}")
            },
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

pub fn print_table(rows: &[StickRow]) {
    println!(
        "{:<16} {:<20} {:<16} {:>10} {:>10}",
        "SERVICE", "CLIENT", "BACKEND", "IDLE", "AGE"
    );
    for r in rows {
        println!(
            "{:<16} {:<20} {:<16} {:>10} {:>10}{}",
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
    pub vip: Ipv4Addr,
    pub port: u16,
    pub policy: String,
    pub forwarding: String,
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
    pub address: Ipv4Addr,
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
            policy: s.policy.clone(),
            forwarding: s.forwarding.clone(),
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
            "service {}  {}:{}/tcp  {} {}  stick timeout {}  client mask /{}",
            svc.name,
            svc.vip,
            svc.port,
            svc.policy,
            svc.forwarding,
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
    println!(
        "  {:<16} {:<16} {:<18} {:>6} {:<8} {:>10} {:>12} {:>8} {:>8}",
        "BACKEND", "ADDRESS", "MAC", "WEIGHT", "STATE", "PACKETS", "BYTES", "STUCK", "ACTIVE"
    );
    for b in &svc.backends {
        println!(
            "  {:<16} {:<16} {:<18} {:>6} {:<8} {:>10} {:>12} {:>8} {:>8}",
            b.name,
            b.address,
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

/// `backend list`: the backends of every service.
pub fn print_backends(s: &Status) {
    for svc in &s.services {
        println!(
            "service {} ({}:{}, {})",
            svc.name, svc.vip, svc.port, svc.policy
        );
        print_backend_rows(svc);
    }
}
