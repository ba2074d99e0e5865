//! A changing pool, end to end in the netns rig: health checks take a failed backend out and
//! bring it back, drain and weights steer new clients, least-connections balances open
//! connections, and health-check edge cases (500, reset, silence, flapping) behave.
//!
//! Failure and recovery, drain and least-connections also run on an IPv6 service (`_v6`),
//! each client in its own /64 (the default IPv6 client mask of 64 keeps one entry per client).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    balancer::cli,
    rig::{Family, HttpBehaviour, HttpServer, open_held_many},
    scenario::{Mode, Setup, TIMEOUT, count_names},
};

/// Fast checks so the tests take seconds: every 200 ms, 150 ms timeout, rise 2, fall 3.
const FAST_CHECKS: &str = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n      rise: 2\n      fall: 3\n";

/// b2's server stops while clients keep coming: detected within interval x fall + 1 s; its
/// clients move, each to one live backend for all its connections; nobody else moves. It comes
/// back: it gets new clients, and the moved clients stay where they are.
fn failure_and_recovery(mode: Mode, family: Family) {
    let mut s = Setup::new_in("fail", mode, family, 3, 150);
    let config = s.config_with(
        "",
        &format!("    stick:\n      timeout: 30m\n{FAST_CHECKS}"),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let clients: Vec<IpAddr> = s.clients()[..90].to_vec();
    let before = s.round(&clients);
    assert!(before.iter().any(|n| n == "b2"));

    let b2 = s.servers.remove(1);
    b2.stop();
    let stopped = Instant::now();
    s.wait_state("b2", "down", Duration::from_secs(5));
    let detection = stopped.elapsed();
    eprintln!(
        "{mode:?} {family:?}: b2 detected down after {detection:?} (interval 200 ms x fall 3)"
    );
    assert!(
        detection <= Duration::from_millis(200 * 3 + 1000),
        "detection took {detection:?}"
    );

    let after: Vec<Vec<String>> = (0..3).map(|_| s.round(&clients)).collect();
    let mut moved_to = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        let first = &after[0][i];
        assert!(
            after.iter().all(|round| &round[i] == first),
            "{c} changed backend between connections"
        );
        if before[i] == "b2" {
            assert_ne!(first, "b2");
            *moved_to.entry(first.clone()).or_insert(0) += 1;
        } else {
            assert_eq!(first, &before[i], "{c} of a live backend moved");
        }
    }
    eprintln!("{mode:?} {family:?}: b2's clients moved to {moved_to:?}; no other client moved");
    let status = s.status();
    assert!(
        status["services"][0]["redispatches"].as_u64().unwrap()
            >= moved_to.values().sum::<usize>() as u64
    );

    s.servers.insert(1, s.backend_server(2));
    s.wait_state("b2", "up", Duration::from_secs(5));
    let again = s.round(&clients);
    assert_eq!(
        again, after[0],
        "moved clients stay where they are (no flapping back)"
    );
    let newcomers: Vec<IpAddr> = s.clients()[90..].to_vec();
    let new = count_names(&s.round(&newcomers));
    eprintln!("{mode:?} {family:?}: after recovery, 60 new clients went to {new:?}");
    assert!(
        new.get("b2").copied().unwrap_or(0) >= 8,
        "b2 gets new clients again: {new:?}"
    );
    let log = s.balancer.as_ref().unwrap().log_text();
    let b2_addr = s.backend_addr(2);
    assert!(
        log.contains(&format!(
            "backend web/b2 ({b2_addr}) is DOWN: connection refused (3 failed checks)"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("backend web/b2 ({b2_addr}) is UP")),
        "{log}"
    );
    assert_eq!(
        log.matches("is DOWN").count(),
        1,
        "one log line per state change:\n{log}"
    );
}

#[test]
fn failure_and_recovery_native() {
    failure_and_recovery(Mode::Native, Family::Ipv4);
}

#[test]
fn failure_and_recovery_generic() {
    failure_and_recovery(Mode::Generic, Family::Ipv4);
}

#[test]
fn failure_and_recovery_v6_native() {
    failure_and_recovery(Mode::Native, Family::Ipv6);
}

#[test]
fn failure_and_recovery_v6_generic() {
    failure_and_recovery(Mode::Generic, Family::Ipv6);
}

#[test]
fn drain_keeps_stuck_clients_until_their_entries_expire() {
    drain_keeps_stuck_clients(Family::Ipv4);
}

#[test]
fn drain_keeps_stuck_clients_until_their_entries_expire_v6() {
    drain_keeps_stuck_clients(Family::Ipv6);
}

/// `backend drain`: no new client is assigned to it; its clients keep reaching it until their
/// entries expire, then they move.
fn drain_keeps_stuck_clients(family: Family) {
    let mut s = Setup::new_in("drain", Mode::Generic, family, 3, 200);
    let config = s.config(3, "3s", "");
    s.start(&config);
    let clients: Vec<IpAddr> = s.clients()[..100].to_vec();
    let before = s.round(&clients);
    let on_b1: Vec<IpAddr> = clients
        .iter()
        .zip(&before)
        .filter(|(_, n)| *n == "b1")
        .map(|(c, _)| *c)
        .collect();
    assert!(on_b1.len() > 10);

    let out = s.cli_ok(&["backend", "drain", "web/b1"]);
    assert_eq!(out.trim(), "web/b1: drain (weight 1)");
    assert_eq!(s.backend_status("b1")["state"], "drain");
    let newcomers: Vec<IpAddr> = s.clients()[100..].to_vec();
    let new = count_names(&s.round(&newcomers));
    assert!(
        !new.contains_key("b1"),
        "a draining backend takes no new client: {new:?}"
    );
    // Its clients keep reaching it while they are active (each connection refreshes them).
    for _ in 0..3 {
        assert!(s.round(&on_b1).iter().all(|n| n == "b1"));
        std::thread::sleep(Duration::from_millis(500));
    }
    // Idle past the 3 s timeout (and a 0.5 s sweep): their entries are gone, they move.
    std::thread::sleep(Duration::from_millis(4000));
    let later = count_names(&s.round(&on_b1));
    eprintln!(
        "drain {family:?}: {} clients of b1 stayed while active; after their entries expired they went to {later:?}",
        on_b1.len()
    );
    assert!(!later.contains_key("b1"), "{later:?}");

    let out = s.cli_ok(&["backend", "enable", "web/b1"]);
    assert_eq!(out.trim(), "web/b1: up (weight 1)");
    let (code, _, err) = cli(s.rig.lb_ns(), &["backend", "drain", "web/nope"]);
    assert_eq!(
        (code, err.trim()),
        (1, "sticky-lb: error: no backend 'nope' in service 'web'")
    );
    let (code, _, err) = cli(s.rig.lb_ns(), &["backend", "drain", "nope"]);
    assert_eq!(
        (code, err.trim()),
        (1, "sticky-lb: error: 'nope' is not SERVICE/BACKEND")
    );
}

/// Weights 1:2:3 over 600 clients. Maglev gives the backends 1/6, 2/6 and 3/6 of the hash
/// space; 600 clients hashed into it are binomial draws with standard deviations 9.1, 11.5 and
/// 12.2, so +-50 clients is over four standard deviations for each.
#[test]
fn weights_share_new_clients() {
    let mut s = Setup::new("weights", Mode::Generic, 3, 600);
    let weights = [
        "        weight: 1\n",
        "        weight: 2\n",
        "        weight: 3\n",
    ]
    .map(String::from);
    let config = s.config_with("", "", &weights);
    s.start(&config);
    let clients = s.rig.client_addrs().to_vec();
    let counts = count_names(&s.round(&clients));
    eprintln!("weights 1:2:3 over 600 clients: {counts:?} (ideal 100/200/300)");
    for (name, ideal) in [("b1", 100), ("b2", 200), ("b3", 300)] {
        let n = counts.get(name).copied().unwrap_or(0) as i64;
        assert!(
            (n - ideal).abs() <= 50,
            "{name}: {n} clients, ideal {ideal}: {counts:?}"
        );
    }
    // A runtime weight change reshapes new clients only: weight 0 on b3 sends none there.
    s.cli_ok(&["backend", "weight", "web/b3", "0"]);
    assert_eq!(s.backend_status("b3")["state"], "drain");
}

#[test]
fn least_conn_balances_open_connections() {
    least_conn(Family::Ipv4);
}

#[test]
fn least_conn_balances_open_connections_v6() {
    least_conn(Family::Ipv6);
}

/// Least-connections with long-lived connections: they spread evenly, and a backend holding
/// many gets no new client until the others catch up.
fn least_conn(family: Family) {
    let mut s = Setup::new_in("lc", Mode::Generic, family, 3, 200);
    // Servers that hold each connection open, in place of the name servers.
    let holders = s.hold_connections();
    let config = s.config_with("", "    policy: least-conn\n", &vec![String::new(); 3]);
    s.start(&config);
    let vip = s.vip();
    let open = |clients: &[IpAddr]| {
        let requests: Vec<_> = clients.iter().map(|c| (*c, vip)).collect();
        open_held_many(s.rig.client_ns(), &requests, TIMEOUT)
            .into_iter()
            .map(|r| r.expect("held connection"))
            .collect::<Vec<_>>()
    };
    let clients = s.clients();
    let mut held = open(&clients[..90]);
    let first = count_names(&held.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>());
    eprintln!("least-conn {family:?}: 90 long-lived connections spread {first:?}");
    for name in ["b1", "b2", "b3"] {
        let n = first.get(name).copied().unwrap_or(0);
        assert!((28..=32).contains(&n), "{name} holds {n} of 90: {first:?}");
        let active = s.backend_status(name)["active_connections"]
            .as_i64()
            .unwrap();
        assert_eq!(
            active as usize, n,
            "{name}: the data path counts what it forwarded"
        );
    }
    // Close every connection on b1 and b2 (client FINs); b3 keeps its ~30.
    let b3_count = first["b3"];
    held.retain(|(_, n)| n == "b3");
    let deadline = Instant::now() + Duration::from_secs(5);
    while ["b1", "b2"]
        .iter()
        .any(|b| s.backend_status(b)["active_connections"] != 0)
    {
        assert!(
            Instant::now() < deadline,
            "FINs not counted: {:?}",
            s.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // New clients fill b1 and b2 up to b3's count before b3 gets any.
    let catch_up = 2 * b3_count;
    let more = open(&clients[90..90 + catch_up]);
    let second = count_names(&more.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>());
    eprintln!(
        "least-conn {family:?}: with b3 holding {b3_count}, {catch_up} new clients went to {second:?}"
    );
    assert!(
        !second.contains_key("b3"),
        "b3 got new clients before the others caught up: {second:?}"
    );
    let remaining = s.status();
    for backend in remaining["services"][0]["backends"].as_array().unwrap() {
        let active = backend["active_connections"].as_i64().unwrap();
        assert!(
            (b3_count as i64 - 1..=b3_count as i64 + 1).contains(&active),
            "all even again: {backend}"
        );
    }
    drop(holders);
    drop(more);
    drop(held);
}

/// Health-check edge cases with HTTP checks on port 8080: 500, accept-then-reset and silence
/// each take a backend down with the reason logged; a backend alternating 200/500 with rise =
/// fall = 2 never changes state.
#[test]
fn health_check_edge_cases() {
    let mut s = Setup::new("hc", Mode::Generic, 4, 40);
    let http = |k: usize, b: HttpBehaviour| {
        HttpServer::start(
            s.rig.backend_ns(k),
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080),
            b,
        )
        .unwrap()
    };
    let flapper = http(1, HttpBehaviour::Alternate(200, 500));
    let _error = http(2, HttpBehaviour::Status(500));
    let _reset = http(3, HttpBehaviour::Reset);
    let _silent = http(4, HttpBehaviour::Silent);
    let checks = "    health_check:\n      type: http\n      port: 8080\n      path: /health\n      interval: 200ms\n      timeout: 150ms\n      rise: 2\n      fall: 2\n";
    let config = s.config_with("", checks, &vec![String::new(); 4]);
    s.start(&config);
    for b in ["b2", "b3", "b4"] {
        s.wait_state(b, "down", Duration::from_secs(5));
    }
    // The flapper stays up for 3 s (15 checks) of alternating answers.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(s.backend_status("b1")["state"], "up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        flapper.requests() >= 10,
        "the flapper was checked {} times",
        flapper.requests()
    );
    // Every client now reaches the only up backend.
    let clients = s.rig.client_addrs().to_vec();
    assert!(s.round(&clients).iter().all(|n| n == "b1"));
    // Two failures in a row take it down; two successes bring it back.
    flapper.set_behaviour(HttpBehaviour::Status(503));
    s.wait_state("b1", "down", Duration::from_secs(3));
    flapper.set_behaviour(HttpBehaviour::Status(200));
    s.wait_state("b1", "up", Duration::from_secs(3));
    let log = s.balancer.as_ref().unwrap().log_text();
    for expected in [
        "web/b2 (198.18.0.12) is DOWN: bad status 500",
        "web/b3 (198.18.0.13) is DOWN: connection reset before an answer",
        "web/b4 (198.18.0.14) is DOWN: timeout",
        "web/b1 (198.18.0.11) is DOWN: bad status 503",
    ] {
        assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
    }
    assert_eq!(
        log.matches("web/b1 (198.18.0.11) is DOWN").count(),
        1,
        "{log}"
    );
}

/// `client_mask: 0` puts every client of the service on one backend (the key has no client
/// bits): active/backup. When that backend fails, every client moves, together, to one other.
#[test]
fn client_mask_0_is_active_backup() {
    let mut s = Setup::new("mask0", Mode::Generic, 3, 40);
    let config = s.config_with(
        "",
        &format!("    stick:\n      timeout: 30m\n      client_mask: 0\n{FAST_CHECKS}"),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let clients: Vec<Ipv4Addr> = s.rig.client_addrs().to_vec();
    let before = count_names(&s.round(&clients));
    assert_eq!(
        before.len(),
        1,
        "one backend takes every client: {before:?}"
    );
    let (active, n) = before.iter().next().map(|(k, v)| (k.clone(), *v)).unwrap();
    assert_eq!(n, clients.len());
    // One stick entry for the whole service, printed as the /0 prefix.
    let table = s.table();
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(table[0]["client"], "0.0.0.0/0", "{table:?}");

    let k: usize = active[1..].parse().unwrap();
    s.servers.remove(k - 1).stop();
    s.wait_state(&active, "down", Duration::from_secs(5));
    let after = count_names(&s.round(&clients));
    assert_eq!(after.len(), 1, "the backup takes every client: {after:?}");
    assert!(!after.contains_key(&active), "{after:?}");
    eprintln!("client_mask 0: every client on {active}, then all on {after:?}");
}
