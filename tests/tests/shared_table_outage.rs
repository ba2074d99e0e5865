//! The shared stick table when things go away: Redis dies in the middle of traffic while the
//! nodes' pools differ (they must keep forwarding, and agree again once it is back, empty), and
//! a node restarted without its pinned data path (it must load what the others decided before
//! it forwards a packet). Two nodes behind the router's ECMP route, a real Redis. Needs root.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use sticky_lb_tests::ecmp::{Cluster, EcmpRig, EcmpRigOptions};
use sticky_lb_tests::netns::require_root;
use sticky_lb_tests::scenario::count_names;
use sticky_lb_tests::wait::wait_for;

const TIMEOUT: Duration = Duration::from_secs(3);
/// Each node's metrics listener, on its own namespace's loopback.
const METRICS_PORT: u16 = 19180;

/// Node `i`'s config: service `web` (ip-hash, 5 min stick timeout, checks every 200 ms) with
/// backends `names` (of the rig's b1..bK), shared through the rig's Redis as node `lbI`.
fn config(rig: &EcmpRig, i: usize, names: &[usize]) -> String {
    let mut yaml = format!(
        "interface: {}\nxdp_mode: generic\nsweep_interval: 500ms\nnode: lb{i}\nshared_table:\n  redis: {}\n  load_timeout: 2s\nmetrics:\n  listen: 127.0.0.1:{METRICS_PORT}\nservices:\n  - name: web\n    vip: {}\n    port: {}\n    policy: ip-hash\n    stick:\n      timeout: 5m\n    health_check:\n      interval: 200ms\n      timeout: 150ms\n    backends:\n",
        rig.lb_dev(),
        rig.store_url(),
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

/// The clients the two tables place differently: (in both tables but on different backends,
/// in one table only).
fn differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> (usize, usize) {
    let conflicting = a.iter().filter(|(c, x)| b.get(*c).is_some_and(|y| y != *x));
    let one_sided = a.keys().filter(|c| !b.contains_key(*c)).count()
        + b.keys().filter(|c| !a.contains_key(*c)).count();
    (conflicting.count(), one_sided)
}

/// The `sticky_lb_shared_*` samples named `wanted` from node `i`'s `/metrics` (fetched inside
/// its namespace), or why they could not be read.
fn shared_metrics(rig: &EcmpRig, i: usize, wanted: &[&str]) -> String {
    let fetched = rig.node_metrics(i, SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS_PORT));
    match fetched {
        Ok(text) => text
            .lines()
            .filter(|line| {
                wanted
                    .iter()
                    .any(|w| line.starts_with(&format!("sticky_lb_shared_{w}")))
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("metrics of lb{i} unreadable: {e}"),
    }
}

/// Sets the flag when dropped: stops the traffic thread also when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// Old clients each stuck through both nodes.
const OLD: usize = 40;
/// Clients arriving while Redis is down: the first group while only node 1 has b3, the second
/// once both have it.
const NEW: usize = 16;
/// Bounds of the background traffic, and its pause between rounds (a round of 72 clients
/// takes about 10 ms).
const TRAFFIC_LIMIT: Duration = Duration::from_secs(30);
const TRAFFIC_ROUNDS: usize = 3000;
const TRAFFIC_PAUSE: Duration = Duration::from_millis(10);

/// Redis is killed while clients keep connecting through both nodes. While it is down, b3 joins
/// node 1 only (a plain `backend add`: with Redis down nothing else could tell node 2), and
/// new clients arrive: node 1 places about a third of them on b3, node 2 by its own pool; then
/// b3 joins node 2 too and more new clients arrive. Redis comes back empty: the resyncs must
/// make both tables agree on every client, and no connection may fail at any point.
#[test]
fn redis_killed_during_traffic_fails_no_connection_and_tables_converge() {
    require_root();
    let mut cluster = Cluster::start(
        EcmpRigOptions::new("shout_kill")
            .balancers(2)
            .backends(3)
            .clients(OLD + 2 * NEW),
        &[1, 2],
        false,
        |rig, i| config(rig, i, &[1, 2]),
    );
    let rig = &cluster.rig;
    let clients = rig.client_addrs().to_vec();
    let old = &clients[..OLD];
    for _ in 0..3 {
        rig.round(old, TIMEOUT);
    }
    wait_for(
        "both nodes knowing every old client",
        Duration::from_secs(10),
        || {
            let (t1, t2) = (rig.stick_table(1), rig.stick_table(2));
            t1.len() == OLD && t1 == t2
        },
    );

    let active = AtomicUsize::new(OLD);
    let stop = AtomicBool::new(false);
    let add_b3 = ["backend", "add", "web/b3", &rig.backend_addr(3).to_string()].map(String::from);
    let add_b3: Vec<&str> = add_b3.iter().map(String::as_str).collect();
    let (traffic, before_restart, converged) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let started = Instant::now();
            let (mut rounds, mut ok, mut failed) = (0usize, 0usize, Vec::new());
            while !stop.load(Relaxed)
                && rounds < TRAFFIC_ROUNDS
                && started.elapsed() < TRAFFIC_LIMIT
            {
                let now = &clients[..active.load(Relaxed)];
                for (client, result) in now.iter().zip(rig.fetch_names(now, TIMEOUT)) {
                    match result {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            failed.push(format!("{client} at {:?}: {e:#}", started.elapsed()))
                        }
                    }
                }
                rounds += 1;
                std::thread::sleep(TRAFFIC_PAUSE);
            }
            (rounds, ok, failed, started.elapsed())
        });
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_secs(1));
        cluster.store.kill();
        std::thread::sleep(Duration::from_secs(1));
        rig.node_cli(1, &add_b3);
        rig.wait_backend_state(1, "b3", "up");
        active.store(OLD + NEW, Relaxed);
        std::thread::sleep(Duration::from_secs(3));
        rig.node_cli(2, &add_b3);
        rig.wait_backend_state(2, "b3", "up");
        active.store(OLD + 2 * NEW, Relaxed);
        std::thread::sleep(Duration::from_secs(2));
        let before_restart = (rig.stick_table(1), rig.stick_table(2));
        let mut known: Vec<&String> = before_restart.0.keys().collect();
        known.extend(before_restart.1.keys());
        known.sort();
        known.dedup();
        assert_eq!(known.len(), clients.len(), "clients the nodes know of");
        cluster.store.restart().expect("restarting redis-server");
        let converged = wait_for(
            "both tables agreeing on every client after Redis came back",
            Duration::from_secs(20),
            || {
                let (t1, t2) = (rig.stick_table(1), rig.stick_table(2));
                t1.len() == clients.len() && t1 == t2
            },
        );
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Relaxed);
        (traffic.join().unwrap(), before_restart, converged)
    });
    let (rounds, ok, failed, ran) = traffic;
    let (conflicting, one_sided) = differences(&before_restart.0, &before_restart.1);
    eprintln!(
        "traffic: {rounds} rounds, {ok} connections in {ran:?}, {} failed",
        failed.len()
    );
    eprintln!(
        "before Redis came back: {conflicting} clients on different backends in the two tables, {one_sided} in one table only"
    );
    eprintln!(
        "tables agreed on all {} clients {converged:?} after Redis restarted",
        clients.len()
    );
    for i in 1..=2 {
        eprintln!(
            "lb{i}: {}",
            shared_metrics(rig, i, &["resyncs", "redis_errors", "claims_lost"])
        );
    }
    assert!(failed.is_empty(), "failed connections: {failed:#?}");
    assert!(
        conflicting > 0,
        "the nodes never disagreed while Redis was down: the test proves nothing"
    );
    // What both tables say is where every client goes now, through either node.
    let agreed = rig.stick_table(1);
    for round in 0..3 {
        for (client, name) in clients.iter().zip(rig.round(&clients, TIMEOUT)) {
            assert_eq!(
                agreed[&client.to_string()],
                name,
                "round {round}: {client} went elsewhere than both tables say"
            );
        }
    }
    cluster.finish();
}

/// Clients stuck through both nodes; b3 joins every node (`--all-nodes`), so a node without
/// entries would send about a third of them to b3. Node 2 stops and its pinned data path is
/// removed (`sticky-lb detach`): it restarts empty. It must load every entry from Redis before
/// it attaches, so that no client moves once it takes traffic again.
#[test]
fn a_node_restarted_empty_keeps_every_client_where_it_was() {
    const STUCK: usize = 48;
    const FRESH: usize = 24;
    require_root();
    let mut cluster = Cluster::start(
        EcmpRigOptions::new("shout_restart")
            .balancers(2)
            .backends(3)
            .clients(STUCK + FRESH),
        &[1, 2],
        false,
        |rig, i| config(rig, i, &[1, 2]),
    );
    let rig = &cluster.rig;
    let clients = rig.client_addrs().to_vec();
    let (stuck, fresh) = clients.split_at(STUCK);
    let before = rig.round(stuck, TIMEOUT);
    for round in 1..4 {
        assert_eq!(rig.round(stuck, TIMEOUT), before, "round {round}");
    }
    wait_for(
        "both nodes knowing every client",
        Duration::from_secs(10),
        || {
            let (t1, t2) = (rig.stick_table(1), rig.stick_table(2));
            t1.len() == STUCK && t1 == t2
        },
    );
    let out = rig.node_cli(
        1,
        &[
            "backend",
            "add",
            "web/b3",
            &rig.backend_addr(3).to_string(),
            "--all-nodes",
        ],
    );
    assert!(out.contains("sent to every node"), "{out}");
    for i in 1..=2 {
        rig.wait_backend_state(i, "b3", "up");
    }
    assert_eq!(rig.round(stuck, TIMEOUT), before, "b3 joined: nobody moves");

    // Node 2 goes away (the router withdraws it first, as a routing daemon would) and loses
    // its data path with the stick table. It has no state file either, so what it knows of
    // b3 comes from its config, which now lists b3 (as the operator's config would).
    rig.set_ecmp(&[1]).unwrap();
    cluster.balancers[1].stop();
    let out = rig.node_cli(2, &["detach"]);
    assert!(out.contains("detached"), "{out}");
    assert!(
        !cluster.guards[1].pins().path().exists(),
        "node 2's pins are still there"
    );
    assert_eq!(
        rig.round(stuck, TIMEOUT),
        before,
        "node 1 alone, node 2 down"
    );
    let restarted = Instant::now();
    cluster.balancers[1] = rig
        .start_balancer(2, cluster.scratch.path(), &config(rig, 2, &[1, 2, 3]))
        .expect("restarting sticky-lb on node 2");
    let attach = restarted.elapsed();
    let at_attach = rig.stick_table(2);
    rig.set_ecmp(&[1, 2]).unwrap();
    let log = cluster.balancers[1].log_text();
    // The log file is shared by both starts of node 2: its last load line is this start's.
    let loaded = log
        .lines()
        .rev()
        .find_map(|line| {
            let (_, rest) = line.split_once("shared table: ")?;
            rest.contains("entries loaded from Redis")
                .then(|| rest.trim().trim_end_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("no load line in node 2's log:\n{log}"));
    eprintln!(
        "node 2 restarted empty: attached {attach:?} after its start; {loaded}; {} entries in its table at attach",
        at_attach.len()
    );
    assert!(
        loaded.starts_with(&format!("{STUCK} entries loaded")),
        "{loaded}"
    );
    assert_eq!(
        at_attach,
        rig.stick_table(1),
        "node 2 attached with other entries than node 1's"
    );

    let mut moved = 0;
    for round in 0..5 {
        let now = rig.round(stuck, TIMEOUT);
        let here = before.iter().zip(&now).filter(|(b, n)| b != n).count();
        eprintln!("round {round} through both nodes: {here} of {STUCK} clients moved");
        moved += here;
    }
    // Only the entries hold them: new clients get b3's share.
    let newcomers = count_names(&rig.round(fresh, TIMEOUT));
    eprintln!("{FRESH} new clients went to {newcomers:?}");
    assert_eq!(moved, 0);
    assert!(
        newcomers.contains_key("b3"),
        "b3 takes no new clients: the test proves nothing"
    );
    cluster.finish();
}

/// A key Redis cannot claim (someone left a list under the cluster's prefix) costs that one
/// client its sharing, counted, never the other clients' placements in the same pipeline and
/// never a connection.
#[test]
fn a_key_redis_refuses_costs_only_that_client_its_sharing() {
    require_root();
    let cluster = Cluster::start(
        EcmpRigOptions::new("shout_poison")
            .balancers(2)
            .backends(2)
            .clients(20),
        &[1, 2],
        false,
        |rig, i| config(rig, i, &[1, 2]),
    );
    let rig = &cluster.rig;
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let poisoned = clients[0];
    cluster
        .store
        .command(&["RPUSH", &format!("sticky-lb:stick:web:{poisoned}"), "x"])
        .expect("RPUSH");
    // Every connection works; the 19 others reach node 2 (from the same pipelines).
    let names = rig.round(&clients, TIMEOUT);
    assert_eq!(names.len(), clients.len());
    wait_for(
        "node 2 learning the others",
        Duration::from_secs(10),
        || rig.stick_table(2).len() == clients.len() - 1,
    );
    assert!(!rig.stick_table(2).contains_key(&poisoned.to_string()));
    let stats: serde_json::Value =
        serde_json::from_str(&rig.node_cli(1, &["stats", "--json"])).unwrap();
    let counters = &stats["shared_table"]["counters"];
    eprintln!("node 1 after a refused claim: {counters}");
    assert!(
        counters["redis_errors"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    assert!(
        counters["events_dropped"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    assert_eq!(
        counters["events_sent"].as_u64().unwrap(),
        clients.len() as u64 - 1,
        "{counters}"
    );
    cluster.finish();
}

/// `ip -n NS route ACTION blackhole ADDR/32`: inside a rig namespace, packets to ADDR vanish
/// (no reset, no ICMP), as when a host dies or the network between two hosts is cut.
fn blackhole(ns: &str, action: &str, addr: Ipv4Addr) {
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            ns,
            "route",
            action,
            "blackhole",
            &format!("{addr}/32"),
        ])
        .output()
        .expect("ip route");
    assert!(
        out.status.success(),
        "ip -n {ns} route {action} blackhole {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Redis's host dies without a word to node 2 (nothing reaches node 2: no FIN, no reset) and a
/// new Redis takes its place. Node 2 sends nothing on its idle connections, so only its own
/// check (a PING when idle) can tell them dead; then it subscribes again and resyncs, and
/// learns the clients node 1 places on the new Redis.
#[test]
fn a_node_whose_redis_died_silently_reconnects_and_learns_again() {
    require_root();
    let mut cluster = Cluster::start(
        EcmpRigOptions::new("shout_silent")
            .balancers(2)
            .backends(2)
            .clients(40),
        &[1, 2],
        false,
        |rig, i| config(rig, i, &[1, 2]),
    );
    let rig = &cluster.rig;
    rig.set_ecmp(&[1]).unwrap();
    let clients = rig.client_addrs().to_vec();
    let (before, after) = clients.split_at(20);
    rig.round(before, TIMEOUT);
    wait_for(
        "node 2 learning the first clients",
        Duration::from_secs(10),
        || rig.stick_table(2).len() == before.len(),
    );
    // The store's host vanishes for node 2 in both directions, dies, and a new Redis starts.
    let (store_ns, store_addr, lb2_ns, lb2_addr) = (
        rig.store_ns(),
        rig.store_addr(),
        rig.lb_ns(2),
        rig.lb_addr(2),
    );
    blackhole(lb2_ns, "add", store_addr);
    blackhole(store_ns, "add", lb2_addr);
    // The dead host's kernel must not tell node 2 later either: its FIN, retransmitted after
    // the blackhole is gone, would close node 2's connections. One retry, then the socket is
    // forgotten (in the store's namespace only).
    let sysctl = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            store_ns,
            "sysctl",
            "-qw",
            "net.ipv4.tcp_orphan_retries=1",
        ])
        .status()
        .expect("sysctl");
    assert!(sysctl.success());
    cluster.store.kill();
    std::thread::sleep(Duration::from_secs(4));
    cluster.store.restart().expect("restarting redis-server");
    blackhole(store_ns, "del", lb2_addr);
    blackhole(lb2_ns, "del", store_addr);
    // New clients through node 1, which saw Redis go and come back.
    rig.round(after, TIMEOUT);
    let learned = wait_for(
        "node 2 learning the new clients",
        Duration::from_secs(15),
        || rig.stick_table(2).len() == clients.len(),
    );
    eprintln!("node 2 learned the clients placed after the silent failure {learned:?} later");
    assert_eq!(rig.stick_table(1), rig.stick_table(2));
    cluster.finish();
}

/// An `--all-nodes` command given while a node is cut off from Redis reaches it once it is
/// back: the command is in the operator log as well as on the channel, and a node that
/// subscribes again reads what it missed.
#[test]
fn an_all_nodes_command_reaches_a_node_that_was_cut_off() {
    require_root();
    let cluster = Cluster::start(
        EcmpRigOptions::new("shout_oplog")
            .balancers(2)
            .backends(2)
            .clients(4),
        &[1, 2],
        false,
        |rig, i| config(rig, i, &[1, 2]),
    );
    let rig = &cluster.rig;
    for i in 1..=2 {
        rig.wait_backend_state(i, "b1", "up");
    }
    let (store_ns, store_addr, lb2_ns, lb2_addr) = (
        rig.store_ns(),
        rig.store_addr(),
        rig.lb_ns(2),
        rig.lb_addr(2),
    );
    blackhole(lb2_ns, "add", store_addr);
    blackhole(store_ns, "add", lb2_addr);
    wait_for(
        "node 2 noticing Redis is gone",
        Duration::from_secs(10),
        || {
            let stats: serde_json::Value =
                serde_json::from_str(&rig.node_cli(2, &["stats", "--json"])).unwrap();
            stats["shared_table"]["connected"] == false
        },
    );
    let out = rig.node_cli(1, &["backend", "drain", "web/b1", "--all-nodes"]);
    assert!(out.contains("sent to every node"), "{out}");
    rig.wait_backend_state(1, "b1", "drain");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rig.backend_states(2)["b1"], "up", "node 2 was cut off");
    blackhole(store_ns, "del", lb2_addr);
    blackhole(lb2_ns, "del", store_addr);
    let took = rig.wait_backend_state(2, "b1", "drain");
    eprintln!("node 2 applied the command it missed {took:?} after Redis was reachable again");
    cluster.finish();
}
