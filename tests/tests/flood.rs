//! A SYN flood from made-up sources must not cost real clients their persistence.
//!
//! Every new client takes a place in the one LRU stick table, so a flood of SYNs from random
//! sources would evict the entries of real clients who are idle for a moment (a shopper reading
//! a page); each evicted client is placed anew, and after a pool change some land elsewhere.
//! Clients that keep connecting keep their entries anyway (the LRU sees them used). The flood
//! guard caps new entries at a rate per CPU, so a flood adds at most rate x CPUs x seconds
//! entries and the table keeps its idle clients too.
//!
//! Here: a 65,536-entry table; 256 real clients connecting continuously over real TCP and 256
//! that connect before the flood and again after it; a flood of SYNs from random sources in
//! 198.18.0.0/15 driven through the running balancer's own program and maps (BPF_PROG_TEST_RUN
//! on every CPU: the same stick-table work as on the wire, without millions of SYN-ACKs to
//! addresses nobody owns; it runs at about 0.2 M SYNs/s, far slower than a wire flood, so the
//! guard's rate here is set low enough that rate x CPUs x the flood's duration fits the table);
//! and a backend added through the control socket during the flood.
//!
//! `SLB_FLOOD_SYNS` sets the flood size (default 1,000,000; `./x bench` runs 5,000,000);
//! `SLB_FLOOD_RATE` the guard's rate per CPU per second (default 1000; 0 turns the guard off,
//! and then the idle clients lose their entries and the test fails).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    loadgen::live_frames,
    packet::Frame,
    rig::fetch_names_many,
    scenario::{Mode, PORT, Setup, TIMEOUT, backend_server},
};

/// Clients connecting throughout, and as many idle during the flood.
const REAL_CLIENTS: usize = 256;
/// Clients that first connect after the flood, to see the added backend take new clients.
const FRESH_CLIENTS: usize = 64;
/// Bound on the whole flood, whatever its size.
const FLOOD_DEADLINE: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pins the calling thread to one CPU, so the flood runs on every CPU at once.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[test]
fn real_clients_keep_their_backends_through_a_syn_flood_and_a_pool_change() {
    let syns = env_or("SLB_FLOOD_SYNS", 1_000_000);
    let rate = env_or("SLB_FLOOD_RATE", 1000);
    let mut s = Setup::new("flood", Mode::Native, 3, 2 * REAL_CLIENTS + FRESH_CLIENTS);
    let config = s.config_with(
        "stick_table_size: 65536\n",
        &format!("    stick:\n      timeout: 30m\n      insert_rate_limit: {rate}\n"),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let addrs = s.rig.client_addrs().to_vec();
    let clients = addrs[..REAL_CLIENTS].to_vec();
    let idle = addrs[REAL_CLIENTS..2 * REAL_CLIENTS].to_vec();
    let fresh = addrs[2 * REAL_CLIENTS..].to_vec();
    let before = s.round(&clients);
    let idle_before = s.round(&idle);
    // The backend to add, ready before the flood.
    let k = s.rig.add_backend().expect("adding a backend namespace");
    s.servers.push(backend_server(&s.rig, k));
    let b4_addr = s.rig.backend_addr(k).to_string();

    let program = live_frames::program_of_pinned_link(&s.guard.pins().link())
        .expect("the running balancer's program");
    let vip = s.rig.vip();
    let flooding = AtomicBool::new(true);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let requests: Vec<(Ipv4Addr, SocketAddrV4)> = clients
        .iter()
        .map(|c| (*c, SocketAddrV4::new(vip, PORT)))
        .collect();
    let started = Instant::now();
    let (rounds, sent, added_at) = std::thread::scope(|scope| {
        // Real clients: one new connection each, round after round, while the flood lasts.
        let real = scope.spawn(|| {
            let mut rounds: Vec<Vec<Option<String>>> = Vec::new();
            while flooding.load(Ordering::SeqCst) && started.elapsed() < FLOOD_DEADLINE {
                let round = fetch_names_many(s.rig.client_ns(), &requests, TIMEOUT);
                rounds.push(round.into_iter().map(|r| r.ok()).collect());
            }
            rounds
        });
        // The flood: SYNs from random sources in 198.18.0.0/15, on every CPU.
        let flood: Vec<_> = (0..cpus)
            .map(|cpu| {
                let program = &program;
                scope.spawn(move || {
                    pin_to_cpu(cpu);
                    let share = syns / cpus as u64;
                    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ cpu as u64;
                    let mut sent = 0u64;
                    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
                    while sent < share && started.elapsed() < FLOOD_DEADLINE {
                        // xorshift64*: a cheap, fixed-seed source of addresses and ports.
                        state ^= state >> 12;
                        state ^= state << 25;
                        state ^= state >> 27;
                        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                        let src = Ipv4Addr::from(base + (r as u32 & 0x1_ffff));
                        let mut frame = Frame::tcp_syn(src, vip, PORT);
                        frame.src_port = 1024 + (r >> 48) as u16 % 60000;
                        live_frames::run_once(program, &frame.build()).expect("test run");
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        // Halfway (by time, roughly): a backend joins the pool.
        std::thread::sleep(Duration::from_secs(1));
        s.cli_ok(&["backend", "add", "web/b4", &b4_addr]);
        let added_at = started.elapsed();
        let sent: u64 = flood.into_iter().map(|h| h.join().unwrap()).sum();
        flooding.store(false, Ordering::SeqCst);
        (real.join().unwrap(), sent, added_at)
    });
    let flood_time = started.elapsed();
    let after = s.round(&clients);
    let idle_after = s.round(&idle);
    let idle_kept = idle_before
        .iter()
        .zip(&idle_after)
        .filter(|(a, b)| a == b)
        .count();

    // A client kept its backend if every answer it got, during and after, came from it.
    let mut moved = 0;
    let mut failed = 0;
    for (i, first) in before.iter().enumerate() {
        let seen: Vec<&Option<String>> = rounds.iter().map(|r| &r[i]).collect();
        failed += seen.iter().filter(|n| n.is_none()).count();
        let elsewhere = seen.iter().any(|n| n.as_ref().is_some_and(|n| n != first));
        if elsewhere || &after[i] != first {
            moved += 1;
        }
    }
    let status = s.status();
    let service = &status["services"][0];
    let kept = REAL_CLIENTS - moved;
    // The pool change was real: new clients reach the added backend.
    let fresh = s.round(&fresh);
    let to_b4 = fresh.iter().filter(|n| *n == "b4").count();
    // On stdout, so `./x bench` can keep the figure.
    println!(
        "flood: {sent} SYNs from random sources in {:.1} s ({:.2} M/s) with guard rate {rate}/s per CPU, \
         backend added at {:.1} s; {} rounds of {REAL_CLIENTS} real connections ({failed} failed); \
         clients that kept their backend: connecting throughout {kept} of {REAL_CLIENTS} ({:.1}%), \
         idle during the flood {idle_kept} of {REAL_CLIENTS} ({:.1}%); \
         inserts {} skipped {} races lost {}; stick entries {}; {to_b4} of {FRESH_CLIENTS} new clients went to b4",
        flood_time.as_secs_f64(),
        sent as f64 / flood_time.as_secs_f64() / 1e6,
        added_at.as_secs_f64(),
        rounds.len(),
        100.0 * kept as f64 / REAL_CLIENTS as f64,
        100.0 * idle_kept as f64 / REAL_CLIENTS as f64,
        service["stick_inserts"],
        service["inserts_skipped"],
        service["races_lost"],
        status["stick_entries"],
    );
    assert!(
        sent >= syns.min(1_000_000) / 2,
        "the flood ran: {sent} SYNs"
    );
    assert!(
        rounds.len() >= 2,
        "real clients kept connecting during the flood"
    );
    assert!(
        kept * 100 >= REAL_CLIENTS * 99,
        "only {kept} of {REAL_CLIENTS} clients connecting throughout kept their backend"
    );
    assert!(
        idle_kept * 100 >= REAL_CLIENTS * 99,
        "only {idle_kept} of {REAL_CLIENTS} clients idle during the flood kept their backend"
    );
    assert!(to_b4 > 0, "the added backend takes new clients");
    if rate > 0 {
        assert!(
            service["inserts_skipped"].as_u64().unwrap() > 0,
            "the guard skipped inserts"
        );
    }
}
