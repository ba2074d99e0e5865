//! Checks the multi-balancer ECMP rig itself: the router spreads connections over the balancers
//! of its ECMP set by the 5-tuple and follows a changed set at once; the Redis store starts,
//! answers from a balancer's namespace, dies and comes back empty; sticky-lb runs on every
//! balancer at once; nothing outlives the rig, also when a test panics. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use sticky_lb_tests::balancer::{ScratchDir, cli};
use sticky_lb_tests::ecmp::{EcmpRig, EcmpRigOptions, PORT, STORE_ADDR, snmp_counter};
use sticky_lb_tests::netns::{listed_namespaces, require_root};
use sticky_lb_tests::redis::{REDIS_PORT, ping_from};
use sticky_lb_tests::rig::{NameServer, fetch_name};
use sticky_lb_tests::scenario::count_names;

const TIMEOUT: Duration = Duration::from_secs(3);
/// Connections per client address in each round.
const PER_CLIENT: u16 = 3;

/// Every client address `PER_CLIENT` times, with fixed source ports 20000.. (outside the
/// ephemeral range).
fn fixed_sources(rig: &EcmpRig) -> Vec<SocketAddrV4> {
    rig.client_addrs()
        .iter()
        .flat_map(|&addr| (0..PER_CLIENT).map(move |n| SocketAddrV4::new(addr, 20_000 + n)))
        .collect()
}

/// Every client address `PER_CLIENT` times (new source ports).
fn sources(rig: &EcmpRig) -> Vec<Ipv4Addr> {
    rig.client_addrs()
        .iter()
        .flat_map(|&addr| std::iter::repeat_n(addr, PER_CLIENT as usize))
        .collect()
}

fn from_ports(rig: &EcmpRig, sources: &[SocketAddrV4]) -> Vec<String> {
    rig.fetch_names_from_ports(sources, TIMEOUT)
        .into_iter()
        .zip(sources)
        .map(|(result, src)| result.unwrap_or_else(|err| panic!("client {src}: {err:#}")))
        .collect()
}

fn seen(names: &[String]) -> BTreeSet<String> {
    names.iter().cloned().collect()
}

fn set_of(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

/// `sysctl -n KEY` inside `ns`.
fn sysctl_in(ns: &str, key: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-n", key])
        .output()
        .expect("sysctl");
    assert!(out.status.success(), "sysctl {key} in {ns}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_router_spreads_connections_over_the_ecmp_set_and_follows_changes() {
    require_root();
    let started = Instant::now();
    let rig = EcmpRig::build(
        EcmpRigOptions::new("ecmp_rig")
            .balancers(3)
            .backends(2)
            .clients(20),
    )
    .expect("building the ECMP rig");
    eprintln!("rig built in {:?}", started.elapsed());
    let prefix = format!("slb-{}-", rig.tag());

    // The topology as documented.
    let listed = listed_namespaces(&prefix);
    assert_eq!(rig.namespaces().len(), 1 + 3 + 2 + 3);
    for name in rig.namespaces() {
        assert!(name.starts_with(&prefix), "{name}");
        assert!(listed.iter().any(|n| n == name), "{name} not in {listed:?}");
    }
    assert_eq!(rig.lb_ns(2), format!("{prefix}lb2"));
    assert_eq!(rig.store_ns(), format!("{prefix}rd"));
    assert_eq!(rig.router_ns(), format!("{prefix}rt"));
    assert_eq!(rig.client_ns(), format!("{prefix}cl"));
    assert_eq!(rig.lb_dev(), "lb0");
    let lb_addrs: Vec<Ipv4Addr> = (1..=3).map(|i| rig.lb_addr(i)).collect();
    assert_eq!(
        lb_addrs,
        [
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(198, 18, 0, 3),
            Ipv4Addr::new(198, 18, 0, 4)
        ]
    );
    let macs: BTreeSet<[u8; 6]> = (1..=3).map(|i| rig.lb_mac(i)).collect();
    assert_eq!(macs.len(), 3, "balancer MACs are distinct");
    assert_eq!(rig.backend_addr(2), Ipv4Addr::new(198, 18, 0, 12));
    assert_eq!(rig.store_addr(), Ipv4Addr::new(198, 18, 0, 250));
    assert_eq!(rig.vip(), Ipv4Addr::new(198, 18, 0, 100));
    assert_eq!(rig.client_addrs().len(), 20);
    assert_eq!(rig.client_addrs()[19], Ipv4Addr::new(198, 19, 1, 20));
    assert_eq!(rig.ecmp(), vec![1, 2, 3]);
    let route = rig.ecmp_route().unwrap();
    for addr in &lb_addrs {
        assert!(
            route.contains(&format!("nexthop via {addr} dev eth0")),
            "{route}"
        );
    }
    assert_eq!(sysctl_in(rig.router_ns(), "net.ipv4.ip_forward"), "1");
    assert_eq!(
        sysctl_in(rig.router_ns(), "net.ipv4.fib_multipath_hash_policy"),
        "3"
    );
    assert_eq!(
        sysctl_in(rig.router_ns(), "net.ipv4.conf.all.send_redirects"),
        "0"
    );
    // Nothing leads out of the rig: no default route in any namespace.
    for ns in rig.namespaces() {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-4", "route", "show", "default"])
            .output()
            .unwrap();
        assert!(out.stdout.is_empty(), "default route in {ns}");
    }

    // Clients reach the backends' own addresses through the router, and the backends answer
    // them back through it.
    let backend_servers = rig.start_backend_servers().expect("backend servers");
    for k in 1..=2 {
        let name = fetch_name(
            rig.client_ns(),
            rig.client_addrs()[0],
            SocketAddrV4::new(rig.backend_addr(k), PORT),
            TIMEOUT,
        )
        .expect("a backend through the router");
        assert_eq!(name, format!("b{k}"));
    }

    // Each balancer answers its own name on VIP:80 (the VIP is on its lo).
    let lb_servers: Vec<NameServer> = (1..=3)
        .map(|i| {
            NameServer::start(rig.lb_ns(i), rig.service(), &format!("lb{i}"))
                .expect("name server on a balancer's VIP")
        })
        .collect();
    let all = set_of(&["lb1", "lb2", "lb3"]);

    // The full set: connections spread, and one 4-tuple always takes one balancer.
    let fixed = fixed_sources(&rig);
    let first = from_ports(&rig, &fixed);
    let again = from_ports(&rig, &fixed);
    eprintln!("fixed ports over lb1..3: {:?}", count_names(&first));
    assert!(seen(&first).is_subset(&all), "{first:?}");
    assert!(seen(&first).len() >= 2, "{:?}", count_names(&first));
    for ((src, a), b) in fixed.iter().zip(&first).zip(&again) {
        assert_eq!(a, b, "{src} took {a} then {b}");
    }
    let fresh = rig.round(&sources(&rig), TIMEOUT);
    eprintln!("new ports over lb1..3: {:?}", count_names(&fresh));
    assert!(seen(&fresh).is_subset(&all), "{fresh:?}");
    assert!(seen(&fresh).len() >= 2, "{:?}", count_names(&fresh));
    // Some clients already went through two balancers with their successive connections.
    let mut per_client: BTreeMap<Ipv4Addr, BTreeSet<&String>> = BTreeMap::new();
    for (src, name) in sources(&rig).iter().zip(&fresh) {
        per_client.entry(*src).or_default().insert(name);
    }
    assert!(
        per_client.values().any(|names| names.len() > 1),
        "{per_client:?}"
    );

    // One balancer: a plain route, every connection there.
    rig.set_ecmp(&[2]).unwrap();
    assert_eq!(rig.ecmp(), vec![2]);
    let route = rig.ecmp_route().unwrap();
    assert!(!route.contains("nexthop"), "{route}");
    assert!(route.contains("via 198.18.0.3 dev eth0"), "{route}");
    let only2 = rig.round(&sources(&rig), TIMEOUT);
    assert_eq!(seen(&only2), set_of(&["lb2"]), "{:?}", count_names(&only2));
    let only2 = from_ports(&rig, &fixed);
    assert_eq!(seen(&only2), set_of(&["lb2"]), "{:?}", count_names(&only2));

    // Two of three: only those, both used.
    rig.set_ecmp(&[1, 3]).unwrap();
    let two = rig.round(&sources(&rig), TIMEOUT);
    eprintln!("new ports over lb1, lb3: {:?}", count_names(&two));
    assert_eq!(
        seen(&two),
        set_of(&["lb1", "lb3"]),
        "{:?}",
        count_names(&two)
    );
    let two = from_ports(&rig, &fixed);
    assert_eq!(
        seen(&two),
        set_of(&["lb1", "lb3"]),
        "{:?}",
        count_names(&two)
    );

    // The full set again: the same 4-tuples take the same balancers as at first.
    rig.set_ecmp(&[1, 2, 3]).unwrap();
    assert_eq!(from_ports(&rig, &fixed), first);

    // Bad sets are refused and change nothing.
    assert!(rig.set_ecmp(&[]).is_err());
    assert!(rig.set_ecmp(&[4]).is_err());
    assert!(rig.set_ecmp(&[1, 1]).is_err());
    assert_eq!(rig.ecmp(), vec![1, 2, 3]);

    // Everything went through the router, which never sent a redirect.
    let router = rig.router_ns();
    assert!(snmp_counter(router, "Ip", "ForwDatagrams").unwrap() > 0);
    assert_eq!(snmp_counter(router, "Icmp", "OutRedirects").unwrap(), 0);
    // Eight rounds of 60 connections, each answered by exactly one balancer.
    let served: u64 = lb_servers.iter().map(NameServer::accepted).sum();
    assert_eq!(served as usize, 8 * fixed.len());

    drop(lb_servers);
    drop(backend_servers);
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
    eprintln!("ECMP test done in {:?}", started.elapsed());
}

#[test]
fn the_store_answers_balancers_dies_and_comes_back_empty() {
    require_root();
    let rig = EcmpRig::build(EcmpRigOptions::new("ecmp_redis").clients(1))
        .expect("building the ECMP rig");
    let prefix = format!("slb-{}-", rig.tag());
    let store = SocketAddr::from((STORE_ADDR, REDIS_PORT));

    let mut redis = rig.start_store().expect("starting redis-server");
    assert_eq!(redis.url(), "redis://198.18.0.250:6379/");
    assert_eq!(rig.store_url(), redis.url());
    assert_eq!(redis.addr(), store);
    assert!(redis.is_running());
    // Reached on-link from every balancer's namespace.
    for i in 1..=rig.balancer_count() {
        ping_from(rig.lb_ns(i), store, TIMEOUT).expect("PING from a balancer");
    }
    assert_eq!(redis.command(&["SET", "k", "v"]).unwrap(), "OK");
    assert_eq!(redis.command(&["GET", "k"]).unwrap(), "v");
    assert_eq!(redis.command(&["GET", "missing"]).unwrap(), "");
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), "1");
    // An error reply is an error.
    assert!(redis.command(&["INCR", "k"]).is_err());

    // Killed: refused at once, from anywhere.
    let pid = redis.pid();
    redis.kill();
    assert!(!redis.is_running());
    assert!(!process_alive(pid));
    let refused = Instant::now();
    assert!(ping_from(rig.lb_ns(1), store, TIMEOUT).is_err());
    assert!(refused.elapsed() < TIMEOUT, "refused, not timed out");
    assert!(redis.command(&["PING"]).is_err());

    // Restarted: same place, empty.
    redis.restart().expect("restarting redis-server");
    ping_from(rig.lb_ns(2), store, TIMEOUT).expect("PING after the restart");
    assert_eq!(redis.command(&["DBSIZE"]).unwrap(), "0");
    assert_eq!(redis.command(&["GET", "k"]).unwrap(), "");

    let pid = redis.pid();
    drop(redis);
    assert!(!process_alive(pid));
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

#[test]
fn a_panicking_test_leaves_no_namespace_and_no_redis_behind() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let rig = EcmpRig::build(EcmpRigOptions::new("ecmp_panic")).expect("building");
        let redis = rig.start_store().expect("starting redis-server");
        tx.send((rig.tag().to_owned(), redis.pid())).unwrap();
        panic!("a test failing with the rig and its store up");
    });
    assert!(outcome.is_err());
    let (tag, pid) = rx.recv().unwrap();
    assert_eq!(
        listed_namespaces(&format!("slb-{tag}-")),
        Vec::<String>::new()
    );
    assert!(!process_alive(pid));
}

#[test]
fn sticky_lb_runs_on_every_balancer_and_each_forwards_its_share() {
    require_root();
    let rig = EcmpRig::build(
        EcmpRigOptions::new("ecmp_lb")
            .balancers(3)
            .backends(2)
            .clients(20),
    )
    .expect("building the ECMP rig");
    let prefix = format!("slb-{}-", rig.tag());
    let scratch = ScratchDir::new(rig.tag());
    let guards: Vec<_> = (1..=3).map(|i| rig.datapath_guard(i)).collect();
    // Native mode on every balancer: the client's packets cross the router before the XDP
    // program sees them, so this also proves their checksums arrive whole.
    let peers: Vec<_> = (1..=3)
        .map(|i| rig.attach_peer_xdp(i).expect("xdp_pass on p-lbI"))
        .collect();
    let backend_servers = rig.start_backend_servers().expect("backend servers");
    let config = rig.config("native", "", "    stick:\n      timeout: 1m\n");
    let balancers: Vec<_> = (1..=3)
        .map(|i| {
            rig.start_balancer(i, scratch.path(), &config)
                .expect("starting sticky-lb")
        })
        .collect();

    let clients = sources(&rig);
    let names = rig.round(&clients, TIMEOUT);
    eprintln!("through sticky-lb: {:?}", count_names(&names));
    assert!(seen(&names).is_subset(&set_of(&["b1", "b2"])), "{names:?}");
    // Every balancer has the same Maglev table, so a client's connections reach one backend
    // whichever balancer each went through.
    let mut per_client: BTreeMap<Ipv4Addr, BTreeSet<&String>> = BTreeMap::new();
    for (src, name) in clients.iter().zip(&names) {
        per_client.entry(*src).or_default().insert(name);
    }
    assert!(
        per_client.values().all(|names| names.len() == 1),
        "{per_client:?}"
    );
    // And the connections went through several balancers: their stick tables hold the clients
    // each one saw, together all of them.
    let mut stuck = BTreeSet::new();
    let mut busy = 0;
    for i in 1..=3 {
        let (code, out, err) = cli(rig.lb_ns(i), &["table", "show", "--json"]);
        assert_eq!(code, 0, "table show on lb{i}: {err}");
        let table: serde_json::Value = serde_json::from_str(&out).unwrap();
        let rows = table.as_array().unwrap();
        busy += usize::from(!rows.is_empty());
        stuck.extend(
            rows.iter()
                .map(|row| row["client"].as_str().unwrap().to_owned()),
        );
    }
    assert!(busy >= 2, "only {busy} balancer(s) saw clients");
    let expected: BTreeSet<String> = rig.client_addrs().iter().map(|a| a.to_string()).collect();
    assert_eq!(stuck, expected);

    drop(balancers);
    drop(peers);
    drop(guards);
    drop(backend_servers);
    drop(scratch);
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

/// Whether `pid` is a live process that is a redis-server (a pid reused by something else
/// does not count).
fn process_alive(pid: u32) -> bool {
    pid != 0
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim_end().starts_with("redis-server"))
}
