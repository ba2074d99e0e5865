//! Checks the namespace rig itself, without the balancer: the topology comes
//! up, a client reaches a backend directly, and nothing outlives the rig.
//! Needs root.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use sticky_lb_tests::balancer::PeerXdp;
use sticky_lb_tests::netns::{in_netns, listed_namespaces, require_root};
use sticky_lb_tests::rig::{
    Family, NameServer, Rig, RigOptions, fetch_name, fetch_names_many, unspecified,
};

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

/// The routed part: remote backends on br1 behind the router, in both families. Addresses and
/// roles as advertised; a name server on a remote backend's own address answers the balancer and
/// every client through the router (with a native XDP program on the remote eth0, as a decap
/// program will be); the balancer's (and the client's) route to a remote backend names the
/// router, also after lb0 is recreated; the remote backend's way back names the router's br1
/// side; no namespace has a default route or any route out of the rig; nothing outlives the rig.
#[test]
fn remote_backends_are_reached_through_the_router() {
    require_root();
    let mut rig = Rig::build(
        RigOptions::new("rig_routed")
            .backends(1)
            .clients(3)
            .remote_backends(2),
    )
    .expect("build rig");
    let prefix = format!("slb-{}-", rig.tag());
    let listed = listed_namespaces(&prefix);
    assert_eq!(rig.namespaces().len(), 7, "{:?}", rig.namespaces());
    for name in rig.namespaces() {
        assert!(listed.iter().any(|n| n == name), "{name} not in {listed:?}");
    }
    assert_eq!(rig.remote_backend_count(), 2);
    assert_eq!(rig.backend_count(), 1);
    assert_eq!(rig.ns("rt"), rig.router_ns());
    assert_eq!(rig.ns("rb2"), rig.remote_backend_ns(2));
    assert_eq!(rig.ns("b1"), rig.backend_ns(1));
    assert_eq!(rig.router_ns(), format!("{prefix}rt"));
    assert_eq!(rig.remote_backend_ns(1), format!("{prefix}rb1"));
    let v6 = |text: &str| text.parse::<Ipv6Addr>().unwrap();
    assert_eq!(rig.remote_backend_addr(1), Ipv4Addr::new(198, 19, 0, 11));
    assert_eq!(rig.remote_backend_addr(2), Ipv4Addr::new(198, 19, 0, 12));
    assert_eq!(rig.remote_backend_addr6(2), v6("2001:db8:ff::12"));
    assert_eq!(
        rig.router_addr_in(Family::Ipv4),
        IpAddr::from(Ipv4Addr::new(198, 18, 0, 254))
    );
    assert_eq!(
        rig.router_addr_in(Family::Ipv6),
        IpAddr::from(v6("2001:db8::254"))
    );
    assert_ne!(rig.remote_backend_mac(1), rig.remote_backend_mac(2));
    // The router's br0 side answers ARP/NDP with the MAC the rig reports.
    let arp = rig
        .ip("rt", &["-j", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(arp.contains(&format_mac(rig.router_mac())), "{arp}");

    // A native XDP program on each remote eth0 (XDP_PASS here; a decapsulating one in tunnel
    // tests) still gets every frame with good checksums.
    let _xdp: Vec<PeerXdp> = (1..=2)
        .map(|k| PeerXdp::attach(rig.remote_backend_ns(k), "eth0").expect("native XDP on rbK"))
        .collect();
    for role in ["rb1", "rb2"] {
        let link = rig.ip(role, &["link", "show", "dev", "eth0"]).unwrap();
        assert!(link.contains("prog/xdp "), "{role}: not native XDP: {link}");
    }

    for family in [Family::Ipv4, Family::Ipv6] {
        for k in 1..=2 {
            let addr = rig.remote_backend_addr_in(family, k);
            let bind = SocketAddr::new(addr, 8080);
            let name = format!("rb{k} {family}");
            let server = NameServer::start(rig.remote_backend_ns(k), bind, &name)
                .expect("name server on a remote backend");
            let from_lb = fetch_name(rig.lb_ns(), rig.lb_addr_in(family), bind, TIMEOUT)
                .expect("fetch from the balancer");
            assert_eq!(from_lb, name);
            let requests: Vec<_> = rig
                .client_addrs_in(family)
                .into_iter()
                .map(|src| (src, bind))
                .collect();
            for result in fetch_names_many(rig.client_ns(), &requests, TIMEOUT) {
                assert_eq!(result.expect("fetch from a client"), name);
            }
            assert_eq!(server.accepted(), 4);
            drop(server);

            // The kernel's route from the balancer (and a client) names the router as gateway,
            // and the balancer's own address as source.
            let route = route_get(&rig, "lb", addr);
            assert!(
                route.contains(&format!("via {} dev lb0", rig.router_addr_in(family)))
                    && route.contains(&format!("src {}", rig.lb_addr_in(family))),
                "{family}: {route}"
            );
            let route = route_get(&rig, "cl", addr);
            assert!(
                route.contains(&format!("via {} dev eth0", rig.router_addr_in(family))),
                "{family}: {route}"
            );
            // The remote backend reaches clients via the router's br1 side.
            let client = rig.client_addrs_in(family)[2];
            let route = route_get(&rig, &format!("rb{k}"), client);
            assert!(
                route.contains(&format!(
                    "via {} dev eth0",
                    rig.router_remote_addr_in(family)
                )),
                "{family}: {route}"
            );

            // The VIP on the remote backend's lo, as on a local backend.
            let vip = SocketAddr::new(rig.vip_in(family), 8081);
            let server = NameServer::start(
                rig.remote_backend_ns(k),
                SocketAddr::new(unspecified(family), 8081),
                &name,
            )
            .expect("DSR name server on a remote backend");
            let over_lo = fetch_name(rig.remote_backend_ns(k), vip.ip(), vip, TIMEOUT)
                .expect("fetch over lo");
            assert_eq!(over_lo, name);
            assert_eq!(server.accepted(), 1);
        }
    }

    // Routes go with lb0: recreating it brings them back.
    rig.recreate_lb_dev().expect("recreate lb0");
    for family in [Family::Ipv4, Family::Ipv6] {
        let route = route_get(&rig, "lb", rig.remote_backend_addr_in(family, 1));
        assert!(
            route.contains(&format!("via {} dev lb0", rig.router_addr_in(family))),
            "{family} after recreating lb0: {route}"
        );
    }

    // Remote backends are DSR backends like local ones; VIP6 is deprecated there too.
    for (key, want) in [
        ("net/ipv4/conf/all/arp_ignore", "1"),
        ("net/ipv4/conf/all/arp_announce", "2"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/eth0/rp_filter", "0"),
        ("net/ipv6/conf/eth0/accept_dad", "0"),
        ("net/ipv6/conf/eth0/accept_ra", "0"),
    ] {
        let got = in_netns(rig.remote_backend_ns(1), || {
            std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap()
        });
        assert_eq!(got.trim(), want, "{key} on rb1");
    }
    let lo = rig
        .ip("rb1", &["-6", "-j", "addr", "show", "dev", "lo"])
        .unwrap();
    let lo: serde_json::Value = serde_json::from_str(&lo).unwrap();
    let vip6 = lo[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["local"] == rig.vip6().to_string())
        .expect("VIP6 on rb1's lo");
    assert_eq!(vip6["preferred_life_time"], 0, "{vip6}");
    // Forwarding is on in the router, in both families.
    for key in ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"] {
        let got = in_netns(rig.router_ns(), || {
            std::fs::read_to_string(format!("/proc/sys/{key}")).unwrap()
        });
        assert_eq!(got.trim(), "1", "{key} in the router");
    }
    // TX checksum offload is off on every veth end of the routed part.
    let br = rig.ns("br").to_owned();
    for (ns, dev) in [
        (rig.router_ns(), "eth0"),
        (rig.router_ns(), "eth1"),
        (rig.remote_backend_ns(1), "eth0"),
        (rig.remote_backend_ns(2), "eth0"),
        (&br, "p-rt0"),
        (&br, "p-rt1"),
        (&br, "p-rb1"),
        (&br, "p-rb2"),
    ] {
        let features = in_ns_command(ns, &["ethtool", "-k", dev]);
        assert!(
            features.contains("tx-checksumming: off"),
            "{ns} {dev}: {features}"
        );
    }

    // No default route anywhere, and no route to anything outside the rig's ranges.
    for name in rig.namespaces() {
        for family in ["-4", "-6"] {
            let json = in_ns_command(
                name,
                &["ip", "-j", family, "route", "show", "table", "main"],
            );
            let routes: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
            for route in routes.as_array().into_iter().flatten() {
                let dst = route["dst"].as_str().unwrap_or_default();
                assert!(inside_rig(dst), "{name}: route out of the rig: {route}");
            }
            let default = in_ns_command(name, &["ip", family, "route", "show", "default"]);
            assert!(default.trim().is_empty(), "{name}: {default}");
        }
    }

    drop(_xdp);
    drop(rig);
    assert_eq!(listed_namespaces(&prefix), Vec::<String>::new());
}

#[test]
fn a_failing_test_still_removes_its_routed_rig() {
    require_root();
    let tag = std::thread::spawn(|| {
        let rig = Rig::build(
            RigOptions::new("rig_routed_panics")
                .backends(1)
                .remote_backends(2),
        )
        .expect("build rig");
        assert_eq!(rig.namespaces().len(), 7);
        std::panic::panic_any(rig.tag().to_owned());
    })
    .join()
    .expect_err("the thread panics");
    let tag = tag.downcast::<String>().expect("tag payload");
    assert!(listed_namespaces(&format!("slb-{tag}-")).is_empty());
}

/// `ip route get ADDR` in the namespace of `role`.
fn route_get(rig: &Rig, role: &str, addr: IpAddr) -> String {
    rig.ip(role, &["route", "get", &addr.to_string()])
        .expect("ip route get")
}

/// Runs `ip netns exec NS args...` and returns its stdout (panics on failure).
fn in_ns_command(ns: &str, args: &[&str]) -> String {
    assert!(ns.starts_with("slb-"), "{ns}");
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    assert!(
        output.status.success(),
        "{ns} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Whether a route destination (as `ip -j route` prints it) lies inside the rig's address ranges
/// (198.18.0.0/15, 2001:db8::/32) or is link-local IPv6.
fn inside_rig(dst: &str) -> bool {
    let (addr, len) = dst.split_once('/').unwrap_or((dst, ""));
    let len: u8 = len.parse().unwrap_or(128);
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            let [x, y, ..] = a.octets();
            x == 198 && (y & 0xfe) == 18 && len >= 15
        }
        Ok(IpAddr::V6(a)) => {
            let s = a.segments();
            (s[..2] == [0x2001, 0xdb8] && len >= 32) || (s[0] == 0xfe80 && len >= 10)
        }
        Err(_) => false,
    }
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
