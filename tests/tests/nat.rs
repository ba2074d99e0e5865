//! End to end: `forwarding: nat` (IPVS `-m`) and full NAT (`source_nat`) with backends that
//! know nothing of the balancer: no VIP on loopback, no decapsulation. For plain NAT their one
//! change is the route back to the clients via the balancer; with full NAT they have none at
//! all, and see the balancer's address as their peer.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    netns::in_netns,
    rig::{Family, NameServer, fetch_name},
    scenario::{Mode, PORT, Setup, TIMEOUT, count_names},
};

/// Backend 3 listens on this port instead of the service's: NAT translates the port too.
const OTHER_PORT: u16 = 8080;

/// A NAT scenario: three unmodified backends (b3 on [`OTHER_PORT`]), routes back via the
/// balancer unless `full_nat`.
fn nat_setup(test: &str, family: Family, clients: usize, full_nat: bool) -> (Setup, NameServer) {
    let s = Setup::new_in(test, Mode::Native, family, 3, clients);
    for k in 1..=3 {
        s.rig
            .make_nat_backend(k, !full_nat)
            .expect("making an unmodified NAT backend");
    }
    let b3 = NameServer::start(
        s.rig.backend_ns(3),
        SocketAddr::new(s.backend_addr(3), OTHER_PORT),
        "b3",
    )
    .expect("b3 on its own port");
    (s, b3)
}

/// The service's YAML for a NAT scenario.
fn nat_config(s: &Setup, service: &str) -> String {
    let backends: Vec<String> = vec![
        String::new(),
        String::new(),
        format!("        port: {OTHER_PORT}\n"),
    ];
    s.config_with(
        "on_exit: detach\n",
        &format!(
            "    forwarding: nat\n    health_check: {{interval: 300ms, timeout: 250ms, rise: 1, fall: 2}}\n    stick:\n      timeout: 30m\n{service}"
        ),
        &backends,
    )
}

/// Clients reach all three unmodified backends (one on another port) and stay on them; every
/// reply was translated by the data path.
fn sticky_through_nat(family: Family, full_nat: bool) {
    let test = if full_nat { "fnat-stick" } else { "nat-stick" };
    let (mut s, _b3) = nat_setup(test, family, 48, full_nat);
    let extra = if full_nat {
        "    source_nat: true\n"
    } else {
        ""
    };
    s.start(&nat_config(&s, extra));
    let clients = s.clients();
    let first = s.round(&clients);
    for round in 1..5 {
        assert_eq!(s.round(&clients), first, "round {round}: a client moved");
    }
    let spread = count_names(&first);
    eprintln!("{family:?} full_nat={full_nat}: 48 clients x 5 connections: {spread:?}");
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "every backend, b3 on port {OTHER_PORT}, takes clients"
    );
    assert_eq!(s.table().len(), clients.len());
    let status = s.status();
    assert_eq!(status["services"][0]["forwarding"], "nat", "{status}");
    // `status` names the address `source_nat: true` resolved to (the balancer's, not a VIP).
    let detail = &status["services"][0]["forwarding_detail"];
    if full_nat {
        let expected = format!("source NAT {} ports 1024-32767", s.rig.lb_addr_in(family));
        assert_eq!(detail, expected.as_str(), "{status}");
    } else {
        assert!(detail.is_null(), "{status}");
    }
    // Backend 3's own port shows in its address.
    let text = s.cli_ok(&["status"]);
    let b3 = std::net::SocketAddr::new(s.backend_addr(3), OTHER_PORT).to_string();
    assert!(text.contains(&b3), "status shows {b3}:\n{text}");
    let replies = status["counters"]["tx_nat_reply"].as_u64().unwrap_or(0);
    assert!(
        replies >= 48 * 5 * 2,
        "every connection's replies were translated: {replies}"
    );
    assert_eq!(
        status["counters"]["drop_nat_stale_reply"]
            .as_u64()
            .unwrap_or(0),
        0
    );
    s.balancer.take().unwrap().stop();
}

#[test]
fn nat_keeps_clients() {
    sticky_through_nat(Family::Ipv4, false);
}

#[test]
fn nat_keeps_clients_v6() {
    sticky_through_nat(Family::Ipv6, false);
}

#[test]
fn full_nat_keeps_clients() {
    sticky_through_nat(Family::Ipv4, true);
}

#[test]
fn full_nat_keeps_clients_v6() {
    sticky_through_nat(Family::Ipv6, true);
}

/// Without a route back, plain NAT cannot work (the backend answers the client directly, from
/// its own address); full NAT does, and the backend sees the balancer's address.
fn full_nat_needs_no_route_back(family: Family) {
    let (mut s, _b3) = nat_setup("fnat-peer", family, 2, true);
    // A server on b1 that answers with the peer address it sees.
    let b1 = SocketAddr::new(s.backend_addr(1), 9000);
    let listener =
        in_netns(s.rig.backend_ns(1), || TcpListener::bind(b1)).expect("peer server on b1");
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut served = 0;
        while served < 2 && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = stream.write_all(format!("{}\n", peer.ip()).as_bytes());
                    served += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    let vip_port = 9000;
    let config = s
        .config_with(
            "on_exit: detach\n",
            "    forwarding: nat\n    health_check: {type: none}\n",
            &[String::new()],
        )
        .replace(&format!("port: {PORT}\n"), &format!("port: {vip_port}\n"));
    // Plain NAT first: the backend's answer leaves from its own address straight to the client,
    // which does not know that connection.
    s.start(&config);
    let vip = SocketAddr::new(s.rig.vip_in(family), vip_port);
    let client = s.clients()[0];
    assert!(
        fetch_name(s.rig.client_ns(), client, vip, Duration::from_secs(2)).is_err(),
        "plain NAT without a route back cannot answer"
    );
    s.balancer.take().unwrap().stop();
    s.start(&config.replace(
        "    forwarding: nat\n",
        "    forwarding: nat\n    source_nat: true\n",
    ));
    let peer = fetch_name(s.rig.client_ns(), client, vip, TIMEOUT).expect("full NAT answers");
    let lb: IpAddr = s.rig.lb_addr_in(family);
    assert_eq!(
        peer,
        lb.to_string(),
        "the backend sees the balancer's address"
    );
    s.balancer.take().unwrap().stop();
    drop(server);
}

#[test]
fn full_nat_needs_no_route_back_v4() {
    full_nat_needs_no_route_back(Family::Ipv4);
}

#[test]
fn full_nat_needs_no_route_back_v6() {
    full_nat_needs_no_route_back(Family::Ipv6);
}

/// A backend fails: its clients move once and stay; draining keeps stuck clients.
fn failure_and_drain(family: Family, full_nat: bool) {
    let (mut s, b3) = nat_setup("nat-fail", family, 60, full_nat);
    let extra = if full_nat {
        "    source_nat: true\n"
    } else {
        ""
    };
    s.start(&nat_config(&s, extra));
    let clients = s.clients();
    let (early, late) = clients.split_at(40);
    let before = s.round(early);
    assert!(before.iter().any(|n| n == "b3"), "b3 has clients");
    b3.stop();
    s.wait_state("b3", "down", Duration::from_secs(10));
    let after = s.round(early);
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a == "b3" {
            assert_ne!(b, "b3", "client {} still reached the failed b3", early[i]);
        } else {
            assert_eq!(a, b, "client {} of a healthy backend moved", early[i]);
        }
    }
    assert_eq!(s.round(early), after, "redispatched clients stay");
    s.cli_ok(&["backend", "drain", "web/b2"]);
    assert_eq!(s.round(early), after, "draining moves nobody");
    let fresh = s.round(late);
    assert!(
        fresh.iter().all(|n| n == "b1"),
        "new clients avoid the down b3 and the draining b2: {fresh:?}"
    );
}

#[test]
fn nat_failure_and_drain() {
    failure_and_drain(Family::Ipv4, false);
}

#[test]
fn full_nat_failure_and_drain_v6() {
    failure_and_drain(Family::Ipv6, true);
}

/// A client that reuses its source port once the last connection closed (the server closed
/// first and holds TIME_WAIT; the client's side is gone at once) reaches its backend again:
/// the closing connection gives its port to the new one, in the connection table and the NAT
/// reply table alike.
fn port_reuse(family: Family, full_nat: bool) {
    let (mut s, _b3) = nat_setup("nat-reuse", family, 1, full_nat);
    let extra = if full_nat {
        "    source_nat: true\n"
    } else {
        ""
    };
    s.start(&nat_config(&s, extra));
    let client = s.clients()[0];
    let vip = s.vip();
    let names = in_netns(s.rig.client_ns(), || {
        (0..5)
            .map(|_| {
                let stream = connect_from_port(client, 40_123, vip)?;
                read_line(stream)
            })
            .collect::<anyhow::Result<Vec<String>>>()
    })
    .expect("five connections from one client port");
    assert!(
        names.windows(2).all(|w| w[0] == w[1]),
        "one backend every time: {names:?}"
    );
}

/// Connects from `client:port` (SO_REUSEADDR, so a port just released can be bound again).
fn connect_from_port(
    client: IpAddr,
    port: u16,
    target: SocketAddr,
) -> anyhow::Result<std::net::TcpStream> {
    // Waits out the moment the previous connection's socket needs to go.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match sticky_lb_tests::socket::connect_from_port(
            SocketAddr::new(client, port),
            target,
            Duration::from_secs(3),
        ) {
            Ok(stream) => return Ok(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_line(mut stream: std::net::TcpStream) -> anyhow::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.trim().to_string())
}

#[test]
fn nat_port_reuse() {
    port_reuse(Family::Ipv4, false);
}

#[test]
fn full_nat_port_reuse_v6() {
    port_reuse(Family::Ipv6, true);
}

/// `backend add --port`: a NAT backend added at run time on a port of its own takes clients
/// there; a port of 0 is refused in one line.
#[test]
fn nat_backend_added_with_its_own_port() {
    let (mut s, _b3) = nat_setup("nat-add", Family::Ipv4, 8, false);
    s.start(&nat_config(&s, ""));
    let k = s.rig.add_backend().expect("a fourth backend namespace");
    s.rig.make_nat_backend(k, true).expect("unmodified");
    let address = s.backend_addr(k);
    let _b4 = NameServer::start(s.rig.backend_ns(k), SocketAddr::new(address, 9090), "b4")
        .expect("b4 on port 9090");
    let (code, _, err) = sticky_lb_tests::balancer::cli(
        s.rig.lb_ns(),
        &[
            "backend",
            "add",
            "web/b5",
            &address.to_string(),
            "--port",
            "0",
        ],
    );
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("--port"), "{err}");
    s.cli_ok(&[
        "backend",
        "add",
        "web/b4",
        &address.to_string(),
        "--port",
        "9090",
    ]);
    for b in ["b1", "b2", "b3"] {
        s.cli_ok(&["backend", "disable", &format!("web/{b}")]);
    }
    let names = s.round(&s.clients());
    assert!(names.iter().all(|n| n == "b4"), "{names:?}");
    let text = s.cli_ok(&["status"]);
    assert!(text.contains(&format!("{address}:9090")), "{text}");
}
