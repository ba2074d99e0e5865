//! End to end: the real `sticky-lb` binary balancing real TCP connections in a rig of network
//! namespaces (clients, balancer, backends on a bridge), in native and in generic XDP mode.
//!
//! Each backend runs a server that answers every connection with its own name, so a client
//! learns which backend it reached by reading one line.
//!
//! The `_v6_` variants run the same scenarios on an IPv6 service (VIP 2001:db8::100), each
//! client in a /64 of its own so the default IPv6 client mask (/64) keeps one entry per client;
//! `ipv6_client_mask_*` covers many clients within one /64.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    rig::{Family, fetch_name},
    scenario::{Mode, Setup, TIMEOUT, count_names},
};

/// 256 clients, 10 new connections each: every client reaches one backend every time; the
/// spread over three backends is near even; `table show` agrees with what clients saw (for
/// IPv6 each entry is the client's /64); the balancer's own address still answers.
fn stickiness_and_spread(mode: Mode, family: Family) {
    let mut s = Setup::new_in("stick", mode, family, 3, 256);
    // Detach on exit, which the end of this test checks (the default keeps the data path).
    let config = s.config(3, "30m", "on_exit: detach\n");
    s.start(&config);
    let clients = s.clients();
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
    eprintln!(
        "{mode:?} {family:?}: 256 clients x 10 connections, 100% sticky; spread {per_backend:?}"
    );
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
    let mask = s.default_client_mask();
    let seen: BTreeMap<String, String> = clients
        .iter()
        .map(|&c| s.client_key(c, mask))
        .zip(first.clone())
        .collect();
    if family == Family::Ipv6 {
        assert!(
            seen.contains_key("2001:db8:1:1::/64"),
            "the first client is keyed by its /64"
        );
        for row in &table {
            assert!(
                row["client"].as_str().unwrap().ends_with("::/64"),
                "an IPv6 entry is the client's /64: {row}"
            );
        }
    }
    for row in &table {
        let client = row["client"].as_str().unwrap();
        let expected = seen
            .get(client)
            .unwrap_or_else(|| panic!("table show lists {client}, not a client key"));
        assert_eq!(
            row["backend"].as_str().unwrap(),
            expected,
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
    let own = fetch_name(s.rig.client_ns(), clients[0], s.lb_own(), TIMEOUT)
        .expect("the balancer's own address answers");
    assert_eq!(own, "balancer");
    // SIGTERM detaches and removes the pinned state.
    let code = s.balancer.as_mut().unwrap().stop();
    assert_eq!(code, Some(0));
    assert!(!s.guard.pins().path().exists(), "pins removed on exit");
}

#[test]
fn stickiness_and_spread_native() {
    stickiness_and_spread(Mode::Native, Family::Ipv4);
}

#[test]
fn stickiness_and_spread_generic() {
    stickiness_and_spread(Mode::Generic, Family::Ipv4);
}

#[test]
fn stickiness_and_spread_v6_native() {
    stickiness_and_spread(Mode::Native, Family::Ipv6);
}

#[test]
fn stickiness_and_spread_v6_generic() {
    stickiness_and_spread(Mode::Generic, Family::Ipv6);
}

/// A fourth backend joins (a controller restart with the new config, adopting the pinned stick
/// table): no client in the stick table moves, and new clients reach the new backend.
fn adding_a_backend_moves_no_stuck_client(mode: Mode, family: Family) {
    let mut s = Setup::new_in("add", mode, family, 3, 400);
    let config = s.config(3, "30m", "on_exit: keep-running\n");
    s.start(&config);
    let clients = s.clients();
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
    s.servers.push(s.backend_server(k));
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
        "{mode:?} {family:?}: after adding b4, 0 of 256 stuck clients moved; {to_new} of {} new clients went to b4",
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
    adding_a_backend_moves_no_stuck_client(Mode::Native, Family::Ipv4);
}

#[test]
fn adding_a_backend_moves_no_stuck_client_generic() {
    adding_a_backend_moves_no_stuck_client(Mode::Generic, Family::Ipv4);
}

#[test]
fn adding_a_backend_moves_no_stuck_client_v6_native() {
    adding_a_backend_moves_no_stuck_client(Mode::Native, Family::Ipv6);
}

#[test]
fn adding_a_backend_moves_no_stuck_client_v6_generic() {
    adding_a_backend_moves_no_stuck_client(Mode::Generic, Family::Ipv6);
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

/// 256 IPv6 clients in four /64s of 64 addresses each. With `client_mask: 64` (the IPv6
/// default, written out here) a /64 is one stick entry: every address of a /64 reaches the
/// same backend, connection after connection; `table show` lists the `/64` prefixes and
/// `table get` finds a /64's entry from any address in it; the /64s spread over the backends
/// (checked with one more client from each of eight more /64s: twelve keys on one backend
/// out of three would be a 1 in 177,000 chance). With `client_mask: 128` every address is its
/// own entry: the addresses within one /64 spread over the backends.
fn ipv6_client_mask_64_and_128(mode: Mode) {
    let mut s = Setup::with_rig("mask64", mode, Family::Ipv6, |o| {
        o.backends(3).clients(12 * 64).clients_per_64(64)
    });
    let all = s.clients();
    let nets: Vec<&[IpAddr]> = all.chunks(64).collect();
    assert_eq!(nets.len(), 12);
    let keys: Vec<String> = nets.iter().map(|net| s.client_key(net[0], 64)).collect();
    assert_eq!(
        keys[..4],
        [
            "2001:db8:1:1::/64",
            "2001:db8:1:2::/64",
            "2001:db8:1:3::/64",
            "2001:db8:1:4::/64"
        ]
    );
    assert_eq!(keys[11], "2001:db8:1:c::/64");
    // The 256 clients of the first four /64s, and one more client in each of the others.
    let clients = all[..256].to_vec();
    let others: Vec<IpAddr> = nets[4..].iter().map(|net| net[9]).collect();

    let sticky = |timeout: &str, mask: u8| {
        format!("    stick:\n      timeout: {timeout}\n      client_mask: {mask}\n")
    };
    // Detach on exit, so the second half starts on an empty table.
    let config = s.config_with(
        "on_exit: detach\n",
        &sticky("30m", 64),
        &vec![String::new(); 3],
    );
    s.start(&config);
    let first = s.round(&clients);
    for round in 1..3 {
        assert_eq!(s.round(&clients), first, "round {round}: a client moved");
    }
    let per_net: Vec<BTreeMap<String, usize>> = first.chunks(64).map(count_names).collect();
    for (key, counts) in keys.iter().zip(&per_net) {
        assert_eq!(
            counts.len(),
            1,
            "every address of {key} on one backend: {counts:?}"
        );
    }
    let mut net_backends: Vec<String> = per_net
        .iter()
        .map(|counts| counts.keys().next().unwrap().clone())
        .collect();
    net_backends.extend(s.round(&others));
    eprintln!(
        "{mode:?}: client_mask 64, twelve /64s (four of 64 addresses) went to {net_backends:?}"
    );
    let spread = count_names(&net_backends);
    assert!(
        spread.len() >= 2,
        "the /64s spread over the backends: {spread:?}"
    );
    let table = s.table();
    let mut listed: Vec<(String, String)> = table
        .iter()
        .map(|row| {
            (
                row["client"].as_str().unwrap().to_owned(),
                row["backend"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    let mut expected: Vec<(String, String)> = keys
        .iter()
        .cloned()
        .zip(net_backends.iter().cloned())
        .collect();
    expected.sort();
    assert_eq!(listed, expected, "one entry per /64, printed as the prefix");
    let status = s.status();
    assert_eq!(status["stick_entries"], 12);
    assert_eq!(status["services"][0]["stick_misses"], 12);
    // `table get` with any address of a /64 finds that /64's entry, named by its prefix.
    let out = s.cli_ok(&["table", "get", &nets[2][37].to_string(), "--json"]);
    let got: serde_json::Value = serde_json::from_str(&out).expect("table get --json");
    assert_eq!(got[0]["client"], "2001:db8:1:3::/64", "{got}");
    assert_eq!(got[0]["backend"], net_backends[2], "{got}");

    // The same clients with /128 keys, after a restart that starts on an empty table.
    assert_eq!(s.balancer.as_mut().unwrap().stop(), Some(0));
    assert!(!s.guard.pins().path().exists(), "pins removed on exit");
    let config = s.config_with("", &sticky("30m", 128), &vec![String::new(); 3]);
    s.start(&config);
    let first = s.round(&clients);
    assert_eq!(s.round(&clients), first, "a /128 client moved");
    let per_net: Vec<BTreeMap<String, usize>> = first.chunks(64).map(count_names).collect();
    eprintln!("{mode:?}: client_mask 128, the four /64s spread {per_net:?}");
    // 64 addresses over three equal thirds of the hash space: all on one backend has odds of
    // 3 x (1/3)^64, and each backend's share is binomial (mean 21.3, sd 3.8).
    for counts in &per_net {
        assert_eq!(counts.len(), 3, "addresses of one /64 spread: {counts:?}");
        assert!(counts.values().all(|&n| n >= 6), "{counts:?}");
    }
    let table = s.table();
    assert_eq!(table.len(), 256);
    let listed: BTreeSet<&str> = table
        .iter()
        .map(|row| row["client"].as_str().unwrap())
        .collect();
    let addresses: Vec<String> = clients.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        listed,
        addresses.iter().map(String::as_str).collect(),
        "a /128 entry is the plain address"
    );
}

#[test]
fn ipv6_client_mask_64_and_128_native() {
    ipv6_client_mask_64_and_128(Mode::Native);
}

#[test]
fn ipv6_client_mask_64_and_128_generic() {
    ipv6_client_mask_64_and_128(Mode::Generic);
}
