//! Several balancer nodes behind a router's ECMP route sharing one stick table through a real
//! Redis (`shared_table`): what one node decided about a client, every node honours. Needs root.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use sticky_lb_tests::balancer::{Balancer, ScratchDir, cli};
use sticky_lb_tests::ecmp::{EcmpRig, EcmpRigOptions};
use sticky_lb_tests::netns::{listed_namespaces, require_root};

const TIMEOUT: Duration = Duration::from_secs(3);

/// The clients' backends, one fetch each (new source ports: each may take another node).
fn backends_of(rig: &EcmpRig, clients: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, String> {
    clients
        .iter()
        .copied()
        .zip(rig.round(clients, TIMEOUT))
        .collect()
}

/// Node `i`'s stick table: client -> backend.
fn table(rig: &EcmpRig, i: usize) -> BTreeMap<String, String> {
    let (code, out, err) = cli(rig.lb_ns(i), &["table", "show", "--json"]);
    assert_eq!(code, 0, "table show on lb{i}: {err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["client"].as_str().unwrap().to_owned(),
                row["backend"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Waits (bounded) until `done` holds; returns how long it took.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// A node's config: service `web` with backends `names` (of the rig's b1..bK), shared through
/// the rig's Redis as node `lbI` when `shared`.
fn config(rig: &EcmpRig, i: usize, shared: bool, policy: &str, names: &[usize]) -> String {
    config_with_timeout(rig, i, shared, policy, names, "5m")
}

/// [`config`] with the stick timeout `timeout`.
fn config_with_timeout(
    rig: &EcmpRig,
    i: usize,
    shared: bool,
    policy: &str,
    names: &[usize],
    timeout: &str,
) -> String {
    let top = if shared {
        format!(
            "node: lb{i}\nshared_table:\n  redis: {}\n  load_timeout: 2s\n",
            rig.store_url()
        )
    } else {
        String::new()
    };
    let mut yaml = format!(
        "interface: {}\nxdp_mode: generic\nsweep_interval: 500ms\n{top}services:\n  - name: web\n    vip: {}\n    port: {}\n    policy: {policy}\n    stick:\n      timeout: {timeout}\n    backends:\n",
        rig.lb_dev(),
        rig.vip(),
        rig.service().port(),
    );
    for &k in names {
        yaml += &format!(
            "      - name: b{k}\n        address: {}\n",
            rig.backend_addr(k)
        );
    }
    yaml
}

/// Clients stuck through node 1; a backend is added (on every node); the ECMP set changes so
/// they reach node 2. Returns how many clients moved.
fn clients_moved_by_a_pool_and_ecmp_change(tag: &str, shared: bool) -> usize {
    let rig = EcmpRig::build(
        EcmpRigOptions::new(tag)
            .balancers(2)
            .backends(3)
            .clients(60),
    )
    .expect("building the ECMP rig");
    let prefix = format!("slb-{}-", rig.tag());
    let scratch = ScratchDir::new(rig.tag());
    let store = rig.start_store().expect("redis-server");
    let guards: Vec<_> = (1..=2).map(|i| rig.datapath_guard(i)).collect();
    let servers = rig.start_backend_servers().expect("backend servers");
    let balancers: Vec<Balancer> = (1..=2)
        .map(|i| {
            rig.start_balancer(
                i,
                scratch.path(),
                &config(&rig, i, shared, "ip-hash", &[1, 2]),
            )
            .expect("starting sticky-lb")
        })
        .collect();
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let before = backends_of(&rig, &clients);
    if shared {
        // Node 2 learns every client node 1 placed.
        let lag = wait_for(
            "node 2 learning node 1's clients",
            Duration::from_secs(10),
            || table(&rig, 2).len() == clients.len(),
        );
        eprintln!(
            "node 2 had all {} clients {lag:?} after the round",
            clients.len()
        );
        assert_eq!(table(&rig, 1), table(&rig, 2));
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
    let after = backends_of(&rig, &clients);
    let moved = clients.iter().filter(|c| before[c] != after[c]).count();
    drop(balancers);
    drop(guards);
    drop(servers);
    drop(store);
    drop(scratch);
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
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

/// A client whose connections all reach node 1 for longer than the stick timeout does not
/// expire on node 2: node 1's refreshes keep node 2's entry alive, so when the ECMP set sends
/// the client to node 2 after a pool change, it still reaches its backend.
#[test]
fn a_client_busy_on_one_node_does_not_expire_on_the_others() {
    require_root();
    let rig = EcmpRig::build(
        EcmpRigOptions::new("shared_alive")
            .balancers(2)
            .backends(3)
            .clients(30),
    )
    .expect("building the ECMP rig");
    let prefix = format!("slb-{}-", rig.tag());
    let scratch = ScratchDir::new(rig.tag());
    let store = rig.start_store().expect("redis-server");
    let guards: Vec<_> = (1..=2).map(|i| rig.datapath_guard(i)).collect();
    let servers = rig.start_backend_servers().expect("backend servers");
    const TIMEOUT_S: u64 = 4;
    let timeout = format!("{TIMEOUT_S}s");
    let balancers: Vec<Balancer> = (1..=2)
        .map(|i| {
            let yaml = config_with_timeout(&rig, i, true, "ip-hash", &[1, 2], &timeout);
            rig.start_balancer(i, scratch.path(), &yaml)
                .expect("starting sticky-lb")
        })
        .collect();
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let before = backends_of(&rig, &clients);
    wait_for(
        "node 2 learning node 1's clients",
        Duration::from_secs(10),
        || table(&rig, 2).len() == clients.len(),
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
        assert_eq!(backends_of(&rig, &clients), before);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        table(&rig, 2).len(),
        clients.len(),
        "node 2 let clients expire"
    );
    rig.set_ecmp(&[2]).unwrap();
    let after = backends_of(&rig, &clients);
    let moved = clients.iter().filter(|c| before[c] != after[c]).count();
    eprintln!(
        "{rounds} rounds through node 1 over {:?}; then {moved} of {} clients moved through node 2",
        busy.elapsed(),
        clients.len()
    );
    assert_eq!(moved, 0);
    drop(balancers);
    drop(guards);
    drop(servers);
    drop(store);
    drop(scratch);
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}
