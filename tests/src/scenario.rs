//! A rig ready for end-to-end scenarios: name servers on every backend and on the balancer's
//! own address, the guards that clean up after the balancer, and the client-side helpers the
//! scenario tests share.

use crate::{
    balancer::{Balancer, DataPathGuard, PeerXdp, ScratchDir, cli},
    netns::{require_root, unique_tag},
    rig::{Family, HoldServer, NameServer, Rig, RigOptions, fetch_names_many, unspecified},
};
use serde_json::Value;
use std::{
    net::{IpAddr, SocketAddr},
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
    /// The family of the service (its VIP, backend addresses and clients); the rig itself is
    /// dual-stack.
    pub family: Family,
    pub rig: Rig,
}

impl Setup {
    /// An IPv4 scenario.
    pub fn new(test: &str, mode: Mode, backends: usize, clients: usize) -> Setup {
        Setup::new_in(test, mode, Family::Ipv4, backends, clients)
    }

    /// A scenario whose service is of `family`. IPv6 clients each get a /64 of their own (see
    /// [`RigOptions::clients_per_64`]), so the default IPv6 `client_mask` of 64 still tells them
    /// apart, as /32 does for IPv4.
    pub fn new_in(
        test: &str,
        mode: Mode,
        family: Family,
        backends: usize,
        clients: usize,
    ) -> Setup {
        Setup::with_rig(test, mode, family, |o| {
            o.backends(backends).clients(clients)
        })
    }

    /// A scenario whose rig is built from the options `rig` makes of the defaults (e.g.
    /// `|o| o.backends(4).clients(256).clients_per_64(64)`).
    pub fn with_rig(
        test: &str,
        mode: Mode,
        family: Family,
        rig: impl FnOnce(RigOptions) -> RigOptions,
    ) -> Setup {
        require_root();
        let tag = unique_tag(test);
        let opts = rig(RigOptions::new(&tag));
        let backends = opts.backends;
        let rig = Rig::build(opts).expect("building the rig");
        let mut servers = Vec::new();
        for k in 1..=backends {
            servers.push(backend_server_in(&rig, family, k));
        }
        // The balancer's own address must keep answering: XDP passes what is not a service.
        servers.push(
            NameServer::start(
                rig.lb_ns(),
                SocketAddr::new(rig.lb_addr_in(family), 8080),
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
            family,
            rig,
        }
    }

    /// The client addresses of the scenario's family, in rig order.
    pub fn clients(&self) -> Vec<IpAddr> {
        self.rig.client_addrs_in(self.family)
    }

    /// Backend `k`'s address in the scenario's family (as the config and the log name it).
    pub fn backend_addr(&self, k: usize) -> IpAddr {
        self.rig.backend_addr_in(self.family, k)
    }

    /// The balancer's own address in the scenario's family, port 8080 (answered by the kernel,
    /// not the service).
    pub fn lb_own(&self) -> SocketAddr {
        SocketAddr::new(self.rig.lb_addr_in(self.family), 8080)
    }

    /// A name server answering `bK` on backend k's service port, for the scenario's family.
    pub fn backend_server(&self, k: usize) -> NameServer {
        backend_server_in(&self.rig, self.family, k)
    }

    /// The `client_mask` a service of this family gets by default (32 for IPv4, 64 for IPv6).
    pub fn default_client_mask(&self) -> u8 {
        self.family.default_client_mask()
    }

    /// How `table show` names the stick entry of `client` under `client_mask` (see
    /// [`client_key`]).
    pub fn client_key(&self, client: IpAddr, client_mask: u8) -> String {
        client_key(client, client_mask)
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
            self.rig.vip_in(self.family)
        );
        for (k, extra) in backends.iter().enumerate() {
            yaml += &format!(
                "      - name: b{}\n        address: {}\n{extra}",
                k + 1,
                self.backend_addr(k + 1)
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
                    SocketAddr::new(unspecified(self.family), PORT),
                    &format!("b{k}"),
                )
                .expect("holding server")
            })
            .collect()
    }

    /// The service: the VIP of the scenario's family, port [`PORT`].
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.rig.vip_in(self.family), PORT)
    }

    /// One new connection from each client (addresses of the scenario's family); the name each
    /// one got.
    pub fn round<A: Into<IpAddr> + Copy + Sync>(&self, clients: &[A]) -> Vec<String> {
        let requests: Vec<(IpAddr, SocketAddr)> =
            clients.iter().map(|&c| (c.into(), self.vip())).collect();
        fetch_names_many(self.rig.client_ns(), &requests, TIMEOUT)
            .into_iter()
            .zip(&requests)
            .map(|(r, (c, _))| r.unwrap_or_else(|e| panic!("client {c}: {e:#}")))
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
    backend_server_in(rig, Family::Ipv4, k)
}

/// [`backend_server`] for `family` (binding `[::]` for IPv6).
pub fn backend_server_in(rig: &Rig, family: Family, k: usize) -> NameServer {
    NameServer::start(
        rig.backend_ns(k),
        SocketAddr::new(unspecified(family), PORT),
        &format!("b{k}"),
    )
    .expect("backend server")
}

/// How `table show` prints the stick entry of `client` under `client_mask`: the address alone
/// when the mask keeps all of it (32 for IPv4, 128 for IPv6), otherwise the masked prefix,
/// e.g. `198.18.1.0/24` or `2001:db8:1:2::/64`.
pub fn client_key(client: IpAddr, client_mask: u8) -> String {
    match client {
        IpAddr::V4(a) if client_mask >= 32 => a.to_string(),
        IpAddr::V6(a) if client_mask >= 128 => a.to_string(),
        IpAddr::V4(a) => {
            let bits = u32::from(a)
                & u32::MAX
                    .checked_shl(32 - u32::from(client_mask))
                    .unwrap_or(0);
            format!("{}/{client_mask}", std::net::Ipv4Addr::from(bits))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a)
                & u128::MAX
                    .checked_shl(128 - u32::from(client_mask))
                    .unwrap_or(0);
            format!("{}/{client_mask}", std::net::Ipv6Addr::from(bits))
        }
    }
}

/// How many times each backend name occurs.
pub fn count_names(names: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_print_like_table_show() {
        let v4: IpAddr = "198.18.1.7".parse().unwrap();
        let v6: IpAddr = "2001:db8:1:2::7".parse().unwrap();
        assert_eq!(client_key(v4, 32), "198.18.1.7");
        assert_eq!(client_key(v4, 24), "198.18.1.0/24");
        assert_eq!(client_key(v4, 0), "0.0.0.0/0");
        assert_eq!(client_key(v6, 128), "2001:db8:1:2::7");
        assert_eq!(client_key(v6, 64), "2001:db8:1:2::/64");
        assert_eq!(client_key(v6, 0), "::/0");
    }
}
