//! Backend identities and first verdicts, end to end in the netns rig (generic XDP mode).
//!
//! Stick entries, connections and per-backend counters name a backend by its id, so:
//!
//! * the id of a removed backend is retired, across a restart too (the state file keeps the
//!   book), and never handed to a new backend while stick entries still name it: otherwise the
//!   new backend would inherit every client of the removed one (and its counters);
//! * the same holds for backends removed and added by reload and by `backend add`;
//! * a backend that is dead when the controller starts gets no client, neither on a fresh start
//!   (every backend is checked once before the first publish) nor after a restart that adopts
//!   the pinned data path (the verdicts from before the restart are kept).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};
use sticky_lb::state::{self, RuntimeState};
use sticky_lb_common::BackendId;
use sticky_lb_tests::{
    rig::fetch_names_many,
    scenario::{Mode, Setup, TIMEOUT, backend_server, count_names},
};

/// One test at a time: each builds a rig of hundreds of client addresses, and the dead-backend
/// test must connect its clients right after the controller starts, which a neighbour's rig
/// build on a 2-CPU machine would delay.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The controller's state file: ids by backend name (service `web`) and the retired ids.
fn state_file(s: &Setup) -> RuntimeState {
    let path = state::path(Some(s.rig.lb_ns()), s.rig.lb_dev());
    RuntimeState::read(&path).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ids_by_name(state: &RuntimeState) -> BTreeMap<String, BackendId> {
    let web = state
        .services
        .iter()
        .find(|s| s.name == "web")
        .expect("service web in the state file");
    web.backends
        .iter()
        .map(|b| (b.name.clone(), b.id))
        .collect()
}

/// `stats --json`: the packet counter of backend `name` of service `web`.
fn packets_of(s: &Setup, name: &str) -> u64 {
    let stats = json(&s.cli_ok(&["stats", "--json"]));
    stats["services"][0]["backends"]
        .as_array()
        .expect("backends in stats")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in stats: {stats}"))["packets"]
        .as_u64()
        .expect("a packet count")
}

/// The config lines of backend `name` at `address`, as [`Setup::config_with`] writes them.
fn backend_lines(name: &str, address: Ipv4Addr) -> String {
    format!("      - name: {name}\n        address: {address}\n")
}

/// The clients in `clients` whose answer in `names` was `backend`.
fn clients_of(clients: &[Ipv4Addr], names: &[String], backend: &str) -> Vec<Ipv4Addr> {
    clients
        .iter()
        .zip(names)
        .filter(|(_, n)| *n == backend)
        .map(|(c, _)| *c)
        .collect()
}

/// One connection from each client; counts the failed ones (refused, reset, timed out) and
/// returns them with the names the others got.
fn attempt(s: &Setup, clients: &[Ipv4Addr]) -> (usize, BTreeMap<String, usize>) {
    let requests: Vec<(Ipv4Addr, SocketAddr)> = clients.iter().map(|c| (*c, s.vip())).collect();
    let mut failed = 0;
    let mut names = Vec::new();
    for reply in fetch_names_many(s.rig.client_ns(), &requests, TIMEOUT) {
        match reply {
            Ok(name) if !name.is_empty() => names.push(name),
            _ => failed += 1,
        }
    }
    (failed, count_names(&names))
}

/// The reported bug: `backend remove` (immediate), a restart, and a new backend in the config.
/// The old controller handed the new backend the lowest free id, the removed backend's, and
/// with it every client still stuck to that id (and its counters).
#[test]
fn a_removed_backends_id_is_not_reused_across_a_restart() {
    let _serial = one_at_a_time();
    let mut s = Setup::new("idrestart", Mode::Generic, 4, 256);
    // Keep-running is the default; said here because the restart depends on it.
    let top = "backend_removal: immediate\non_exit: keep-running\n";
    let service = "    stick:\n      timeout: 30m\n";
    let four = s.config_with(top, service, &vec![String::new(); 4]);
    s.start(&four);
    let clients = s.rig.client_addrs().to_vec();
    let before = s.round(&clients);
    let on_b2 = clients_of(&clients, &before, "b2");
    assert!(on_b2.len() >= 20, "b2 got {} of 256 clients", on_b2.len());
    let b2_id = ids_by_name(&state_file(&s))["b2"];

    let out = s.cli_ok(&["backend", "remove", "web/b2"]);
    assert!(out.contains("web/b2 removed"), "{out}");
    // Let sweeps run: the stick entries of b2's clients still name its id, so it stays retired.
    std::thread::sleep(Duration::from_millis(1200));
    let removed = state_file(&s);
    assert!(
        !ids_by_name(&removed).contains_key("b2"),
        "b2 is out of the state file"
    );
    assert!(
        removed.retired_backends.contains_key(&b2_id),
        "b2's id {b2_id} is retired: {:?}",
        removed.retired_backends
    );

    // SIGTERM: the data path keeps running.
    assert_eq!(s.balancer.as_mut().unwrap().stop(), Some(0));
    let k = s.rig.add_backend().expect("a fifth backend namespace");
    assert_eq!(k, 5);
    s.servers.push(backend_server(&s.rig, k));
    let without_b2 = s
        .config_with(top, service, &vec![String::new(); 5])
        .replace(&backend_lines("b2", s.rig.backend_addr(2)), "");
    assert!(!without_b2.contains("name: b2"), "{without_b2}");
    s.start(&without_b2);

    let adopted = state_file(&s);
    let ids = ids_by_name(&adopted);
    eprintln!(
        "identities: ids before: b2 = {b2_id}; after the restart: {ids:?}, retired {:?}",
        adopted.retired_backends
    );
    assert_eq!(
        ids.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b3", "b4", "b5"]
    );
    assert_ne!(ids["b5"], b2_id, "b5 got the removed b2's id");
    assert!(
        adopted.retired_backends.contains_key(&b2_id),
        "b2's id {b2_id} stays retired across the restart: {:?}",
        adopted.retired_backends
    );
    let in_use: BTreeSet<BackendId> = ids.values().copied().collect();
    assert_eq!(in_use.len(), 4, "four distinct ids: {ids:?}");
    // No client has reached b5 yet: its counters start at 0 (b2's were not handed over).
    let b5_packets = packets_of(&s, "b5");
    assert_eq!(b5_packets, 0, "b5's packet counter before any client");
    assert_eq!(s.backend_status("b5")["state"], "up");

    let after = s.round(&clients);
    let moved: Vec<_> = clients
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (a, b))| a != b && *a != "b2")
        .collect();
    assert!(
        moved.is_empty(),
        "{} clients of b1/b3/b4 moved, e.g. {:?}",
        moved.len(),
        moved.first()
    );
    let former: Vec<String> = clients
        .iter()
        .zip(&after)
        .filter(|(c, _)| on_b2.contains(c))
        .map(|(_, n)| n.clone())
        .collect();
    let spread = count_names(&former);
    let to_b5 = spread.get("b5").copied().unwrap_or(0);
    eprintln!(
        "identities: {} of 256 clients were on b2 (id {b2_id}); b5 got id {}; after the restart {to_b5} of them ({:.0}%) went to b5: {spread:?}; b5's packets before any client: {b5_packets}",
        on_b2.len(),
        ids["b5"],
        100.0 * to_b5 as f64 / on_b2.len() as f64
    );
    assert!(!spread.contains_key("b2"), "nobody reaches b2: {spread:?}");
    assert!(
        to_b5 * 100 < on_b2.len() * 60,
        "{to_b5} of b2's {} former clients went to b5 (old behaviour: all of them): {spread:?}",
        on_b2.len()
    );
}

/// Removal by reload, addition by reload and by `backend add`: no new backend gets the id of
/// the removed one while its clients' stick entries name it.
#[test]
fn ids_stay_unique_for_reload_and_api_add() {
    let _serial = one_at_a_time();
    let mut s = Setup::new("idreload", Mode::Generic, 4, 128);
    let top = "backend_removal: immediate\n";
    let service = "    stick:\n      timeout: 30m\n";
    let four = s.config_with(top, service, &vec![String::new(); 4]);
    s.start(&four);
    let clients = s.rig.client_addrs().to_vec();
    let before = s.round(&clients);
    let on_b2 = clients_of(&clients, &before, "b2");
    assert!(on_b2.len() >= 10, "b2 got {} of 128 clients", on_b2.len());
    let b2_id = ids_by_name(&state_file(&s))["b2"];
    let path = s.scratch.path().join("config.yaml");

    // Reload 1: b2 leaves.
    let b2_lines = backend_lines("b2", s.rig.backend_addr(2));
    std::fs::write(&path, four.replace(&b2_lines, "")).unwrap();
    let out = s.cli_ok(&["reload"]);
    assert!(out.contains("1 removed"), "{out}");
    // Sweeps run meanwhile (every 500 ms) and find b2's clients' entries naming its id.
    std::thread::sleep(Duration::from_millis(1200));
    let state = state_file(&s);
    assert!(
        state.retired_backends.contains_key(&b2_id),
        "b2's id {b2_id} is retired: {:?}",
        state.retired_backends
    );

    // Reload 2: b5 joins.
    let k5 = s.rig.add_backend().expect("backend namespace 5");
    s.servers.push(backend_server(&s.rig, k5));
    let with_b5 = s
        .config_with(top, service, &vec![String::new(); 5])
        .replace(&b2_lines, "");
    std::fs::write(&path, &with_b5).unwrap();
    let out = s.cli_ok(&["reload"]);
    assert!(out.contains("1 backend(s) added"), "{out}");
    let ids = ids_by_name(&state_file(&s));
    assert_ne!(
        ids["b5"], b2_id,
        "b5 (reload) got the removed b2's id: {ids:?}"
    );

    // `backend add`: b6 joins at run time.
    let k6 = s.rig.add_backend().expect("backend namespace 6");
    s.servers.push(backend_server(&s.rig, k6));
    let address = s.rig.backend_addr(k6).to_string();
    let out = s.cli_ok(&["backend", "add", "web/b6", &address]);
    assert!(
        out.contains(&format!("web/b6 added ({address}, weight 1): up")),
        "{out}"
    );
    let state = state_file(&s);
    let ids = ids_by_name(&state);
    eprintln!(
        "identities (reload, backend add): b2 had id {b2_id}; now {ids:?}, retired {:?}",
        state.retired_backends
    );
    assert_eq!(
        ids.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b3", "b4", "b5", "b6"]
    );
    assert_ne!(
        ids["b6"], b2_id,
        "b6 (backend add) got the removed b2's id: {ids:?}"
    );
    let distinct: BTreeSet<BackendId> = ids.values().copied().collect();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "every backend has its own id: {ids:?}"
    );
    assert!(
        state.retired_backends.contains_key(&b2_id),
        "b2's id {b2_id} is still retired: {:?}",
        state.retired_backends
    );
    for new in ["b5", "b6"] {
        assert_eq!(
            packets_of(&s, new),
            0,
            "{new}'s packet counter before any client"
        );
    }

    // b2's former clients are placed afresh over five backends, not handed over as a block.
    let after = s.round(&clients);
    let spread = count_names(
        &clients
            .iter()
            .zip(&after)
            .filter(|(c, _)| on_b2.contains(c))
            .map(|(_, n)| n.clone())
            .collect::<Vec<_>>(),
    );
    eprintln!(
        "identities (reload, backend add): b2's {} former clients now: {spread:?}",
        on_b2.len()
    );
    assert!(!spread.contains_key("b2"), "{spread:?}");
    for new in ["b5", "b6"] {
        let got = spread.get(new).copied().unwrap_or(0);
        assert!(
            got * 100 < on_b2.len() * 60,
            "{got} of b2's {} former clients went to {new}: {spread:?}",
            on_b2.len()
        );
    }
    let moved = clients
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (a, b))| a != b && *a != "b2")
        .count();
    assert_eq!(moved, 0, "clients of b1/b3/b4 stay where they were");
}

/// b1 is dead (nothing listens on its port) when the controller starts: new clients that
/// connect right after the start never reach it, on a fresh start and after a restart that
/// adopts the pinned data path. Once b1's server runs, its checks bring it up.
#[test]
fn a_backend_dead_at_start_gets_no_client() {
    let _serial = one_at_a_time();
    let mut s = Setup::new("deadstart", Mode::Generic, 4, 400);
    // b1's server is the first one Setup started; with it gone b1 refuses every connection.
    s.servers.remove(0).stop();
    let config = s.config(4, "30m", "on_exit: keep-running\n");
    let clients = s.rig.client_addrs().to_vec();
    let (fresh_start, rest) = clients.split_at(120);
    let (after_restart, after_recovery) = rest.split_at(120);

    s.start(&config);
    let started = Instant::now();
    let (failed_fresh, spread_fresh) = attempt(&s, fresh_start);
    let took_fresh = started.elapsed();
    let b1_state_fresh = s.backend_status("b1")["state"].clone();
    eprintln!(
        "identities: fresh start with b1 dead: {failed_fresh} of 120 new clients failed ({took_fresh:?} for the round, b1 {b1_state_fresh}): {spread_fresh:?}"
    );
    assert_eq!(
        failed_fresh, 0,
        "new clients sent to the dead b1: {spread_fresh:?}"
    );
    assert_eq!(b1_state_fresh, "down");

    // A restart (SIGTERM, keep-running, adoption) keeps b1's verdict.
    assert_eq!(s.balancer.as_mut().unwrap().stop(), Some(0));
    s.start(&config);
    let started = Instant::now();
    let (failed_restart, spread_restart) = attempt(&s, after_restart);
    let took_restart = started.elapsed();
    let log = s.balancer.as_ref().unwrap().log_text();
    eprintln!(
        "identities: restart (adoption) with b1 dead: {failed_restart} of 120 new clients failed ({took_restart:?} for the round): {spread_restart:?}"
    );
    assert!(log.contains("adopting the data path pinned at"), "{log}");
    assert_eq!(
        failed_restart, 0,
        "new clients sent to the dead b1: {spread_restart:?}"
    );
    assert_eq!(s.backend_status("b1")["state"], "down");

    // b1 comes back: rise 2 checks every 2 s bring it up.
    s.servers.push(backend_server(&s.rig, 1));
    let took = s.wait_state("b1", "up", Duration::from_secs(20));
    let (failed_recovered, spread_recovered) = attempt(&s, after_recovery);
    eprintln!(
        "identities: b1 up {took:?} after its server started; then {failed_recovered} of {} new clients failed: {spread_recovered:?}",
        after_recovery.len()
    );
    assert_eq!(failed_recovered, 0);
    assert!(
        spread_recovered.get("b1").copied().unwrap_or(0) > 0,
        "b1 takes new clients again: {spread_recovered:?}"
    );
}
