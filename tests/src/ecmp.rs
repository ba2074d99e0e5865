//! A throw-away network of namespaces for multi-balancer tests: N sticky-lb nodes behind a
//! router that spreads the VIP over them by ECMP, K direct-server-return backends, a Redis
//! store the nodes can share state through, and clients that reach it all through the router
//! only. The single-balancer rig is [`crate::rig`]; this one reuses its plumbing and servers.
//!
//! ```text
//!                                  slb-TAG-br: bridge br0 (198.18.0.0/16, all on-link)
//!     p-lb1        p-lb2     [p-lb3]        p-b1  ...  p-bK          p-rd            p-rt
//!       |            |          |             |          |             |               |
//!  lb0 (lb1)    lb0 (lb2)  lb0 (lb3)     eth0 (b1) .. eth0 (bK)   eth0 (rd)      eth0 (rt)
//!  198.18.0.2   198.18.0.3 198.18.0.4    198.18.0.11  198.18.0.(10+K) 198.18.0.250  198.18.0.254
//!  VIP on lo    VIP on lo  VIP on lo     VIP on lo (DSR)          redis-server   router: forwards,
//!                                                                 (when started) ECMP route
//!                                                                                VIP/32 -> lb1..lbN
//!                                                                                    eth1
//!                                                                              198.19.1.254/24
//!                                                                                      |  veth
//!                                                                                    eth0 (cl)
//!                                                                       198.19.1.1 ..= 198.19.1.C
//! ```
//!
//! Every namespace is `slb-TAG-ROLE` (TAG from [`crate::netns::unique_tag`]; roles `br`, `lb1`..`lbN`,
//! `b1`..`bK`, `rd`, `rt`, `cl`) and is deleted when the [`EcmpRig`] is dropped, also while a
//! failing test unwinds. Addresses are all in 198.18.0.0/15, IPv4 only (IPv6 is on but quiet in
//! each namespace, as in [`crate::rig`], and carries nothing); there is no default route
//! anywhere and no route out of the rig.
//!
//! # What a multi-node test needs to know
//!
//! * **The path of a connection.** A client's packets go to the router (the clients' only route,
//!   198.18.0.0/16 via 198.19.1.254); the router picks one balancer of the ECMP set for the
//!   VIP (198.18.0.100/32, one nexthop per balancer, see [`EcmpRig::set_ecmp`]) and sends the
//!   frame to that balancer's MAC on br0. sticky-lb's XDP program on that balancer's `lb0`
//!   rewrites the MACs to the backend's (DSR) and sends it back out of `lb0`; the backend holds
//!   the VIP on `lo` and answers the client directly, via the router (route 198.19.1.0/24 via
//!   198.18.0.254). So a balancer only ever sees the client-to-VIP direction, and the replies
//!   never touch a balancer.
//! * **How the router chooses.** Per packet, by a hash of the 5-tuple (source and destination
//!   address, protocol, source and destination port), computed from the packet's headers
//!   (`fib_multipath_hash_policy=3` with those fields, see [`ROUTER_HASH_FIELDS`]; the
//!   "L4" policy 1 would reuse the hash the client's own socket put on the packet when it
//!   crossed the veth, which is random per socket and changes when TCP retransmits after a
//!   timeout: not what a real router does). Every packet of one connection takes one balancer;
//!   the same 4-tuple opened again takes the same one; a client's successive connections (new
//!   source ports) spread over the balancers. The hash seed is fixed ([`ROUTER_HASH_SEED`]), so
//!   a run is reproducible on one kernel, but which 4-tuple lands where is the kernel's
//!   business: assert on sets and counts, not on a particular placement. A client's second
//!   connection usually lands on another node than its first: that node must learn where the
//!   first one went (the shared stick table).
//! * **What makes sharing visible.** Every node given the same config builds the same Maglev
//!   table, so while the backends stay as they are, `ip-hash` sends a client to one backend
//!   through whichever node (the self-test shows it without any sharing). Nodes disagree only
//!   where a stick entry overrides Maglev: after a backend is added (or comes back), an old
//!   client's entry on one node keeps it where it was while Maglev on a node without the
//!   entry moves it; or with `least-conn`. A multi-node stickiness test changes the backend
//!   set between a client's connections, then checks that every node sends it to its old
//!   backend. Each node's own table is `sticky-lb --netns NS table show --json`
//!   ([`crate::balancer::cli`]).
//! * **Reopening a 4-tuple.** The name servers close first, so the TIME_WAIT is on the
//!   server's side (the backend in DSR); Linux accepts a new SYN for a 4-tuple in TIME_WAIT
//!   (higher sequence number and timestamp), so [`EcmpRig::fetch_names_from_ports`] can repeat
//!   a pair at once. The client side is free again once its FIN is acknowledged, a few
//!   milliseconds: repeat a pair after a round over others, not back to back.
//! * **Changing the set.** [`EcmpRig::set_ecmp`] replaces the route at once (the next packet
//!   follows it). Linux splits the hash space into equal ranges, one per nexthop
//!   (hash-threshold, not resilient hashing): adding or removing a balancer moves flows
//!   between the remaining ones too, and moves established connections mid-stream, as a real
//!   router without resilient hashing does. A balancer left out of the set keeps running and
//!   gets no new packets (a test that wants it dead kills its controller as well).
//! * **Balancers.** Each `lbI` namespace has `lb0` ([`EcmpRig::lb_dev`]) with 198.18.0.(1+I)/16
//!   ([`EcmpRig::lb_addr`]), its own MAC, TX checksum offload off on both ends of its veth and
//!   GRO on the bridge end `p-lbI` (generic-mode XDP needs nothing more; for native mode attach
//!   an XDP program to `p-lbI` with [`EcmpRig::attach_peer_xdp`], as [`crate::scenario`] does).
//!   The VIP is on each balancer's `lo` (with `arp_ignore=1`, `arp_announce=2`), not on `lb0`:
//!   every balancer accepts what its XDP program passes to the kernel for the VIP (echo
//!   requests, other ports), yet none answers ARP for the VIP, which N nodes on one segment
//!   could otherwise all claim. Nothing in the rig asks for the VIP by ARP anyway: the router
//!   routes it via the balancers' own addresses. Health checks leave from each balancer's own
//!   address (the primary one on `lb0`). Run one controller per balancer with
//!   [`EcmpRig::start_balancer`]; give each its [`EcmpRig::datapath_guard`].
//! * **Backends** `bK` are [`crate::rig`]'s DSR backends: 198.18.0.(10+K)/16 on `eth0`, VIP on
//!   `lo`, `arp_ignore=1`, `arp_announce=2`, `rp_filter=0`. [`EcmpRig::start_backend_servers`]
//!   puts a [`NameServer`] answering `bK` on 0.0.0.0:80 on each.
//! * **Clients** are the addresses 198.19.1.1 ..= 198.19.1.C on `eth0` of `slb-TAG-cl`, a
//!   separate subnet behind the router (not on br0): a backend sees them as they are. The
//!   router holds permanent neighbour entries for them (the kernel's neighbour table is shared
//!   by all namespaces, see `/work/shared/XDP-NOTES.md`). Fetch with [`EcmpRig::fetch_names`]
//!   (one connection per source address, new source port each) or
//!   [`EcmpRig::fetch_names_from_ports`] (fixed source ports: the same 4-tuple again).
//! * **The store** `slb-TAG-rd` has 198.18.0.250/16 ([`STORE_ADDR`]) on br0: every balancer
//!   reaches it on-link from its own address. [`EcmpRig::start_store`] starts a
//!   [`RedisServer`] there on port 6379 (`redis://198.18.0.250:6379/`); kill and restart it to
//!   test a store that goes away. The clients can reach it too (via the router); nothing in
//!   the rig stops them, and nothing needs to.
//! * **Sysctls**, only inside the rig's namespaces: `rp_filter=0` everywhere (backends answer
//!   from the VIP, balancers and router see asymmetric paths); no ICMP redirects sent or
//!   accepted (`send_redirects=0` on the router, whose nexthops share its link,
//!   `accept_redirects=0` elsewhere); forwarding on in the router only.
//! * **Counters.** [`snmp_counter`] reads `/proc/net/snmp` of one namespace, e.g. the router's
//!   `Ip ForwDatagrams` (traffic went through it) or `Icmp OutRedirects` (must stay 0).
//! * **Cost.** Building the rig takes about half a second (3 balancers, 2 backends, 20
//!   clients); a controller takes about a second to attach. Several rigs can run at once (each
//!   has its own bridge; every interface name is per namespace).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::balancer::{Balancer, DataPathGuard, PeerXdp, ScratchDir};
use crate::netns::{self, NetNs, in_netns};
use crate::redis::{REDIS_PORT, RedisServer};
use crate::rig::{
    self, HoldServer, NameServer, backend_addr_of, fetch_names_many, fetch_names_many_from_ports,
    ns_name, pin_client_neighbours, plug_into_bridge, quiet_namespace, read_mac,
    set_up_dsr_backend, sysctls,
};

/// The service address: on every balancer's and every backend's `lo`, routed by the router to
/// the balancers of the ECMP set.
pub const VIP: Ipv4Addr = rig::VIP;
/// The service port every helper here uses (the scenarios' port).
pub const PORT: u16 = crate::scenario::PORT;
/// Balancer I (1-based) has 198.18.0.(1+I); backends start at .11.
pub const MAX_BALANCERS: usize = 3;
/// Backend k has 198.18.0.(10+k), below the VIP, as in [`crate::rig`].
pub const MAX_BACKENDS: usize = rig::MAX_BACKENDS;
/// Client addresses 198.19.1.1 ..= 198.19.1.200.
pub const MAX_CLIENTS: usize = 200;
/// The router's address on br0 (its `eth0`): the backends' and balancers' way to the clients.
pub const ROUTER_ADDR: Ipv4Addr = rig::ROUTER_ADDR;
/// The router's address on the clients' link (its `eth1`): the clients' gateway.
pub const ROUTER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 254);
/// The clients' subnet, [`CLIENT_NET`]/[`CLIENT_PREFIX_LEN`]: inside 198.18.0.0/15, off br0.
pub const CLIENT_NET: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 0);
pub const CLIENT_PREFIX_LEN: u8 = 24;
/// The store's address on br0.
pub const STORE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
/// The fields the router hashes for ECMP (`net.ipv4.fib_multipath_hash_fields`, used with
/// `fib_multipath_hash_policy=3`): source IP (0x1), destination IP (0x2), IP protocol (0x4),
/// source port (0x10), destination port (0x20): the 5-tuple, from the packet's headers.
pub const ROUTER_HASH_FIELDS: u32 = 0x37;
/// `net.ipv4.fib_multipath_hash_policy` in the router: 3, the fields of [`ROUTER_HASH_FIELDS`].
pub const ROUTER_HASH_POLICY: u8 = 3;
/// `net.ipv4.fib_multipath_hash_seed` in the router: fixed, so one 4-tuple takes the same
/// balancer in every rig on a given kernel (the kernel does not promise the same across
/// versions). 0 would be the kernel's own random seed.
pub const ROUTER_HASH_SEED: u32 = 0x5eed;

/// All addresses on br0 share this /16 (on-link, no gateways).
const PREFIX_LEN: u8 = 16;
const RIG_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
const BRIDGE_DEV: &str = "br0";
const LB_DEV: &str = "lb0";
/// Backend, store, client and the router's br0 side.
const HOST_DEV: &str = "eth0";
/// The router's side of its veth to the client namespace.
const ROUTER_CLIENT_DEV: &str = "eth1";

/// What to build. `test_name` only feeds the namespace tag.
#[derive(Debug, Clone)]
pub struct EcmpRigOptions {
    pub test_name: String,
    /// Balancer namespaces, 2..=[`MAX_BALANCERS`]; all in the ECMP set at first.
    pub balancers: usize,
    /// Backend namespaces, 1..=[`MAX_BACKENDS`].
    pub backends: usize,
    /// Client addresses, 1..=[`MAX_CLIENTS`].
    pub clients: usize,
}

impl EcmpRigOptions {
    /// Two balancers, two backends, one client address.
    pub fn new(test_name: &str) -> EcmpRigOptions {
        EcmpRigOptions {
            test_name: test_name.to_owned(),
            balancers: 2,
            backends: 2,
            clients: 1,
        }
    }

    pub fn balancers(mut self, balancers: usize) -> EcmpRigOptions {
        self.balancers = balancers;
        self
    }

    pub fn backends(mut self, backends: usize) -> EcmpRigOptions {
        self.backends = backends;
        self
    }

    pub fn clients(mut self, clients: usize) -> EcmpRigOptions {
        self.clients = clients;
        self
    }
}

/// One namespace on br0 and the facts tests need about it (a balancer or a backend).
#[derive(Debug)]
struct Node {
    ns: NetNs,
    addr: Ipv4Addr,
    mac: [u8; 6],
}

/// The built topology (see the module documentation). Dropping it deletes every namespace it
/// created (servers and controllers started in them are the test's to stop, before).
#[derive(Debug)]
pub struct EcmpRig {
    tag: String,
    // Field order is drop order: the leaves first, the bridge they hang on last.
    client: NetNs,
    router: NetNs,
    store: NetNs,
    backends: Vec<Node>,
    balancers: Vec<Node>,
    bridge: NetNs,
    client_addrs: Vec<Ipv4Addr>,
    client_mac: [u8; 6],
    router_mac: [u8; 6],
    /// The balancers (1-based) the VIP route names now.
    ecmp: Mutex<Vec<usize>>,
}

impl EcmpRig {
    /// Builds the whole topology with every balancer in the ECMP set (root only; panics with a
    /// plain message otherwise). On error everything created so far is deleted again.
    pub fn build(opts: EcmpRigOptions) -> anyhow::Result<EcmpRig> {
        netns::require_root();
        if !(2..=MAX_BALANCERS).contains(&opts.balancers) {
            bail!(
                "balancers must be 2..={MAX_BALANCERS}, not {}",
                opts.balancers
            );
        }
        if !(1..=MAX_BACKENDS).contains(&opts.backends) {
            bail!("backends must be 1..={MAX_BACKENDS}, not {}", opts.backends);
        }
        if !(1..=MAX_CLIENTS).contains(&opts.clients) {
            bail!("clients must be 1..={MAX_CLIENTS}, not {}", opts.clients);
        }
        let tag = netns::unique_tag(&opts.test_name);

        // The bridge only switches frames: no IPv6, no multicast snooping (as in rig.rs).
        let bridge = NetNs::new(ns_name(&tag, "br"))?;
        quiet_namespace(&bridge, false)?;
        bridge.ip_batch(&format!(
            "link add {BRIDGE_DEV} type bridge mcast_snooping 0\nlink set {BRIDGE_DEV} up\n"
        ))?;

        let mut balancers = Vec::with_capacity(opts.balancers);
        for i in 1..=opts.balancers {
            balancers.push(build_balancer(&tag, &bridge, i)?);
        }
        let mut backends = Vec::with_capacity(opts.backends);
        for k in 1..=opts.backends {
            backends.push(build_backend(&tag, &bridge, k)?);
        }
        let store = build_store(&tag, &bridge)?;

        let client = NetNs::new(ns_name(&tag, "cl"))?;
        quiet_namespace(&client, true)?;
        let router = NetNs::new(ns_name(&tag, "rt"))?;
        quiet_namespace(&router, true)?;
        let client_addrs: Vec<Ipv4Addr> = (1..=opts.clients).map(client_addr_of).collect();
        let (client_mac, router_mac) = wire_router_and_client(&bridge, &router, &client)?;
        let mut script = String::with_capacity(48 * client_addrs.len() + 96);
        for addr in &client_addrs {
            script.push_str(&format!(
                "addr add {addr}/{CLIENT_PREFIX_LEN} dev {HOST_DEV}\n"
            ));
        }
        script.push_str(&format!(
            "link set {HOST_DEV} up\n\
             route add {RIG_NET}/{PREFIX_LEN} via {ROUTER_CLIENT_ADDR} dev {HOST_DEV}\n"
        ));
        client.ip_batch(&script)?;
        // The router answers for every client: permanent entries keep them out of the shared
        // neighbour table's count (see rig.rs).
        pin_client_neighbours(&router, ROUTER_CLIENT_DEV, &client_addrs, &[], client_mac)?;

        let rig = EcmpRig {
            tag,
            client,
            router,
            store,
            backends,
            balancers,
            bridge,
            client_addrs,
            client_mac,
            router_mac,
            ecmp: Mutex::new(Vec::new()),
        };
        let all: Vec<usize> = (1..=opts.balancers).collect();
        rig.set_ecmp(&all)?;
        Ok(rig)
    }

    /// Makes the router's route to the VIP name exactly the balancers `set` (1-based, each at
    /// most once, in any order; one is a plain route): `ip route replace 198.18.0.100/32
    /// nexthop via 198.18.0.2 dev eth0 nexthop via ...`. The next packet follows the new
    /// route; the cache flush is only for older kernels (IPv4 has had no route cache since
    /// 3.6). Flows move as the module documentation says.
    pub fn set_ecmp(&self, set: &[usize]) -> anyhow::Result<()> {
        if set.is_empty() {
            bail!("the ECMP set needs at least one balancer");
        }
        for (n, &i) in set.iter().enumerate() {
            if !(1..=self.balancers.len()).contains(&i) {
                bail!(
                    "rig {} has balancers 1..={}, not {i}",
                    self.tag,
                    self.balancers.len()
                );
            }
            if set[..n].contains(&i) {
                bail!("balancer {i} is twice in the ECMP set {set:?}");
            }
        }
        let route = if let [i] = set {
            format!("via {} dev {HOST_DEV}", self.lb_addr(*i))
        } else {
            set.iter()
                .map(|&i| format!("nexthop via {} dev {HOST_DEV}", self.lb_addr(i)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        self.router.ip_batch(&format!(
            "route replace {VIP}/32 {route}\nroute flush cache\n"
        ))?;
        *self.ecmp.lock().unwrap_or_else(PoisonError::into_inner) = set.to_vec();
        Ok(())
    }

    /// The balancers (1-based) in the ECMP set now, as last given to [`EcmpRig::set_ecmp`].
    pub fn ecmp(&self) -> Vec<usize> {
        self.ecmp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The router's route to the VIP as `ip route show` prints it (for assertions and logs).
    pub fn ecmp_route(&self) -> anyhow::Result<String> {
        self.router
            .ip(&["-4", "route", "show", &format!("{VIP}/32")])
    }

    /// The per-rig tag; every namespace name starts with `slb-{tag}-`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Every namespace this rig owns.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut names = vec![self.bridge.name()];
        names.extend(self.balancers.iter().map(|node| node.ns.name()));
        names.extend(self.backends.iter().map(|node| node.ns.name()));
        names.extend([self.store.name(), self.router.name(), self.client.name()]);
        names
    }

    /// The bridge namespace (br0 and every bridge port).
    pub fn bridge_ns(&self) -> &str {
        self.bridge.name()
    }

    /// Number of balancers.
    pub fn balancer_count(&self) -> usize {
        self.balancers.len()
    }

    /// Namespace of balancer `i` (1-based). Panics if there is no such balancer.
    pub fn lb_ns(&self, i: usize) -> &str {
        self.balancer(i).ns.name()
    }

    /// Balancer `i`'s own address on `lb0`: 198.18.0.(1+i).
    pub fn lb_addr(&self, i: usize) -> Ipv4Addr {
        self.balancer(i).addr
    }

    /// MAC of balancer `i`'s `lb0`: where the router sends the VIP's frames for it.
    pub fn lb_mac(&self, i: usize) -> [u8; 6] {
        self.balancer(i).mac
    }

    /// The balancers' interface (`lb0` in each balancer namespace), where XDP attaches.
    pub fn lb_dev(&self) -> &str {
        LB_DEV
    }

    /// The bridge-side end of balancer `i`'s veth: (bridge namespace, `p-lbI`).
    pub fn bridge_peer_of_lb(&self, i: usize) -> (&str, String) {
        self.balancer(i);
        (self.bridge.name(), format!("p-lb{i}"))
    }

    /// An XDP_PASS program in native mode on `p-lbI`, which native-mode XDP_TX from balancer
    /// `i`'s `lb0` needs (see [`PeerXdp`]); keep it as long as the balancer runs.
    pub fn attach_peer_xdp(&self, i: usize) -> anyhow::Result<PeerXdp> {
        let (ns, dev) = self.bridge_peer_of_lb(i);
        PeerXdp::attach(ns, &dev)
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Namespace of backend `k` (1-based). Panics if there is no such backend.
    pub fn backend_ns(&self, k: usize) -> &str {
        self.backend(k).ns.name()
    }

    /// Backend `k`'s address on its `eth0`: 198.18.0.(10+k).
    pub fn backend_addr(&self, k: usize) -> Ipv4Addr {
        self.backend(k).addr
    }

    /// MAC of backend `k`'s `eth0` (what DSR rewrites the frame to).
    pub fn backend_mac(&self, k: usize) -> [u8; 6] {
        self.backend(k).mac
    }

    /// The client namespace (all client addresses on its `eth0`).
    pub fn client_ns(&self) -> &str {
        self.client.name()
    }

    /// The client addresses, 198.19.1.1 onwards.
    pub fn client_addrs(&self) -> &[Ipv4Addr] {
        &self.client_addrs
    }

    /// MAC of the client namespace's `eth0`.
    pub fn client_mac(&self) -> [u8; 6] {
        self.client_mac
    }

    /// The router namespace.
    pub fn router_ns(&self) -> &str {
        self.router.name()
    }

    /// The router's address on br0 ([`ROUTER_ADDR`]).
    pub fn router_addr(&self) -> Ipv4Addr {
        ROUTER_ADDR
    }

    /// The router's address on the clients' link ([`ROUTER_CLIENT_ADDR`]).
    pub fn router_client_addr(&self) -> Ipv4Addr {
        ROUTER_CLIENT_ADDR
    }

    /// MAC of the router's br0 side (the source MAC of every client frame a balancer sees).
    pub fn router_mac(&self) -> [u8; 6] {
        self.router_mac
    }

    /// The store namespace.
    pub fn store_ns(&self) -> &str {
        self.store.name()
    }

    /// The store's address ([`STORE_ADDR`]).
    pub fn store_addr(&self) -> Ipv4Addr {
        STORE_ADDR
    }

    /// The URL of the store's Redis as [`EcmpRig::start_store`] starts it:
    /// `redis://198.18.0.250:6379/`.
    pub fn store_url(&self) -> String {
        format!("redis://{STORE_ADDR}:{REDIS_PORT}/")
    }

    /// Starts a [`RedisServer`] in the store namespace on [`STORE_ADDR`]:6379 and waits for it.
    pub fn start_store(&self) -> anyhow::Result<RedisServer> {
        RedisServer::start(self.store.name(), STORE_ADDR, REDIS_PORT)
    }

    /// The VIP ([`VIP`]).
    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    /// The service: VIP:[`PORT`].
    pub fn service(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, PORT)
    }

    /// Starts a [`NameServer`] on 0.0.0.0:[`PORT`] in every backend, answering `b1`, `b2`...
    /// (bound to 0.0.0.0, so it also answers on the VIP held on `lo`). Keep them as long as
    /// needed; dropping one stops it.
    pub fn start_backend_servers(&self) -> anyhow::Result<Vec<NameServer>> {
        (1..=self.backends.len())
            .map(|k| {
                NameServer::start(
                    self.backend_ns(k),
                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
                    &format!("b{k}"),
                )
            })
            .collect()
    }

    /// One connection from each of `sources` (client addresses) to the service, sequentially
    /// from the client namespace, each with a new source port; the name each got (or why not),
    /// in order. Each gets `timeout`.
    pub fn fetch_names(
        &self,
        sources: &[Ipv4Addr],
        timeout: Duration,
    ) -> Vec<anyhow::Result<String>> {
        let service = self.service();
        let requests: Vec<(Ipv4Addr, SocketAddrV4)> =
            sources.iter().map(|&src| (src, service)).collect();
        fetch_names_many(self.client.name(), &requests, timeout)
    }

    /// [`EcmpRig::fetch_names`] from fixed source address and port pairs: the same pair again
    /// is the same connection 4-tuple, so the router sends it the same way while the ECMP set
    /// is unchanged. Use ports outside the ephemeral range (32768-60999), e.g. 20000 up.
    pub fn fetch_names_from_ports(
        &self,
        sources: &[SocketAddrV4],
        timeout: Duration,
    ) -> Vec<anyhow::Result<String>> {
        let service = self.service();
        let requests: Vec<(SocketAddrV4, SocketAddrV4)> =
            sources.iter().map(|&src| (src, service)).collect();
        fetch_names_many_from_ports(self.client.name(), &requests, timeout)
    }

    /// [`EcmpRig::fetch_names`], panicking (with the client) on the first failure.
    pub fn round(&self, sources: &[Ipv4Addr], timeout: Duration) -> Vec<String> {
        self.fetch_names(sources, timeout)
            .into_iter()
            .zip(sources)
            .map(|(result, src)| result.unwrap_or_else(|err| panic!("client {src}: {err:#}")))
            .collect()
    }

    /// A config for one balancer: service `web` on VIP:[`PORT`] (DSR, the default) with every
    /// backend `bK`, `xdp_mode` (`generic` or `native`), `top` lines at the top level (e.g. a
    /// shared-table section) and `service` lines in the service (indented four spaces). The
    /// same text suits every balancer: each runs its own controller on its own `lb0`.
    pub fn config(&self, xdp_mode: &str, top: &str, service: &str) -> String {
        let mut yaml = format!(
            "interface: {LB_DEV}\nxdp_mode: {xdp_mode}\nsweep_interval: 500ms\n{top}services:\n  - name: web\n    vip: {VIP}\n    port: {PORT}\n{service}    backends:\n"
        );
        for k in 1..=self.backends.len() {
            yaml += &format!(
                "      - name: b{k}\n        address: {}\n",
                self.backend_addr(k)
            );
        }
        yaml
    }

    /// Starts sticky-lb on balancer `i`'s `lb0` with `yaml` as its config, in `dir/lbI` (its
    /// config file and log; one directory per balancer, since [`Balancer`] names both by the
    /// test process only), and waits until it has attached ([`Balancer::start`]).
    pub fn start_balancer(&self, i: usize, dir: &Path, yaml: &str) -> anyhow::Result<Balancer> {
        let dir = dir.join(format!("lb{i}"));
        Balancer::start(self.lb_ns(i), LB_DEV, &dir, yaml)
            .with_context(|| format!("starting sticky-lb on balancer {i}"))
    }

    /// The guard that removes balancer `i`'s pins and state file (see [`DataPathGuard`]):
    /// declare it after the rig and before the balancer's [`Balancer`].
    pub fn datapath_guard(&self, i: usize) -> DataPathGuard {
        DataPathGuard::new(self.lb_ns(i), LB_DEV)
    }

    fn balancer(&self, i: usize) -> &Node {
        i.checked_sub(1)
            .and_then(|index| self.balancers.get(index))
            .unwrap_or_else(|| {
                panic!(
                    "rig {} has balancers 1..={}, not {i}",
                    self.tag,
                    self.balancers.len()
                )
            })
    }

    fn backend(&self, k: usize) -> &Node {
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

/// Balancer `i`'s own address: 198.18.0.(1+i).
fn lb_addr_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 1 + i as u8)
}

/// Client address `n` (1-based): 198.19.1.n.
fn client_addr_of(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, n as u8)
}

/// Balancer namespace `lbI`: `lb0` on br0 (port `p-lbI`, set up as rig.rs sets up its `lb0`),
/// its address, the VIP on `lo`, the route to the clients via the router.
fn build_balancer(tag: &str, bridge: &NetNs, i: usize) -> anyhow::Result<Node> {
    let ns = NetNs::new(ns_name(tag, &format!("lb{i}")))?;
    quiet_namespace(&ns, true)?;
    let port = format!("p-lb{i}");
    plug_into_bridge(bridge, BRIDGE_DEV, &port, &ns, LB_DEV)?;
    let addr = lb_addr_of(i);
    // The VIP on lo, never claimed in ARP (arp_ignore=1: answer only for addresses of the
    // asking interface; arp_announce=2: never the VIP as ARP source); rp_filter off, as the
    // path back to a client (via the router) need not be the way its packet came.
    sysctls(
        &ns,
        &[
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.all.accept_redirects=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.lo.rp_filter=0",
            &format!("net.ipv4.conf.{LB_DEV}.rp_filter=0"),
            &format!("net.ipv4.conf.{LB_DEV}.accept_redirects=0"),
        ],
    )?;
    ns.ip_batch(&format!(
        "addr add {addr}/{PREFIX_LEN} dev {LB_DEV}\n\
         addr add {VIP}/32 dev lo\n\
         link set {LB_DEV} up\n\
         route add {CLIENT_NET}/{CLIENT_PREFIX_LEN} via {ROUTER_ADDR} dev {LB_DEV}\n"
    ))?;
    // As in rig.rs: XDP_TX from lb0 lands in p-lbI, whose NAPI must run (GRO on, or an XDP
    // program for native mode).
    bridge.exec(&["ethtool", "-K", &port, "gro", "on"])?;
    let mac = read_mac(&ns, LB_DEV)?;
    Ok(Node { ns, addr, mac })
}

/// Backend namespace `bK`: a DSR backend as in rig.rs, answering clients via the router.
fn build_backend(tag: &str, bridge: &NetNs, k: usize) -> anyhow::Result<Node> {
    let ns = NetNs::new(ns_name(tag, &format!("b{k}")))?;
    quiet_namespace(&ns, true)?;
    plug_into_bridge(bridge, BRIDGE_DEV, &format!("p-b{k}"), &ns, HOST_DEV)?;
    let addr = backend_addr_of(k);
    set_up_dsr_backend(
        &ns,
        &format!(
            "addr add {addr}/{PREFIX_LEN} dev {HOST_DEV}\n\
             link set {HOST_DEV} up\n\
             route add {CLIENT_NET}/{CLIENT_PREFIX_LEN} via {ROUTER_ADDR} dev {HOST_DEV}\n"
        ),
    )?;
    sysctls(
        &ns,
        &[
            "net.ipv4.conf.all.accept_redirects=0",
            &format!("net.ipv4.conf.{HOST_DEV}.accept_redirects=0"),
        ],
    )?;
    let mac = read_mac(&ns, HOST_DEV)?;
    Ok(Node { ns, addr, mac })
}

/// The store namespace `rd`: [`STORE_ADDR`] on br0, nothing else.
fn build_store(tag: &str, bridge: &NetNs) -> anyhow::Result<NetNs> {
    let ns = NetNs::new(ns_name(tag, "rd"))?;
    quiet_namespace(&ns, true)?;
    plug_into_bridge(bridge, BRIDGE_DEV, "p-rd", &ns, HOST_DEV)?;
    ns.ip_batch(&format!(
        "addr add {STORE_ADDR}/{PREFIX_LEN} dev {HOST_DEV}\nlink set {HOST_DEV} up\n"
    ))?;
    Ok(ns)
}

/// The router: `eth0` on br0 (port `p-rt`), `eth1` on a veth pair whose other end is the
/// client namespace's `eth0`; forwarding, the ECMP hash, no redirects, no reverse-path filter.
/// Returns the MACs of the client's `eth0` and the router's `eth0`.
fn wire_router_and_client(
    bridge: &NetNs,
    router: &NetNs,
    client: &NetNs,
) -> anyhow::Result<([u8; 6], [u8; 6])> {
    plug_into_bridge(bridge, BRIDGE_DEV, "p-rt", router, HOST_DEV)?;
    router.ip(&[
        "link",
        "add",
        ROUTER_CLIENT_DEV,
        "type",
        "veth",
        "peer",
        "name",
        HOST_DEV,
        "netns",
        client.name(),
    ])?;
    // The client's packets cross the router into a balancer's native XDP: they must carry
    // full checksums from the start (see rig.rs's plug_into_bridge).
    router.exec(&["ethtool", "-K", ROUTER_CLIENT_DEV, "tx", "off"])?;
    client.exec(&["ethtool", "-K", HOST_DEV, "tx", "off"])?;
    let hash_fields = format!("net.ipv4.fib_multipath_hash_fields={ROUTER_HASH_FIELDS:#x}");
    // Per namespace, like every setting here. Forwarding on; rp_filter off (replies from the
    // VIP arrive on eth0, where the VIP is also routed: harmless, but nothing should depend on
    // it); no redirects (the nexthops share eth0 with the backends' replies); the 5-tuple hash
    // (module documentation); every nexthop used whatever its neighbour state.
    sysctls(
        router,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
            "net.ipv4.conf.all.accept_redirects=0",
            &format!("net.ipv4.conf.{HOST_DEV}.rp_filter=0"),
            &format!("net.ipv4.conf.{HOST_DEV}.send_redirects=0"),
            &format!("net.ipv4.conf.{HOST_DEV}.accept_redirects=0"),
            &format!("net.ipv4.conf.{ROUTER_CLIENT_DEV}.rp_filter=0"),
            &format!("net.ipv4.conf.{ROUTER_CLIENT_DEV}.send_redirects=0"),
            &format!("net.ipv4.conf.{ROUTER_CLIENT_DEV}.accept_redirects=0"),
            &format!("net.ipv4.fib_multipath_hash_policy={ROUTER_HASH_POLICY}"),
            &hash_fields,
            &format!("net.ipv4.fib_multipath_hash_seed={ROUTER_HASH_SEED}"),
            "net.ipv4.fib_multipath_use_neigh=0",
        ],
    )?;
    // `sysctls` skips keys the kernel lacks; without these the rig would not be what it says.
    let wanted = format!("1\n{ROUTER_HASH_POLICY}\n{ROUTER_HASH_FIELDS}\n{ROUTER_HASH_SEED}\n");
    let got = router.exec(&[
        "sysctl",
        "-n",
        "net.ipv4.ip_forward",
        "net.ipv4.fib_multipath_hash_policy",
        "net.ipv4.fib_multipath_hash_fields",
        "net.ipv4.fib_multipath_hash_seed",
    ])?;
    if got != wanted {
        bail!(
            "the router's forwarding and ECMP hash settings did not take: {got:?}, not {wanted:?} \
             (this kernel lacks fib_multipath_hash_policy=3 or its fields or seed?)"
        );
    }
    router.ip_batch(&format!(
        "addr add {ROUTER_ADDR}/{PREFIX_LEN} dev {HOST_DEV}\n\
         addr add {ROUTER_CLIENT_ADDR}/{CLIENT_PREFIX_LEN} dev {ROUTER_CLIENT_DEV}\n\
         link set {HOST_DEV} up\n\
         link set {ROUTER_CLIENT_DEV} up\n"
    ))?;
    sysctls(
        client,
        &[
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.all.accept_redirects=0",
            &format!("net.ipv4.conf.{HOST_DEV}.rp_filter=0"),
        ],
    )?;
    Ok((read_mac(client, HOST_DEV)?, read_mac(router, HOST_DEV)?))
}

/// A counter of `/proc/net/snmp` in namespace `ns`: `group` is the line's prefix without the
/// colon (`Ip`, `Icmp`, `Tcp`, `Udp`...), `field` the column (`ForwDatagrams`,
/// `OutRedirects`, `ActiveOpens`...). Read on the calling thread, moved into `ns` for the
/// duration (`/proc/thread-self`, so it is that namespace's counters).
pub fn snmp_counter(ns: &str, group: &str, field: &str) -> anyhow::Result<u64> {
    let text = in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .with_context(|| format!("reading /proc/net/snmp in {ns}"))?;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} lines in /proc/net/snmp of {ns}");
    };
    let column = names
        .split_whitespace()
        .position(|name| name == field)
        .with_context(|| format!("no {group} {field} in /proc/net/snmp of {ns}"))?;
    let value = values
        .split_whitespace()
        .nth(column)
        .with_context(|| format!("short {group} values in /proc/net/snmp of {ns}"))?;
    value
        .parse()
        .with_context(|| format!("{group} {field} = {value:?} in {ns}"))
}

/// Reading and asking one node's controller (`sticky-lb --netns lbI ...`), for assertions.
impl EcmpRig {
    /// Runs `sticky-lb --netns lbI ARGS`; panics unless it succeeds. Its stdout.
    pub fn node_cli(&self, i: usize, args: &[&str]) -> String {
        let (code, out, err) = crate::balancer::cli(self.lb_ns(i), args);
        assert_eq!(code, 0, "lb{i}: sticky-lb {args:?}: {out}{err}");
        out
    }

    /// Node `i`'s stick table (`table show --json`): client (as `table show` prints it) ->
    /// backend.
    pub fn stick_table(&self, i: usize) -> std::collections::BTreeMap<String, String> {
        let rows: serde_json::Value =
            serde_json::from_str(&self.node_cli(i, &["table", "show", "--json"])).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["client"].as_str().unwrap().to_owned(),
                    row["backend"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Node `i`'s backends of its first service (`backend list --json`): name -> state
    /// (`up`, `down`, `drain`, `disabled`).
    pub fn backend_states(&self, i: usize) -> std::collections::BTreeMap<String, String> {
        let services: serde_json::Value =
            serde_json::from_str(&self.node_cli(i, &["backend", "list", "--json"])).unwrap();
        services[0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap().to_owned(),
                    b["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Waits (bounded: 15 s) until node `i` has backend `name` in `state`; how long it took.
    pub fn wait_backend_state(&self, i: usize, name: &str, state: &str) -> Duration {
        crate::wait::wait_for(
            &format!("{name} {state} on lb{i}"),
            Duration::from_secs(15),
            || self.backend_states(i).get(name).map(String::as_str) == Some(state),
        )
    }

    /// Node `i`'s `/metrics` text, scraped from `listen` inside its namespace (the node's
    /// config must have `metrics: {listen: ...}`).
    pub fn node_metrics(&self, i: usize, listen: SocketAddrV4) -> std::io::Result<String> {
        use std::io::{Read, Write};
        in_netns(self.lb_ns(i), || {
            let timeout = Duration::from_secs(3);
            let mut stream = std::net::TcpStream::connect_timeout(&listen.into(), timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: lb\r\n\r\n")?;
            let mut text = String::new();
            stream.take(4 << 20).read_to_string(&mut text)?;
            Ok(text)
        })
    }
}

/// A rig with its Redis, a server on every backend and a controller on each of `nodes`;
/// dropped in order: controllers, their pins, servers, Redis, scratch directory, namespaces.
pub struct Cluster {
    pub balancers: Vec<Balancer>,
    pub guards: Vec<DataPathGuard>,
    /// Backend bK's name server at K-1 (`None` while a test has it stopped).
    pub servers: Vec<Option<NameServer>>,
    /// Or its hold server (see [`Cluster::start`]).
    pub holders: Vec<HoldServer>,
    pub store: RedisServer,
    pub scratch: ScratchDir,
    pub rig: EcmpRig,
}

impl Cluster {
    /// The backends answer their name and close, or with `hold` keep every connection open
    /// (so from the first: a server stopped and at once started again on its port was once
    /// refused with EADDRINUSE while this file's tests ran in parallel, probably the old
    /// listener still held by another test thread's child between its fork and exec).
    pub fn start(
        opts: EcmpRigOptions,
        nodes: &[usize],
        hold: bool,
        config: impl Fn(&EcmpRig, usize) -> String,
    ) -> Cluster {
        let rig = EcmpRig::build(opts).expect("building the ECMP rig");
        let scratch = ScratchDir::new(rig.tag());
        let store = rig.start_store().expect("redis-server");
        let guards = nodes.iter().map(|&i| rig.datapath_guard(i)).collect();
        let (mut servers, mut holders) = (Vec::new(), Vec::new());
        for k in 1..=rig.backend_count() {
            let (ns, any) = (
                rig.backend_ns(k),
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT),
            );
            let name = format!("b{k}");
            if hold {
                holders.push(HoldServer::start(ns, any, &name).expect("hold server"));
            } else {
                servers.push(Some(
                    NameServer::start(ns, any, &name).expect("name server"),
                ));
            }
        }
        let balancers = nodes
            .iter()
            .map(|&i| {
                rig.start_balancer(i, scratch.path(), &config(&rig, i))
                    .expect("starting sticky-lb")
            })
            .collect();
        Cluster {
            balancers,
            guards,
            servers,
            holders,
            store,
            scratch,
            rig,
        }
    }

    /// Stops everything and checks no namespace of the rig is left.
    pub fn finish(self) {
        let prefix = format!("slb-{}-", self.rig.tag());
        drop(self);
        assert_eq!(netns::listed_namespaces(&prefix), Vec::<String>::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_apart_and_inside_the_rig_range() {
        assert_eq!(lb_addr_of(1), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(lb_addr_of(MAX_BALANCERS), Ipv4Addr::new(198, 18, 0, 4));
        assert!(lb_addr_of(MAX_BALANCERS) < backend_addr_of(1));
        assert!(backend_addr_of(MAX_BACKENDS) < VIP);
        assert!(VIP < STORE_ADDR && STORE_ADDR < ROUTER_ADDR);
        assert_eq!(client_addr_of(1), Ipv4Addr::new(198, 19, 1, 1));
        assert_eq!(client_addr_of(MAX_CLIENTS), Ipv4Addr::new(198, 19, 1, 200));
        assert!(client_addr_of(MAX_CLIENTS) < ROUTER_CLIENT_ADDR);
        // Everything in 198.18.0.0/15; the clients' /24 off br0's /16.
        for addr in [VIP, STORE_ADDR, ROUTER_ADDR, ROUTER_CLIENT_ADDR, CLIENT_NET] {
            assert_eq!(u32::from(addr) >> 17, u32::from(RIG_NET) >> 17, "{addr}");
        }
        assert_ne!(u32::from(CLIENT_NET) >> 16, u32::from(RIG_NET) >> 16);
    }
}
