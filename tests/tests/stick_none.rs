//! `stick: {mode: none}` end to end in the netns rig: the policy alone places every new
//! connection and no stick entry is kept, yet each connection stays on its backend for its
//! whole life (the connection table), and `table set` is refused. Needs root.

use std::{
    io::{ErrorKind, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    balancer::cli,
    rig::{HeldConnection, HoldServer, open_held_many},
    scenario::{Mode, PORT, Setup, TIMEOUT, count_names},
};

/// Checks every 200 ms, up after 2: a backend added at run time takes connections within a
/// second.
const FAST_CHECKS: &str = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n";

/// The service's stick counters from `stats --json`: (misses, inserts, hits).
fn stick_counters(s: &Setup) -> (u64, u64, u64) {
    let stats: serde_json::Value = serde_json::from_str(&s.cli_ok(&["stats", "--json"])).unwrap();
    let web = &stats["services"][0];
    let counter = |name: &str| web[name].as_u64().unwrap();
    (
        counter("stick_misses"),
        counter("stick_inserts"),
        counter("stick_hits"),
    )
}

/// `n` held connections from `client`, each with a new source port, opened one after the other.
fn open_from(s: &Setup, client: IpAddr, n: usize) -> Vec<(HeldConnection, String)> {
    let requests = vec![(client, s.vip()); n];
    open_held_many(s.rig.client_ns(), &requests, TIMEOUT)
        .into_iter()
        .map(|r| r.expect("held connection"))
        .collect()
}

/// Whether the connection is still open: nothing to read within 100 ms (no reset from a backend
/// that does not know it, no FIN).
fn still_open(connection: &HeldConnection) -> bool {
    let stream = connection.stream();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut byte = [0u8; 1];
    let open = matches!(
        stream.peek(&mut byte),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
    );
    stream.set_read_timeout(None).unwrap();
    open
}

/// Least-connections without stickiness: 200 short connections leave no entry and count no
/// insert; one client's 8 held connections spread 2 per backend (stickiness would put all 8
/// on one); the pool changes (b5 joins, b1 drains) and every held connection keeps its backend
/// (its segments, then its FIN, reach the server holding it); the client's next 2 go to b5.
#[test]
fn least_conn_without_stickiness_spreads_one_clients_connections_and_keeps_each_on_its_backend() {
    let mut s = Setup::new("stknone-lc", Mode::Generic, 4, 40);
    let config = s.config_with(
        "",
        &format!("    policy: least-conn\n    stick:\n      mode: none\n{FAST_CHECKS}"),
        &vec![String::new(); 4],
    );
    s.start(&config);
    let clients = s.clients();
    let mut names = Vec::new();
    for _ in 0..5 {
        names.extend(s.round(&clients));
    }
    let (misses, inserts, hits) = stick_counters(&s);
    eprintln!(
        "mode none, least-conn: 200 short connections went to {:?}; stick misses {misses}, inserts {inserts}, hits {hits}",
        count_names(&names)
    );
    assert!(s.table().is_empty(), "mode none keeps no entry");
    assert_eq!(inserts, 0);
    assert_eq!(hits, 0);
    assert!(
        misses >= 200,
        "every new connection is looked up: {misses} misses"
    );

    // Held connections, all from one client.
    let mut holders = s.hold_connections();
    let client = clients[0];
    let mut held = open_from(&s, client, 8);
    let spread = count_names(&held.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>());
    eprintln!("mode none, least-conn: one client's 8 held connections went to {spread:?}");
    for name in ["b1", "b2", "b3", "b4"] {
        assert_eq!(spread.get(name), Some(&2), "{spread:?}");
        assert_eq!(s.backend_status(name)["active_connections"], 2);
    }
    assert!(s.table().is_empty());

    // The pool changes: b5 joins (the fewest connections), b1 drains.
    let k = s.rig.add_backend().expect("a fifth backend");
    holders.push(
        HoldServer::start(
            s.rig.backend_ns(k),
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT),
            "b5",
        )
        .unwrap(),
    );
    let out = s.cli_ok(&[
        "backend",
        "add",
        "web/b5",
        &s.rig.backend_addr(k).to_string(),
    ]);
    assert!(out.contains("web/b5 added"), "{out}");
    let up = s.wait_state("b5", "up", Duration::from_secs(10));
    s.cli_ok(&["backend", "drain", "web/b1"]);
    eprintln!("mode none, least-conn: b5 up {up:?} after its add; b1 drained");

    // Every held connection keeps working on its backend: data on it reaches the server that
    // holds it (another would answer with a reset).
    for round in 0..3 {
        for (connection, name) in &held {
            let mut stream = connection.stream();
            stream.write_all(b"still there?\n").unwrap_or_else(|e| {
                panic!("round {round}: write on the connection to {name}: {e}")
            });
        }
        std::thread::sleep(Duration::from_millis(200));
        for (connection, name) in &held {
            assert!(
                still_open(connection),
                "round {round}: the connection to {name} was reset or closed after the pool changed"
            );
        }
    }
    // New connections: least-conn among the up backends, b5 has none.
    let more = open_from(&s, client, 2);
    let names: Vec<&str> = more.iter().map(|(_, n)| n.as_str()).collect();
    eprintln!("mode none, least-conn: after the change the client's next 2 went to {names:?}");
    assert_eq!(names, ["b5", "b5"]);
    held.extend(more);
    assert!(s.table().is_empty());
    let (_, inserts, _) = stick_counters(&s);
    assert_eq!(inserts, 0);

    // Closing: each FIN reaches the server holding the connection, which lets go of it.
    let expected = [("b1", 2), ("b2", 2), ("b3", 2), ("b4", 2), ("b5", 2)];
    let holding = |h: &HoldServer| (h.name().to_string(), h.open_connections());
    let counted = Instant::now();
    while holders
        .iter()
        .map(holding)
        .ne(expected.map(|(n, c)| (n.to_string(), c)))
    {
        let now: Vec<_> = holders.iter().map(holding).collect();
        assert!(
            counted.elapsed() < Duration::from_secs(5),
            "the servers hold {now:?}, not {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(held);
    let closed = Instant::now();
    while holders.iter().any(|h| h.open_connections() > 0) {
        let left: Vec<(String, usize)> = holders
            .iter()
            .map(|h| (h.name().to_string(), h.open_connections()))
            .collect();
        assert!(
            closed.elapsed() < Duration::from_secs(5),
            "connections still held after the clients closed them: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "mode none, least-conn: every server saw its connections close within {:?}",
        closed.elapsed()
    );
}

/// Ip-hash without stickiness: no entry, so a backend that joins takes its share of the
/// clients at once (with entries they would stay); and `table set` is refused.
#[test]
fn ip_hash_without_stickiness_follows_the_pool_and_refuses_table_set() {
    let mut s = Setup::new("stknone-ih", Mode::Generic, 4, 60);
    let config = s.config_with(
        "",
        &format!("    stick:\n      mode: none\n{FAST_CHECKS}"),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let clients = s.clients();
    let before = s.round(&clients);
    assert_eq!(
        s.round(&clients),
        before,
        "ip-hash is stable while the pool is"
    );
    let out = s.cli_ok(&[
        "backend",
        "add",
        "web/b4",
        &s.rig.backend_addr(4).to_string(),
    ]);
    assert!(out.contains("web/b4 added"), "{out}");
    s.wait_state("b4", "up", Duration::from_secs(10));
    let after = s.round(&clients);
    let moved: Vec<(&str, &str)> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(b, a)| (b.as_str(), a.as_str()))
        .collect();
    eprintln!(
        "mode none, ip-hash: {} of {} clients moved when b4 joined",
        moved.len(),
        clients.len()
    );
    assert!(!moved.is_empty(), "no client moved to the new backend");
    assert!(
        moved.iter().all(|(_, a)| *a == "b4"),
        "Maglev moves clients only to the new backend: {moved:?}"
    );
    assert!(s.table().is_empty());
    let (misses, inserts, _) = stick_counters(&s);
    assert_eq!(inserts, 0);
    assert!(misses >= 3 * clients.len() as u64, "{misses} misses");

    let client = clients[0].to_string();
    let (code, out, err) = cli(s.rig.lb_ns(), &["table", "set", &client, "web/b2"]);
    eprintln!("mode none: table set -> exit {code}: {}", err.trim());
    assert_ne!(code, 0, "table set on a mode-none service: {out}{err}");
    assert_eq!(
        err.trim(),
        "sticky-lb: error: service web has stick mode none: it keeps no entries"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(s.table().is_empty());
}
