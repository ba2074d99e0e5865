//! NAT and full NAT leave every checksum right: 100,000 short HTTP connections (request and
//! answer carry payload) through each of four services of one balancer (IPv4 NAT, IPv4 full
//! NAT, IPv6 NAT, IPv6 full NAT; the backends listen on another port than the service's, so
//! ports are translated too), driven by the benchmark's load generator. Every connection must
//! succeed, and the kernels that check the translated segments keep their checksum counters at
//! 0: the backends' (the client's segments, translated towards them) and the client
//! namespace's (the backends' answers, translated back).
//!
//! Counters read in each namespace, before and after (`ip netns exec NS cat ...`): `Tcp:
//! InCsumErrors` (/proc/net/snmp; TCP over both families, the TCP MIB is shared), `IpExt:
//! InCsumErrors` (/proc/net/netstat: IPv4 header checksums, which NAT rewrites too) and every
//! `TcpExt:` counter with `Csum` in its name (`TCPCsumErrors` where the kernel has one; 6.18
//! has none, its TCP checksum failures are `Tcp: InCsumErrors`).
//!
//! `SLB_NAT_CSUM_CONNECTIONS` changes the count per service (default 100,000),
//! `SLB_NAT_CSUM_SERVICES` (comma-separated: nat4, fnat4, nat6, fnat6) runs only some.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use sticky_lb_tests::{
    loadgen::{
        client::{self, LoadSpec, Mode, ThreadPlan},
        command::in_ns,
        server::HttpBackend,
    },
    rig::Family,
    scenario::{self, Setup},
};

/// Connections per service.
const CONNECTIONS: u64 = 100_000;
/// Client threads (each with its own share of the client addresses).
const THREADS: usize = 32;
const CLIENTS: usize = 256;
/// Nine, so each full NAT service's 100,000 connections take about 11,000 of each backend's
/// 64,512 source ports (see [`config`]).
const BACKENDS: usize = 9;
/// Where the backends listen: not the services' ports, so NAT translates ports as well.
const BACKEND_PORT: u16 = 8080;
/// The plain NAT services' port on the VIPs, and the full NAT ones'.
const NAT_PORT: u16 = 80;
const FULL_NAT_PORT: u16 = 81;
/// Bound on each socket operation: long enough for a SYN retransmitted once (1 s), so a slow
/// connection shows up as slow, not failed.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on each service's run; the whole test's is four times this.
const DEADLINE: Duration = Duration::from_secs(40);

/// The counters this test keeps at 0, from one namespace: name -> value.
fn checksum_counters(ns: &str) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    for (file, wanted) in [
        ("/proc/net/snmp", &["Tcp:"][..]),
        ("/proc/net/netstat", &["TcpExt:", "IpExt:"][..]),
    ] {
        let text = in_ns(ns, &["cat", file], None).expect("reading the counters");
        for (prefix, fields) in counter_lines(&text) {
            if !wanted.contains(&prefix.as_str()) {
                continue;
            }
            for (name, value) in fields {
                let keep = match prefix.as_str() {
                    "TcpExt:" => name.contains("Csum"),
                    _ => name == "InCsumErrors",
                };
                if keep {
                    counters.insert(format!("{}{name}", prefix.trim_end_matches(':')), value);
                }
            }
        }
    }
    assert!(
        counters.contains_key("TcpInCsumErrors") && counters.contains_key("IpExtInCsumErrors"),
        "{ns}: no checksum counters in {counters:?}"
    );
    counters
}

/// A few TCP counters that explain failures or slow connections (not asserted).
fn tcp_diagnostics(ns: &str) -> BTreeMap<String, u64> {
    let text = in_ns(ns, &["cat", "/proc/net/netstat"], None).expect("reading TcpExt");
    let snmp = in_ns(ns, &["cat", "/proc/net/snmp"], None).expect("reading Tcp");
    let mut out = BTreeMap::new();
    for (prefix, fields) in counter_lines(&text).into_iter().chain(counter_lines(&snmp)) {
        for (name, value) in fields {
            let keep = match prefix.as_str() {
                "TcpExt:" => matches!(
                    name.as_str(),
                    "PAWSEstab" | "PAWSTimewait" | "TCPACKSkippedTimeWait" | "TCPOFOQueue"
                ),
                "Tcp:" => matches!(name.as_str(), "AttemptFails" | "RetransSegs" | "OutRsts"),
                _ => false,
            };
            if keep {
                out.insert(format!("{}{name}", prefix.trim_end_matches(':')), value);
            }
        }
    }
    out
}

/// The `Name: field field ...` / `Name: value value ...` line pairs of /proc/net/snmp and
/// /proc/net/netstat.
fn counter_lines(text: &str) -> Vec<(String, Vec<(String, u64)>)> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .filter_map(|pair| {
            let [names, values] = pair else { return None };
            let mut names = names.split_whitespace();
            let mut values = values.split_whitespace();
            let prefix = names.next()?;
            if values.next()? != prefix {
                return None;
            }
            let fields = names
                .zip(values)
                .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
                .collect();
            Some((prefix.to_owned(), fields))
        })
        .collect()
}

/// `after - before` for every counter.
fn grown(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, value)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), value.saturating_sub(was))
        })
        .collect()
}

/// One service of the balancer.
struct Service {
    name: &'static str,
    family: Family,
    port: u16,
    full_nat: bool,
}

const SERVICES: [Service; 4] = [
    Service {
        name: "nat4",
        family: Family::Ipv4,
        port: NAT_PORT,
        full_nat: false,
    },
    Service {
        name: "fnat4",
        family: Family::Ipv4,
        port: FULL_NAT_PORT,
        full_nat: true,
    },
    Service {
        name: "nat6",
        family: Family::Ipv6,
        port: NAT_PORT,
        full_nat: false,
    },
    Service {
        name: "fnat6",
        family: Family::Ipv6,
        port: FULL_NAT_PORT,
        full_nat: true,
    },
];

/// The balancer: the four services, each with the three backends on [`BACKEND_PORT`].
///
/// Full NAT gets every port above 1023 (the balancer makes no connections of its own here):
/// a port stays held for 65 s after its connection ended (the backends' TIME_WAIT, 60 s: the
/// server closes first), so a backend can take 64,512 connections in any 65 s; nine backends
/// share 100,000 connections, about 11,000 each, and the allocator's probes find a free port for
/// every one (the defaults, 1024-32767 and three backends, hold 488 new connections a second per
/// backend: see README, Limits).
fn config(s: &Setup) -> String {
    let mut yaml = format!(
        "interface: {}\nxdp_mode: native\non_exit: detach\nservices:\n",
        s.rig.lb_dev()
    );
    for service in &SERVICES {
        let source_nat = if service.full_nat {
            "    source_nat: {ports: 1024-65535}\n"
        } else {
            ""
        };
        yaml += &format!(
            "  - name: {}\n    vip: {}\n    port: {}\n    forwarding: nat\n{source_nat}    health_check: {{type: none}}\n    backends:\n",
            service.name,
            s.rig.vip_in(service.family),
            service.port,
        );
        for k in 1..=BACKENDS {
            yaml += &format!(
                "      - name: b{k}\n        address: {}\n        port: {BACKEND_PORT}\n",
                s.rig.backend_addr_in(service.family, k)
            );
        }
    }
    yaml
}

/// The services `SLB_NAT_CSUM_SERVICES` names (default all).
fn chosen(service: &Service) -> bool {
    match std::env::var("SLB_NAT_CSUM_SERVICES") {
        Ok(names) => names.split(',').any(|n| n.trim() == service.name),
        Err(_) => true,
    }
}

fn connections() -> u64 {
    std::env::var("SLB_NAT_CSUM_CONNECTIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(CONNECTIONS)
}

#[test]
fn nat_and_full_nat_keep_checksums_over_100k_connections() {
    let total = connections();
    let per_thread = total.div_ceil(THREADS as u64);
    let mut s = Setup::with_rig("nat-csum", scenario::Mode::Native, Family::Ipv4, |o| {
        o.backends(BACKENDS).clients(CLIENTS)
    });
    // Unmodified backends: no VIP; the route back to the clients via the balancer that plain
    // NAT needs (full NAT's answers go to the balancer's own, on-link, address anyway).
    for k in 1..=BACKENDS {
        s.rig
            .make_nat_backend(k, true)
            .expect("making an unmodified NAT backend");
    }
    // Every namespace that terminates TCP receives through one NAPI instance (GRO on makes a
    // veth poll like a NIC queue), so the segments of one connection are processed one after
    // the other, as a real NIC's RSS queue delivers them. Without it a veth hands each frame
    // to the backlog of whichever CPU forwarded it, two segments of one connection can be
    // processed on both CPUs at once, and the backends' kernel now and then answers one of
    // them with a reset (1 to 4 per 100,000 connections here, DSR and nftables alike: a race
    // in the kernel's socket lookup while a handshake completes, nothing the balancer does).
    for ns in (1..=BACKENDS)
        .map(|k| s.rig.backend_ns(k))
        .chain([s.rig.client_ns()])
    {
        in_ns(ns, &["ethtool", "-K", "eth0", "gro", "on"], None).expect("GRO on eth0");
    }
    let mut servers = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        for k in 1..=BACKENDS {
            let bind = SocketAddr::new(s.rig.backend_addr_in(family, k), BACKEND_PORT);
            servers.push(
                HttpBackend::start(s.rig.backend_ns(k), bind, &format!("b{k}"), 40)
                    .expect("HTTP server on a backend"),
            );
        }
    }
    s.start(&config(&s));

    let watched: Vec<String> = (1..=BACKENDS)
        .map(|k| s.rig.backend_ns(k).to_owned())
        .chain([s.rig.client_ns().to_owned()])
        .collect();
    let read_all = |f: fn(&str) -> BTreeMap<String, u64>| -> Vec<BTreeMap<String, u64>> {
        watched.iter().map(|ns| f(ns)).collect()
    };

    let started = Instant::now();
    let mut failures = Vec::new();
    for service in SERVICES.iter().filter(|s| chosen(s)) {
        let before = read_all(checksum_counters);
        let diag_before = read_all(tcp_diagnostics);
        let clients = s.rig.client_addrs_in(service.family);
        let target = SocketAddr::new(s.rig.vip_in(service.family), service.port);
        let spec = LoadSpec {
            ns: s.rig.client_ns().to_owned(),
            mode: Mode::Short,
            threads: (0..THREADS)
                .map(|t| ThreadPlan {
                    sources: clients
                        .iter()
                        .skip(t)
                        .step_by(THREADS)
                        .copied()
                        .collect::<Vec<IpAddr>>(),
                    target,
                })
                .collect(),
            warmup: Duration::ZERO,
            duration: DEADLINE,
            op_timeout: OP_TIMEOUT,
            max_requests_per_thread: per_thread,
        };
        let result = client::run(&spec).expect("running the load");
        let after = read_all(checksum_counters);
        let diag = read_all(tcp_diagnostics);
        let asked = per_thread * THREADS as u64;
        eprintln!(
            "nat_checksums {}: {} of {asked} connections in {:.2} s ({:.0} conn/s), {} failed {:?}, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            service.name,
            result.completed,
            result.window.as_secs_f64(),
            result.rate(),
            result.errors,
            result.error_kinds,
            result.latency_ms(0.5),
            result.latency_ms(0.99),
            result.latency_ms(1.0),
        );
        for (i, ns) in watched.iter().enumerate() {
            let grew = grown(&before[i], &after[i]);
            let mut moved = grown(&diag_before[i], &diag[i]);
            moved.retain(|_, v| *v > 0);
            eprintln!("nat_checksums {}: {ns}: {grew:?}; {moved:?}", service.name);
            if grew.values().any(|&v| v > 0) {
                failures.push(format!(
                    "{}: {ns}: checksum counters grew: {grew:?}",
                    service.name
                ));
            }
        }
        if result.completed != asked || result.errors != 0 {
            failures.push(format!(
                "{}: {} of {asked} connections completed, {} failed: {:?} (first: {})",
                service.name,
                result.completed,
                result.errors,
                result.error_kinds,
                result.first_error.as_deref().unwrap_or("none"),
            ));
        }
    }
    let status = s.status();
    let counters = &status["counters"];
    eprintln!(
        "nat_checksums: {} services x {total} connections in {:.1} s; balancer: tx_nat_reply {}, drop_nat_stale_reply {}, drop_nat_ports_exhausted {}, drop_nat_untracked {}",
        SERVICES.len(),
        started.elapsed().as_secs_f64(),
        counters["tx_nat_reply"],
        counters["drop_nat_stale_reply"],
        counters["drop_nat_ports_exhausted"],
        counters["drop_nat_untracked"],
    );
    s.balancer.take().expect("running").stop();
    drop(servers);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
