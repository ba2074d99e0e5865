//! End to end: the real `sticky-lb` binary balancing real TCP connections in a rig of network
//! namespaces (clients, balancer, backends on a bridge), in native and in generic XDP mode.
//!
//! Each backend runs a server that answers every connection with its own name, so a client
//! learns which backend it reached by reading one line.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    rig::fetch_name,
    scenario::{Mode, Setup, TIMEOUT, backend_server},
};

/// 256 clients, 10 new connections each: every client reaches one backend every time; the
/// spread over three backends is near even; `table show` agrees with what clients saw; the
/// balancer's own address still answers.
fn stickiness_and_spread(mode: Mode) {
    let mut s = Setup::new("stick", mode, 3, 256);
    // Detach on exit, which the end of this test checks (the default keeps the data path).
    let config = s.config(3, "30m", "on_exit: detach\n");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let first = s.round(&clients);
    for round in 1..10 {
        let again = s.round(&clients);
        for (i, (a, b)) in first.iter().zip(&again).enumerate() {
            assert_eq!(
                a, b,
                "round {round}: client {} moved from {a} to {b}",
                clients[i]
            );
        }
    }
    // Spread. Maglev gives each backend a third of the hash space; 256 clients hashed into it
    // are a binomial draw (mean 85.3, sd 7.5), so +-30 clients is four standard deviations: a
    // skew beyond that means the table or the hash is broken, not bad luck.
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for name in &first {
        *per_backend.entry(name.as_str()).or_default() += 1;
    }
    eprintln!("{mode:?}: 256 clients x 10 connections, 100% sticky; spread {per_backend:?}");
    assert_eq!(
        per_backend.len(),
        3,
        "every backend gets clients: {per_backend:?}"
    );
    for (backend, n) in &per_backend {
        assert!(
            (56..=115).contains(n),
            "{backend} got {n} of 256 clients: {per_backend:?}"
        );
    }
    // The stick table holds exactly these clients, each with the backend it answered from.
    let table = s.table();
    assert_eq!(table.len(), 256);
    let seen: BTreeMap<String, String> = clients
        .iter()
        .map(|c| c.to_string())
        .zip(first.clone())
        .collect();
    for row in &table {
        let client = row["client"].as_str().unwrap();
        assert_eq!(
            row["backend"].as_str().unwrap(),
            seen[client],
            "table show for {client}"
        );
        assert_eq!(row["service"], "web");
    }
    // Each client missed once (its first SYN), then hit.
    let status = s.status();
    let service = &status["services"][0];
    assert_eq!(service["stick_misses"], 256);
    assert_eq!(service["stick_inserts"], 256);
    assert!(service["stick_hits"].as_u64().unwrap() >= 256 * 9);
    assert_eq!(status["xdp_mode"], mode.yaml());
    assert_eq!(status["controller_running"], true);
    // Pass-through: the balancer's own address answers through the kernel.
    let own = fetch_name(
        s.rig.client_ns(),
        clients[0],
        SocketAddrV4::new(s.rig.lb_addr(), 8080),
        TIMEOUT,
    )
    .expect("the balancer's own address answers");
    assert_eq!(own, "balancer");
    // SIGTERM detaches and removes the pinned state.
    let code = s.balancer.as_mut().unwrap().stop();
    assert_eq!(code, Some(0));
    assert!(!s.guard.pins().path().exists(), "pins removed on exit");
}

#[test]
fn stickiness_and_spread_native() {
    stickiness_and_spread(Mode::Native);
}

#[test]
fn stickiness_and_spread_generic() {
    stickiness_and_spread(Mode::Generic);
}

/// A fourth backend joins (a controller restart with the new config, adopting the pinned stick
/// table): no client in the stick table moves, and new clients reach the new backend.
fn adding_a_backend_moves_no_stuck_client(mode: Mode) {
    let mut s = Setup::new("add", mode, 3, 400);
    let config = s.config(3, "30m", "on_exit: keep-running\n");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let (known, fresh) = clients.split_at(256);
    let before = s.round(known);
    // Keep-running: the data path keeps forwarding with no controller at all.
    assert_eq!(s.balancer.as_mut().unwrap().stop(), Some(0));
    assert_eq!(
        s.round(&known[..32]),
        before[..32],
        "forwarding continues without a controller"
    );

    let k = s.rig.add_backend().expect("adding a backend namespace");
    s.servers.push(backend_server(&s.rig, k));
    let config = s.config(4, "30m", "on_exit: keep-running\n");
    s.start(&config);
    let after = s.round(known);
    let moved: Vec<_> = known
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (a, b))| a != b)
        .collect();
    assert!(
        moved.is_empty(),
        "{} stuck clients moved, e.g. {:?}",
        moved.len(),
        moved.first()
    );
    // New clients: a quarter of the hash space is the new backend's.
    let new = s.round(fresh);
    let to_new = new.iter().filter(|n| *n == "b4").count();
    eprintln!(
        "{mode:?}: after adding b4, 0 of 256 stuck clients moved; {to_new} of {} new clients went to b4",
        fresh.len()
    );
    assert!(
        to_new >= 10,
        "only {to_new} of {} new clients reached the new backend",
        fresh.len()
    );
    assert_eq!(s.status()["stick_entries"], 400);
}

#[test]
fn adding_a_backend_moves_no_stuck_client_native() {
    adding_a_backend_moves_no_stuck_client(Mode::Native);
}

#[test]
fn adding_a_backend_moves_no_stuck_client_generic() {
    adding_a_backend_moves_no_stuck_client(Mode::Generic);
}

/// With a 2 s timeout, an idle client's entry is swept and `table show` stops listing it, while
/// a client that keeps connecting stays.
fn idle_entry_expires(mode: Mode) {
    let mut s = Setup::new("expire", mode, 2, 2);
    let config = s.config(2, "2s", "");
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let (idle, active) = (clients[0], clients[1]);
    s.round(&[idle, active]);
    let listed = |s: &Setup| -> BTreeSet<String> {
        s.table()
            .iter()
            .map(|r| r["client"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        listed(&s),
        BTreeSet::from([idle.to_string(), active.to_string()])
    );
    let active_backend = s.round(&[active]);
    let started = Instant::now();
    let mut gone_after = None;
    // Bounded: 8 s at most (timeout 2 s + sweep interval 0.5 s + slack).
    while started.elapsed() < Duration::from_secs(8) {
        assert_eq!(
            s.round(&[active]),
            active_backend,
            "the active client keeps its backend"
        );
        let now = listed(&s);
        assert!(
            now.contains(&active.to_string()),
            "the active client's entry must not expire"
        );
        if !now.contains(&idle.to_string()) {
            gone_after = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let gone_after = gone_after.expect("the idle entry was not swept within 8 s");
    eprintln!("{mode:?}: idle entry (timeout 2 s) swept after {gone_after:?}");
    assert!(
        gone_after >= Duration::from_millis(1500),
        "swept too early: {gone_after:?}"
    );
    let log = s.balancer.as_ref().unwrap().log_text();
    assert!(
        log.contains("expiry sweep: 1 of 2 stick entries expired"),
        "the sweep logs what it expired:\n{log}"
    );
}

#[test]
fn idle_entry_expires_native() {
    idle_entry_expires(Mode::Native);
}

#[test]
fn idle_entry_expires_generic() {
    idle_entry_expires(Mode::Generic);
}
