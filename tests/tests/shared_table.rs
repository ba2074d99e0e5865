//! Several balancer nodes behind a router's ECMP route sharing one stick table through a real
//! Redis (`shared_table`): what one node decided about a client, every node honours. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData};
use sticky_lb::dataplane::{PinDir, open_pinned};
use sticky_lb_common::{BackendId, SERVICE_INDEX_TOMBSTONE, Service, map_names};
use sticky_lb_tests::balancer::cli;
use sticky_lb_tests::ecmp::{Cluster, EcmpRig, EcmpRigOptions, PORT};
use sticky_lb_tests::netns::require_root;
use sticky_lb_tests::rig::{HeldConnection, NameServer, open_held};
use sticky_lb_tests::wait::wait_for;

const TIMEOUT: Duration = Duration::from_secs(3);

/// The clients' backends, one fetch each (new source ports: each may take another node).
fn backends_of(rig: &EcmpRig, clients: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, String> {
    clients
        .iter()
        .copied()
        .zip(rig.round(clients, TIMEOUT))
        .collect()
}

/// A node's config: service `web` with backends `names` (of the rig's b1..bK), shared through
/// the rig's Redis as node `lbI` when `shared`.
fn config(rig: &EcmpRig, i: usize, shared: bool, policy: &str, names: &[usize]) -> String {
    let backends: Vec<(usize, u32)> = names.iter().map(|&k| (k, 1)).collect();
    node_config(rig, i, shared, policy, &backends, "", "")
}

/// [`config`] with weights (`(k, weight)` for backend bK), `top` lines at the top level and
/// `service` lines in the service (indented four spaces).
fn node_config(
    rig: &EcmpRig,
    i: usize,
    shared: bool,
    policy: &str,
    backends: &[(usize, u32)],
    top: &str,
    service: &str,
) -> String {
    let shared_top = if shared {
        format!(
            "node: lb{i}\nshared_table:\n  redis: {}\n  load_timeout: 2s\n",
            rig.store_url()
        )
    } else {
        String::new()
    };
    let mut yaml = format!(
        "interface: {}\nxdp_mode: generic\nsweep_interval: 500ms\n{shared_top}{top}services:\n  - name: web\n    vip: {}\n    port: {}\n    policy: {policy}\n    stick:\n      timeout: 5m\n{service}    backends:\n",
        rig.lb_dev(),
        rig.vip(),
        rig.service().port(),
    );
    for &(k, weight) in backends {
        yaml += &format!(
            "      - name: b{k}\n        address: {}\n        weight: {weight}\n",
            rig.backend_addr(k)
        );
    }
    yaml
}

/// Clients stuck through node 1; a backend is added (on every node); the ECMP set changes so
/// they reach node 2. Returns how many clients moved.
fn clients_moved_by_a_pool_and_ecmp_change(tag: &str, shared: bool) -> usize {
    let cluster = Cluster::start(
        EcmpRigOptions::new(tag)
            .balancers(2)
            .backends(3)
            .clients(60),
        &[1, 2],
        false,
        |rig, i| config(rig, i, shared, "ip-hash", &[1, 2]),
    );
    let rig = &cluster.rig;
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let before = backends_of(rig, &clients);
    if shared {
        // Node 2 learns every client node 1 placed.
        let lag = wait_for(
            "node 2 learning node 1's clients",
            Duration::from_secs(10),
            || rig.stick_table(2).len() == clients.len(),
        );
        eprintln!(
            "node 2 had all {} clients {lag:?} after the round",
            clients.len()
        );
        assert_eq!(rig.stick_table(1), rig.stick_table(2));
    }
    // b3 joins: on every node with --all-nodes when shared, else on each node by hand.
    let add = ["backend", "add", "web/b3", &rig.backend_addr(3).to_string()];
    if shared {
        let mut args = add.to_vec();
        args.push("--all-nodes");
        let (code, out, err) = cli(rig.lb_ns(1), &args);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("sent to every node"), "{out}");
    } else {
        for i in 1..=2 {
            let (code, out, err) = cli(rig.lb_ns(i), &add);
            assert_eq!(code, 0, "{out}{err}");
        }
    }
    for i in 1..=2 {
        wait_for(&format!("b3 up on lb{i}"), Duration::from_secs(15), || {
            let (_, out, _) = cli(rig.lb_ns(i), &["backend", "list", "--json"]);
            out.contains("\"b3\"") && {
                let services: serde_json::Value = serde_json::from_str(&out).unwrap();
                services[0]["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|b| b["name"] == "b3" && b["state"] == "up")
            }
        });
    }
    rig.set_ecmp(&[2]).unwrap();
    let after = backends_of(rig, &clients);
    let moved = clients.iter().filter(|c| before[c] != after[c]).count();
    cluster.finish();
    moved
}

#[test]
fn clients_keep_their_backend_across_nodes_when_the_pool_and_the_ecmp_set_change() {
    require_root();
    let moved = clients_moved_by_a_pool_and_ecmp_change("shared_move", true);
    let control = clients_moved_by_a_pool_and_ecmp_change("shared_ctrl", false);
    eprintln!("clients moved: {moved} of 60 with the shared table, {control} of 60 without");
    assert_eq!(moved, 0);
    // The control shows the test can see a move: Maglev gives b3 about a third of the clients
    // on a node that never saw them.
    assert!(
        control > 0,
        "without sharing no client moved: the test proves nothing"
    );
}

/// Health checks that see a stopped server within about half a second.
const FAST_CHECKS: &str = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n      rise: 2\n      fall: 2\n";
/// Where every node serves /metrics, inside its own namespace.
const METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9180);
/// Connections each client opens at once in [`parallel_round`].
const PARALLEL: usize = 4;

/// Waits (bounded) until every backend is up on every node of `nodes`.
fn wait_all_up(rig: &EcmpRig, nodes: &[usize]) {
    for &i in nodes {
        wait_for(
            &format!("every backend up on lb{i}"),
            Duration::from_secs(15),
            || rig.backend_states(i).values().all(|state| state == "up"),
        );
    }
}

/// Waits (bounded) until the stick tables of `nodes` are equal and hold `n` entries each;
/// returns how long it took.
fn wait_agree(rig: &EcmpRig, nodes: &[usize], n: usize) -> Duration {
    wait_for(
        &format!("the tables of {nodes:?} agreeing on {n} clients"),
        Duration::from_secs(15),
        || {
            let first = rig.stick_table(nodes[0]);
            first.len() == n && nodes[1..].iter().all(|&i| rig.stick_table(i) == first)
        },
    )
}

/// Node `i`'s entry for `client` in `web` (`table get`): its backend, if any.
fn entry(rig: &EcmpRig, i: usize, client: Ipv4Addr) -> Option<String> {
    let client = client.to_string();
    let (code, out, err) = cli(
        rig.lb_ns(i),
        &["table", "get", &client, "--service", "web", "--json"],
    );
    assert_eq!(code, 0, "table get on lb{i}: {err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows[0]["backend"].as_str().map(str::to_owned)
}

/// The active table of the data path's only service: the slice of `slb_maglev` that its
/// current parameters (`slb_services`, found through `slb_svc_index`) point at.
fn active_table(pins: &PinDir) -> Vec<BackendId> {
    let index: Array<MapData, u32> = open_pinned(pins, map_names::SERVICE_INDEX).unwrap();
    let services: Array<MapData, Service> = open_pinned(pins, map_names::SERVICES).unwrap();
    let maglev: Array<MapData, BackendId> = open_pinned(pins, map_names::MAGLEV).unwrap();
    let params: Vec<u32> = index
        .iter()
        .map(Result::unwrap)
        .filter(|&e| e != 0 && e != SERVICE_INDEX_TOMBSTONE)
        .collect();
    assert_eq!(params.len(), 1, "one service in the index");
    let service = services.get(&(params[0] - 1), 0).unwrap();
    (service.ring_base..service.ring_base + service.ring_size)
        .map(|slot| maglev.get(&slot, 0).unwrap())
        .collect()
}

/// Every client makes `per_client` connections at once with `connect` (one thread each, in
/// step client by client; new source ports, so ECMP spreads them over the nodes). What each
/// connection gave, by client.
fn parallel_round<T: Send>(
    clients: &[Ipv4Addr],
    per_client: usize,
    connect: impl Fn(Ipv4Addr) -> anyhow::Result<T> + Sync,
) -> Vec<Vec<T>> {
    let barrier = Barrier::new(per_client);
    // Results, not panics, inside the threads: a thread that panicked would leave the others
    // waiting at the barrier.
    let mut rounds: Vec<std::vec::IntoIter<anyhow::Result<T>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..per_client)
            .map(|_| {
                scope.spawn(|| {
                    clients
                        .iter()
                        .map(|&client| {
                            barrier.wait();
                            connect(client)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap().into_iter())
            .collect()
    });
    clients
        .iter()
        .map(|client| {
            rounds
                .iter_mut()
                .map(|round| match round.next().unwrap() {
                    Ok(got) => got,
                    Err(err) => panic!("client {client}: {err:#}"),
                })
                .collect()
        })
        .collect()
}

/// Node `i`'s metric `name` (no labels) from its /metrics endpoint, scraped inside its
/// namespace.
fn metric(rig: &EcmpRig, i: usize, name: &str) -> f64 {
    let text = rig.node_metrics(i, METRICS).expect("scraping metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in lb{i}'s metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn same_config_gives_every_node_byte_identical_maglev_tables() {
    require_root();
    let backends = [(1, 1), (2, 2), (3, 1), (4, 1)];
    let cluster = Cluster::start(
        EcmpRigOptions::new("shared_maglev")
            .balancers(3)
            .backends(4),
        &[1, 2, 3],
        false,
        |rig, i| node_config(rig, i, true, "ip-hash", &backends, "", ""),
    );
    let rig = &cluster.rig;
    wait_all_up(rig, &[1, 2, 3]);
    let tables: Vec<Vec<BackendId>> = (1..=3)
        .map(|i| active_table(&PinDir::new(Some(rig.lb_ns(i)), rig.lb_dev())))
        .collect();
    let mut slots: BTreeMap<BackendId, usize> = BTreeMap::new();
    for &id in &tables[0] {
        *slots.entry(id).or_default() += 1;
    }
    eprintln!(
        "Maglev table of {} slots on each node; slots per backend id (weights 1, 2, 1, 1): {slots:?}",
        tables[0].len()
    );
    assert_eq!(slots.len(), 4, "every backend holds slots: {slots:?}");
    for i in 2..=3 {
        let differing = tables[0]
            .iter()
            .zip(&tables[i - 1])
            .filter(|(a, b)| a != b)
            .count();
        assert!(
            tables[i - 1] == tables[0],
            "lb{i}'s table differs from lb1's in {differing} of {} slots",
            tables[0].len()
        );
    }
    cluster.finish();
}

#[test]
fn least_conn_clients_end_on_one_backend_across_nodes() {
    require_root();
    let top = format!("metrics:\n  listen: {METRICS}\n");
    // The backends hold every connection open: least-conn counts open connections, each node
    // those it forwarded, so the nodes' counts differ and so would their choices.
    let cluster = Cluster::start(
        EcmpRigOptions::new("shared_lc")
            .balancers(3)
            .backends(3)
            .clients(sticky_lb_tests::ecmp::MAX_CLIENTS),
        &[1, 2, 3],
        true,
        |rig, i| {
            node_config(
                rig,
                i,
                true,
                "least-conn",
                &[(1, 1), (2, 1), (3, 1)],
                &top,
                "",
            )
        },
    );
    let rig = &cluster.rig;
    wait_all_up(rig, &[1, 2, 3]);
    let clients = rig.client_addrs().to_vec();
    let connect = |client| open_held(rig.client_ns(), client, rig.service(), TIMEOUT);
    let names = |round: &[Vec<(HeldConnection, String)>]| -> Vec<BTreeSet<String>> {
        round
            .iter()
            .map(|held| held.iter().map(|(_, name)| name.clone()).collect())
            .collect()
    };
    let first = parallel_round(&clients, PARALLEL, connect);
    let split = names(&first)
        .iter()
        .filter(|reached| reached.len() > 1)
        .count();
    let lag = wait_agree(rig, &[1, 2, 3], clients.len());
    let second = parallel_round(&clients, PARALLEL, connect);
    let agreed = rig.stick_table(1);
    for (client, reached) in clients.iter().zip(names(&second)) {
        assert_eq!(reached.len(), 1, "client {client} reached {reached:?}");
        assert_eq!(
            reached.first(),
            agreed.get(&client.to_string()),
            "client {client}"
        );
    }
    let lost: Vec<f64> = (1..=3)
        .map(|i| metric(rig, i, "sticky_lb_shared_claims_lost_total"))
        .collect();
    eprintln!(
        "least-conn, {} clients x {PARALLEL} connections at once over 3 nodes: {split} ({:.1}%) \
         reached more than one backend in the first round (needed a rewrite); the tables agreed \
         {lag:?} after it; claims lost per node: {lost:?}",
        clients.len(),
        100.0 * split as f64 / clients.len() as f64
    );
    // Every client that reached two backends had a node whose claim lost.
    assert!(lost.iter().sum::<f64>() >= split as f64);
    drop((first, second));
    cluster.finish();
}

/// Clients stuck through node 1; the backend with the most of them fails (its server stops,
/// both nodes see it down) and they connect again through node 1, which moves them; the
/// backend comes back; the ECMP set changes to node 2. Returns (clients that reach another
/// backend through node 2 than through node 1 last, clients node 1 moved).
fn clients_off_their_redispatch(tag: &str, shared: bool) -> (usize, usize) {
    let mut cluster = Cluster::start(
        EcmpRigOptions::new(tag)
            .balancers(2)
            .backends(3)
            .clients(60),
        &[1, 2],
        false,
        |rig, i| {
            let backends = [(1, 1), (2, 1), (3, 1)];
            node_config(rig, i, shared, "ip-hash", &backends, "", FAST_CHECKS)
        },
    );
    let rig = &cluster.rig;
    wait_all_up(rig, &[1, 2]);
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let before = backends_of(rig, &clients);
    if shared {
        wait_agree(rig, &[1, 2], clients.len());
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for name in before.values() {
        *counts.entry(name).or_default() += 1;
    }
    let (failed, _) = counts.into_iter().max_by_key(|&(_, n)| n).unwrap();
    let failed = failed.to_owned();
    let k: usize = failed[1..].parse().unwrap();
    cluster.servers[k - 1].take().unwrap().stop();
    for i in 1..=2 {
        rig.wait_backend_state(i, &failed, "down");
    }
    let after = backends_of(rig, &clients);
    let mut moved = 0;
    for client in &clients {
        if before[client] == failed {
            assert_ne!(after[client], failed, "client {client}");
            moved += 1;
        } else {
            assert_eq!(after[client], before[client], "client {client}");
        }
    }
    if shared {
        let lag = wait_agree(rig, &[1, 2], clients.len());
        eprintln!("node 2 had node 1's {moved} redispatches {lag:?} after the round");
    }
    // Back up: a node that has not learned where node 1 moved its clients sends them back.
    let server = NameServer::start(
        rig.backend_ns(k),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        &failed,
    );
    cluster.servers[k - 1] = Some(server.expect("restarting the backend's server"));
    for i in 1..=2 {
        rig.wait_backend_state(i, &failed, "up");
    }
    rig.set_ecmp(&[2]).unwrap();
    let through_2 = backends_of(rig, &clients);
    let differ = clients.iter().filter(|c| after[c] != through_2[c]).count();
    cluster.finish();
    (differ, moved)
}

#[test]
fn a_failure_redispatch_on_one_node_is_honoured_by_the_others() {
    require_root();
    let (differ, moved) = clients_off_their_redispatch("shared_fail", true);
    let (control, control_moved) = clients_off_their_redispatch("shared_fctl", false);
    eprintln!(
        "node 1 moved {moved} of 60 clients off a failed backend; through node 2 after it came \
         back, {differ} reached another backend with the shared table, {control} (of \
         {control_moved} moved) without"
    );
    assert!(moved > 0);
    assert_eq!(differ, 0);
    assert!(
        control > 0,
        "without sharing no client differed: the test proves nothing"
    );
}

#[test]
fn operator_table_changes_reach_every_node() {
    require_root();
    let cluster = Cluster::start(
        EcmpRigOptions::new("shared_ops")
            .balancers(2)
            .backends(3)
            .clients(10),
        &[1, 2],
        false,
        |rig, i| config(rig, i, true, "ip-hash", &[1, 2, 3]),
    );
    let rig = &cluster.rig;
    let run = |i: usize, args: &[&str]| {
        let (code, out, err) = cli(rig.lb_ns(i), args);
        assert_eq!(code, 0, "{args:?} on lb{i}: {out}{err}");
    };
    let keys = || {
        cluster
            .store
            .command(&["KEYS", "sticky-lb:stick:*"])
            .unwrap()
    };
    wait_all_up(rig, &[1, 2]);
    let clients = rig.client_addrs().to_vec();
    let placed = backends_of(rig, &clients);
    wait_agree(rig, &[1, 2], clients.len());

    // `table set` on node 1: node 2's entry follows, and so do the client's connections there.
    let client = clients[0];
    let target = if placed[&client] == "b1" { "b2" } else { "b1" };
    run(
        1,
        &[
            "table",
            "set",
            &client.to_string(),
            &format!("web/{target}"),
        ],
    );
    let set_lag = wait_for(
        "lb2 learning the table set",
        Duration::from_secs(10),
        || entry(rig, 2, client).as_deref() == Some(target),
    );
    rig.set_ecmp(&[2]).unwrap();
    assert_eq!(rig.round(&[client; 3], TIMEOUT), [target; 3]);

    // `table delete` on node 2: node 1 forgets the client, and so does Redis.
    run(
        2,
        &["table", "delete", &client.to_string(), "--service", "web"],
    );
    let delete_lag = wait_for("lb1 forgetting the client", Duration::from_secs(10), || {
        entry(rig, 1, client).is_none()
    });
    assert_eq!(keys().lines().count(), clients.len() - 1);

    // `table flush` on node 1: node 2's table and Redis are empty.
    assert_eq!(rig.stick_table(2).len(), clients.len() - 1);
    run(1, &["table", "flush", "--service", "web"]);
    let flush_lag = wait_for("lb2 flushing", Duration::from_secs(10), || {
        rig.stick_table(2).is_empty()
    });
    assert_eq!(keys(), "");

    // `--all-nodes` backend changes.
    run(1, &["backend", "drain", "web/b1", "--all-nodes"]);
    assert_eq!(rig.backend_states(1)["b1"], "drain");
    rig.wait_backend_state(2, "b1", "drain");
    run(1, &["backend", "enable", "web/b1", "--all-nodes"]);
    rig.wait_backend_state(2, "b1", "up");
    eprintln!(
        "node 2 had the table set after {set_lag:?}; node 1 forgot the deleted client after \
         {delete_lag:?}; node 2 was flushed after {flush_lag:?}"
    );
    cluster.finish();
}

#[test]
fn all_nodes_without_a_shared_table_is_refused_and_changes_nothing() {
    require_root();
    let cluster = Cluster::start(EcmpRigOptions::new("shared_cli"), &[1], false, |rig, i| {
        config(rig, i, false, "ip-hash", &[1, 2])
    });
    let rig = &cluster.rig;
    wait_all_up(rig, &[1]);
    let before = rig.backend_states(1);
    for args in [
        &["backend", "drain", "web/b1", "--all-nodes"][..],
        &["backend", "list", "--all-nodes"],
    ] {
        let (code, out, err) = cli(rig.lb_ns(1), args);
        eprintln!("{args:?}: exit {code}: {}", err.trim_end());
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(rig.backend_states(1), before);
    cluster.finish();
}

/// A client whose connections all reach node 1 for longer than the stick timeout does not
/// expire on node 2: node 1's refreshes keep node 2's entry alive, so when the ECMP set sends
/// the client to node 2 after a pool change, it still reaches its backend.
#[test]
fn a_client_busy_on_one_node_does_not_expire_on_the_others() {
    require_root();
    const TIMEOUT_S: u64 = 4;
    let cluster = Cluster::start(
        EcmpRigOptions::new("shared_alive")
            .balancers(2)
            .backends(3)
            .clients(30),
        &[1, 2],
        false,
        |rig, i| {
            config(rig, i, true, "ip-hash", &[1, 2])
                .replace("timeout: 5m", &format!("timeout: {TIMEOUT_S}s"))
        },
    );
    let rig = &cluster.rig;
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let before = backends_of(rig, &clients);
    wait_for(
        "node 2 learning node 1's clients",
        Duration::from_secs(10),
        || rig.stick_table(2).len() == clients.len(),
    );
    let (code, out, err) = cli(
        rig.lb_ns(1),
        &[
            "backend",
            "add",
            "web/b3",
            &rig.backend_addr(3).to_string(),
            "--all-nodes",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    // Twice the timeout of traffic through node 1 only (bounded: at most 100 rounds).
    let busy = Instant::now();
    let mut rounds = 0;
    while busy.elapsed() < Duration::from_secs(2 * TIMEOUT_S) && rounds < 100 {
        assert_eq!(backends_of(rig, &clients), before);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        rig.stick_table(2).len(),
        clients.len(),
        "node 2 let clients expire"
    );
    rig.set_ecmp(&[2]).unwrap();
    let after = backends_of(rig, &clients);
    let moved = clients.iter().filter(|c| before[c] != after[c]).count();
    eprintln!(
        "{rounds} rounds through node 1 over {:?}; then {moved} of {} clients moved through node 2",
        busy.elapsed(),
        clients.len()
    );
    assert_eq!(moved, 0);
    cluster.finish();
}
