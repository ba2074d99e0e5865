//! A throw-away network of namespaces for end-to-end tests: clients, one
//! balancer and N backends on a shared Linux bridge, plus a tiny TCP "name
//! server" (answers with its own name) and the client side that asks it.
//! Optionally ([`RigOptions::remote_backends`]) a routed part: M more
//! backends in another subnet on a second bridge, behind a router.
//!
//! ```text
//!                         slb-TAG-br: bridge br0
//!          p-cl            p-lb              p-b1   ...   p-bN
//!           |               |                 |            |
//!     eth0 (slb-TAG-cl)  lb0 (slb-TAG-lb)  eth0 (b1) ... eth0 (bN)
//!     198.18.1.1, ...    198.18.0.2         198.18.0.11   198.18.0.(10+N)
//!                        + VIP 198.18.0.100  + VIP on lo (for DSR)
//!     2001:db8:1:P::H    2001:db8::2        2001:db8::11  2001:db8::(10+N)
//!                        + VIP6 2001:db8::100 + VIP6 on lo
//! ```
//!
//! With M remote backends ([`RigOptions::remote_backends`]), a router joins
//! br0 and a second bridge br1 in the same bridge namespace:
//!
//! ```text
//!     br0 -- p-rt0 -- eth0 (slb-TAG-rt) eth1 -- p-rt1 -- br1 -- p-rb1 ... p-rbM
//!                     198.18.0.254      198.19.0.1/24             |         |
//!                     2001:db8::254     2001:db8:ff::1/64    eth0 (rb1) ... eth0 (rbM)
//!                     (forwards IPv4 and IPv6)               198.19.0.11    198.19.0.(10+M)
//!                                                            2001:db8:ff::11 .. ::(10+M)
//!                                                            + VIP, VIP6 on lo (for DSR)
//! ```
//!
//! The rig is dual-stack. IPv4 lives in 198.18.0.0/15 (reserved for
//! benchmarking), IPv6 in 2001:db8::/32 (documentation); an IPv6 backend or
//! VIP address reads like its IPv4 twin (backend 1: 198.18.0.11 and
//! 2001:db8::11). Client IPv6 addresses are `2001:db8:1:P::H`, with
//! [`RigOptions::clients_per_64`] addresses per /64 (see [`client_addr6`]).
//! Every address on br0 is on-link (one /16, one /32), so no gateway is
//! needed there and no route leads out of the rig. IPv6 is kept quiet: no
//! DAD (addresses are added `nodad`, accept_dad=0), no router solicitations
//! or advertisements, no autoconfiguration. VIP6 is added with
//! `preferred_lft 0` (deprecated): it still receives, but the kernel never
//! picks it as the source of the balancer's own connections; it would
//! otherwise, as the longest match for a backend's address, and the health
//! checks' replies would go to the backend's own VIP6 on lo. Everything lives
//! inside namespaces named `slb-TAG-ROLE`, and all namespaces (with their
//! veths) are deleted when the [`Rig`] is dropped, including while a failing
//! test unwinds.
//!
//! The routed part exists only when remote backends are asked for. Its
//! subnet, [`REMOTE_NET`]/24 and [`REMOTE_NET6`]/64, is inside the rig's
//! ranges but off br0's link: 198.19.0.0/24 is outside the /16 altogether,
//! and 2001:db8:ff::/64, although inside the /32 that is on-link on br0,
//! gets a more specific route wherever it is used. The router
//! `slb-TAG-rt` forwards (IPv4 and IPv6, in its namespace only) between br0
//! ([`ROUTER_ADDR`], [`ROUTER_ADDR6`]) and br1 ([`ROUTER_REMOTE_ADDR`],
//! [`ROUTER_REMOTE_ADDR6`]); the rig's /16 and /32 are on-link on its br0
//! side, so it reaches clients, balancer and local backends directly. Remote
//! backends `slb-TAG-rbK` hold the VIPs on `lo` like local ones (same DSR
//! sysctls) and route 198.18.0.0/16 and 2001:db8::/32 via the router. The
//! balancer and the client namespace route the remote subnet via the
//! router's br0 address (so the balancer's route lookup for a remote backend
//! names the router as gateway). There is no default route anywhere.
//! The balancer's frames for a remote backend still leave lb0 into p-lb (to
//! the router's MAC), so p-lb needs nothing new for native XDP_TX. Every
//! veth of the routed part has TX checksum offload off like the others, so
//! a native XDP program on a remote backend's eth0 (a decapsulating one, in
//! tunnel mode) sees full checksums. Every link keeps MTU 1500: an
//! encapsulated full-size frame would not fit, which the rig's short
//! name-server exchanges never come near.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::netns::{self, NetNs, in_netns};
use crate::socket;

/// The address family a test runs in (re-exported for the tests' convenience).
pub use sticky_lb_common::Family;

/// The service address: on the balancer's `lb0` (so clients' ARP resolves it
/// to the balancer) and on every backend's `lo` (so backends accept the
/// packets the balancer forwards unchanged, and answer clients directly).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The balancer's own address on `lb0`.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// All rig addresses on br0 share one /16, so every namespace there reaches
/// every other over the bridge through the connected route alone (no
/// gateways); only the remote backends on br1 are behind the router.
const PREFIX_LEN: u8 = 16;
/// The network of that /16.
const RIG_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// The IPv6 service address, wherever [`VIP`] is: `2001:db8::100`.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
/// The balancer's own IPv6 address on `lb0`: `2001:db8::2`.
pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// All rig IPv6 addresses on br0 share 2001:db8::/32, on-link there like the
/// IPv4 /16 (the remote subnet inside it is routed, see the module
/// documentation).
const PREFIX_LEN6: u8 = 32;
/// The network of that /32.
const RIG_NET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0);
/// Backend k has 198.18.0.(10+k); staying below .100 keeps clear of the VIP.
pub const MAX_BACKENDS: usize = 89;
/// Client addresses 198.18.1.1 onwards, 254 per /24.
pub const MAX_CLIENTS: usize = 1000;

/// The router's address on br0 (its `eth0`): the gateway to the remote subnet.
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The router's IPv6 address on br0: `2001:db8::254`, read like its IPv4 twin.
pub const ROUTER_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x254);
/// The remote backends' subnet on br1, [`REMOTE_NET`]/[`REMOTE_PREFIX_LEN`]:
/// inside 198.18.0.0/15, outside the rig's on-link /16.
pub const REMOTE_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
pub const REMOTE_PREFIX_LEN: u8 = 24;
/// The remote backends' IPv6 subnet, [`REMOTE_NET6`]/[`REMOTE_PREFIX_LEN6`]:
/// inside the rig's /32, routed (more specific) wherever it is used.
pub const REMOTE_NET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0);
pub const REMOTE_PREFIX_LEN6: u8 = 64;
/// The router's address on br1 (its `eth1`): the remote backends' gateway.
pub const ROUTER_REMOTE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The router's IPv6 address on br1: `2001:db8:ff::1`.
pub const ROUTER_REMOTE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
/// Remote backend k has 198.19.0.(10+k) and 2001:db8:ff::(10+k), like
/// local backend k in its own subnet.
pub const MAX_REMOTE_BACKENDS: usize = 89;

/// Bridge device in the bridge namespace.
const BRIDGE_DEV: &str = "br0";
/// The balancer's interface, and its peer on the bridge.
const LB_DEV: &str = "lb0";
const LB_BRIDGE_PORT: &str = "p-lb";
/// Client and backend interface name (each lives in its own namespace).
const HOST_DEV: &str = "eth0";
const CLIENT_BRIDGE_PORT: &str = "p-cl";
/// A NAT backend's routes back to the clients via the balancer (see
/// [`Rig::make_nat_backend`]): every client address of the rig, nothing else.
const NAT_ROUTE_BACK: [&str; 3] = ["198.18.1.0/24", "198.18.2.0/23", "198.18.4.0/24"];
const NAT_ROUTE_BACK6: &str = "2001:db8:1::/48";
/// The second bridge, for the remote backends, in the bridge namespace.
const REMOTE_BRIDGE_DEV: &str = "br1";
/// The router's interfaces on br0 and br1, and their bridge ports.
const ROUTER_DEV: &str = "eth0";
const ROUTER_REMOTE_DEV: &str = "eth1";
const ROUTER_BRIDGE_PORT: &str = "p-rt0";
const ROUTER_REMOTE_BRIDGE_PORT: &str = "p-rt1";

/// What to build. `test_name` only feeds the namespace tag, to tell rigs apart
/// in `ip netns list`.
#[derive(Debug, Clone)]
pub struct RigOptions {
    pub test_name: String,
    /// Number of backend namespaces, 1..=[`MAX_BACKENDS`].
    pub backends: usize,
    /// Number of client addresses in the client namespace, 1..=[`MAX_CLIENTS`]
    /// (that many IPv4 ones and as many IPv6 ones).
    pub clients: usize,
    /// How many IPv6 client addresses share one /64, 1..=[`MAX_CLIENTS`]:
    /// 1 (the default) puts every client in its own /64, so a service's
    /// default IPv6 `client_mask` of 64 still tells every client apart; more
    /// puts that many addresses into each /64 (see [`client_addr6`]).
    pub clients_per_64: usize,
    /// Number of remote backend namespaces behind a router,
    /// 0..=[`MAX_REMOTE_BACKENDS`]; 0 (the default) builds no routed part.
    pub remote_backends: usize,
}

impl RigOptions {
    /// Two backends, one client address.
    pub fn new(test_name: &str) -> RigOptions {
        RigOptions {
            test_name: test_name.to_owned(),
            backends: 2,
            clients: 1,
            clients_per_64: 1,
            remote_backends: 0,
        }
    }

    pub fn backends(mut self, backends: usize) -> RigOptions {
        self.backends = backends;
        self
    }

    pub fn clients(mut self, clients: usize) -> RigOptions {
        self.clients = clients;
        self
    }

    pub fn clients_per_64(mut self, clients_per_64: usize) -> RigOptions {
        self.clients_per_64 = clients_per_64;
        self
    }

    /// Remote backends `slb-TAG-rb1`.. behind the router `slb-TAG-rt` (see
    /// the module documentation); 0 builds no routed part.
    pub fn remote_backends(mut self, remote_backends: usize) -> RigOptions {
        self.remote_backends = remote_backends;
        self
    }
}

impl Default for RigOptions {
    fn default() -> RigOptions {
        RigOptions::new("rig")
    }
}

/// One backend namespace and the facts tests need about it.
#[derive(Debug)]
struct Backend {
    ns: NetNs,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
    mac: [u8; 6],
}

/// The router between br0 and br1 (see the module documentation).
#[derive(Debug)]
struct Router {
    ns: NetNs,
    /// MAC of its br0 side: where the balancer sends frames for remote backends.
    mac: [u8; 6],
}

/// The built topology. Dropping it deletes every namespace it created.
#[derive(Debug)]
pub struct Rig {
    tag: String,
    // Field order is drop order: the leaves first, the bridge they hang on last.
    remote_backends: Vec<Backend>,
    router: Option<Router>,
    backends: Vec<Backend>,
    client: NetNs,
    lb: NetNs,
    bridge: NetNs,
    client_addrs: Vec<Ipv4Addr>,
    client_addrs6: Vec<Ipv6Addr>,
    client_mac: [u8; 6],
    lb_mac: [u8; 6],
}

impl Rig {
    /// Builds the whole topology (root only; panics with a plain message
    /// otherwise). On error everything created so far is deleted again: each
    /// namespace is held by a [`NetNs`] guard from the moment it exists.
    pub fn build(opts: RigOptions) -> anyhow::Result<Rig> {
        netns::require_root();
        if !(1..=MAX_BACKENDS).contains(&opts.backends) {
            bail!("backends must be 1..={MAX_BACKENDS}, not {}", opts.backends);
        }
        if !(1..=MAX_CLIENTS).contains(&opts.clients) {
            bail!("clients must be 1..={MAX_CLIENTS}, not {}", opts.clients);
        }
        if !(1..=MAX_CLIENTS).contains(&opts.clients_per_64) {
            bail!(
                "clients_per_64 must be 1..={MAX_CLIENTS}, not {}",
                opts.clients_per_64
            );
        }
        if opts.remote_backends > MAX_REMOTE_BACKENDS {
            bail!(
                "remote_backends must be 0..={MAX_REMOTE_BACKENDS}, not {}",
                opts.remote_backends
            );
        }
        let tag = netns::unique_tag(&opts.test_name);

        // The bridge itself stays IPv6-free (it only switches frames), and
        // floods multicast instead of snooping MLD: NDP's solicitations then
        // reach every port whether or not a membership report got through.
        let bridge = NetNs::new(ns_name(&tag, "br"))?;
        quiet_namespace(&bridge, false)?;
        bridge.ip_batch(&format!(
            "link add {BRIDGE_DEV} type bridge mcast_snooping 0\nlink set {BRIDGE_DEV} up\n"
        ))?;

        // The IPv6 settings go in before any interface exists, so every
        // interface starts with them (see `quiet_namespace`).
        let lb = NetNs::new(ns_name(&tag, "lb"))?;
        quiet_namespace(&lb, true)?;
        let lb_mac = create_lb_dev(&bridge, &lb, None)?;

        let client = NetNs::new(ns_name(&tag, "cl"))?;
        quiet_namespace(&client, true)?;
        plug_into_bridge(&bridge, BRIDGE_DEV, CLIENT_BRIDGE_PORT, &client, HOST_DEV)?;
        let client_addrs: Vec<Ipv4Addr> = (0..opts.clients).map(client_addr).collect();
        let client_addrs6: Vec<Ipv6Addr> = (0..opts.clients)
            .map(|index| client_addr6(index, opts.clients_per_64))
            .collect();
        let mut script = String::with_capacity(112 * client_addrs.len() + 32);
        for addr in &client_addrs {
            script.push_str(&format!("addr add {addr}/{PREFIX_LEN} dev {HOST_DEV}\n"));
        }
        for addr in &client_addrs6 {
            script.push_str(&format!(
                "addr add {addr}/{PREFIX_LEN6} dev {HOST_DEV} nodad\n"
            ));
        }
        script.push_str(&format!("link set {HOST_DEV} up\n"));
        client.ip_batch(&script)?;
        let client_mac = read_mac(&client, HOST_DEV)?;

        // The balancer's kernel may answer clients too (e.g. a RST when the
        // data path passes a packet up); see `pin_client_neighbours`.
        // Permanent entries go with their interface: `create_lb_dev` pins
        // them again.
        pin_client_neighbours(&lb, LB_DEV, &client_addrs, &client_addrs6, client_mac)?;

        let mut rig = Rig {
            tag,
            remote_backends: Vec::with_capacity(opts.remote_backends),
            router: None,
            backends: Vec::with_capacity(opts.backends),
            client,
            lb,
            bridge,
            client_addrs,
            client_addrs6,
            client_mac,
            lb_mac,
        };
        for _ in 0..opts.backends {
            rig.add_backend()?;
        }
        for _ in 0..opts.remote_backends {
            rig.add_remote_backend()?;
        }
        Ok(rig)
    }

    /// Adds backend namespace `slb-TAG-bK` (K = current count + 1), wired
    /// like the others, and returns K.
    pub fn add_backend(&mut self) -> anyhow::Result<usize> {
        let k = self.backends.len() + 1;
        if k > MAX_BACKENDS {
            bail!("a rig holds at most {MAX_BACKENDS} backends");
        }
        let addr = backend_addr_of(k);
        let addr6 = backend_addr6_of(k);
        let ns = NetNs::new(ns_name(&self.tag, &format!("b{k}")))?;
        quiet_namespace(&ns, true)?;
        plug_into_bridge(&self.bridge, BRIDGE_DEV, &format!("p-b{k}"), &ns, HOST_DEV)?;
        set_up_dsr_backend(
            &ns,
            &format!(
                "addr add {addr}/{PREFIX_LEN} dev {HOST_DEV}\n\
                 addr add {addr6}/{PREFIX_LEN6} dev {HOST_DEV} nodad\n\
                 link set {HOST_DEV} up\n"
            ),
        )?;
        pin_client_neighbours(
            &ns,
            HOST_DEV,
            &self.client_addrs,
            &self.client_addrs6,
            self.client_mac,
        )?;
        let mac = read_mac(&ns, HOST_DEV)?;
        self.backends.push(Backend {
            ns,
            addr,
            addr6,
            mac,
        });
        Ok(k)
    }

    /// Adds remote backend namespace `slb-TAG-rbK` (K = current count of
    /// remote backends + 1) on br1, behind the router (built with the first
    /// one), and returns K. It is set up for direct server return like a
    /// local backend (VIPs on lo, same sysctls) and reaches the rig's /16 and
    /// /32 via the router; its veth is set up like a local backend's, so a
    /// native XDP program on its `eth0` receives frames.
    pub fn add_remote_backend(&mut self) -> anyhow::Result<usize> {
        let k = self.remote_backends.len() + 1;
        if k > MAX_REMOTE_BACKENDS {
            bail!("a rig holds at most {MAX_REMOTE_BACKENDS} remote backends");
        }
        self.ensure_router()?;
        let addr = remote_backend_addr_of(k);
        let addr6 = remote_backend_addr6_of(k);
        let ns = NetNs::new(ns_name(&self.tag, &format!("rb{k}")))?;
        quiet_namespace(&ns, true)?;
        plug_into_bridge(
            &self.bridge,
            REMOTE_BRIDGE_DEV,
            &format!("p-rb{k}"),
            &ns,
            HOST_DEV,
        )?;
        // The connected /64 is more specific than the rig's /32 and wins for
        // the remote subnet itself.
        set_up_dsr_backend(
            &ns,
            &format!(
                "addr add {addr}/{REMOTE_PREFIX_LEN} dev {HOST_DEV}\n\
                 addr add {addr6}/{REMOTE_PREFIX_LEN6} dev {HOST_DEV} nodad\n\
                 link set {HOST_DEV} up\n\
                 route add {RIG_NET}/{PREFIX_LEN} via {ROUTER_REMOTE_ADDR} dev {HOST_DEV}\n\
                 route add {RIG_NET6}/{PREFIX_LEN6} via {ROUTER_REMOTE_ADDR6} dev {HOST_DEV}\n"
            ),
        )?;
        let mac = read_mac(&ns, HOST_DEV)?;
        self.remote_backends.push(Backend {
            ns,
            addr,
            addr6,
            mac,
        });
        Ok(k)
    }

    /// Builds the router `slb-TAG-rt` and bridge br1 unless they exist, and
    /// routes the remote subnet from the balancer and the client namespace
    /// via the router.
    fn ensure_router(&mut self) -> anyhow::Result<()> {
        if self.router.is_some() {
            return Ok(());
        }
        self.bridge.ip_batch(&format!(
            "link add {REMOTE_BRIDGE_DEV} type bridge mcast_snooping 0\n\
             link set {REMOTE_BRIDGE_DEV} up\n"
        ))?;
        let ns = NetNs::new(ns_name(&self.tag, "rt"))?;
        quiet_namespace(&ns, true)?;
        // Forwarding in this namespace only (these sysctls are per
        // namespace). rp_filter off: remote backends answer clients from the
        // VIP, which arrives on eth1 but is routed out of eth0 (a strict
        // reverse-path check would drop it). No redirects: nothing here
        // should learn a path other than the one the rig sets up. `all`
        // IPv6 forwarding also switches off taking RAs, which are off anyway.
        sysctls(
            &ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.forwarding=1",
                "net.ipv4.conf.default.forwarding=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.default.send_redirects=0",
            ],
        )?;
        plug_into_bridge(
            &self.bridge,
            BRIDGE_DEV,
            ROUTER_BRIDGE_PORT,
            &ns,
            ROUTER_DEV,
        )?;
        plug_into_bridge(
            &self.bridge,
            REMOTE_BRIDGE_DEV,
            ROUTER_REMOTE_BRIDGE_PORT,
            &ns,
            ROUTER_REMOTE_DEV,
        )?;
        // The rig's /16 and /32 on the br0 side put every client, the
        // balancer and the local backends on-link; the remote subnet's /24
        // and /64 on the br1 side (the /64 is more specific than the /32).
        ns.ip_batch(&format!(
            "addr add {ROUTER_ADDR}/{PREFIX_LEN} dev {ROUTER_DEV}\n\
             addr add {ROUTER_ADDR6}/{PREFIX_LEN6} dev {ROUTER_DEV} nodad\n\
             addr add {ROUTER_REMOTE_ADDR}/{REMOTE_PREFIX_LEN} dev {ROUTER_REMOTE_DEV}\n\
             addr add {ROUTER_REMOTE_ADDR6}/{REMOTE_PREFIX_LEN6} dev {ROUTER_REMOTE_DEV} nodad\n\
             link set {ROUTER_DEV} up\n\
             link set {ROUTER_REMOTE_DEV} up\n"
        ))?;
        sysctls(
            &ns,
            &[
                &format!("net.ipv4.conf.{ROUTER_DEV}.rp_filter=0"),
                &format!("net.ipv4.conf.{ROUTER_REMOTE_DEV}.rp_filter=0"),
            ],
        )?;
        // The router answers clients for every remote backend: the same
        // shared neighbour table concern as for local backends.
        pin_client_neighbours(
            &ns,
            ROUTER_DEV,
            &self.client_addrs,
            &self.client_addrs6,
            self.client_mac,
        )?;
        let mac = read_mac(&ns, ROUTER_DEV)?;
        self.router = Some(Router { ns, mac });
        route_remote_subnet(&self.lb, LB_DEV)?;
        route_remote_subnet(&self.client, HOST_DEV)?;
        Ok(())
    }

    /// Deletes the balancer's interface `lb0`; deleting one end of a veth
    /// deletes both, so `p-lb` goes too (with any XDP program on it). The
    /// balancer namespace stays; [`Rig::create_lb_dev`] wires it again.
    pub fn delete_lb_dev(&mut self) -> anyhow::Result<()> {
        self.lb.ip(&["link", "del", LB_DEV])?;
        Ok(())
    }

    /// Creates the balancer's interface again after [`Rig::delete_lb_dev`],
    /// the way [`Rig::build`] made it: same name, same MAC (so neighbour
    /// entries for the VIP elsewhere stay right), same addresses, offload
    /// settings, bridge port, pinned client neighbours and (with remote
    /// backends) routes to the remote subnet. The kernel gives it a new
    /// index. An XDP program the bridge-side peer needs (native mode) is the
    /// caller's to attach again.
    pub fn create_lb_dev(&mut self) -> anyhow::Result<()> {
        let mac = create_lb_dev(&self.bridge, &self.lb, Some(self.lb_mac))?;
        if mac != self.lb_mac {
            bail!(
                "{LB_DEV} came back with MAC {}, not {}",
                format_mac(mac),
                format_mac(self.lb_mac)
            );
        }
        pin_client_neighbours(
            &self.lb,
            LB_DEV,
            &self.client_addrs,
            &self.client_addrs6,
            self.client_mac,
        )?;
        // Routes go with their interface too.
        if self.router.is_some() {
            route_remote_subnet(&self.lb, LB_DEV)?;
        }
        Ok(())
    }

    /// [`Rig::delete_lb_dev`] then at once [`Rig::create_lb_dev`].
    pub fn recreate_lb_dev(&mut self) -> anyhow::Result<()> {
        self.delete_lb_dev()?;
        self.create_lb_dev()
    }

    /// The per-rig tag; every namespace name starts with `slb-{tag}-`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Full namespace name for a role: `br`, `lb`, `cl`, `b1`..`bN`, and
    /// with remote backends `rt` and `rb1`..`rbM`. Panics on an unknown role
    /// (a bug in the test).
    pub fn ns(&self, role: &str) -> &str {
        self.netns_of(role).name()
    }

    /// Runs `ip -n NS args...` in the namespace of `role` (as in [`Rig::ns`])
    /// and returns its stdout: for tests that look at (or change) addresses
    /// and neighbours in the rig's own namespaces.
    pub fn ip(&self, role: &str, args: &[&str]) -> anyhow::Result<String> {
        self.netns_of(role).ip(args)
    }

    fn netns_of(&self, role: &str) -> &NetNs {
        /// Backend K of `backends` for a role `{prefix}K`.
        fn numbered<'a>(role: &str, prefix: &str, backends: &'a [Backend]) -> Option<&'a Backend> {
            role.strip_prefix(prefix)
                .and_then(|k| k.parse::<usize>().ok())
                .and_then(|k| k.checked_sub(1))
                .and_then(|index| backends.get(index))
        }
        let found = match role {
            "br" => Some(&self.bridge),
            "lb" => Some(&self.lb),
            "cl" => Some(&self.client),
            "rt" => self.router.as_ref().map(|router| &router.ns),
            _ => numbered(role, "rb", &self.remote_backends)
                .or_else(|| numbered(role, "b", &self.backends))
                .map(|backend| &backend.ns),
        };
        found.unwrap_or_else(|| panic!("rig {} has no namespace role {role:?}", self.tag))
    }

    /// Every namespace this rig owns.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut names = vec![self.bridge.name(), self.lb.name(), self.client.name()];
        names.extend(self.backends.iter().map(|backend| backend.ns.name()));
        names.extend(self.router.iter().map(|router| router.ns.name()));
        names.extend(self.remote_backends.iter().map(|backend| backend.ns.name()));
        names
    }

    pub fn bridge_ns(&self) -> &str {
        self.bridge.name()
    }

    pub fn lb_ns(&self) -> &str {
        self.lb.name()
    }

    pub fn client_ns(&self) -> &str {
        self.client.name()
    }

    /// Namespace of backend `k` (1-based). Panics if there is no such backend.
    pub fn backend_ns(&self, k: usize) -> &str {
        self.backend(k).ns.name()
    }

    /// Address of backend `k` on its `eth0`: 198.18.0.(10+k).
    pub fn backend_addr(&self, k: usize) -> Ipv4Addr {
        self.backend(k).addr
    }

    /// IPv6 address of backend `k` on its `eth0`: 2001:db8::(10+k), the
    /// digits of its IPv4 host part read as hex (backend 1: 2001:db8::11).
    pub fn backend_addr6(&self, k: usize) -> Ipv6Addr {
        self.backend(k).addr6
    }

    /// Address of backend `k` in `family`.
    pub fn backend_addr_in(&self, family: Family, k: usize) -> IpAddr {
        match family {
            Family::Ipv4 => self.backend_addr(k).into(),
            Family::Ipv6 => self.backend_addr6(k).into(),
        }
    }

    /// Makes local backend k a server that knows nothing of the balancer, as NAT forwarding
    /// allows: the VIP leaves its loopback (it is reached at its own address), and with
    /// `route_back` its routes to the clients lead via the balancer, the one change plain NAT
    /// needs (replies must come back through the balancer to be translated). Full NAT needs
    /// none: leave `route_back` false. The routes cover every client address of the rig
    /// (198.18.1.0-198.18.4.255, 2001:db8:1::/48) and nothing outside it.
    pub fn make_nat_backend(&self, k: usize, route_back: bool) -> anyhow::Result<()> {
        let role = format!("b{k}");
        self.ip(&role, &["addr", "del", &format!("{VIP}/32"), "dev", "lo"])?;
        self.ip(
            &role,
            &["-6", "addr", "del", &format!("{VIP6}/128"), "dev", "lo"],
        )?;
        if route_back {
            for prefix in NAT_ROUTE_BACK {
                self.ip(
                    &role,
                    &["route", "add", prefix, "via", &LB_ADDR.to_string()],
                )?;
            }
            self.ip(
                &role,
                &[
                    "-6",
                    "route",
                    "add",
                    NAT_ROUTE_BACK6,
                    "via",
                    &LB_ADDR6.to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// Undoes [`Rig::make_nat_backend`] (called with the same `route_back`): the VIPs back on
    /// backend k's loopback as the rig first put them there, the routes back removed. For a
    /// benchmark that runs DSR and NAT balancers in turn on one rig.
    pub fn restore_dsr_backend(&self, k: usize, route_back: bool) -> anyhow::Result<()> {
        let role = format!("b{k}");
        if route_back {
            for prefix in NAT_ROUTE_BACK {
                self.ip(&role, &["route", "del", prefix])?;
            }
            self.ip(&role, &["-6", "route", "del", NAT_ROUTE_BACK6])?;
        }
        self.ip(&role, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        self.ip(
            &role,
            &[
                "-6",
                "addr",
                "add",
                &format!("{VIP6}/128"),
                "dev",
                "lo",
                "nodad",
                "preferred_lft",
                "0",
            ],
        )?;
        Ok(())
    }

    /// MAC of backend `k`'s `eth0` (what DSR must rewrite the frame to).
    pub fn backend_mac(&self, k: usize) -> [u8; 6] {
        self.backend(k).mac
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The client addresses, all on `eth0` of the client namespace.
    pub fn client_addrs(&self) -> &[Ipv4Addr] {
        &self.client_addrs
    }

    /// The IPv6 client addresses, all on `eth0` of the client namespace, in
    /// the same order as [`Rig::client_addrs`] (see [`client_addr6`]).
    pub fn client_addrs6(&self) -> &[Ipv6Addr] {
        &self.client_addrs6
    }

    /// The client addresses of `family`.
    pub fn client_addrs_in(&self, family: Family) -> Vec<IpAddr> {
        match family {
            Family::Ipv4 => self.client_addrs.iter().map(|&a| a.into()).collect(),
            Family::Ipv6 => self.client_addrs6.iter().map(|&a| a.into()).collect(),
        }
    }

    /// MAC of the client namespace's `eth0`.
    pub fn client_mac(&self) -> [u8; 6] {
        self.client_mac
    }

    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    pub fn lb_addr(&self) -> Ipv4Addr {
        LB_ADDR
    }

    /// [`VIP6`].
    pub fn vip6(&self) -> Ipv6Addr {
        VIP6
    }

    /// [`LB_ADDR6`].
    pub fn lb_addr6(&self) -> Ipv6Addr {
        LB_ADDR6
    }

    /// The VIP of `family`.
    pub fn vip_in(&self, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => VIP.into(),
            Family::Ipv6 => VIP6.into(),
        }
    }

    /// The balancer's own address in `family`.
    pub fn lb_addr_in(&self, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => LB_ADDR.into(),
            Family::Ipv6 => LB_ADDR6.into(),
        }
    }

    /// The balancer's interface in [`Rig::lb_ns`] (where XDP attaches).
    pub fn lb_dev(&self) -> &str {
        LB_DEV
    }

    /// MAC of the balancer's `lb0`.
    pub fn lb_mac(&self) -> [u8; 6] {
        self.lb_mac
    }

    /// The bridge-side end of the balancer's veth: (bridge namespace, "p-lb").
    pub fn bridge_peer_of_lb(&self) -> (&str, &str) {
        (self.bridge.name(), LB_BRIDGE_PORT)
    }

    /// Namespace of remote backend `k` (1-based), behind the router: start
    /// servers there as on a local backend. Panics if there is no such
    /// remote backend.
    pub fn remote_backend_ns(&self, k: usize) -> &str {
        self.remote_backend(k).ns.name()
    }

    /// Address of remote backend `k` on its `eth0`: 198.19.0.(10+k).
    pub fn remote_backend_addr(&self, k: usize) -> Ipv4Addr {
        self.remote_backend(k).addr
    }

    /// IPv6 address of remote backend `k` on its `eth0`:
    /// 2001:db8:ff::(10+k), read like the IPv4 one (remote backend 1:
    /// 2001:db8:ff::11).
    pub fn remote_backend_addr6(&self, k: usize) -> Ipv6Addr {
        self.remote_backend(k).addr6
    }

    /// Address of remote backend `k` in `family`.
    pub fn remote_backend_addr_in(&self, family: Family, k: usize) -> IpAddr {
        match family {
            Family::Ipv4 => self.remote_backend_addr(k).into(),
            Family::Ipv6 => self.remote_backend_addr6(k).into(),
        }
    }

    /// MAC of remote backend `k`'s `eth0` (on br1, behind the router).
    pub fn remote_backend_mac(&self, k: usize) -> [u8; 6] {
        self.remote_backend(k).mac
    }

    /// Number of remote backends (0 without a routed part).
    pub fn remote_backend_count(&self) -> usize {
        self.remote_backends.len()
    }

    /// Namespace of the router. Panics if the rig has no remote backends.
    pub fn router_ns(&self) -> &str {
        self.router().ns.name()
    }

    /// The router's address on br0 in `family` ([`ROUTER_ADDR`],
    /// [`ROUTER_ADDR6`]): the gateway the balancer uses for remote backends.
    pub fn router_addr_in(&self, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => ROUTER_ADDR.into(),
            Family::Ipv6 => ROUTER_ADDR6.into(),
        }
    }

    /// The router's address on br1 in `family` ([`ROUTER_REMOTE_ADDR`],
    /// [`ROUTER_REMOTE_ADDR6`]): the remote backends' gateway.
    pub fn router_remote_addr_in(&self, family: Family) -> IpAddr {
        match family {
            Family::Ipv4 => ROUTER_REMOTE_ADDR.into(),
            Family::Ipv6 => ROUTER_REMOTE_ADDR6.into(),
        }
    }

    /// MAC of the router's br0 side: the destination of the balancer's frames
    /// for remote backends. Panics if the rig has no remote backends.
    pub fn router_mac(&self) -> [u8; 6] {
        self.router().mac
    }

    /// The remote subnet of `family` as `(network, prefix length)`:
    /// 198.19.0.0/24 or 2001:db8:ff::/64.
    pub fn remote_net_in(&self, family: Family) -> (IpAddr, u8) {
        match family {
            Family::Ipv4 => (REMOTE_NET.into(), REMOTE_PREFIX_LEN),
            Family::Ipv6 => (REMOTE_NET6.into(), REMOTE_PREFIX_LEN6),
        }
    }

    fn router(&self) -> &Router {
        self.router
            .as_ref()
            .unwrap_or_else(|| panic!("rig {} has no router (no remote backends)", self.tag))
    }

    fn remote_backend(&self, k: usize) -> &Backend {
        k.checked_sub(1)
            .and_then(|index| self.remote_backends.get(index))
            .unwrap_or_else(|| {
                panic!(
                    "rig {} has remote backends 1..={}, not {k}",
                    self.tag,
                    self.remote_backends.len()
                )
            })
    }

    fn backend(&self, k: usize) -> &Backend {
        k.checked_sub(1)
            .and_then(|index| self.backends.get(index))
            .unwrap_or_else(|| {
                panic!(
                    "rig {} has backends 1..={}, not {k}",
                    self.tag,
                    self.backends.len()
                )
            })
    }
}

pub(crate) fn ns_name(tag: &str, role: &str) -> String {
    format!("{}{tag}-{role}", netns::NS_PREFIX)
}

pub(crate) fn backend_addr_of(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + k as u8)
}

/// IPv6 address of backend `k`: 2001:db8::(10+k) with the decimal digits of
/// 10+k as hex digits, so it reads like the IPv4 one (k <= 89).
fn backend_addr6_of(k: usize) -> Ipv6Addr {
    let n = 10 + k as u16;
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, (n / 10) * 16 + n % 10)
}

fn remote_backend_addr_of(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + k as u8)
}

/// IPv6 address of remote backend `k`: 2001:db8:ff::(10+k), written like
/// [`backend_addr6_of`] (k <= 89).
fn remote_backend_addr6_of(k: usize) -> Ipv6Addr {
    let n = 10 + k as u16;
    Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, (n / 10) * 16 + n % 10)
}

/// The unspecified address of `family` (`0.0.0.0` or `::`), e.g. for a
/// server that must also answer on the VIP held on `lo`.
pub fn unspecified(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => Ipv4Addr::UNSPECIFIED.into(),
        Family::Ipv6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// IPv6 client address number `index` (from 0) with `per_64` addresses in
/// each /64: `2001:db8:1:P::H` with P = 1 + index / per_64 and
/// H = 1 + index % per_64 (both written in hex). With `per_64` = 1 every
/// client has its own /64 (2001:db8:1:1::1, 2001:db8:1:2::1, ...); with 64,
/// clients 0..64 are 2001:db8:1:1::1 ..= 2001:db8:1:1::40, and so on.
pub fn client_addr6(index: usize, per_64: usize) -> Ipv6Addr {
    let per_64 = per_64.max(1);
    let (net, host) = (1 + index / per_64, 1 + index % per_64);
    Ipv6Addr::new(0x2001, 0xdb8, 1, net as u16, 0, 0, 0, host as u16)
}

/// Client address number `index` (from 0): 198.18.1.1 ..= 198.18.1.254, then
/// 198.18.2.1 and so on, never a .0 or .255 host part.
fn client_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + (index / 254) as u8, 1 + (index % 254) as u8)
}

/// The balancer's interface `lb0` in `lb` on the bridge (port `p-lb`),
/// with `mac` if given (a kernel-chosen one otherwise) from the moment it
/// exists, its addresses, up; returns its MAC. Client neighbours are pinned
/// separately (the clients may not exist yet).
fn create_lb_dev(bridge: &NetNs, lb: &NetNs, mac: Option<[u8; 6]>) -> anyhow::Result<[u8; 6]> {
    plug_into_bridge_with_mac(bridge, BRIDGE_DEV, LB_BRIDGE_PORT, lb, LB_DEV, mac)?;
    lb.ip_batch(&format!(
        "addr add {LB_ADDR}/{PREFIX_LEN} dev {LB_DEV}\n\
         addr add {VIP}/32 dev {LB_DEV}\n\
         addr add {LB_ADDR6}/{PREFIX_LEN6} dev {LB_DEV} nodad\n\
         addr add {VIP6}/128 dev {LB_DEV} nodad preferred_lft 0\n\
         link set {LB_DEV} up\n"
    ))?;
    // A veth drops frames sent to it by XDP_TX/XDP_REDIRECT unless its
    // NAPI is running, i.e. unless it has an XDP program or GRO enabled.
    // The balancer XDP_TXes from lb0 into p-lb, so p-lb needs GRO.
    bridge.exec(&["ethtool", "-K", LB_BRIDGE_PORT, "gro", "on"])?;
    read_mac(lb, LB_DEV)
}

/// Creates veth `bridge_port` in the bridge namespace with its peer
/// `inner_dev` directly inside `ns`, enslaves the bridge end to
/// `bridge_dev` (br0 or br1) and brings it up, and turns TX checksum offload
/// off on both ends.
pub(crate) fn plug_into_bridge(
    bridge: &NetNs,
    bridge_dev: &str,
    bridge_port: &str,
    ns: &NetNs,
    inner_dev: &str,
) -> anyhow::Result<()> {
    plug_into_bridge_with_mac(bridge, bridge_dev, bridge_port, ns, inner_dev, None)
}

/// [`plug_into_bridge`], with `inner_mac` on `inner_dev` from its creation
/// if given (so nobody in `ns` ever sees it with another MAC).
fn plug_into_bridge_with_mac(
    bridge: &NetNs,
    bridge_dev: &str,
    bridge_port: &str,
    ns: &NetNs,
    inner_dev: &str,
    inner_mac: Option<[u8; 6]>,
) -> anyhow::Result<()> {
    let address = inner_mac
        .map(|mac| format!(" address {}", format_mac(mac)))
        .unwrap_or_default();
    bridge.ip_batch(&format!(
        "link add {bridge_port} type veth peer name {inner_dev} netns {}{address}\n\
         link set {bridge_port} master {bridge_dev}\n\
         link set {bridge_port} up\n",
        ns.name()
    ))?;
    // With TX checksum offload a veth hands packets on with only a partial
    // TCP checksum. Native XDP on the receiving veth turns them into plain
    // frames, so after XDP_TX the backend would see bad checksums and drop.
    bridge.exec(&["ethtool", "-K", bridge_port, "tx", "off"])?;
    ns.exec(&["ethtool", "-K", inner_dev, "tx", "off"])?;
    Ok(())
}

/// Sets up `ns` (with its `eth0` plugged in) as a direct-server-return
/// backend: the VIPs on `lo` and the sysctls that go with them, then runs
/// `script` (`ip -batch` lines: its own addresses, routes, link up).
pub(crate) fn set_up_dsr_backend(ns: &NetNs, script: &str) -> anyhow::Result<()> {
    // Direct server return: the VIP sits on lo, so the backend accepts
    // forwarded packets but never claims the VIP in ARP (arp_ignore=1:
    // answer only for addresses on the asking interface; arp_announce=2:
    // never use the VIP as ARP source). Replies leave eth0 with source
    // VIP, which rp_filter would treat as spoofed/asymmetric.
    // IPv6 needs no such setting: the kernel answers a neighbour
    // solicitation only for an address on the interface it came in on,
    // so VIP6 on lo is never claimed on eth0 (the rig selftest checks
    // this), and IPv6 has no reverse-path filter of its own.
    sysctls(
        ns,
        &[
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.default.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
            "net.ipv4.conf.default.arp_announce=2",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.lo.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
        ],
    )?;
    ns.ip_batch(&format!(
        "addr add {VIP}/32 dev lo\n\
         addr add {VIP6}/128 dev lo nodad preferred_lft 0\n\
         {script}"
    ))?;
    Ok(())
}

/// Routes the remote subnet (both families) in `ns` via the router's br0
/// address, out of `dev` (on br0). For IPv6 this route is more specific
/// than the on-link /32, which would otherwise send NDP for remote backends
/// into br0 where nobody answers.
fn route_remote_subnet(ns: &NetNs, dev: &str) -> anyhow::Result<()> {
    ns.ip_batch(&format!(
        "route replace {REMOTE_NET}/{REMOTE_PREFIX_LEN} via {ROUTER_ADDR} dev {dev}\n\
         route replace {REMOTE_NET6}/{REMOTE_PREFIX_LEN6} via {ROUTER_ADDR6} dev {dev}\n"
    ))?;
    Ok(())
}

/// Brings `lo` up and settles IPv6 in `ns`. Without `ipv6` it is disabled
/// (the bridge namespace: no router solicitations, DAD or MLD noise from
/// it); with it, it is on but quiet: no duplicate address detection (nothing
/// is ever tentative, link-local addresses included), no router
/// advertisements taken, no autoconfiguration and no router solicitations
/// sent. `default.*` is what every interface created later in `ns` starts
/// with, so call this before creating any; `lo` exists from the start but is
/// exempt from DAD and router solicitations anyway. (MLD reports for the
/// solicited-node groups remain: a few frames when an interface comes up.)
pub(crate) fn quiet_namespace(ns: &NetNs, ipv6: bool) -> anyhow::Result<()> {
    ns.ip(&["link", "set", "lo", "up"])?;
    let mut settings: Vec<String> = Vec::new();
    for scope in ["all", "default"] {
        if ipv6 {
            for setting in [
                "disable_ipv6=0",
                "accept_dad=0",
                "dad_transmits=0",
                "accept_ra=0",
                "autoconf=0",
                "router_solicitations=0",
            ] {
                settings.push(format!("net.ipv6.conf.{scope}.{setting}"));
            }
        } else {
            settings.push(format!("net.ipv6.conf.{scope}.disable_ipv6=1"));
        }
    }
    sysctls(ns, &settings.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Sets sysctls (`key=value`) in `ns`. Keys the kernel does not have (e.g.
/// IPv6 ones on a kernel without IPv6) are skipped.
pub(crate) fn sysctls(ns: &NetNs, settings: &[&str]) -> anyhow::Result<()> {
    let mut args = vec!["sysctl", "-q", "-e", "-w"];
    args.extend_from_slice(settings);
    ns.exec(&args)?;
    Ok(())
}

/// Installs permanent neighbour entries for every client address (IPv4 and
/// IPv6) in `ns`.
///
/// The kernel's ARP and NDP tables and their gc thresholds (gc_thresh3 = 1024
/// by default) are shared by all namespaces: a backend answering 1000 clients
/// would learn 1000 dynamic entries and, with a second backend, overflow the
/// table and drop replies. Permanent entries are exempt from that count.
pub(crate) fn pin_client_neighbours(
    ns: &NetNs,
    dev: &str,
    client_addrs: &[Ipv4Addr],
    client_addrs6: &[Ipv6Addr],
    client_mac: [u8; 6],
) -> anyhow::Result<()> {
    let mac = format_mac(client_mac);
    let mut script = String::with_capacity(80 * (client_addrs.len() + client_addrs6.len()));
    let all = client_addrs
        .iter()
        .map(|&a| IpAddr::from(a))
        .chain(client_addrs6.iter().map(|&a| IpAddr::from(a)));
    for addr in all {
        script.push_str(&format!(
            "neigh replace {addr} lladdr {mac} dev {dev} nud permanent\n"
        ));
    }
    ns.ip_batch(&script)?;
    Ok(())
}

/// Reads the MAC of `dev` in `ns` from `ip -j link show`.
pub(crate) fn read_mac(ns: &NetNs, dev: &str) -> anyhow::Result<[u8; 6]> {
    let json = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let links: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("parsing `ip -j link show {dev}` in {}", ns.name()))?;
    let text = links[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("no address for {dev} in {}: {json}", ns.name()))?;
    parse_mac(text)
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts
            .next()
            .ok_or_else(|| anyhow!("short MAC address {text:?}"))?;
        *byte =
            u8::from_str_radix(part, 16).with_context(|| format!("bad MAC address {text:?}"))?;
    }
    if parts.next().is_some() {
        bail!("long MAC address {text:?}");
    }
    Ok(mac)
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------
// Name server and client
// ---------------------------------------------------------------------------

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Safety net: a server nobody stops (leaked by a test) ends by itself.
const SERVER_MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// How long `start` waits for the server thread to report its bind.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(5);
/// A name longer than this is not an answer from our server.
const MAX_ANSWER_LEN: u64 = 4096;

/// The methods every server handle ([`NameServer`], [`HoldServer`],
/// [`HttpServer`]) shares, for an `impl` block of a struct that keeps its
/// [`ServerThread`] in a field `server`; `named` adds those of the servers
/// that answer with a `name` field. A macro rather than a trait, so they stay
/// inherent methods that callers use without importing anything.
macro_rules! server_handle_methods {
    () => {
        /// The address it listens on (the actual port if `bind` had port 0).
        pub fn addr(&self) -> SocketAddr {
            self.server.addr
        }

        /// Stops the server, closing every connection it still holds open,
        /// and waits for its thread (Drop does the same).
        pub fn stop(mut self) {
            self.server.shutdown();
        }
    };
    (named) => {
        server_handle_methods!();

        /// The name it answers with.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// Connections accepted so far.
        pub fn accepted(&self) -> u64 {
            self.server.accepted()
        }
    };
}

/// A TCP server inside a namespace that answers every connection with its
/// name and a newline, then closes. Tells tests which backend they reached.
#[derive(Debug)]
pub struct NameServer {
    name: String,
    server: ServerThread,
}

impl NameServer {
    /// Starts the server on its own thread in namespace `ns`, listening on
    /// `bind`. Returns once the socket is listening, or with the bind error.
    ///
    /// For direct server return bind `0.0.0.0:PORT` (`[::]:PORT` for IPv6,
    /// see [`unspecified`]): that also covers the VIP held on the backend's
    /// `lo`.
    pub fn start(ns: &str, bind: impl Into<SocketAddr>, name: &str) -> anyhow::Result<NameServer> {
        let bind = bind.into();
        let answer = format!("{name}\n");
        let server =
            ServerThread::start(ns, bind, &format!("name server {name:?}"), move |stream| {
                // A few bytes into an empty send buffer never block, so answering
                // inline keeps the server single-threaded; the timeout is only a
                // guard. Errors (client gone) are ignored.
                let _ = answer_connection(&stream, &answer);
                None
            })?;
        Ok(NameServer {
            name: name.to_owned(),
            server,
        })
    }

    server_handle_methods!(named);
}

/// Enters `ns` on this (dedicated) thread and binds a nonblocking listener.
/// std sets SO_REUSEADDR on listeners, so restarting on a port with
/// connections in TIME_WAIT works.
fn listen_in(ns: &str, bind: SocketAddr) -> anyhow::Result<TcpListener> {
    netns::enter_netns(ns)?;
    let listener = TcpListener::bind(bind).with_context(|| format!("bind {bind}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Writes `answer` and sends FIN right after it (the client reads to EOF);
/// the caller closes the socket by dropping it.
fn answer_connection(stream: &TcpStream, answer: &str) -> std::io::Result<()> {
    send_small(stream, answer.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Writes a few bytes on a blocking socket, with [`SERVER_WRITE_TIMEOUT`]
/// as a guard (a fresh connection's empty send buffer takes them at once).
fn send_small(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(SERVER_WRITE_TIMEOUT))?;
    let mut writer = stream;
    writer.write_all(bytes)
}

/// Connects from `src` (an address in namespace `ns`) to `dst` and returns
/// the trimmed answer, all within `timeout`. Runs on the calling thread,
/// which is moved into `ns` for the duration.
/// `src` and `dst` are of one family, IPv4 or IPv6.
pub fn fetch_name(
    ns: &str,
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let (src, dst) = (src.into(), dst.into());
    in_netns(ns, || fetch_name_here(src, dst, timeout))
}

/// Runs many requests `(src, dst)` sequentially from namespace `ns`, entering
/// it once on a dedicated thread (much cheaper than a setns per request).
/// Each request gets its own `timeout`; results are in request order.
/// Requests are `(source, target)` of one family each, e.g.
/// `(Ipv4Addr, SocketAddrV4)` or `(IpAddr, SocketAddr)`.
pub fn fetch_names_many<S, D>(
    ns: &str,
    requests: &[(S, D)],
    timeout: Duration,
) -> Vec<anyhow::Result<String>>
where
    S: Into<IpAddr> + Copy + Sync,
    D: Into<SocketAddr> + Copy + Sync,
{
    for_each_in_netns(ns, requests, |&(src, dst)| {
        fetch_name_here(src.into(), dst.into(), timeout)
    })
}

/// [`fetch_names_many`] with a fixed source port for each request: requests
/// are `(source address and port, target)`. The socket is bound with
/// SO_REUSEADDR, so a port whose last connection has just ended can be taken
/// again: the same connection 4-tuple, e.g. to show that a router keeps
/// sending one flow the same way. (A port still held by an open connection to
/// the same target fails with EADDRNOTAVAIL.)
pub fn fetch_names_many_from_ports<S, D>(
    ns: &str,
    requests: &[(S, D)],
    timeout: Duration,
) -> Vec<anyhow::Result<String>>
where
    S: Into<SocketAddr> + Copy + Sync,
    D: Into<SocketAddr> + Copy + Sync,
{
    for_each_in_netns(ns, requests, |&(src, dst)| {
        let (src, dst) = (src.into(), dst.into());
        let deadline = Instant::now() + timeout;
        let stream = socket::connect_from_port(src, dst, timeout)
            .with_context(|| format!("connect {src} -> {dst}"))?;
        stream.set_write_timeout(None)?;
        read_answer(stream, deadline).with_context(|| format!("read answer {src} -> {dst}"))
    })
}

/// Runs `one(request)` for every request, sequentially and in order, on a
/// helper thread that enters `ns` once (much cheaper than a setns each).
/// If the namespace cannot be entered, every request gets that error.
fn for_each_in_netns<T: Send, R: Sync>(
    ns: &str,
    requests: &[R],
    one: impl Fn(&R) -> anyhow::Result<T> + Sync,
) -> Vec<anyhow::Result<T>> {
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<Vec<anyhow::Result<T>>> {
                // This thread ends with the scope, so it never needs to leave.
                netns::enter_netns(ns)?;
                Ok(requests.iter().map(&one).collect())
            })
            .join()
    });
    match outcome {
        Ok(Ok(results)) => results,
        Ok(Err(err)) => {
            let message = format!("{err:#}");
            requests.iter().map(|_| Err(anyhow!("{message}"))).collect()
        }
        Err(_) => requests
            .iter()
            .map(|_| Err(anyhow!("request thread in {ns} panicked")))
            .collect(),
    }
}

/// The client side, in whatever namespace the calling thread is in.
fn fetch_name_here(src: IpAddr, dst: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let stream =
        connect_from(src, dst, deadline).with_context(|| format!("connect {src} -> {dst}"))?;
    read_answer(stream, deadline).with_context(|| format!("read answer {src} -> {dst}"))
}

/// TCP connect with a chosen source address, done by `deadline`. The stream
/// comes back blocking and without timeouts.
fn connect_from(src: IpAddr, dst: SocketAddr, deadline: Instant) -> anyhow::Result<TcpStream> {
    let left = deadline.saturating_duration_since(Instant::now());
    let stream = socket::connect_from(src, dst, left)?;
    // The connect's bound stays on as a write timeout; drop it: readers here
    // set their own deadline per read, and held connections are handed over
    // like fresh ones, without any.
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Reads to EOF (at most [`MAX_ANSWER_LEN`] bytes) before the deadline.
fn read_answer(stream: TcpStream, deadline: Instant) -> anyhow::Result<String> {
    let (answer, _eof) = read_until(&stream, deadline, |_| false)?;
    let text = String::from_utf8(answer).context("answer is not UTF-8")?;
    Ok(text.trim().to_owned())
}

/// Reads until `done(bytes so far)`, EOF or [`MAX_ANSWER_LEN`] bytes,
/// whichever comes first; running into the deadline is an error. Returns the
/// bytes and whether EOF was seen.
fn read_until(
    stream: &TcpStream,
    deadline: Instant,
    done: impl Fn(&[u8]) -> bool,
) -> anyhow::Result<(Vec<u8>, bool)> {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    let mut reader = stream;
    // Bounded by the deadline (each read waits at most the time left) and
    // by MAX_ANSWER_LEN bytes.
    while answer.len() < MAX_ANSWER_LEN as usize && !done(&answer) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out after {} bytes", answer.len());
        }
        stream.set_read_timeout(Some(left))?;
        let room = (MAX_ANSWER_LEN as usize - answer.len()).min(chunk.len());
        match reader.read(&mut chunk[..room]) {
            Ok(0) => return Ok((answer, true)),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("timed out after {} bytes", answer.len())
            }
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok((answer, false))
}

// ---------------------------------------------------------------------------
// Server core shared by NameServer, HoldServer and HttpServer
// ---------------------------------------------------------------------------

/// Guard for the few bytes a server writes into a fresh connection.
const SERVER_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per server, connections beyond this many open ones are closed right after
/// accept, so a runaway test cannot use up every descriptor of the process.
const MAX_OPEN_CONNECTIONS: usize = 10_000;
/// Connections accepted per loop round before the open ones get their turn,
/// so a burst of connects cannot starve them.
const ACCEPT_BATCH: usize = 64;

/// The stop flag and the counters, shared by a server handle and its thread.
#[derive(Debug, Default)]
struct ServerState {
    stop: AtomicBool,
    accepted: AtomicU64,
    /// Connections the loop currently keeps open.
    open: AtomicUsize,
}

/// A listener in a namespace served by one thread (see [`serve`]). Dropping
/// it stops the thread and joins it, which closes every connection it holds.
#[derive(Debug)]
struct ServerThread {
    state: Arc<ServerState>,
    /// The bound address (the actual port if the bind asked for port 0).
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Starts the thread in namespace `ns`, listening on `bind`, and returns
    /// once the socket is listening, or with the bind error. `on_accept` gets
    /// every accepted connection and returns it if the loop should keep it
    /// open; `what` names the server in errors and the thread name.
    fn start(
        ns: &str,
        bind: SocketAddr,
        what: &str,
        mut on_accept: impl FnMut(TcpStream) -> Option<OpenConn> + Send + 'static,
    ) -> anyhow::Result<ServerThread> {
        let state = Arc::new(ServerState::default());
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<SocketAddr>>();
        let thread = {
            let (ns, state) = (ns.to_owned(), state.clone());
            std::thread::Builder::new()
                .name(what.to_owned())
                .spawn(move || {
                    let listener = match listen_in(&ns, bind) {
                        Ok(listener) => listener,
                        Err(err) => {
                            let _ = ready_tx.send(Err(err));
                            return;
                        }
                    };
                    let local = listener.local_addr().unwrap_or(bind);
                    let _ = ready_tx.send(Ok(local));
                    serve(&listener, &state, &mut on_accept);
                })
                .with_context(|| format!("spawning the {what} thread"))?
        };
        let mut server = ServerThread {
            state,
            addr: bind,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(SERVER_START_TIMEOUT) {
            Ok(Ok(local)) => {
                server.addr = local;
                Ok(server)
            }
            // Dropping `server` stops and joins the thread (already ended here).
            Ok(Err(err)) => Err(err.context(format!("{what} on {bind} in {ns}"))),
            Err(_) => {
                bail!("{what} on {bind} in {ns} did not start within {SERVER_START_TIMEOUT:?}")
            }
        }
    }

    fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::Relaxed)
    }

    fn shutdown(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The loop notices the flag within one poll interval.
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A connection the server loop keeps open after accepting it.
#[derive(Debug)]
struct OpenConn {
    /// Nonblocking, so a spurious wake-up can never stall the loop.
    stream: TcpStream,
    state: ConnState,
}

#[derive(Debug)]
enum ConnState {
    /// Open until the peer closes (or fails) or the server stops; whatever
    /// the peer sends is read and dropped.
    Held,
    /// Collecting an HTTP request head. `reply` goes out, followed by a close,
    /// once the head is complete, [`HTTP_HEAD_LIMIT`] bytes long, ended by
    /// the peer's FIN, or `deadline` passes.
    AwaitingHead {
        head: Vec<u8>,
        deadline: Instant,
        reply: String,
    },
}

/// How one read of a request head went.
enum HeadRead {
    More,
    Complete,
    Failed,
}

impl OpenConn {
    fn held(stream: TcpStream) -> Option<OpenConn> {
        stream.set_nonblocking(true).ok()?;
        Some(OpenConn {
            stream,
            state: ConnState::Held,
        })
    }

    fn awaiting_head(stream: TcpStream, reply: String) -> Option<OpenConn> {
        stream.set_nonblocking(true).ok()?;
        Some(OpenConn {
            stream,
            state: ConnState::AwaitingHead {
                head: Vec::new(),
                deadline: Instant::now() + HTTP_HEAD_TIMEOUT,
                reply,
            },
        })
    }

    /// Moves the connection on after a poll round; `ready` means poll saw
    /// input, EOF or an error on it. Returns false once it is finished (the
    /// caller then closes it by dropping it).
    fn advance(&mut self, ready: bool, now: Instant) -> bool {
        match &mut self.state {
            ConnState::Held => !ready || discard_input(&self.stream),
            ConnState::AwaitingHead {
                head,
                deadline,
                reply,
            } => {
                let complete = if ready {
                    match read_head(&self.stream, head) {
                        HeadRead::More => false,
                        HeadRead::Complete => true,
                        // Reset by the peer: nobody left to answer.
                        HeadRead::Failed => return false,
                    }
                } else {
                    false
                };
                if complete || now >= *deadline {
                    // Errors mean the client is gone; nothing to do then.
                    let _ = answer_connection(&self.stream, reply);
                    return false;
                }
                true
            }
        }
    }
}

/// One read of whatever the peer of a held connection sent. False once the
/// peer has closed (EOF) or the connection failed.
fn discard_input(stream: &TcpStream) -> bool {
    let mut scratch = [0u8; 1024];
    let mut reader = stream;
    match reader.read(&mut scratch) {
        Ok(0) => false,
        Ok(_) => true,
        Err(err) => matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    }
}

/// One read of an HTTP request head into `head`, never past
/// [`HTTP_HEAD_LIMIT`] bytes in total.
fn read_head(stream: &TcpStream, head: &mut Vec<u8>) -> HeadRead {
    let mut chunk = [0u8; 1024];
    let room = HTTP_HEAD_LIMIT.saturating_sub(head.len()).min(chunk.len());
    let mut reader = stream;
    match reader.read(&mut chunk[..room]) {
        // The peer half-closed: answer whatever it sent.
        Ok(0) => HeadRead::Complete,
        Ok(n) => {
            head.extend_from_slice(&chunk[..n]);
            if head.len() >= HTTP_HEAD_LIMIT || head.windows(4).any(|w| w == b"\r\n\r\n") {
                HeadRead::Complete
            } else {
                HeadRead::More
            }
        }
        Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
            HeadRead::More
        }
        Err(_) => HeadRead::Failed,
    }
}

/// The server loop: one poll over the listener and every open connection, so
/// hundreds of held connections cost no threads. Wakes at least every
/// [`ACCEPT_POLL`] to check the stop flag and deadlines; bounded by
/// [`SERVER_MAX_LIFETIME`]. Open connections are closed when it returns.
fn serve(
    listener: &TcpListener,
    state: &ServerState,
    on_accept: &mut impl FnMut(TcpStream) -> Option<OpenConn>,
) {
    let started = Instant::now();
    let mut conns: Vec<OpenConn> = Vec::new();
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    while !state.stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_MAX_LIFETIME {
        pollfds.clear();
        pollfds.push(poll_input(listener.as_raw_fd()));
        pollfds.extend(conns.iter().map(|conn| poll_input(conn.stream.as_raw_fd())));
        // SAFETY: `pollfds` is an array of `len` valid pollfds whose
        // descriptors (listener, conns) stay open for the whole call.
        let rc = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                ACCEPT_POLL.as_millis() as libc::c_int,
            )
        };
        if rc < 0 {
            // EINTR: just go round again. Anything else would fail again at
            // once, so back off instead of spinning.
            if std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                std::thread::sleep(ACCEPT_POLL);
            }
            continue;
        }
        // Connections first: `pollfds[1..]` lines up with `conns` only
        // until new ones are accepted.
        let now = Instant::now();
        let mut ready = pollfds[1..].iter().map(|pollfd| pollfd.revents != 0);
        conns.retain_mut(|conn| conn.advance(ready.next().unwrap_or(false), now));
        if pollfds[0].revents != 0 {
            accept_pending(listener, state, &mut conns, on_accept);
        }
        state.open.store(conns.len(), Ordering::Relaxed);
    }
    drop(conns);
    state.open.store(0, Ordering::Relaxed);
}

/// Accepts up to [`ACCEPT_BATCH`] pending connections and hands each to
/// `on_accept`, keeping those it returns.
fn accept_pending(
    listener: &TcpListener,
    state: &ServerState,
    conns: &mut Vec<OpenConn>,
    on_accept: &mut impl FnMut(TcpStream) -> Option<OpenConn>,
) {
    for _ in 0..ACCEPT_BATCH {
        match listener.accept() {
            Ok((stream, _peer)) => {
                state.accepted.fetch_add(1, Ordering::Relaxed);
                if conns.len() >= MAX_OPEN_CONNECTIONS {
                    // Over the safety limit: close at once.
                    drop(stream);
                    continue;
                }
                conns.extend(on_accept(stream));
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => return,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            // Transient per-connection failures (ECONNABORTED, EMFILE, ...):
            // back off a little instead of spinning.
            Err(_) => {
                std::thread::sleep(ACCEPT_POLL);
                return;
            }
        }
    }
}

fn poll_input(fd: RawFd) -> libc::pollfd {
    // POLLHUP and POLLERR are always reported; a read then sees EOF or the error.
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Held connections cost a descriptor at both ends, and in the rig both ends
/// live in this one test process: 500 held connections would already pass
/// the usual soft limit of 1024. Raises the soft limit towards the hard one,
/// once per process; best effort (on failure, accept/connect report EMFILE).
fn raise_fd_limit() {
    const WANTED: libc::rlim_t = 65_536;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into valid memory.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return;
        }
        let wanted = WANTED.min(limit.rlim_max);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            // SAFETY: setrlimit reads one valid rlimit; it only raises the
            // soft limit within the hard one.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        }
    });
}

// ---------------------------------------------------------------------------
// Hold server and held connections
// ---------------------------------------------------------------------------

/// A TCP server inside a namespace that answers every connection with its
/// name and a newline, like [`NameServer`], but then keeps it open until the
/// client closes it or the server stops: long-lived flows for tests of
/// stickiness and draining. One thread serves every connection.
#[derive(Debug)]
pub struct HoldServer {
    name: String,
    server: ServerThread,
}

impl HoldServer {
    /// Starts the server on its own thread in namespace `ns`, listening on
    /// `bind`. Returns once the socket is listening, or with the bind error.
    /// Bind `0.0.0.0:PORT` (`[::]:PORT`) for direct server return (see
    /// [`NameServer::start`]).
    pub fn start(ns: &str, bind: impl Into<SocketAddr>, name: &str) -> anyhow::Result<HoldServer> {
        let bind = bind.into();
        raise_fd_limit();
        let answer = format!("{name}\n");
        let server =
            ServerThread::start(ns, bind, &format!("hold server {name:?}"), move |stream| {
                // As for NameServer: a few bytes never block. A client already
                // gone is simply not held.
                send_small(&stream, answer.as_bytes()).ok()?;
                OpenConn::held(stream)
            })?;
        Ok(HoldServer {
            name: name.to_owned(),
            server,
        })
    }

    server_handle_methods!(named);

    /// Connections currently held open (updated every loop round, i.e.
    /// within [`ACCEPT_POLL`] of a change).
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }
}

/// The client end of a connection a [`HoldServer`] keeps open. Dropping it
/// closes the socket (a normal FIN: the server's line was read completely).
#[derive(Debug)]
pub struct HeldConnection(TcpStream);

impl HeldConnection {
    /// The open, blocking stream without timeouts, e.g. for its local
    /// address or to see whether the server side has closed it.
    pub fn stream(&self) -> &TcpStream {
        &self.0
    }
}

/// Connects from `src` (an address in namespace `ns`) to `dst`, reads the
/// server's one-line answer within `timeout`, and returns the still open
/// connection with that line (without the newline). Runs on the calling
/// thread, which is moved into `ns` for the duration; the socket stays in
/// `ns` afterwards.
pub fn open_held(
    ns: &str,
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
    timeout: Duration,
) -> anyhow::Result<(HeldConnection, String)> {
    let (src, dst) = (src.into(), dst.into());
    raise_fd_limit();
    in_netns(ns, || open_held_here(src, dst, timeout))
}

/// [`open_held`] for many requests `(src, dst)`, sequentially and in request
/// order, from one helper thread that enters `ns` once. Each request gets its
/// own `timeout`.
pub fn open_held_many<S, D>(
    ns: &str,
    requests: &[(S, D)],
    timeout: Duration,
) -> Vec<anyhow::Result<(HeldConnection, String)>>
where
    S: Into<IpAddr> + Copy + Sync,
    D: Into<SocketAddr> + Copy + Sync,
{
    raise_fd_limit();
    for_each_in_netns(ns, requests, |&(src, dst)| {
        open_held_here(src.into(), dst.into(), timeout)
    })
}

/// The client side of [`open_held`], in whatever namespace the calling thread is in.
fn open_held_here(
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(HeldConnection, String)> {
    let deadline = Instant::now() + timeout;
    let stream =
        connect_from(src, dst, deadline).with_context(|| format!("connect {src} -> {dst}"))?;
    let name = read_line(&stream, deadline).with_context(|| format!("read name {src} -> {dst}"))?;
    // Hand the stream over like a fresh one, without our deadline on it.
    stream.set_read_timeout(None)?;
    Ok((HeldConnection(stream), name))
}

/// Reads one line before the deadline and returns it without its line end.
fn read_line(stream: &TcpStream, deadline: Instant) -> anyhow::Result<String> {
    let (bytes, eof) = read_until(stream, deadline, |bytes| bytes.contains(&b'\n'))?;
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        let why = if eof { "connection closed" } else { "too long" };
        bail!(
            "no complete line ({why}): {:?}",
            String::from_utf8_lossy(&bytes)
        );
    };
    let line = bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]);
    String::from_utf8(line.to_vec()).context("line is not UTF-8")
}

// ---------------------------------------------------------------------------
// HTTP server for health checks
// ---------------------------------------------------------------------------

/// A request head longer than this is answered as it is.
const HTTP_HEAD_LIMIT: usize = 4096;
/// A request head not complete by then is answered as it is.
const HTTP_HEAD_TIMEOUT: Duration = Duration::from_secs(1);

/// How an [`HttpServer`] treats each connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpBehaviour {
    /// Read the request head, reply `HTTP/1.0 <code> X` with an empty body,
    /// close.
    Status(u16),
    /// Close at once with a RST.
    Reset,
    /// Never answer; keep the connection open until the peer closes it or
    /// the server stops.
    Silent,
    /// Like `Status`, with the first code for the first connection after
    /// this behaviour was set, the second code for the next, and so on.
    Alternate(u16, u16),
}

/// The behaviour and how many connections it has served (for `Alternate`).
#[derive(Debug)]
struct HttpMode {
    behaviour: HttpBehaviour,
    served: u64,
}

/// What to do with one accepted connection.
enum HttpAction {
    Reply(u16),
    Reset,
    Silent,
}

impl HttpMode {
    fn next_action(&mut self) -> HttpAction {
        let action = match self.behaviour {
            HttpBehaviour::Status(code) => HttpAction::Reply(code),
            HttpBehaviour::Reset => HttpAction::Reset,
            HttpBehaviour::Silent => HttpAction::Silent,
            // Even counts (from 0) get the first code.
            HttpBehaviour::Alternate(first, _) if self.served.is_multiple_of(2) => {
                HttpAction::Reply(first)
            }
            HttpBehaviour::Alternate(_, second) => HttpAction::Reply(second),
        };
        self.served += 1;
        action
    }
}

/// A minimal HTTP/1.0 server inside a namespace, for health-check tests: its
/// [`HttpBehaviour`] can be changed while it runs. One thread serves every
/// connection, so a silent or slow client never holds up the others.
#[derive(Debug)]
pub struct HttpServer {
    mode: Arc<Mutex<HttpMode>>,
    server: ServerThread,
}

impl HttpServer {
    /// Starts the server on its own thread in namespace `ns`, listening on
    /// `bind`. Returns once the socket is listening, or with the bind error.
    pub fn start(
        ns: &str,
        bind: impl Into<SocketAddr>,
        behaviour: HttpBehaviour,
    ) -> anyhow::Result<HttpServer> {
        let bind = bind.into();
        raise_fd_limit();
        let mode = Arc::new(Mutex::new(HttpMode {
            behaviour,
            served: 0,
        }));
        let server = {
            let mode = mode.clone();
            ServerThread::start(ns, bind, "HTTP server", move |stream| {
                let action = lock_mode(&mode).next_action();
                match action {
                    HttpAction::Reply(code) => OpenConn::awaiting_head(
                        stream,
                        format!("HTTP/1.0 {code} X\r\nContent-Length: 0\r\n\r\n"),
                    ),
                    HttpAction::Reset => {
                        reset_connection(stream);
                        None
                    }
                    HttpAction::Silent => OpenConn::held(stream),
                }
            })?
        };
        Ok(HttpServer { mode, server })
    }

    /// Changes how connections accepted from now on are treated (those
    /// already open keep what they got). Restarts an `Alternate` at its
    /// first code.
    pub fn set_behaviour(&self, behaviour: HttpBehaviour) {
        *lock_mode(&self.mode) = HttpMode {
            behaviour,
            served: 0,
        };
    }

    /// The current behaviour.
    pub fn behaviour(&self) -> HttpBehaviour {
        lock_mode(&self.mode).behaviour
    }

    /// Connections accepted so far (each is one request or probe).
    pub fn requests(&self) -> u64 {
        self.server.accepted()
    }

    /// Connections currently open: silent ones, and requests whose head is
    /// still being read.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    server_handle_methods!();
}

/// The mode is plain data, always consistent, so a panic while it was
/// locked (poisoning) does not make it unusable.
fn lock_mode(mode: &Mutex<HttpMode>) -> std::sync::MutexGuard<'_, HttpMode> {
    mode.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes with a RST instead of a FIN: SO_LINGER on with a zero timeout
/// makes close() abort the connection. If the option cannot be set the
/// close is a plain FIN, which the test then notices.
fn reset_connection(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Failure is the plain FIN described above.
    let _ = socket::set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_skip_network_and_broadcast_host_parts() {
        assert_eq!(client_addr(0), Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(client_addr(253), Ipv4Addr::new(198, 18, 1, 254));
        assert_eq!(client_addr(254), Ipv4Addr::new(198, 18, 2, 1));
        assert_eq!(client_addr(MAX_CLIENTS - 1), Ipv4Addr::new(198, 18, 4, 238));
        for index in 0..MAX_CLIENTS {
            let [a, b, c, d] = client_addr(index).octets();
            assert_eq!((a, b), (198, 18));
            assert!(c >= 1 && d != 0 && d != 255, "{index}");
        }
    }

    #[test]
    fn backend_addresses_stay_below_the_vip() {
        assert_eq!(backend_addr_of(1), Ipv4Addr::new(198, 18, 0, 11));
        assert!(backend_addr_of(MAX_BACKENDS) < VIP);
        assert_eq!(backend_addr6_of(1).to_string(), "2001:db8::11");
        assert_eq!(backend_addr6_of(MAX_BACKENDS).to_string(), "2001:db8::99");
        assert!(backend_addr6_of(MAX_BACKENDS) < VIP6);
        assert!(LB_ADDR6 < backend_addr6_of(1));
    }

    #[test]
    fn routed_part_addresses_stay_clear_of_the_rest() {
        assert_eq!(remote_backend_addr_of(1), Ipv4Addr::new(198, 19, 0, 11));
        assert_eq!(
            remote_backend_addr_of(MAX_REMOTE_BACKENDS),
            Ipv4Addr::new(198, 19, 0, 99)
        );
        assert_eq!(remote_backend_addr6_of(1).to_string(), "2001:db8:ff::11");
        assert_eq!(
            remote_backend_addr6_of(MAX_REMOTE_BACKENDS).to_string(),
            "2001:db8:ff::99"
        );
        assert_eq!(ROUTER_ADDR6.to_string(), "2001:db8::254");
        // The router's br0 addresses are no backend's, client's, VIP or LB.
        let taken4: Vec<Ipv4Addr> = (1..=MAX_BACKENDS)
            .map(backend_addr_of)
            .chain((0..MAX_CLIENTS).map(client_addr))
            .chain([VIP, LB_ADDR])
            .collect();
        assert!(!taken4.contains(&ROUTER_ADDR));
        let taken6: Vec<Ipv6Addr> = (1..=MAX_BACKENDS)
            .map(backend_addr6_of)
            .chain((0..MAX_CLIENTS).map(|index| client_addr6(index, 1)))
            .chain((0..MAX_CLIENTS).map(|index| client_addr6(index, MAX_CLIENTS)))
            .chain([VIP6, LB_ADDR6])
            .collect();
        assert!(!taken6.contains(&ROUTER_ADDR6));
        // The remote subnet is in 198.18.0.0/15 but not in the rig's /16, and
        // its /64 holds no client or local address.
        let [a, b, ..] = REMOTE_NET.octets();
        assert_eq!((a, b), (198, 19));
        assert!(
            taken6
                .iter()
                .chain([&ROUTER_ADDR6])
                .all(|addr| addr.segments()[..4] != REMOTE_NET6.segments()[..4])
        );
    }

    #[test]
    fn ipv6_client_addresses_fill_each_64_as_asked() {
        assert_eq!(client_addr6(0, 1).to_string(), "2001:db8:1:1::1");
        assert_eq!(client_addr6(1, 1).to_string(), "2001:db8:1:2::1");
        assert_eq!(client_addr6(999, 1).to_string(), "2001:db8:1:3e8::1");
        assert_eq!(client_addr6(0, 64).to_string(), "2001:db8:1:1::1");
        assert_eq!(client_addr6(63, 64).to_string(), "2001:db8:1:1::40");
        assert_eq!(client_addr6(64, 64).to_string(), "2001:db8:1:2::1");
        assert_eq!(client_addr6(999, 1000).to_string(), "2001:db8:1:1::3e8");
        // Every address is in the rig's /32 and outside the backends' /64.
        for index in 0..MAX_CLIENTS {
            let segments = client_addr6(index, 7).segments();
            assert_eq!(segments[..3], [0x2001, 0xdb8, 1]);
            assert!(segments[3] >= 1 && segments[7] >= 1, "{index}");
        }
    }

    #[test]
    fn macs_round_trip() {
        let mac = [0x02, 0, 0xab, 0x10, 0xff, 0x01];
        assert_eq!(parse_mac(&format_mac(mac)).unwrap(), mac);
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:00:00").is_err());
    }
}
