//! A loaded sticky-lb XDP program under BPF_PROG_TEST_RUN, unpinned and unattached, with small
//! tables, one service (198.18.0.100:80, or [2001:db8::100]:80 for IPv6) and three backends:
//! frames built in a test go in, the verdict, the bytes that come out and the map contents are
//! checked (the style of Katran's testing/fixtures). A second service of the other family can be
//! added, so frames of one family meet a program that also serves the other, and more services
//! on other ports; any of them may forward by tunnel instead of DSR ([`TunnelParams`]) or by NAT
//! ([`NatParams`], optionally with source NAT). Used by the data-path fixtures and the packet
//! fuzzer.

use crate::{netns::require_root, packet::Frame};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use sticky_lb::{
    dataplane::{Dataplane, LoadOptions},
    maglev,
};
use sticky_lb_common::{
    Backend, BackendId, BackendState, Counter, FEATURE_NAT, FlowEntry, FlowKey, Forwarding,
    NatEntry, NatKey, PROTO_TCP, Policy, SERVICE_SOURCE_NAT, Service, ServiceCounters, ServiceKey,
    StickEntry, StickKey, addr, addr::Family, hash::client_hash, map_names,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
pub const PORT: u16 = 80;
pub const RING: u32 = 251; // a small prime keeps the test fast; the logic is size-independent
pub const TIMEOUT_NS: u64 = 60_000_000_000;
/// The balancer interface's MAC as the program is told it (the source MAC of forwarded frames).
pub const OUR_MAC: [u8; 6] = [0x02, 0x5b, 0, 0, 0, 0xfe];

pub struct Fixture {
    pub dataplane: Dataplane,
    pub family: Family,
    pub key: ServiceKey,
    pub service: Service,
    pub backends: Vec<(BackendId, String, [u8; 6])>,
    pub stick: HashMap<MapData, StickKey, StickEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, ServiceCounters>,
    pub flows: HashMap<MapData, FlowKey, FlowEntry>,
    pub active: Array<MapData, i64>,
    /// The NAT reply table.
    pub nat: HashMap<MapData, NatKey, NatEntry>,
    /// A second service, of the other family, if [`Fixture::add_other_family`] added one.
    pub other: Option<OtherService>,
    /// Services [`Fixture::add_service`] added, in order.
    pub extra: Vec<OtherService>,
}

/// A service of a fixture besides the first: its own key, parameters and three backends.
#[derive(Clone)]
pub struct OtherService {
    pub family: Family,
    pub key: ServiceKey,
    pub service: Service,
    pub backends: Vec<(BackendId, String, [u8; 6])>,
}

/// The fixture's VIP of `family`.
pub fn vip_of(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => VIP.into(),
        Family::Ipv6 => VIP6.into(),
    }
}

/// The service key of the fixture's VIP of `family`, port [`PORT`].
fn service_key(family: Family) -> ServiceKey {
    service_key_on(family, PORT)
}

/// The service key of the fixture's VIP of `family` on `port`.
fn service_key_on(family: Family, port: u16) -> ServiceKey {
    ServiceKey {
        vip: addr::words(&vip_of(family)),
        port: port.to_be(),
        protocol: PROTO_TCP,
        family: family as u8,
    }
}

/// Tunnel forwarding for a service, as `forwarding: tunnel` configures it: the outer source
/// prefix (`source`/`prefix`, at most 32 host bits) and the interface MTU.
#[derive(Clone, Copy, Debug)]
pub struct TunnelParams {
    pub source: IpAddr,
    pub prefix: u8,
    pub mtu: u16,
}

impl TunnelParams {
    /// Makes `service` (of the source's family) a tunnel service with these parameters, written
    /// as the controller writes them: the prefix with its host bits cleared, the host bits of
    /// the address's last word (word 0 for IPv4, 3 for IPv6) in network order.
    pub fn apply(&self, service: &mut Service) {
        let family = Family::of(&self.source);
        let mask = addr::prefix_mask(family, self.prefix);
        let last = if family == Family::Ipv6 { 3 } else { 0 };
        service.forwarding = Forwarding::Tunnel as u8;
        service.tunnel_source = addr::masked(addr::words(&self.source), mask);
        service.tunnel_host_bits = !mask[last];
        service.mtu = self.mtu;
    }
}

/// NAT forwarding for a service, as `forwarding: nat` configures it: plain NAT (destination
/// only), or with `source` also source NAT from that address and the ports `first..first +
/// count` (host order).
#[derive(Clone, Copy, Debug)]
pub struct NatParams {
    pub source: Option<SourceNat>,
}

/// Source NAT: the balancer address translated connections leave from, and the port range.
#[derive(Clone, Copy, Debug)]
pub struct SourceNat {
    pub addr: IpAddr,
    pub first: u16,
    pub count: u32,
}

impl NatParams {
    /// Plain NAT (IPVS `-m`): only the destination is translated.
    pub const PLAIN: NatParams = NatParams { source: None };

    /// Full NAT from `addr`, ports `first..first + count`.
    pub fn source(addr: impl Into<IpAddr>, first: u16, count: u32) -> NatParams {
        NatParams {
            source: Some(SourceNat {
                addr: addr.into(),
                first,
                count,
            }),
        }
    }

    /// Makes `service` a NAT service with these parameters, written as the controller writes
    /// them (the address as map words, the range in host order).
    pub fn apply(&self, service: &mut Service) {
        service.forwarding = Forwarding::Nat as u8;
        service.flags &= !SERVICE_SOURCE_NAT;
        service.nat_source = [0; 4];
        service.nat_port_first = 0;
        service.nat_port_count = 0;
        if let Some(source) = self.source {
            service.flags |= SERVICE_SOURCE_NAT;
            service.nat_source = addr::words(&source.addr);
            service.nat_port_first = source.first;
            service.nat_port_count = source.count;
        }
    }
}

/// Three up backends of `service` (`family`), ids `first_id..first_id + 3`, named `NAME-0..2`,
/// MACs 02:TAG:00:00:00:01..03.
fn install_backends(
    dataplane: &mut Dataplane,
    family: Family,
    service: u32,
    first_id: BackendId,
    name: &str,
    tag: u8,
) -> Vec<(BackendId, String, [u8; 6])> {
    (0..3u32)
        .map(|i| {
            let id = first_id + i;
            let mac = [0x02, tag, 0, 0, 0, i as u8 + 1];
            let address: IpAddr = match family {
                Family::Ipv4 => Ipv4Addr::new(198, 18, 0, 11 + id as u8).into(),
                Family::Ipv6 => {
                    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11 + id as u16).into()
                }
            };
            let entry = Backend {
                addr: addr::words(&address),
                mac,
                state: BackendState::Up as u8,
                _pad: 0,
                service,
                weight: 1,
                port: PORT.to_be(),
                _pad2: 0,
            };
            dataplane.backends.set(id, &entry, 0).unwrap();
            (id, format!("{name}-{i}"), mac)
        })
        .collect()
}

/// `backends` as Maglev members of equal weight.
pub fn members(backends: &[(BackendId, String, [u8; 6])]) -> Vec<maglev::Member<'_>> {
    backends
        .iter()
        .map(|(id, name, _)| maglev::Member {
            id: *id,
            name,
            weight: 1,
        })
        .collect()
}

pub fn v4(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

impl Fixture {
    /// An IPv4 fixture whose service masks clients to `client_prefix` bits.
    pub fn new(client_prefix: u32) -> Fixture {
        Fixture::with_family(Family::Ipv4, client_prefix as u8)
    }

    /// An IPv6 fixture ([2001:db8::100]:80) masking clients to `client_prefix` bits.
    pub fn new_v6(client_prefix: u8) -> Fixture {
        Fixture::with_family(Family::Ipv6, client_prefix)
    }

    pub fn with_family(family: Family, client_prefix: u8) -> Fixture {
        require_root();
        let mut dataplane = Dataplane::load(
            None,
            LoadOptions {
                stick_table_size: 1 << 16,
                flow_table_size: 1 << 16,
                maglev_stride: RING,
                // The first service, one of the other family and six more (add_service).
                maglev_services: 8,
                interface_mac: OUR_MAC,
                log_level: 0,
            },
        )
        .expect("the kernel accepts the program");
        let backends = install_backends(&mut dataplane, family, 1, 5, "web", 0xbe);
        let key = service_key(family);
        let service = Service {
            id: 1,
            stick_timeout_ns: TIMEOUT_NS,
            client_mask: addr::prefix_mask(family, client_prefix),
            ..Default::default()
        };
        let stick = dataplane.take_map(map_names::STICK).unwrap();
        let stats = dataplane.take_map(map_names::STATS).unwrap();
        let service_stats = dataplane.take_map(map_names::SERVICE_STATS).unwrap();
        let flows = dataplane.take_map(map_names::FLOWS).unwrap();
        let active = dataplane.take_map(map_names::ACTIVE).unwrap();
        let nat = dataplane.take_map(map_names::NAT).unwrap();
        let mut fixture = Fixture {
            dataplane,
            family,
            key,
            service,
            backends,
            stick,
            stats,
            service_stats,
            flows,
            active,
            nat,
            other: None,
            extra: Vec::new(),
        };
        fixture.publish(&[0, 1, 2]);
        fixture
    }

    /// Adds a service of the other family (same port, service id 0, backends 9..12) masking
    /// clients to `client_prefix` bits, with a Maglev table of its three backends.
    pub fn add_other_family(&mut self, client_prefix: u8) -> &OtherService {
        let family = match self.family {
            Family::Ipv4 => Family::Ipv6,
            Family::Ipv6 => Family::Ipv4,
        };
        let backends = install_backends(&mut self.dataplane, family, 0, 9, "other", 0xbf);
        let key = service_key(family);
        let mut service = Service {
            id: 0,
            stick_timeout_ns: TIMEOUT_NS,
            client_mask: addr::prefix_mask(family, client_prefix),
            ..Default::default()
        };
        let table = maglev::Table::build(RING, &members(&backends));
        self.dataplane
            .publish_service(&key, &mut service, table.slots())
            .unwrap();
        self.other.insert(OtherService {
            family,
            key,
            service,
            backends,
        })
    }

    /// Makes the fixture's service a tunnel service and publishes it with all three backends.
    pub fn tunnel(&mut self, params: TunnelParams) -> maglev::Table {
        assert_eq!(
            Family::of(&params.source),
            self.family,
            "a source of the service's family"
        );
        params.apply(&mut self.service);
        self.publish(&[0, 1, 2])
    }

    /// Makes the fixture's service a NAT service, tells the data path to look for replies
    /// (FEATURE_NAT) and publishes it with all three backends.
    pub fn nat(&mut self, params: NatParams) -> maglev::Table {
        if let Some(source) = params.source {
            assert_eq!(
                Family::of(&source.addr),
                self.family,
                "a source of the service's family"
            );
        }
        params.apply(&mut self.service);
        self.set_features(FEATURE_NAT);
        self.publish(&[0, 1, 2])
    }

    /// Writes the features word (slot 0 of `slb_features`) as the controller does.
    pub fn set_features(&mut self, features: u32) {
        self.dataplane.set_features(features).unwrap();
    }

    /// Sets the port (host order) backend index `backend` listens on.
    pub fn set_backend_port(&mut self, backend: usize, port: u16) {
        let id = self.backends[backend].0;
        let mut entry = self.dataplane.backends.get(&id, 0).unwrap();
        entry.port = port.to_be();
        self.dataplane.backends.set(id, &entry, 0).unwrap();
    }

    /// The NAT reply table's entries.
    pub fn nat_entries(&self) -> Vec<(NatKey, NatEntry)> {
        self.nat.iter().map(|r| r.unwrap()).collect()
    }

    /// Adds a service of `family` on `port` of the fixture's VIP of that family: service id `id`
    /// (2 to 7; 1 is the first service's, 0 the other family's), masking clients to
    /// `client_prefix` bits, forwarding by tunnel if `tunnel` says so, with three backends of
    /// its own (ids 13 + 3 * (id - 2) on, MACs 02:c(id):00:00:00:01..03) in a Maglev table.
    pub fn add_service(
        &mut self,
        family: Family,
        port: u16,
        id: u32,
        client_prefix: u8,
        tunnel: Option<TunnelParams>,
    ) -> OtherService {
        self.add_service_with(family, port, id, client_prefix, |service| {
            if let Some(tunnel) = tunnel {
                tunnel.apply(service);
            }
        })
    }

    /// [`Fixture::add_service`] for a NAT service (`nat`); sets FEATURE_NAT.
    pub fn add_nat_service(
        &mut self,
        family: Family,
        port: u16,
        id: u32,
        client_prefix: u8,
        nat: NatParams,
    ) -> OtherService {
        self.set_features(FEATURE_NAT);
        self.add_service_with(family, port, id, client_prefix, |service| {
            nat.apply(service)
        })
    }

    fn add_service_with(
        &mut self,
        family: Family,
        port: u16,
        id: u32,
        client_prefix: u8,
        forwarding: impl FnOnce(&mut Service),
    ) -> OtherService {
        assert!(
            (2..8).contains(&id),
            "ids 0 and 1 are taken; the Maglev array holds 8"
        );
        let name = format!("svc{id}");
        let backends = install_backends(
            &mut self.dataplane,
            family,
            id,
            13 + 3 * (id - 2),
            &name,
            0xc0 | id as u8,
        );
        let key = service_key_on(family, port);
        let mut service = Service {
            id,
            stick_timeout_ns: TIMEOUT_NS,
            client_mask: addr::prefix_mask(family, client_prefix),
            ..Default::default()
        };
        forwarding(&mut service);
        let table = maglev::Table::build(RING, &members(&backends));
        self.dataplane
            .publish_service(&key, &mut service, table.slots())
            .unwrap();
        let added = OtherService {
            family,
            key,
            service,
            backends,
        };
        self.extra.push(added.clone());
        added
    }

    /// The backend entry (as the program reads it) of backend index `backend`.
    pub fn backend_entry(&self, backend: usize) -> Backend {
        self.dataplane
            .backends
            .get(&self.backends[backend].0, 0)
            .unwrap()
    }

    /// The stick key of `client` in this fixture's service (masked as the program masks it).
    pub fn stick_key(&self, client: impl Into<IpAddr>) -> StickKey {
        let client = client.into();
        assert_eq!(
            Family::of(&client),
            self.family,
            "a client of the service's family"
        );
        StickKey {
            service: self.service.id,
            client: addr::masked(addr::words(&client), self.service.client_mask),
        }
    }
    /// Publishes a Maglev table made of the given backends (indexes into `self.backends`).
    pub fn publish(&mut self, indexes: &[usize]) -> maglev::Table {
        let chosen: Vec<_> = indexes.iter().map(|&i| self.backends[i].clone()).collect();
        let table = maglev::Table::build(RING, &members(&chosen));
        self.dataplane
            .publish_service(&self.key, &mut self.service, table.slots())
            .unwrap();
        table
    }

    /// Turns the service into a least-connections one over the given backends.
    pub fn least_conn(&mut self, members: &[usize]) {
        self.service.policy = Policy::LeastConn as u8;
        let ids: Vec<BackendId> = members.iter().map(|&i| self.backends[i].0).collect();
        self.dataplane
            .publish_service(&self.key, &mut self.service, &ids)
            .unwrap();
    }

    pub fn set_weight(&mut self, backend: usize, weight: u32) {
        let id = self.backends[backend].0;
        let mut entry = self.dataplane.backends.get(&id, 0).unwrap();
        entry.weight = weight;
        self.dataplane.backends.set(id, &entry, 0).unwrap();
    }

    pub fn active(&self, backend: usize) -> i64 {
        self.active.get(&self.backends[backend].0, 0).unwrap()
    }

    pub fn set_active(&mut self, backend: usize, count: i64) {
        self.active
            .set(self.backends[backend].0, &count, 0)
            .unwrap();
    }

    /// Index of the backend a forwarded frame went to.
    pub fn forwarded_to(&self, (verdict, out): &(u32, Vec<u8>)) -> usize {
        assert_eq!(*verdict, XDP_TX);
        self.backends
            .iter()
            .position(|b| b.2 == out[0..6])
            .expect("a backend's MAC")
    }

    pub fn set_state(&mut self, backend: usize, state: BackendState) {
        let id = self.backends[backend].0;
        let mut entry = self.dataplane.backends.get(&id, 0).unwrap();
        entry.state = state as u8;
        self.dataplane.backends.set(id, &entry, 0).unwrap();
    }

    /// Runs one frame; returns the verdict and the frame as the program left it.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        run_on(self.dataplane.program(), frame)
    }

    /// A second handle on the connection table (for a sweep running beside the program).
    pub fn flows_handle(&self) -> HashMap<MapData, FlowKey, FlowEntry> {
        HashMap::try_from(aya::maps::Map::HashMap(reopen(IterableMap::map(
            &self.flows,
        ))))
        .unwrap()
    }

    /// A second handle on the backends (for a thread beside the program).
    pub fn backends_handle(&self) -> Array<MapData, Backend> {
        Array::try_from(aya::maps::Map::Array(reopen(IterableMap::map(
            &self.dataplane.backends,
        ))))
        .unwrap()
    }

    /// A second handle on the active counts (for a thread beside the program).
    pub fn active_handle(&self) -> Array<MapData, i64> {
        Array::try_from(aya::maps::Map::Array(reopen(IterableMap::map(
            &self.active,
        ))))
        .unwrap()
    }

    /// The active count of backend id `id`.
    pub fn active_of(&self, id: BackendId) -> i64 {
        self.active.get(&id, 0).unwrap()
    }

    /// Writes a stick entry as it is (any version, any times).
    pub fn set_stick_entry(&mut self, client: impl Into<IpAddr>, entry: StickEntry) {
        let key = self.stick_key(client);
        self.stick.insert(&key, &entry, 0).unwrap();
    }

    /// Removes a client's stick entry (as the sweep or an LRU eviction would).
    pub fn remove_stick(&mut self, client: impl Into<IpAddr>) {
        let key = self.stick_key(client);
        self.stick.remove(&key).unwrap();
    }

    /// The backend (index) the Maglev table gives a client, computed the way the program does.
    pub fn predicted(&self, table: &maglev::Table, client: impl Into<IpAddr>) -> usize {
        let masked = self.stick_key(client).client;
        let id = table.lookup(client_hash(&masked, self.service.id));
        self.index_of(id)
    }

    pub fn index_of(&self, id: BackendId) -> usize {
        self.backends
            .iter()
            .position(|b| b.0 == id)
            .expect("a known backend id")
    }

    pub fn stick_entry(&self, client: impl Into<IpAddr>) -> Option<StickEntry> {
        let key = self.stick_key(client);
        self.stick.get(&key, 0).ok()
    }

    pub fn set_stick(&mut self, client: impl Into<IpAddr>, backend: usize, last_seen_ns: u64) {
        let key = self.stick_key(client);
        let entry = StickEntry {
            backend: self.backends[backend].0,
            version: 0,
            last_seen_ns,
            created_ns: last_seen_ns,
        };
        self.stick.insert(&key, &entry, 0).unwrap();
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.stats.get(&(counter as u32), 0).unwrap().iter().sum()
    }

    pub fn service_counters(&self) -> ServiceCounters {
        ServiceCounters::sum(self.service_stats.get(&self.service.id, 0).unwrap().iter())
    }

    /// Asserts the frame was forwarded to `backend` by DSR: destination MAC = the backend's,
    /// source MAC = ours, every other byte unchanged.
    pub fn assert_forwarded(
        &self,
        input: &[u8],
        (verdict, output): (u32, Vec<u8>),
        backend: usize,
    ) {
        assert_eq!(verdict, XDP_TX, "expected XDP_TX");
        assert_eq!(output.len(), input.len());
        assert_eq!(output[0..6], self.backends[backend].2, "destination MAC");
        assert_eq!(output[6..12], OUR_MAC, "source MAC");
        assert_eq!(
            output[12..],
            input[12..],
            "bytes after the MACs must be untouched"
        );
    }
}

/// Runs one frame through `program` (which may be shared by several threads).
pub fn run_on(program: &Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Another handle on the same kernel map.
fn reopen(map: &MapData) -> MapData {
    MapData::from_id(map.info().unwrap().id()).unwrap()
}

pub fn assert_passed_untouched(input: &[u8], (verdict, output): (u32, Vec<u8>)) {
    assert_eq!(verdict, XDP_PASS, "expected XDP_PASS");
    assert_eq!(output, input, "a passed frame must be untouched");
}

pub fn client(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, n)
}

/// An IPv6 client: number `n` of /64 number `net` (2001:db8:1:NET::N).
pub fn client6(net: u16, n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, net, 0, 0, 0, n)
}

/// A TCP segment from `client:port` to the fixture's VIP of the client's family, with the given
/// flags.
pub fn segment(client_addr: impl Into<IpAddr>, port: u16, flags: u8) -> Vec<u8> {
    let client_addr = client_addr.into();
    let mut frame = Frame::tcp_syn(client_addr, vip_of(Family::of(&client_addr)), PORT);
    frame.src_port = port;
    frame.tcp_flags = flags;
    frame.build()
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN_ACK: u8 = 0x11;
pub const RST: u8 = 0x04;
