//! Checks the namespace rig itself, without the balancer: the topology comes
//! up, a client reaches a backend directly, and nothing outlives the rig.
//! Needs root.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use sticky_lb_tests::netns::{in_netns, listed_namespaces, require_root};
use sticky_lb_tests::rig::{NameServer, Rig, RigOptions, fetch_name, fetch_names_many};

const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn client_reaches_backend_and_rig_cleans_up() {
    require_root();
    let home_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let rig =
        Rig::build(RigOptions::new("rig_selftest").backends(2).clients(4)).expect("build rig");
    let prefix = format!("slb-{}-", rig.tag());

    // Every namespace is there, with the advertised addresses.
    let listed = listed_namespaces(&prefix);
    for name in rig.namespaces() {
        assert!(
            listed.iter().any(|n| n == name),
            "{name} missing from {listed:?}"
        );
    }
    assert_eq!(rig.namespaces().len(), 5);
    assert_eq!(rig.backend_addr(1), Ipv4Addr::new(198, 18, 0, 11));
    assert_eq!(rig.backend_addr(2), Ipv4Addr::new(198, 18, 0, 12));
    assert_eq!(rig.client_addrs().len(), 4);
    assert_eq!(rig.client_addrs()[2], Ipv4Addr::new(198, 18, 1, 3));
    assert_eq!(rig.ns("b2"), rig.backend_ns(2));
    assert_ne!(rig.backend_mac(1), rig.backend_mac(2));

    let backend = SocketAddrV4::new(rig.backend_addr(1), 8080);
    let server =
        NameServer::start(rig.backend_ns(1), backend, "backend-1").expect("start name server");
    let client = Ipv4Addr::new(198, 18, 1, 3);
    let name = fetch_name(rig.client_ns(), client, backend, TIMEOUT).expect("fetch name");
    assert_eq!(name, "backend-1");
    assert_eq!(server.accepted(), 1);

    // The batch client, from every client address.
    let requests: Vec<_> = rig
        .client_addrs()
        .iter()
        .map(|&src| (src, backend))
        .collect();
    for result in fetch_names_many(rig.client_ns(), &requests, TIMEOUT) {
        assert_eq!(result.expect("fetch name (many)"), "backend-1");
    }
    assert_eq!(server.accepted(), 5);

    // Nothing listens on backend 2: refused, not a hang.
    let refused = fetch_name(
        rig.client_ns(),
        client,
        SocketAddrV4::new(rig.backend_addr(2), 8080),
        TIMEOUT,
    );
    assert!(refused.is_err());

    // fetch_name moved this thread back to its own namespace.
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        home_ns
    );

    server.stop();
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

#[test]
fn backend_added_later_is_reachable_on_the_vip_from_its_own_namespace() {
    require_root();
    let mut rig =
        Rig::build(RigOptions::new("rig_addbackend").backends(1).clients(1)).expect("build rig");
    let k = rig.add_backend().expect("add backend");
    assert_eq!(k, 2);
    assert_eq!(rig.backend_addr(2), Ipv4Addr::new(198, 18, 0, 12));

    // The DSR server binds 0.0.0.0, so it also answers on the VIP held on lo.
    let server = NameServer::start(
        rig.backend_ns(2),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8081),
        "backend-2",
    )
    .expect("start name server");
    let vip = SocketAddrV4::new(rig.vip(), 8081);
    let name = fetch_name(rig.backend_ns(2), rig.vip(), vip, TIMEOUT).expect("fetch over lo");
    assert_eq!(name, "backend-2");
    // And on its own address, from the client.
    let direct = SocketAddrV4::new(rig.backend_addr(2), 8081);
    let name =
        fetch_name(rig.client_ns(), rig.client_addrs()[0], direct, TIMEOUT).expect("fetch direct");
    assert_eq!(name, "backend-2");
    drop(server);

    // The DSR sysctls are in place inside the backend namespace only.
    let arp_ignore = in_netns(rig.backend_ns(2), || {
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/arp_ignore").unwrap()
    });
    assert_eq!(arp_ignore.trim(), "1");

    let prefix = format!("slb-{}-", rig.tag());
    drop(rig);
    assert!(listed_namespaces(&prefix).is_empty());
}

#[test]
fn a_failing_test_still_removes_its_rig() {
    require_root();
    let tag = std::thread::spawn(|| {
        let rig =
            Rig::build(RigOptions::new("rig_panics").backends(1).clients(2)).expect("build rig");
        let tag = rig.tag().to_owned();
        // Hand the tag out through the panic payload.
        std::panic::panic_any(tag);
    })
    .join()
    .expect_err("the thread panics");
    let tag = tag.downcast::<String>().expect("tag payload");
    assert!(listed_namespaces(&format!("slb-{tag}-")).is_empty());
}

#[test]
fn a_thousand_clients() {
    require_root();
    let started = std::time::Instant::now();
    let rig = Rig::build(RigOptions::new("rig_many").backends(2).clients(1000)).expect("build rig");
    let built = started.elapsed();
    let addrs = rig.client_addrs();
    assert_eq!(addrs.len(), 1000);
    assert_eq!(addrs[999], Ipv4Addr::new(198, 18, 4, 238));
    let backend = SocketAddrV4::new(rig.backend_addr(2), 9000);
    let server = NameServer::start(rig.backend_ns(2), backend, "b2").expect("start name server");
    let requests: Vec<_> = addrs.iter().map(|&src| (src, backend)).collect();
    let results = fetch_names_many(rig.client_ns(), &requests, TIMEOUT);
    let failures: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok(name) if name == "b2"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(server.accepted(), 1000);
    eprintln!(
        "1000-client rig built in {built:?}, 1000 fetches in {:?}",
        started.elapsed() - built
    );
}
