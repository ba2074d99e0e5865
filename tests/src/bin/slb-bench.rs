//! `./x bench`, parts a and b: the XDP program's per-packet cost under BPF_PROG_TEST_RUN, and the
//! control plane's costs (Maglev builds, filling, sweeping, swapping tables).
//!
//! Every figure is the median of 5 runs. Rows marked "repeat" run one frame 1,000,000 times in
//! the kernel (`duration` is per repetition); rows over many keys run 200,000 different frames
//! once each and average the kernel-measured durations. Ratios are taken within this run.
//! Writes a markdown table to stdout and JSON to target/bench/datapath.json.

use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use serde_json::json;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};
use sticky_lb::{
    batch,
    dataplane::{Dataplane, LoadOptions, PASS_PROGRAM, monotonic_ns},
    expiry, maglev,
};
use sticky_lb_common::{
    Backend, BackendState, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_STICK_TABLE_SIZE, FEATURE_NAT,
    FlowEntry, FlowKey, FlowState, Forwarding, PROTO_TCP, Policy, SERVICE_SHARED,
    SERVICE_SOURCE_NAT, Service, ServiceKey, StickEntry, StickKey, addr, addr::Family, map_names,
};
use sticky_lb_tests::{netns::require_root, packet::Frame};

const RUNS: usize = 5;
const REPEAT: u32 = 1_000_000;
const KEYS: usize = 200_000;
const TABLE: u32 = DEFAULT_STICK_TABLE_SIZE;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const BENCH_LOOKUP: &str = "bench_stick_lookup";

fn v4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Median of the runs (one implementation, shared with the end-to-end benchmark).
fn median(runs: Vec<f64>) -> f64 {
    sticky_lb_tests::loadgen::median(runs).expect("at least one run")
}

/// The VIP of `src`'s family.
fn vip_for(src: IpAddr) -> IpAddr {
    match src {
        IpAddr::V4(_) => VIP.into(),
        IpAddr::V6(_) => VIP6.into(),
    }
}

fn syn(src: impl Into<IpAddr>, port: u16) -> Vec<u8> {
    let src = src.into();
    Frame::tcp_syn(src, vip_for(src), port).build()
}

/// A segment of an open connection from `src:src_port` to the service (ACK).
fn ack(src: impl Into<IpAddr>, src_port: u16) -> Vec<u8> {
    let src = src.into();
    let mut frame = Frame::tcp_syn(src, vip_for(src), 80);
    frame.src_port = src_port;
    frame.tcp_flags = 0x10;
    frame.build()
}

/// Client address number `i` (10.0.0.0 upwards: keys only, never on a wire).
fn client(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i))
}

/// IPv6 client number `i`: each in its own /64 of 2001:db8::/32, so with the default mask of 64
/// each is its own stick entry, as IPv4 client `i` is.
fn client6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0x100 | (i >> 16) as u16,
        i as u16,
        0x1111,
        0x2222,
        0x3333,
        1,
    )
}

/// Client `i` of `family`.
fn client_of(family: Family, i: u32) -> IpAddr {
    match family {
        Family::Ipv4 => client(i).into(),
        Family::Ipv6 => client6(i).into(),
    }
}

/// ns per packet for `frame` repeated in the kernel.
fn repeated(program: &Xdp, frame: &[u8]) -> f64 {
    let mut out = vec![0u8; frame.len() + 256];
    let r = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: REPEAT,
            ..TestRunOptions::new()
        })
        .expect("test run");
    r.duration.as_nanos() as f64
}

/// Mean ns per packet over many frames, each run once.
fn each_once(program: &Xdp, frames: &[Vec<u8>]) -> f64 {
    let mut total = 0.0;
    let mut out = vec![0u8; 512];
    for f in frames {
        let r = program
            .test_run(TestRunOptions {
                data_in: Some(f),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .expect("test run");
        total += r.duration.as_nanos() as f64;
    }
    total / frames.len() as f64
}

struct Bench {
    family: Family,
    dataplane: Dataplane,
    stick: HashMap<MapData, StickKey, StickEntry>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    key: ServiceKey,
    service: Service,
    names: Vec<String>,
}

impl Bench {
    /// A data path with one IPv4 service of 10 backends, its stick table `TABLE` entries.
    fn new(policy: Policy, timeout_ns: u64) -> Bench {
        Bench::with_family(Family::Ipv4, policy, timeout_ns)
    }

    /// The same with a service of `family` (IPv6: [2001:db8::100]:80, client mask 64).
    fn with_family(family: Family, policy: Policy, timeout_ns: u64) -> Bench {
        let mut dataplane = Dataplane::load(
            None,
            LoadOptions {
                stick_table_size: TABLE,
                flow_table_size: sticky_lb_common::DEFAULT_FLOW_TABLE_SIZE,
                maglev_stride: DEFAULT_MAGLEV_TABLE_SIZE,
                maglev_services: 1,
                interface_mac: [2, 0, 0, 0, 0, 1],
                log_level: 0,
            },
        )
        .expect("load");
        let names: Vec<String> = (0..10).map(|i| format!("backend-{i}")).collect();
        for i in 0..10u32 {
            let entry = Backend {
                addr: [v4(Ipv4Addr::new(198, 18, 0, 11 + i as u8)), 0, 0, 0],
                mac: [2, 0xbe, 0, 0, 0, i as u8],
                state: BackendState::Up as u8,
                _pad: 0,
                service: 0,
                weight: 1,
                port: 80u16.to_be(),
                _pad2: 0,
            };
            dataplane.backends.set(i, &entry, 0).unwrap();
        }
        let key = ServiceKey {
            vip: addr::words(&vip_for(client_of(family, 0))),
            port: 80u16.to_be(),
            protocol: PROTO_TCP,
            family: family as u8,
        };
        let service = Service {
            id: 0,
            policy: policy as u8,
            stick_timeout_ns: timeout_ns,
            client_mask: addr::prefix_mask(family, family.default_client_mask()),
            ..Default::default()
        };
        let stick = dataplane.take_map(map_names::STICK).unwrap();
        let flows = dataplane.take_map(map_names::FLOWS).unwrap();
        let mut bench = Bench {
            family,
            dataplane,
            stick,
            flows,
            key,
            service,
            names,
        };
        bench.publish(10);
        bench
    }

    /// Publishes a table of the first `n` backends; returns the time it took (build + swap).
    fn publish(&mut self, n: usize) -> Duration {
        let started = Instant::now();
        let slots: Vec<u32> = if self.service.policy == Policy::LeastConn as u8 {
            (0..n as u32).collect()
        } else {
            let members = equal_members(&self.names[..n]);
            maglev::Table::build(DEFAULT_MAGLEV_TABLE_SIZE, &members)
                .slots()
                .to_vec()
        };
        self.dataplane
            .publish_service(&self.key, &mut self.service, &slots)
            .unwrap();
        started.elapsed()
    }

    /// Fills the stick table with `count` entries for clients 0..count (batched).
    fn fill(&mut self, count: u32) -> Duration {
        let now = monotonic_ns();
        let keys: Vec<StickKey> = (0..count)
            .map(|i| StickKey {
                service: 0,
                client: addr::masked(
                    addr::words(&client_of(self.family, i)),
                    self.service.client_mask,
                ),
            })
            .collect();
        let values: Vec<StickEntry> = (0..count)
            .map(|i| StickEntry {
                backend: i % 10,
                version: 0,
                last_seen_ns: now,
                created_ns: now,
            })
            .collect();
        let started = Instant::now();
        batch::update(&self.stick, &keys, &values).unwrap();
        started.elapsed()
    }

    /// Opens `count` connections, clients 0..count from source port 40000 (batched).
    fn fill_flows(&mut self, count: u32) {
        let now = monotonic_ns();
        let keys: Vec<FlowKey> = (0..count)
            .map(|i| FlowKey {
                service: 0,
                client: addr::words(&client_of(self.family, i)),
                client_port: 40000u16.to_be(),
                _pad: 0,
            })
            .collect();
        let values: Vec<FlowEntry> = keys
            .iter()
            .zip(0..)
            .map(|(key, i)| FlowEntry::new(key, i % 10, FlowState::Established, now))
            .collect();
        batch::update(&self.flows, &keys, &values).unwrap();
    }
}

/// Backends `0..names.len()` with equal weights, as Maglev members.
fn equal_members(names: &[String]) -> Vec<maglev::Member<'_>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| maglev::Member {
            id: i as u32,
            name,
            weight: 1,
        })
        .collect()
}

/// Frames from `count` clients picked pseudo-randomly in `0..range` (plus `offset`).
fn random_frames(count: usize, range: u32, offset: u32, seed: u64) -> Vec<Vec<u8>> {
    random_frames_of(Family::Ipv4, count, range, offset, seed)
}

/// The same for clients of `family`.
fn random_frames_of(
    family: Family,
    count: usize,
    range: u32,
    offset: u32,
    seed: u64,
) -> Vec<Vec<u8>> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            syn(
                client_of(family, offset + ((state >> 33) as u32) % range),
                80,
            )
        })
        .collect()
}

/// Misses into a table that is not full, for new clients of `family`: a fresh table per run,
/// new keys (ns per packet, median of the runs).
fn miss_into_empty_table(family: Family) -> f64 {
    median(
        (0..RUNS)
            .map(|r| {
                let mut b = Bench::with_family(family, Policy::IpHash, u64::MAX);
                let frames: Vec<Vec<u8>> = (0..KEYS as u32)
                    .map(|i| syn(client_of(family, i * 3 + r as u32), 80))
                    .collect();
                each_once(b.dataplane.program(), &frames)
            })
            .collect(),
    )
}

/// New clients into a table that is not full, of a service that is not shared and of one that
/// is (`SERVICE_SHARED`: each insert also writes a stick event to the ring buffer): ns per
/// packet, median of the runs. 20,000 clients per run, so every event fits the 1 MiB ring
/// (nobody reads it here) and none takes the cheaper ring-full path.
fn miss_shared_and_not(family: Family) -> (f64, f64) {
    const NEW_CLIENTS: u32 = 20_000;
    let run = |flags: u8, r: usize| {
        let mut b = Bench::with_family(family, Policy::IpHash, u64::MAX);
        b.service.flags = flags;
        b.publish(10);
        let frames: Vec<Vec<u8>> = (0..NEW_CLIENTS)
            .map(|i| syn(client_of(family, i * 3 + r as u32), 80))
            .collect();
        each_once(b.dataplane.program(), &frames)
    };
    let plain = median((0..RUNS).map(|r| run(0, r)).collect());
    let shared = median((0..RUNS).map(|r| run(SERVICE_SHARED, r)).collect());
    (plain, shared)
}

/// `frame` (a SYN of `family`) turned into an ACK (XDP never checks the TCP checksum).
fn into_ack(mut frame: Vec<u8>, family: Family) -> Vec<u8> {
    let ip_len = match family {
        Family::Ipv4 => 20,
        Family::Ipv6 => 40,
    };
    frame[14 + ip_len + 13] = 0x10;
    frame
}

/// `SLB_BENCH_QUICK=1`: only the hot rows, 21 runs each, for before/after comparisons while
/// changing the data path (min and median printed).
/// Mean ns per packet of an open connection's ACK (one client, its connection-table hit) in
/// each forwarding mode, and of a NAT backend's reply, every frame run once.
fn forwarding_modes() -> Vec<(String, f64)> {
    const FRAMES: usize = 20_000;
    let mut rows = Vec::new();
    let mut b = Bench::new(Policy::IpHash, u64::MAX);
    let set_mode = |b: &mut Bench, forwarding: Forwarding, flags: u8| {
        b.service.forwarding = forwarding as u8;
        b.service.flags = flags;
        b.service.tunnel_source = [v4(Ipv4Addr::new(198, 18, 240, 0)), 0, 0, 0];
        b.service.tunnel_host_bits = 0xff00_0000; // a /24, network order
        b.service.mtu = 1500;
        b.service.nat_source = [v4(Ipv4Addr::new(198, 18, 0, 2)), 0, 0, 0];
        b.service.nat_port_first = 1024;
        b.service.nat_port_count = 31744;
        b.publish(10);
    };
    let acks = |port: u16| vec![ack(client(0), port); FRAMES];
    let time = |b: &mut Bench, frames: &[Vec<u8>]| {
        median(
            (0..RUNS)
                .map(|_| each_once(b.dataplane.program(), frames))
                .collect(),
        )
    };
    b.fill(1);
    b.fill_flows(1);
    let floor = median(
        (0..RUNS)
            .map(|_| {
                each_once(
                    b.dataplane.extra_program(PASS_PROGRAM).unwrap(),
                    &acks(40000),
                )
            })
            .collect(),
    );
    rows.push((
        "XDP_PASS no-op, each frame run once (the floor of these rows)".to_string(),
        floor,
    ));
    let dsr = time(&mut b, &acks(40000));
    rows.push(("DSR: open connection, each frame run once".to_string(), dsr));
    set_mode(&mut b, Forwarding::Tunnel, 0);
    let tunnel = time(&mut b, &acks(40000));
    rows.push((
        "tunnel (IPIP): open connection, each frame run once".to_string(),
        tunnel,
    ));
    b.dataplane.set_features(FEATURE_NAT).unwrap();
    for (label, flags, port) in [
        ("NAT", 0, 40010u16),
        ("full NAT", SERVICE_SOURCE_NAT, 40020),
    ] {
        set_mode(&mut b, Forwarding::Nat, flags);
        // The SYN opens the connection and its reply entry; its translation shows where the
        // replies come from.
        let mut out = vec![0u8; 256];
        let syn_frame = {
            let mut f = Frame::tcp_syn(client(0), VIP, 80);
            f.src_port = port;
            f.build()
        };
        let r = b
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(&syn_frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::new()
            })
            .expect("test run");
        assert_eq!(r.return_value, 3, "{label}: the SYN is forwarded");
        let translated = &out[..syn_frame.len()];
        let backend = Ipv4Addr::new(
            translated[30],
            translated[31],
            translated[32],
            translated[33],
        );
        let peer = Ipv4Addr::new(
            translated[26],
            translated[27],
            translated[28],
            translated[29],
        );
        let peer_port = u16::from_be_bytes([translated[34], translated[35]]);
        let forward = time(&mut b, &acks(port));
        rows.push((
            format!("{label}: open connection, each frame run once"),
            forward,
        ));
        let mut reply = Frame::tcp_syn(backend, peer, peer_port);
        reply.src_port = 80;
        reply.tcp_flags = 0x10;
        let replies = vec![reply.build(); FRAMES];
        let back = time(&mut b, &replies);
        rows.push((format!("{label}: backend reply, each frame run once"), back));
    }
    rows
}

/// Instructions the kernel's verifier processed to accept the data path (its limit is
/// 1,000,000; every branch added to the packet path multiplies the paths it walks).
fn verified_instructions(b: &mut Bench) -> u32 {
    b.dataplane
        .program()
        .info()
        .ok()
        .and_then(|info| info.verified_instruction_count())
        .unwrap_or(0)
}

fn quick() {
    for (name, ns) in forwarding_modes() {
        eprintln!("{name}: {ns:.0} ns");
    }
    let mut b = Bench::new(Policy::IpHash, u64::MAX);
    eprintln!(
        "verifier: {} instructions processed (limit 1000000)",
        verified_instructions(&mut b)
    );
    let (plain, shared) = miss_shared_and_not(Family::Ipv4);
    eprintln!(
        "new client, service not shared: {plain:.0} ns; shared service (+ stick event): {shared:.0} ns"
    );
    b.fill(1);
    b.fill_flows(1);
    let hot = ack(client(0), 40000);
    let other = syn(client(1), 8080);
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("floor", vec![]),
        ("bare hot", vec![]),
        ("pass-through", vec![]),
        ("hit hot", vec![]),
        ("IPv6 hit hot", vec![]),
    ];
    let mut b6 = Bench::with_family(Family::Ipv6, Policy::IpHash, u64::MAX);
    b6.fill(1);
    b6.fill_flows(1);
    let hot6 = ack(client6(0), 40000);
    for _ in 0..21 {
        rows[0].1.push(repeated(
            b.dataplane.extra_program(PASS_PROGRAM).unwrap(),
            &hot,
        ));
        rows[1].1.push(repeated(
            b.dataplane.extra_program(BENCH_LOOKUP).unwrap(),
            &hot,
        ));
        rows[2].1.push(repeated(b.dataplane.program(), &other));
        rows[3].1.push(repeated(b.dataplane.program(), &hot));
        rows[4].1.push(repeated(b6.dataplane.program(), &hot6));
    }
    for (name, values) in rows {
        let min = values.iter().cloned().fold(f64::MAX, f64::min);
        println!(
            "{name:>14}: min {min:.0} ns, median {:.0} ns",
            median(values)
        );
    }
}

fn main() {
    require_root();
    if std::env::var_os("SLB_BENCH_QUICK").is_some() {
        return quick();
    }
    let mut rows: Vec<(String, f64)> = Vec::new();
    let mut push = |name: &str, ns: f64| {
        eprintln!("  {name}: {ns:.1} ns");
        rows.push((name.to_string(), ns));
    };
    // The hot packet: a segment of an open connection of a stuck client (connection-table hit).
    let hot = ack(client(0), 40000);

    eprintln!("part a: per-packet cost");
    let mut b = Bench::new(Policy::IpHash, u64::MAX);
    let verified = verified_instructions(&mut b);
    eprintln!("  verifier: {verified} instructions processed (limit 1000000)");
    let floor = median(
        (0..RUNS)
            .map(|_| repeated(b.dataplane.extra_program(PASS_PROGRAM).unwrap(), &hot))
            .collect(),
    );
    push("XDP_PASS no-op (the floor), repeat", floor);
    b.fill(1);
    b.fill_flows(1);
    let bare_hot = median(
        (0..RUNS)
            .map(|_| repeated(b.dataplane.extra_program(BENCH_LOOKUP).unwrap(), &hot))
            .collect(),
    );
    push("bare LRU lookup, hot key, repeat", bare_hot);
    let program = b.dataplane.program();
    push(
        "pass-through: TCP not to a service, repeat",
        median(
            (0..RUNS)
                .map(|_| repeated(program, &syn(client(1), 8080)))
                .collect(),
        ),
    );
    let mut arp = Frame::tcp_syn(client(1), VIP, 80);
    arp.ether_type = 0x0806;
    let arp = arp.build();
    push(
        "pass-through: ARP, repeat",
        median((0..RUNS).map(|_| repeated(program, &arp)).collect()),
    );
    push(
        "malformed (truncated IPv4), repeat",
        median((0..RUNS).map(|_| repeated(program, &hot[..30])).collect()),
    );
    let hit_hot = median((0..RUNS).map(|_| repeated(program, &hot)).collect());
    push(
        "open connection (connection-table hit), hot key, repeat",
        hit_hot,
    );
    // A segment of a connection the table does not hold (flow miss, then the stick hit).
    push(
        "stuck client, no connection entry (flow miss + stick hit), hot, repeat",
        median(
            (0..RUNS)
                .map(|_| repeated(program, &ack(client(0), 40001)))
                .collect(),
        ),
    );
    drop(b);

    // The flood guard: a SYN of a new client over the rate is placed by hash, no insert.
    let mut b = Bench::new(Policy::IpHash, u64::MAX);
    b.service.insert_interval_ns = u32::MAX;
    b.publish(10);
    // The first SYN takes the burst's one entry; every later one is over the rate.
    repeated(b.dataplane.program(), &syn(client(5), 80));
    push(
        "new client over the flood guard's rate (miss, no insert), repeat",
        median(
            (0..RUNS)
                .map(|r| repeated(b.dataplane.program(), &syn(client(100 + r as u32), 80)))
                .collect(),
        ),
    );
    drop(b);

    // Random keys over a full table: the realistic case, dominated by cache misses.
    let mut b = Bench::new(Policy::IpHash, u64::MAX);
    let fill = b.fill(TABLE);
    let frames = random_frames(KEYS, TABLE, 0, 0x1234_5678);
    let bare_random = median(
        (0..RUNS)
            .map(|_| each_once(b.dataplane.extra_program(BENCH_LOOKUP).unwrap(), &frames))
            .collect(),
    );
    push("bare LRU lookup, random keys, full 1M table", bare_random);
    // Open connections of those clients (one each): every segment is a connection-table hit.
    b.fill_flows(KEYS as u32 * 5);
    let acks: Vec<Vec<u8>> = random_frames(KEYS, KEYS as u32 * 5, 0, 0x1234_5678)
        .into_iter()
        .map(|f| into_ack(f, Family::Ipv4))
        .collect();
    let hit_random = median(
        (0..RUNS)
            .map(|_| each_once(b.dataplane.program(), &acks))
            .collect(),
    );
    push(
        "open connection (connection-table hit), random keys, 1M clients",
        hit_random,
    );
    // New connections of stuck clients: flow miss, stick hit, connection insert. Each run
    // from a new source port, so every SYN opens a connection.
    let new_conn = median(
        (0..RUNS)
            .map(|r| {
                let frames: Vec<Vec<u8>> = frames
                    .iter()
                    .map(|f| {
                        let mut f = f.clone();
                        f[14 + 20..14 + 22].copy_from_slice(&(1000 + r as u16).to_be_bytes());
                        f
                    })
                    .take(KEYS / 4)
                    .collect();
                each_once(b.dataplane.program(), &frames)
            })
            .collect(),
    );
    push(
        "new connection of a stuck client (stick hit + connection insert), random keys",
        new_conn,
    );
    // Misses into the full table: every insert evicts. New keys each run.
    let full_miss = median(
        (0..RUNS)
            .map(|r| {
                each_once(
                    b.dataplane.program(),
                    &random_frames(KEYS, u32::MAX / 4, TABLE + r as u32 * 7_919_993, r as u64),
                )
            })
            .collect(),
    );
    push("miss + Maglev + insert, full table (evicting)", full_miss);
    drop(b);

    // Misses into a table that is not full: a fresh table per run, new keys.
    push(
        "miss + Maglev + insert, table not full",
        miss_into_empty_table(Family::Ipv4),
    );
    // The shared table's cost in the data path: one ring-buffer write per new entry.
    let (plain, shared) = miss_shared_and_not(Family::Ipv4);
    push(
        "new client (20,000 into an empty table), service not shared",
        plain,
    );
    push(
        "new client (20,000 into an empty table), shared service: + stick event",
        shared,
    );

    // IPv6 beside IPv4 in the same run: the same rows over 16-byte addresses (one code path;
    // the IPv6 service masks clients to /64, each client here in its own /64).
    let mut b = Bench::with_family(Family::Ipv6, Policy::IpHash, u64::MAX);
    b.fill(1);
    b.fill_flows(1);
    let program = b.dataplane.program();
    push(
        "IPv6: pass-through: TCP not to a service, repeat",
        median(
            (0..RUNS)
                .map(|_| repeated(program, &syn(client6(1), 8080)))
                .collect(),
        ),
    );
    push(
        "IPv6: open connection (connection-table hit), hot key, repeat",
        median(
            (0..RUNS)
                .map(|_| repeated(program, &ack(client6(0), 40000)))
                .collect(),
        ),
    );
    push(
        "IPv6: stuck client, no connection entry (flow miss + stick hit), hot, repeat",
        median(
            (0..RUNS)
                .map(|_| repeated(program, &ack(client6(0), 40001)))
                .collect(),
        ),
    );
    b.fill(TABLE);
    b.fill_flows(KEYS as u32 * 5);
    let acks6: Vec<Vec<u8>> = random_frames_of(Family::Ipv6, KEYS, KEYS as u32 * 5, 0, 0x1234_5678)
        .into_iter()
        .map(|f| into_ack(f, Family::Ipv6))
        .collect();
    push(
        "IPv6: open connection (connection-table hit), random keys, 1M clients",
        median(
            (0..RUNS)
                .map(|_| each_once(b.dataplane.program(), &acks6))
                .collect(),
        ),
    );
    drop(b);
    push(
        "IPv6: miss + Maglev + insert, table not full",
        miss_into_empty_table(Family::Ipv6),
    );

    // Least-connections: new clients, each through the pick (10 backends) and inserts.
    let least_conn = median(
        (0..RUNS)
            .map(|r| {
                let mut b = Bench::new(Policy::LeastConn, u64::MAX);
                let frames: Vec<Vec<u8>> = (0..KEYS as u32 / 4)
                    .map(|i| syn(client(i * 3 + r as u32), 80))
                    .collect();
                each_once(b.dataplane.program(), &frames)
            })
            .collect(),
    );
    push(
        "least-conn pick (10 backends) + inserts, new clients",
        least_conn,
    );

    // Forwarding modes, per packet of an open connection. A test run does not restore the
    // frame between repetitions, so a frame that grows (tunnel) or is rewritten (NAT) can only
    // be timed run once each: these rows include the syscall's fixed cost, and compare with
    // DSR timed the same way.
    for (name, ns) in forwarding_modes() {
        push(&name, ns);
    }

    eprintln!("part b: control plane");
    let names: Vec<String> = (0..1000).map(|i| format!("backend-{i}")).collect();
    let mut builds = Vec::new();
    for n in [10usize, 100, 1000] {
        let members = equal_members(&names[..n]);
        let ms = median(
            (0..RUNS)
                .map(|_| {
                    let started = Instant::now();
                    std::hint::black_box(maglev::Table::build(DEFAULT_MAGLEV_TABLE_SIZE, &members));
                    started.elapsed().as_secs_f64() * 1000.0
                })
                .collect(),
        );
        eprintln!("  Maglev build, {n} backends: {ms:.2} ms");
        builds.push((n, ms));
    }
    // A backend change: rebuild the table for 9 of 10 backends and swap it in, then check that
    // the very next packet of a client whose slot moved uses the new table.
    let mut b = Bench::new(Policy::IpHash, 0);
    let change_ms = median(
        (0..RUNS)
            .map(|r| {
                let n = if r % 2 == 0 { 9 } else { 10 };
                b.publish(n).as_secs_f64() * 1000.0
            })
            .collect(),
    );
    b.publish(9);
    let mut out = vec![0u8; 256];
    let mut checked = 0;
    for i in 0..1000 {
        let f = syn(client(i), 80);
        let r = b
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap();
        assert_eq!(r.return_value, 3);
        assert_ne!(
            out[5], 9,
            "backend-9 left the table: no new client may reach it"
        );
        checked += 1;
    }
    eprintln!(
        "  backend change in effect after {change_ms:.2} ms ({checked} packets after it avoided the removed backend)"
    );
    drop(b);

    // Sweep of a full table: wall time, and the hot-hit cost measured while it runs.
    let mut b = Bench::new(Policy::IpHash, u64::MAX);
    b.fill(TABLE);
    // An LRU map may evict a little before it is full (a CPU's local free list runs dry, 128
    // entries at a time), so the sweep is checked against what the table holds.
    let held = sticky_lb::batch::lookup_all(&b.stick, 8192).unwrap().len() as u64;
    assert!(
        held > TABLE as u64 * 99 / 100,
        "{held} of {TABLE} entries held"
    );
    let timeouts = std::collections::BTreeMap::from([(0u32, u64::MAX / 2)]);
    let mut sweep_secs = Vec::new();
    let mut during = Vec::new();
    let quiet = median(
        (0..RUNS)
            .map(|_| repeated(b.dataplane.program(), &hot))
            .collect(),
    );
    for _ in 0..RUNS {
        let stick = &mut b.stick;
        let program = b.dataplane.program();
        let (secs, ns) = std::thread::scope(|scope| {
            let sweeper = scope.spawn(|| {
                let started = Instant::now();
                let report = expiry::sweep(stick, &timeouts, &Default::default()).unwrap();
                assert_eq!(report.scanned, held);
                started.elapsed().as_secs_f64()
            });
            // Packets while the sweep runs (on the other CPU).
            let ns = repeated(program, &hot);
            (sweeper.join().unwrap(), ns)
        });
        sweep_secs.push(secs);
        during.push(ns);
    }
    let sweep = median(sweep_secs);
    let during = median(during);
    eprintln!(
        "  sweep of 1M entries: {sweep:.3} s; hot hit {quiet:.1} ns quiet, {during:.1} ns during the sweep"
    );

    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);

    println!("### a. Per-packet cost (BPF_PROG_TEST_RUN, median of {RUNS})\n");
    println!("| case | ns/packet | x floor |");
    println!("|---|---:|---:|");
    for (name, ns) in &rows {
        println!("| {name} | {ns:.1} | {:.2} |", ns / floor);
    }
    println!();
    println!(
        "sticky-lb over the bare lookup (our own code): hot {:.1} ns, random {:.1} ns; pass-through over the floor: {:.1} ns\n",
        hit_hot - bare_hot,
        hit_random - bare_random,
        rows[2].1 - floor
    );
    println!("### b. Control plane (median of {RUNS})\n");
    println!("| operation | time |");
    println!("|---|---:|");
    for (n, ms) in &builds {
        println!("| Maglev build, {n} backends, M = 65537 | {ms:.2} ms |");
    }
    println!(
        "| fill 1,048,576 stick entries (batched) | {:.3} s |",
        fill.as_secs_f64()
    );
    println!("| expiry sweep over 1,048,576 entries | {sweep:.3} s |");
    println!(
        "| hot hit quiet / during the sweep | {quiet:.1} / {during:.1} ns ({:+.0}%) |",
        (during / quiet - 1.0) * 100.0
    );
    println!("| backend change in effect (rebuild + swap) | {change_ms:.2} ms |");
    println!("| the verifier's walk of the data path | {verified} of 1,000,000 instructions |");
    println!("\nmachine: {machine}, {cpus} CPUs, kernel {kernel}");

    let json = json!({
        "machine": machine, "cpus": cpus, "kernel": kernel, "runs": RUNS, "repeat": REPEAT, "keys": KEYS,
        "per_packet": rows.iter().map(|(n, ns)| json!({"case": n, "ns_per_packet": ns, "x_floor": ns / floor})).collect::<Vec<_>>(),
        "overhead_over_bare_lookup_ns": {"hot": hit_hot - bare_hot, "random": hit_random - bare_random},
        "maglev_build_ms": builds.iter().map(|(n, ms)| json!({"backends": n, "ms": ms})).collect::<Vec<_>>(),
        "fill_1m_seconds": fill.as_secs_f64(),
        "sweep_1m_seconds": sweep,
        "hot_hit_ns_quiet": quiet,
        "hot_hit_ns_during_sweep": during,
        "backend_change_ms": change_ms,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("datapath.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
