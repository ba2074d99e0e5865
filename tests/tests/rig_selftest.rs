//! Checks the namespace rig itself, without the balancer: the topology comes
//! up, a client reaches a backend directly, and nothing outlives the rig.
//! Needs root.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
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

    // The same over IPv6: `[::]` covers VIP6 on lo.
    assert_eq!(
        rig.backend_addr6(2),
        "2001:db8::12".parse::<Ipv6Addr>().unwrap()
    );
    let server = NameServer::start(
        rig.backend_ns(2),
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 8082, 0, 0),
        "backend-2 v6",
    )
    .expect("start name server");
    let vip6 = SocketAddrV6::new(rig.vip6(), 8082, 0, 0);
    let name = fetch_name(rig.backend_ns(2), rig.vip6(), vip6, TIMEOUT).expect("fetch over lo");
    assert_eq!(name, "backend-2 v6");
    let direct = SocketAddrV6::new(rig.backend_addr6(2), 8082, 0, 0);
    let name =
        fetch_name(rig.client_ns(), rig.client_addrs6()[0], direct, TIMEOUT).expect("fetch direct");
    assert_eq!(name, "backend-2 v6");
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
    let fetched4 = started.elapsed() - built;

    // 1000 IPv6 clients too, each in its own /64: the backend answers them all from its pinned
    // neighbour entries (1000 learnt ones would crowd the kernel's shared NDP table).
    let addrs6 = rig.client_addrs6();
    assert_eq!(addrs6.len(), 1000);
    assert_eq!(addrs6[999].to_string(), "2001:db8:1:3e8::1");
    let backend6 = SocketAddrV6::new(rig.backend_addr6(2), 9001, 0, 0);
    let server6 = NameServer::start(rig.backend_ns(2), backend6, "b2 v6").expect("start server");
    let requests: Vec<_> = addrs6.iter().map(|&src| (src, backend6)).collect();
    let results = fetch_names_many(rig.client_ns(), &requests, TIMEOUT);
    let failures: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok(name) if name == "b2 v6"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} IPv6 failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(server6.accepted(), 1000);
    let neighbours = rig
        .ip(
            "b2",
            &["-6", "neigh", "show", "dev", "eth0", "nud", "permanent"],
        )
        .expect("ip neigh");
    assert_eq!(neighbours.lines().count(), 1000, "{neighbours}");
    eprintln!(
        "1000-client rig built in {built:?}, 1000 IPv4 fetches in {fetched4:?}, 1000 IPv6 fetches in {:?}",
        started.elapsed() - built - fetched4
    );
}

/// The rig over IPv6: addresses as advertised and none of them tentative, a client (from
/// addresses spread over /64s and within one) reaches every backend directly, VIP6 resolves by
/// NDP to the balancer's MAC, no backend claims VIP6 on its eth0, and nothing outlives the rig.
#[test]
fn ipv6_clients_reach_backends_and_vip6_resolves_to_the_balancer_only() {
    require_root();
    let rig = Rig::build(
        RigOptions::new("rig_v6")
            .backends(3)
            .clients(6)
            .clients_per_64(4),
    )
    .expect("build rig");
    let prefix = format!("slb-{}-", rig.tag());
    let v6 = |text: &str| text.parse::<Ipv6Addr>().unwrap();
    assert_eq!(rig.vip6(), v6("2001:db8::100"));
    assert_eq!(rig.lb_addr6(), v6("2001:db8::2"));
    assert_eq!(rig.backend_addr6(1), v6("2001:db8::11"));
    assert_eq!(rig.backend_addr6(3), v6("2001:db8::13"));
    // Four addresses in the first /64, the rest in the next.
    let expected: Vec<Ipv6Addr> = [
        "2001:db8:1:1::1",
        "2001:db8:1:1::2",
        "2001:db8:1:1::3",
        "2001:db8:1:1::4",
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
    ]
    .map(v6)
    .to_vec();
    assert_eq!(rig.client_addrs6(), expected);

    // Every IPv6 address is in place and usable at once: none tentative (no DAD), and the
    // global ones all on-link in 2001:db8::/32 (no default route, nothing out of the rig).
    for role in ["lb", "cl", "b1", "b2", "b3"] {
        let json = rig.ip(role, &["-6", "-j", "addr", "show"]).unwrap();
        let links: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut globals = Vec::new();
        for link in links.as_array().unwrap() {
            for addr in link["addr_info"].as_array().unwrap() {
                assert!(
                    addr.get("tentative").is_none() && addr.get("dadfailed").is_none(),
                    "{role}: {addr}"
                );
                if addr["scope"] == "global" {
                    globals.push(addr["local"].as_str().unwrap().to_owned());
                }
            }
        }
        let want: Vec<String> = match role {
            "lb" => vec!["2001:db8::2".into(), "2001:db8::100".into()],
            "cl" => expected.iter().map(|a| a.to_string()).collect(),
            _ => {
                let k: usize = role[1..].parse().unwrap();
                vec!["2001:db8::100".into(), rig.backend_addr6(k).to_string()]
            }
        };
        globals.sort();
        let mut want = want;
        want.sort();
        assert_eq!(globals, want, "{role}");
        let routes = rig.ip(role, &["-6", "route", "show", "default"]).unwrap();
        assert!(
            routes.trim().is_empty(),
            "{role} has a default route: {routes}"
        );
    }

    // Each backend directly, from every client address.
    let servers: Vec<NameServer> = (1..=3)
        .map(|k| {
            let bind = SocketAddrV6::new(rig.backend_addr6(k), 8080, 0, 0);
            NameServer::start(rig.backend_ns(k), bind, &format!("b{k}")).expect("name server")
        })
        .collect();
    for (k, server) in servers.iter().enumerate() {
        let requests: Vec<_> = rig
            .client_addrs6()
            .iter()
            .map(|&src| (src, server.addr()))
            .collect();
        for result in fetch_names_many(rig.client_ns(), &requests, TIMEOUT) {
            assert_eq!(result.expect("fetch name over IPv6"), format!("b{}", k + 1));
        }
        assert_eq!(server.accepted(), 6);
    }

    // VIP6 from the client reaches the balancer, and NDP resolved it to lb0's MAC.
    let on_lb = NameServer::start(
        rig.lb_ns(),
        SocketAddrV6::new(rig.vip6(), 8081, 0, 0),
        "balancer",
    )
    .expect("name server on the balancer");
    let vip6 = SocketAddr::from(SocketAddrV6::new(rig.vip6(), 8081, 0, 0));
    let client = rig.client_addrs6()[5];
    assert_eq!(
        fetch_name(rig.client_ns(), client, vip6, TIMEOUT).expect("fetch from VIP6"),
        "balancer"
    );
    assert_eq!(
        neighbour_mac(&rig, "cl", rig.vip6()),
        Some(format_mac(rig.lb_mac())),
        "VIP6 resolves to lb0"
    );
    drop(on_lb);

    // Without VIP6 on lb0 nobody may claim it: every backend holds VIP6 on lo (and listens on
    // [::]:8081 here, so a wrong claim would be answered), yet the client's solicitations go
    // unanswered.
    let listeners: Vec<NameServer> = (1..=3)
        .map(|k| {
            let bind = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 8081, 0, 0);
            NameServer::start(rig.backend_ns(k), bind, &format!("b{k} on VIP6")).unwrap()
        })
        .collect();
    let vip6_cidr = format!("{}/128", rig.vip6());
    rig.ip("lb", &["addr", "del", &vip6_cidr, "dev", rig.lb_dev()])
        .expect("remove VIP6 from lb0");
    rig.ip("cl", &["-6", "neigh", "flush", "dev", "eth0"])
        .expect("flush the client's IPv6 neighbours");
    // NDP gives up after three solicitations a second apart; the timeout covers that.
    let claimed = fetch_name(rig.client_ns(), client, vip6, Duration::from_secs(5));
    assert!(
        claimed.is_err(),
        "a backend answered for VIP6 on its eth0: {claimed:?}"
    );
    assert_eq!(
        neighbour_mac(&rig, "cl", rig.vip6()),
        None,
        "nobody answers NS for VIP6 without the balancer"
    );
    for listener in &listeners {
        assert_eq!(listener.accepted(), 0, "{}", listener.name());
    }
    drop(listeners);
    drop(servers);

    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

/// The link-layer address the neighbour table of `role` holds for `addr` on its interface,
/// if it has one.
fn neighbour_mac(rig: &Rig, role: &str, addr: Ipv6Addr) -> Option<String> {
    let dev = if role == "lb" { rig.lb_dev() } else { "eth0" };
    let json = rig
        .ip(
            role,
            &["-6", "-j", "neigh", "show", &addr.to_string(), "dev", dev],
        )
        .expect("ip neigh show");
    let entries: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    entries
        .as_array()?
        .iter()
        .find_map(|entry| entry["lladdr"].as_str().map(str::to_owned))
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
