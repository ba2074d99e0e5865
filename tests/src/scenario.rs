//! A rig ready for end-to-end scenarios: name servers on every backend and on the balancer's
//! own address, the guards that clean up after the balancer, and the client-side helpers the
//! scenario tests share.

use crate::{
    balancer::{Balancer, DataPathGuard, PeerXdp, ScratchDir, cli},
    netns::{require_root, unique_tag},
    rig::{HoldServer, NameServer, Rig, RigOptions, fetch_names_many},
};
use serde_json::Value;
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

/// The service port in every scenario.
pub const PORT: u16 = 80;
/// How long a client waits for a backend's answer.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// XDP attach mode a scenario runs in.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Native,
    Generic,
}

impl Mode {
    pub fn yaml(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
}

/// A rig with a name server on every backend and the balancer's own address, and the guards
/// that clean up after the balancer.
pub struct Setup {
    // Field order is drop order: balancer stops, pins go, servers stop, namespaces go.
    pub balancer: Option<Balancer>,
    peer_xdp: Option<PeerXdp>,
    pub guard: DataPathGuard,
    pub servers: Vec<NameServer>,
    pub scratch: ScratchDir,
    pub mode: Mode,
    pub rig: Rig,
}

impl Setup {
    pub fn new(test: &str, mode: Mode, backends: usize, clients: usize) -> Setup {
        require_root();
        let tag = unique_tag(test);
        let rig = Rig::build(RigOptions::new(&tag).backends(backends).clients(clients))
            .expect("building the rig");
        let mut servers = Vec::new();
        for k in 1..=backends {
            servers.push(backend_server(&rig, k));
        }
        // The balancer's own address must keep answering: XDP passes what is not a service.
        servers.push(
            NameServer::start(
                rig.lb_ns(),
                SocketAddrV4::new(rig.lb_addr(), 8080),
                "balancer",
            )
            .expect("server on the balancer"),
        );
        let peer_xdp = peer_xdp(&rig, mode);
        Setup {
            balancer: None,
            peer_xdp,
            guard: DataPathGuard::new(rig.lb_ns(), rig.lb_dev()),
            servers,
            scratch: ScratchDir::new(&tag),
            mode,
            rig,
        }
    }

    /// Deletes the balancer's interface (the veth pair, with the bridge-side peer's XDP program
    /// in native mode); see [`Rig::delete_lb_dev`].
    pub fn delete_lb_dev(&mut self) {
        self.peer_xdp = None;
        self.rig
            .delete_lb_dev()
            .expect("deleting the balancer's interface");
    }

    /// Creates the balancer's interface again as it was, with the bridge-side peer's XDP
    /// program in native mode; see [`Rig::create_lb_dev`].
    pub fn create_lb_dev(&mut self) {
        self.rig
            .create_lb_dev()
            .expect("creating the balancer's interface again");
        self.peer_xdp = peer_xdp(&self.rig, self.mode);
    }

    /// [`Setup::delete_lb_dev`] then at once [`Setup::create_lb_dev`].
    pub fn recreate_lb_dev(&mut self) {
        self.delete_lb_dev();
        self.create_lb_dev();
    }

    /// A config for service `web` on the VIP with backends b1..=bN. `extra` goes at the top level.
    pub fn config(&self, backends: usize, timeout: &str, extra: &str) -> String {
        let backends: Vec<String> = (1..=backends).map(|_| String::new()).collect();
        self.config_with(
            extra,
            &format!("    stick:\n      timeout: {timeout}\n"),
            &backends,
        )
    }

    /// A config with `top` lines at the top level, `service` lines in the service (indented four
    /// spaces), and backend k+1 getting the lines `backends[k]` (indented eight spaces).
    pub fn config_with(&self, top: &str, service: &str, backends: &[String]) -> String {
        let mut yaml = format!(
            "interface: {}\nxdp_mode: {}\nsweep_interval: 500ms\n{top}services:\n  - name: web\n    vip: {}\n    port: {PORT}\n{service}    backends:\n",
            self.rig.lb_dev(),
            self.mode.yaml(),
            self.rig.vip()
        );
        for (k, extra) in backends.iter().enumerate() {
            yaml += &format!(
                "      - name: b{}\n        address: {}\n{extra}",
                k + 1,
                self.rig.backend_addr(k + 1)
            );
        }
        yaml
    }

    /// Runs a `sticky-lb` command against this rig's balancer; panics unless it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let (code, out, err) = cli(self.rig.lb_ns(), args);
        assert_eq!(code, 0, "sticky-lb {args:?} failed: {err}");
        out
    }

    /// The `status --json` entry of backend `name` of the first service.
    pub fn backend_status(&self, name: &str) -> Value {
        let status = self.status();
        status["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no backend {name} in status"))
    }

    /// Polls until backend `name` reports `state`; returns how long that took, or panics after
    /// `within`.
    pub fn wait_state(&self, name: &str, state: &str, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if self.backend_status(name)["state"] == state {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self
            .balancer
            .as_ref()
            .map(|b| b.log_text())
            .unwrap_or_default();
        panic!("{name} did not become {state} within {within:?}; log:\n{log}");
    }

    pub fn start(&mut self, config: &str) {
        let balancer = Balancer::start(
            self.rig.lb_ns(),
            self.rig.lb_dev(),
            self.scratch.path(),
            config,
        )
        .expect("starting sticky-lb");
        self.balancer = Some(balancer);
    }

    /// Replaces the backends' name servers on the service port with servers that hold each
    /// connection open (for counting connections). The caller keeps them alive.
    pub fn hold_connections(&mut self) -> Vec<HoldServer> {
        let backends = self.rig.backend_count();
        for server in self.servers.drain(..backends) {
            server.stop();
        }
        (1..=backends)
            .map(|k| {
                HoldServer::start(
                    self.rig.backend_ns(k),
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                    &format!("b{k}"),
                )
                .expect("holding server")
            })
            .collect()
    }

    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.rig.vip(), PORT)
    }

    /// One new connection from each client; the name each one got.
    pub fn round(&self, clients: &[Ipv4Addr]) -> Vec<String> {
        let requests: Vec<(Ipv4Addr, SocketAddrV4)> =
            clients.iter().map(|c| (*c, self.vip())).collect();
        fetch_names_many(self.rig.client_ns(), &requests, TIMEOUT)
            .into_iter()
            .zip(clients)
            .map(|(r, c)| r.unwrap_or_else(|e| panic!("client {c}: {e:#}")))
            .collect()
    }

    pub fn table(&self) -> Vec<Value> {
        let (code, out, err) = cli(self.rig.lb_ns(), &["table", "show", "--json"]);
        assert_eq!(code, 0, "table show failed: {err}");
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn status(&self) -> Value {
        let (code, out, err) = cli(self.rig.lb_ns(), &["status", "--json"]);
        assert_eq!(code, 0, "status failed: {err}");
        serde_json::from_str(&out).unwrap()
    }
}

/// Native-mode XDP_TX from the balancer's interface needs an XDP program on its peer.
fn peer_xdp(rig: &Rig, mode: Mode) -> Option<PeerXdp> {
    match mode {
        Mode::Native => {
            let (ns, dev) = rig.bridge_peer_of_lb();
            Some(PeerXdp::attach(ns, dev).expect("xdp_pass on the balancer's bridge port"))
        }
        Mode::Generic => None,
    }
}

/// A name server answering `bK` on backend k's port 80 (also the VIP: it binds 0.0.0.0).
pub fn backend_server(rig: &Rig, k: usize) -> NameServer {
    NameServer::start(
        rig.backend_ns(k),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
        &format!("b{k}"),
    )
    .expect("backend server")
}

/// How many times each backend name occurs.
pub fn count_names(names: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_default() += 1;
    }
    counts
}
