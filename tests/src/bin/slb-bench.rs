//! `./x bench`: per-packet cost of the XDP program under BPF_PROG_TEST_RUN.
//!
//! Every figure is the median of 5 runs; each run repeats one frame 1,000,000 times in the kernel
//! (`duration` is already per repetition), except the random-key row, which runs 200,000
//! different frames once each over a full 1M-entry stick table. Writes a markdown table to stdout
//! and JSON to target/bench/datapath.json.

use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions},
};
use serde_json::json;
use std::net::Ipv4Addr;
use sticky_lb::{
    dataplane::{Dataplane, LoadOptions, PASS_PROGRAM, monotonic_ns},
    maglev,
};
use sticky_lb_common::{
    Backend, BackendState, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_STICK_TABLE_SIZE, PROTO_TCP, Service,
    ServiceKey, StickEntry, StickKey, map_names,
};
use sticky_lb_tests::{netns::require_root, packet::Frame};

const RUNS: usize = 5;
const REPEAT: u32 = 1_000_000;
const RANDOM_FRAMES: usize = 200_000;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

fn v4(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ns per packet for `frame` repeated in the kernel.
fn repeated(program: &aya::programs::Xdp, frame: &[u8]) -> f64 {
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

struct Bench {
    dataplane: Dataplane,
    stick: HashMap<MapData, StickKey, StickEntry>,
    service: Service,
}

fn setup(timeout_ns: u64) -> Bench {
    let mut dataplane = Dataplane::load(
        None,
        LoadOptions {
            stick_table_size: DEFAULT_STICK_TABLE_SIZE,
            flow_table_size: 1024,
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
        };
        dataplane.backends.set(i, &entry, 0).unwrap();
    }
    let members: Vec<maglev::Member<'_>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| maglev::Member {
            id: i as u32,
            name,
            weight: 1,
        })
        .collect();
    let table = maglev::Table::build(DEFAULT_MAGLEV_TABLE_SIZE, &members);
    let key = ServiceKey {
        vip: [v4(VIP), 0, 0, 0],
        port: 80u16.to_be(),
        protocol: PROTO_TCP,
        _pad: 0,
    };
    let mut service = Service {
        id: 0,
        stick_timeout_ns: timeout_ns,
        client_mask: [u32::MAX, 0, 0, 0],
        ..Default::default()
    };
    dataplane
        .publish_service(&key, &mut service, table.slots())
        .unwrap();
    let stick = dataplane.take_map(map_names::STICK).unwrap();
    Bench {
        dataplane,
        stick,
        service,
    }
}

fn main() {
    require_root();
    let mut rows: Vec<(&str, f64)> = Vec::new();
    let syn = |src: Ipv4Addr, port: u16| Frame::tcp_syn(src, VIP, port).build();
    let client = Ipv4Addr::new(198, 18, 1, 1);

    // The floor: a program that only returns XDP_PASS.
    let mut floor_dp = setup(u64::MAX);
    let mut pass_ebpf = aya::EbpfLoader::new()
        // Only the pass program is used from this copy: keep its maps tiny.
        .map_max_entries(map_names::STICK, 16)
        .map_max_entries(map_names::MAGLEV, 16)
        .load(sticky_lb::dataplane::EBPF_OBJECT)
        .unwrap();
    let pass_prog: &mut aya::programs::Xdp = pass_ebpf
        .program_mut(PASS_PROGRAM)
        .unwrap()
        .try_into()
        .unwrap();
    pass_prog.load().unwrap();
    let frame = syn(client, 80);
    rows.push((
        "XDP_PASS no-op (floor)",
        median((0..RUNS).map(|_| repeated(pass_prog, &frame)).collect()),
    ));

    let program = floor_dp.dataplane.program();
    let other = syn(client, 8080);
    rows.push((
        "pass-through: TCP not to a service",
        median((0..RUNS).map(|_| repeated(program, &other)).collect()),
    ));
    let mut arp = Frame::tcp_syn(client, VIP, 80);
    arp.ether_type = 0x0806;
    let arp = arp.build();
    rows.push((
        "pass-through: ARP",
        median((0..RUNS).map(|_| repeated(program, &arp)).collect()),
    ));
    let malformed = &frame[..30];
    rows.push((
        "malformed (truncated IPv4)",
        median((0..RUNS).map(|_| repeated(program, malformed)).collect()),
    ));
    // Hot hit: the first repetition inserts, the rest hit the same entry.
    rows.push((
        "stick hit, hot key",
        median((0..RUNS).map(|_| repeated(program, &frame)).collect()),
    ));
    drop(floor_dp);

    // Miss + Maglev + insert: with a zero timeout every entry is expired, so each packet takes
    // the miss path and rewrites its entry (an update of an existing key, the map not full).
    let mut miss = setup(0);
    let program = miss.dataplane.program();
    rows.push((
        "miss + Maglev + insert (entry expired)",
        median((0..RUNS).map(|_| repeated(program, &frame)).collect()),
    ));
    drop(miss);

    // Random-key hits over a full 1M-entry table.
    let mut full = setup(u64::MAX);
    let now = monotonic_ns();
    let started = std::time::Instant::now();
    for i in 0..DEFAULT_STICK_TABLE_SIZE {
        let key = StickKey {
            service: full.service.id,
            client: [0x0a00_0000u32.wrapping_add(i).to_be(), 0, 0, 0],
        };
        let entry = StickEntry {
            backend: i % 10,
            _pad: 0,
            last_seen_ns: now,
            created_ns: now,
        };
        full.stick.insert(&key, &entry, 0).unwrap();
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let mut state = 0x1234_5678u64;
    let frames: Vec<Vec<u8>> = (0..RANDOM_FRAMES)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = ((state >> 33) as u32) % DEFAULT_STICK_TABLE_SIZE;
            let addr = Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i));
            syn(addr, 80)
        })
        .collect();
    let program = full.dataplane.program();
    let random: Vec<f64> = (0..RUNS)
        .map(|_| {
            let mut total = 0.0;
            let mut out = vec![0u8; 512];
            for f in &frames {
                let r = program
                    .test_run(TestRunOptions {
                        data_in: Some(f),
                        data_out: Some(&mut out),
                        repeat: 1,
                        ..TestRunOptions::new()
                    })
                    .unwrap();
                total += r.duration.as_nanos() as f64;
            }
            total / frames.len() as f64
        })
        .collect();
    rows.push(("stick hit, random keys, full 1M table", median(random)));

    let floor = rows[0].1;
    println!("| case | ns/packet | x floor |");
    println!("|---|---:|---:|");
    for (name, ns) in &rows {
        println!("| {name} | {ns:.1} | {:.2} |", ns / floor);
    }
    println!("\nfilling 1,048,576 stick entries one syscall each: {fill_secs:.2} s");
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
    println!(
        "machine: {machine}, {} CPUs, kernel {kernel}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let json = json!({
        "machine": machine,
        "kernel": kernel,
        "runs": RUNS,
        "repeat": REPEAT,
        "rows": rows.iter().map(|(n, ns)| json!({"case": n, "ns_per_packet": ns, "x_floor": ns / floor})).collect::<Vec<_>>(),
        "fill_1m_seconds": fill_secs,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("datapath.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
