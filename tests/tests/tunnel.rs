//! End to end: `forwarding: tunnel` with backends off the balancer's segment. The rig's routed
//! part puts two backends in another subnet behind a router namespace; one more backend sits on
//! the balancer's own segment (its next hop is itself). Every backend runs the real
//! `sticky-lb decap` on its interface (this kernel has no ipip module), holds the VIP on
//! loopback and answers clients directly, through the router for the remote ones.
//!
//! ```text
//!   clients --- br0 --- lb0 (balancer, XDP: IPIP / IPv6-in-IPv6 to the backend's next hop)
//!                |  \
//!                |   router --- br1 --- r1, r2 (198.19.0.11-12, 2001:db8:ff::11-12)
//!                b1 (198.18.0.11, on-link)
//! ```

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};
use sticky_lb_tests::{
    decap::DecapProcess,
    netns::{in_netns, spawn_in_netns},
    rig::{Family, NameServer, unspecified},
    scenario::{Mode, PORT, Setup, count_names},
    socket::connect_from,
};

/// Remote backends behind the router.
const REMOTE: usize = 2;

/// A tunnel scenario: the rig with one on-link backend (b1) and [`REMOTE`] routed ones (r1,
/// r2), name servers answering `b1`, `r1`, `r2` on the service port, and `sticky-lb decap` on
/// every backend.
struct Tunnel {
    // Drop order: decap stops before the rig's namespaces go.
    decaps: Vec<DecapProcess>,
    remote_servers: Vec<NameServer>,
    s: Setup,
}

impl Tunnel {
    fn new(test: &str, mode: Mode, family: Family, clients: usize) -> Tunnel {
        let s = Setup::with_rig(test, mode, family, |o| {
            o.backends(1).remote_backends(REMOTE).clients(clients)
        });
        let remote_servers = (1..=REMOTE)
            .map(|k| {
                NameServer::start(
                    s.rig.remote_backend_ns(k),
                    SocketAddr::new(unspecified(family), PORT),
                    &format!("r{k}"),
                )
                .expect("name server on a remote backend")
            })
            .collect();
        let mut decaps = Vec::new();
        let mode_arg = match mode {
            Mode::Native => "native",
            Mode::Generic => "generic",
        };
        let namespaces: Vec<String> = std::iter::once(s.rig.backend_ns(1).to_string())
            .chain((1..=REMOTE).map(|k| s.rig.remote_backend_ns(k).to_string()))
            .collect();
        for ns in &namespaces {
            let (decap, _) = DecapProcess::start(ns, "eth0", &["--mode", mode_arg])
                .unwrap_or_else(|e| panic!("sticky-lb decap in {ns}: {e:#}"));
            decaps.push(decap);
        }
        Tunnel {
            decaps,
            remote_servers,
            s,
        }
    }

    /// The backend addresses in name order: b1, r1, r2.
    fn backend_addrs(&self) -> Vec<(String, IpAddr)> {
        let family = self.s.family;
        let mut addrs = vec![("b1".to_string(), self.s.rig.backend_addr_in(family, 1))];
        for k in 1..=REMOTE {
            addrs.push((
                format!("r{k}"),
                self.s.rig.remote_backend_addr_in(family, k),
            ));
        }
        addrs
    }

    /// A tunnel service with every backend, outer sources from `source`, and `service` lines
    /// (indented four spaces).
    fn config(&self, source: &str, service: &str) -> String {
        let mut yaml = format!(
            "interface: {}\nxdp_mode: {}\nsweep_interval: 500ms\non_exit: detach\nservices:\n  - name: web\n    vip: {}\n    port: {PORT}\n    forwarding: tunnel\n    tunnel:\n      source: {source}\n    health_check: {{interval: 300ms, timeout: 250ms, rise: 1, fall: 2}}\n{service}    backends:\n",
            self.s.rig.lb_dev(),
            self.s.mode.yaml(),
            self.s.rig.vip_in(self.s.family),
        );
        for (name, address) in self.backend_addrs() {
            yaml += &format!("      - name: {name}\n        address: {address}\n");
        }
        yaml
    }

    /// The source prefix of the scenario's family: outer sources spread over a /24 or a /112.
    fn source(&self) -> &'static str {
        match self.s.family {
            Family::Ipv4 => "198.18.250.0/24",
            Family::Ipv6 => "2001:db8::fa:0/112",
        }
    }

    /// Stops every decap program and returns the decapsulated-packet counts, by backend.
    fn decapsulated(&mut self) -> Vec<u64> {
        let key = match self.s.family {
            Family::Ipv4 => "decapsulated_ipv4",
            Family::Ipv6 => "decapsulated_ipv6",
        };
        self.decaps
            .iter_mut()
            .map(|d| {
                let stopped = d.stop().expect("stopping decap");
                stopped.counters.get(key).copied().unwrap_or(0)
            })
            .collect()
    }
}

/// Clients reach backends on the segment and behind the router through the tunnel and stay
/// on them; the stick table agrees; `status` names the mode; every backend decapsulated.
fn sticky_through_the_tunnel(mode: Mode, family: Family) {
    let mut t = Tunnel::new("tun-stick", mode, family, 48);
    let config = t.config(t.source(), "    stick:\n      timeout: 30m\n");
    t.s.start(&config);
    let clients = t.s.clients();
    let first = t.s.round(&clients);
    for round in 1..5 {
        assert_eq!(t.s.round(&clients), first, "round {round}: a client moved");
    }
    let spread = count_names(&first);
    eprintln!("{mode:?} {family:?}: 48 clients x 5 connections through the tunnel: {spread:?}");
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        ["b1", "r1", "r2"],
        "clients reach the on-link backend and both routed ones"
    );
    let table = t.s.table();
    assert_eq!(table.len(), clients.len());
    let status = t.s.status();
    assert_eq!(status["services"][0]["forwarding"], "tunnel", "{status}");
    let detail = format!("source {}", t.source());
    assert_eq!(
        status["services"][0]["forwarding_detail"],
        detail.as_str(),
        "{status}"
    );
    for b in status["services"][0]["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "up", "{b}");
    }
    // The data path's frames for routed backends go to the router: its MAC, not theirs.
    let router_mac = t.s.rig.router_mac();
    let router_mac = router_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    for b in status["services"][0]["backends"].as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        if name.starts_with('r') {
            assert_eq!(b["mac"], router_mac.as_str(), "{b}");
        }
    }
    t.s.balancer.take().unwrap().stop();
    let decapsulated = t.decapsulated();
    eprintln!("decapsulated per backend (b1, r1, r2): {decapsulated:?}");
    for (i, n) in decapsulated.iter().enumerate() {
        assert!(*n > 0, "backend {i} decapsulated nothing: {decapsulated:?}");
    }
}

#[test]
fn tunnel_keeps_clients_native() {
    sticky_through_the_tunnel(Mode::Native, Family::Ipv4);
}

#[test]
fn tunnel_keeps_clients_v6_native() {
    sticky_through_the_tunnel(Mode::Native, Family::Ipv6);
}

#[test]
fn tunnel_keeps_clients_generic() {
    sticky_through_the_tunnel(Mode::Generic, Family::Ipv4);
}

/// A routed backend fails: its clients move once and stay, nobody else moves; drained, a
/// backend keeps its stuck clients and takes no new ones.
fn failure_and_drain(family: Family) {
    let mut t = Tunnel::new("tun-fail", Mode::Native, family, 60);
    let config = t.config(t.source(), "    stick:\n      timeout: 30m\n");
    t.s.start(&config);
    let clients = t.s.clients();
    let (early, late) = clients.split_at(40);
    let before = t.s.round(early);
    assert!(before.iter().any(|n| n == "r1"), "r1 has clients");
    // r1 fails its checks.
    t.remote_servers.remove(0).stop();
    t.s.wait_state("r1", "down", Duration::from_secs(10));
    let after = t.s.round(early);
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a == "r1" {
            assert_ne!(b, "r1", "client {} still reached the failed r1", early[i]);
        } else {
            assert_eq!(a, b, "client {} of a healthy backend moved", early[i]);
        }
    }
    assert_eq!(t.s.round(early), after, "redispatched clients stay");
    // Drain r2: its stuck clients keep it, the new clients go elsewhere.
    t.s.cli_ok(&["backend", "drain", "web/r2"]);
    assert_eq!(t.s.round(early), after, "draining moves nobody");
    let fresh = t.s.round(late);
    assert!(
        fresh.iter().all(|n| n == "b1"),
        "new clients avoid the down r1 and the draining r2: {fresh:?}"
    );
}

#[test]
fn tunnel_failure_and_drain() {
    failure_and_drain(Family::Ipv4);
}

#[test]
fn tunnel_failure_and_drain_v6() {
    failure_and_drain(Family::Ipv6);
}

/// Bytes each client uploads in the path-MTU test: many full-size segments.
const UPLOAD: usize = 256 * 1024;

/// A server on each backend that reads a connection to its end and answers with the byte count.
fn start_sinks(t: &Tunnel) -> Vec<std::thread::JoinHandle<()>> {
    let family = t.s.family;
    let namespaces: Vec<String> = std::iter::once(t.s.rig.backend_ns(1).to_string())
        .chain((1..=REMOTE).map(|k| t.s.rig.remote_backend_ns(k).to_string()))
        .collect();
    namespaces
        .into_iter()
        .map(|ns| {
            // A socket belongs to the namespace it was made in.
            let listener = in_netns(&ns, || {
                TcpListener::bind(SocketAddr::new(unspecified(family), 8081))
            })
            .expect("sink listener");
            listener.set_nonblocking(true).unwrap();
            std::thread::spawn(move || {
                // Bounded: serves for at most 60 s.
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            stream.set_nonblocking(false).unwrap();
                            stream
                                .set_read_timeout(Some(Duration::from_secs(10)))
                                .unwrap();
                            let mut total = 0usize;
                            let mut buf = [0u8; 16384];
                            while let Ok(n) = stream.read(&mut buf) {
                                if n == 0 {
                                    break;
                                }
                                total += n;
                            }
                            let _ = stream.write_all(format!("{total}\n").as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        })
        .collect()
}

/// Full-size segments do not fit the interface once encapsulated: the balancer answers with
/// ICMP "fragmentation needed" / "packet too big", the clients lower their path MTU, and every
/// upload arrives whole.
fn uploads_discover_the_path_mtu(family: Family) {
    let t = Tunnel::new("tun-pmtu", Mode::Native, family, 6);
    let _sinks = start_sinks(&t);
    let config = t
        .config(t.source(), "")
        .replace(&format!("port: {PORT}\n"), "port: 8081\n")
        .replace(
            "health_check: {interval: 300ms, timeout: 250ms, rise: 1, fall: 2}",
            "health_check: {type: none}",
        );
    let mut s = t.s;
    s.start(&config);
    let vip = SocketAddr::new(s.rig.vip_in(family), 8081);
    let clients = s.clients();
    let results = spawn_in_netns(s.rig.client_ns().to_string(), move || {
        clients
            .iter()
            .map(|&client| upload(client, vip))
            .collect::<Vec<_>>()
    })
    .join()
    .expect("client thread");
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(n) => assert_eq!(*n, UPLOAD, "client {i}: the backend counted {n} bytes"),
            Err(e) => panic!("client {i}: {e:#}"),
        }
    }
    let status = s.status();
    let counters = &status["counters"];
    let too_big = counters["tx_icmp_too_big"].as_u64().unwrap_or(0);
    eprintln!(
        "{family:?}: 6 uploads of {UPLOAD} bytes arrived whole; ICMP too-big sent: {too_big}"
    );
    assert!(too_big > 0, "the balancer told clients the MTU: {counters}");
    assert_eq!(counters["drop_resize_failed"].as_u64().unwrap_or(0), 0);
    drop(_sinks);
}

/// Sends [`UPLOAD`] bytes from `client` to `vip`, half-closes, and returns the count the
/// backend answers with (bounded: 20 s in all).
fn upload(client: IpAddr, vip: SocketAddr) -> anyhow::Result<usize> {
    use anyhow::Context;
    let mut stream: TcpStream =
        connect_from(client, vip, Duration::from_secs(3)).context("connect")?;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(&vec![0x5a; UPLOAD]).context("upload")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).context("answer")?;
    answer
        .trim()
        .parse()
        .with_context(|| format!("answer {answer:?}"))
}

#[test]
fn tunnel_uploads_discover_the_path_mtu() {
    uploads_discover_the_path_mtu(Family::Ipv4);
}

#[test]
fn tunnel_uploads_discover_the_path_mtu_v6() {
    uploads_discover_the_path_mtu(Family::Ipv6);
}
