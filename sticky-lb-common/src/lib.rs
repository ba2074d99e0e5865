//! Map keys and values shared by the sticky-lb XDP program and its controller.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the kernel side and the user
//! side agree on the layout byte for byte. Addresses are always 16 bytes (`[u32; 4]` holding the
//! address bytes in network order, see [`addr`]): an IPv4 address sits in word 0 with words 1..4
//! zero, an IPv6 address fills all four, so both families share every key and one code path.
#![no_std]

pub mod addr;
pub mod decap;
pub mod hash;

pub use addr::Family;

/// Index of a backend in the backends map. Stick entries hold this id, never a table position,
/// so rebuilding a Maglev table never invalidates a stuck client.
pub type BackendId = u32;
/// Index of a service; part of every stick key so services never share entries.
pub type ServiceId = u32;

/// Bump when any map layout below changes; pinned maps of another version are not reused. The
/// layout is the maps' types, sizes and key and value bytes, not the BTF the maps carry for
/// `bpftool` (adoption ignores it; see sticky-lb-ebpf/src/maps.rs).
pub const LAYOUT_VERSION: u32 = 6;

/// Virtual services per interface.
pub const MAX_SERVICES: u32 = 64;
/// Slots of the service index (a power of two, far more than services, so probe chains stay
/// short).
pub const SERVICE_INDEX_SLOTS: u32 = 1024;
/// Slots the data path probes in the service index before deciding a packet is not for a
/// service; the controller never places a service further from its hash slot.
pub const SERVICE_INDEX_PROBES: u32 = 4;
/// A service-index slot whose service was removed: lookups probe past it.
pub const SERVICE_INDEX_TOMBSTONE: u32 = u32::MAX;
/// Capacity of the backends map (backend ids across all services).
pub const MAX_BACKENDS: u32 = 4096;
/// Default stick-table size, like HAProxy `stick-table size 1m`.
pub const DEFAULT_STICK_TABLE_SIZE: u32 = 1 << 20;
/// Default size of the connection table (every open TCP connection of every service, about 90
/// bytes of kernel memory each: 1M entries take about 90 MB).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// A least-connections service compares at most this many backends per new client: the bound
/// keeps the data path's loop short enough for the verifier and the per-packet budget.
pub const MAX_LEAST_CONN_BACKENDS: u32 = 32;
/// Default Maglev lookup-table size (prime, as the paper requires).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;
/// The owning service of an unused backend slot (no service has this id).
pub const NO_SERVICE: ServiceId = u32::MAX;
/// Marks an empty Maglev slot (a service with no eligible backend).
pub const NO_BACKEND: BackendId = u32::MAX;
/// A stick entry's or a connection's last-seen time is rewritten only once it is this old (or half
/// the stick timeout, if that is shorter), so a busy client costs a map write at most once a
/// second instead of once a packet.
pub const STICK_REFRESH_NS: u64 = 1_000_000_000;

/// How old a last-seen time (ns) may get before a packet rewrites it: the smaller of
/// [`STICK_REFRESH_NS`] and half the timeout (ns), so an entry used more often than its timeout
/// is always refreshed before it expires, whatever the timeout.
#[inline(always)]
pub fn refresh_interval_ns(timeout_ns: u64) -> u64 {
    let half = timeout_ns >> 1;
    if half < STICK_REFRESH_NS {
        half
    } else {
        STICK_REFRESH_NS
    }
}

/// Time (ns) since `last_seen_ns` at `now_ns`. A last-seen time ahead of `now` (another CPU read
/// the coarse clock just after a tick this CPU has not seen yet) is idle 0, never a huge
/// wrapped-around idle time that would expire a live entry.
#[inline(always)]
pub fn idle_ns(now_ns: u64, last_seen_ns: u64) -> u64 {
    now_ns.saturating_sub(last_seen_ns)
}

/// Map names (at most 15 characters: the kernel truncates longer names and reuse by name breaks).
pub mod map_names {
    pub const SERVICE_INDEX: &str = "slb_svc_index";
    pub const SERVICES: &str = "slb_services";
    pub const BACKENDS: &str = "slb_backends";
    pub const MAGLEV: &str = "slb_maglev";
    pub const STICK: &str = "slb_stick";
    pub const STATS: &str = "slb_stats";
    pub const BACKEND_STATS: &str = "slb_backend_st";
    pub const SERVICE_STATS: &str = "slb_service_st";
    pub const FLOWS: &str = "slb_flows";
    pub const ACTIVE: &str = "slb_active";
    pub const META: &str = "slb_meta";
    pub const INSERT_BUDGET: &str = "slb_ins_budget";
    pub const NAT: &str = "slb_nat";
    pub const FEATURES: &str = "slb_features";
    pub const EVENTS: &str = "slb_events";
    pub const ALL: [&str; 15] = [
        SERVICE_INDEX,
        SERVICES,
        BACKENDS,
        MAGLEV,
        STICK,
        STATS,
        BACKEND_STATS,
        SERVICE_STATS,
        FLOWS,
        ACTIVE,
        META,
        INSERT_BUDGET,
        NAT,
        FEATURES,
        EVENTS,
    ];
}

/// IP protocol numbers used in [`ServiceKey::protocol`].
pub const PROTO_TCP: u8 = 6;

/// What a packet must be addressed to for the balancer to take it; a service's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub vip: [u32; 4],
    /// Destination port in network byte order, as it sits in the TCP header.
    pub port: u16,
    pub protocol: u8,
    /// A [`Family`] value: an IPv6 VIP whose words equal an IPv4 VIP's is another service.
    pub family: u8,
}

/// How a service picks a backend for a client it has not seen (or whose backend is gone).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Maglev consistent hash of the masked client address.
    IpHash = 0,
    /// Fewest active connections per unit of weight.
    LeastConn = 1,
}

impl Policy {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::LeastConn,
            _ => Self::IpHash,
        }
    }
}

/// How packets reach the chosen backend.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// L2 direct server return (IPVS `-g`): rewrite MACs, XDP_TX; the backend answers the client.
    Dsr = 0,
    /// IP-in-IP tunnel (IPVS `-i`, Katran): the client's packet, unchanged, inside an outer IPv4
    /// header (protocol 4, IPIP) or IPv6 header (next header 41, IPv6-in-IPv6) from a balancer
    /// address to the backend, sent to the backend's next hop; the backend decapsulates and
    /// answers the client directly.
    Tunnel = 1,
    /// NAT (IPVS `-m`): the destination VIP:port becomes the backend's address and port (and
    /// with source NAT the source becomes a balancer address and port); the backend's replies
    /// come back through the balancer, which translates them back. Backends need no change
    /// beyond their route back (none at all with source NAT).
    Nat = 2,
}

impl Forwarding {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Tunnel,
            2 => Self::Nat,
            _ => Self::Dsr,
        }
    }
}

/// [`Service::flags`] bit: NAT with source NAT (IPVS FNAT, LoxiLB fullnat).
pub const SERVICE_SOURCE_NAT: u8 = 1;

/// [`Service::flags`] bit: the service's stick table is shared with other balancer nodes, so
/// every new or re-placed stick entry leaves the data path as a [`StickEvent`].
pub const SERVICE_SHARED: u8 = 2;
/// [`Service::flags`] bit: `stick: {mode: none}`. No stick entry is read or written: every new
/// connection is placed by the policy alone (the application keeps its sessions in a shared
/// store); the connection table still keeps each connection on its backend.
pub const SERVICE_NO_STICK: u8 = 4;

/// [`FEATURES`](map_names::FEATURES) slot 0 bit: some service uses NAT, so TCP segments that
/// are not for a service are looked up as possible backend replies. Without it pass-through
/// traffic costs no lookup.
pub const FEATURE_NAT: u32 = 1;
/// Default source-NAT ports, host order: below Linux's default ephemeral range
/// (net.ipv4.ip_local_port_range 32768-60999), so the balancer's own connections (health
/// checks) from the same address never take a port a translated connection holds.
pub const DEFAULT_NAT_PORTS: (u16, u16) = (1024, 32767);
/// Ports a new source-NAT connection tries before it is refused (`drop_nat_ports_exhausted`;
/// the client's retransmitted SYN, a second later, tries other ports): a stride apart from a
/// hash of the client's address, port and the time.
pub const NAT_PORT_PROBES: u32 = 8;
/// How long a source-NAT port stays held after its connection ended (ns). The side that closes
/// first keeps the connection's addresses and ports in TIME_WAIT for 60 s on Linux
/// (TCP_TIMEWAIT_LEN; the backend, when it closes first); a new connection from the same
/// balancer address and port to the same backend before that lands on it, and unless its
/// timestamps happen to be newer the backend answers with an ACK for the old connection, the
/// client resets, and connecting takes a second more. Five seconds more for segments in flight.
/// A busy backend can therefore take at most (ports in the range) / 65 s new full-NAT
/// connections a second from one balancer address: 488/s with the default range, 992/s with
/// 1024-65535.
pub const NAT_PORT_REUSE_NS: u64 = 65_000_000_000;

/// A service's parameters (the services array holds two copies per service, indexed
/// `id * 2 + generation`; the service index points at the current one).
///
/// The service's address is part of the value: the data path finds a service through a small
/// hash index of array slots (array lookups are inlined by the verifier, a hash-map lookup costs
/// tens of nanoseconds on every TCP packet) and checks the address to rule out collisions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub vip: [u32; 4],
    /// Destination port in network byte order.
    pub port: u16,
    pub protocol: u8,
    /// A [`Policy`] value.
    pub policy: u8,
    pub id: ServiceId,
    /// A [`Forwarding`] value.
    pub forwarding: u8,
    pub flags: u8,
    /// A [`Family`] value: the family of `vip`, its backends and its clients. A packet of the
    /// other family never matches, even if its address words equal `vip`'s.
    pub family: u8,
    pub _pad: u8,
    /// First slot of this service's active table in the Maglev array: the Maglev table for
    /// `ip-hash`, the list of up backends for `least-conn`. The controller writes the inactive
    /// copy of the table and of these parameters, then points the service index at the new
    /// parameters with one aligned 32-bit store: a packet sees the old service or the new one,
    /// never half of each.
    pub ring_base: u32,
    /// Size of this service's Maglev table (a prime), or the number of listed backends.
    pub ring_size: u32,
    /// Flood guard: the least time (ns) between two new stick entries on one CPU, on average
    /// (a rate limit of 1e9 / this per CPU per second, with a burst of one second's worth); a
    /// client above it is placed by the policy's hash without an entry. 0 = no limit.
    pub insert_interval_ns: u32,
    /// A stick entry idle longer than this is treated as absent and swept.
    pub stick_timeout_ns: u64,
    /// Mask applied to the client address before it keys the stick table and the hash
    /// (IPVS `-M`, HAProxy `ipmask`); bytes in network order like the address.
    pub client_mask: [u32; 4],
    /// Tunnel: the outer source prefix, network order (its host bits zero). Each client's packets
    /// leave from one address of it, the prefix with the client's hash in its host bits, so a
    /// backend NIC hashing the outer addresses (RSS) spreads clients over its queues (Katran's
    /// "RSS-friendly" source).
    pub tunnel_source: [u32; 4],
    /// Tunnel: the host bits of the outer source's last word (word 0 for IPv4, 3 for IPv6), in
    /// network order; 0 for a single source address.
    pub tunnel_host_bits: u32,
    /// Tunnel: the largest IP packet (bytes) the interface sends, its MTU. A client packet that
    /// no longer fits once encapsulated is answered with ICMP "fragmentation needed" or ICMPv6
    /// "packet too big" naming `mtu` less the outer header.
    pub mtu: u16,
    /// Source NAT: the first port of the range (host order).
    pub nat_port_first: u16,
    /// Source NAT: the balancer address translated connections leave from (network order).
    pub nat_source: [u32; 4],
    /// Source NAT: how many ports the range holds (host order); at most 65535.
    pub nat_port_count: u32,
    pub _pad3: u32,
}

/// Key of the stick table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StickKey {
    pub service: ServiceId,
    /// Client address with the service's mask applied.
    pub client: [u32; 4],
}

/// Value of the stick table: where a client goes and how long it has been going there.
///
/// `backend` and `version` form one aligned 64-bit word ([`StickEntry::placement`]) that the data
/// path replaces with a compare-and-exchange, so when several CPUs re-place one client at once
/// (an expired entry, a backend that went down) the first choice wins everywhere. An odd
/// version marks a replacement in progress (its backend is already the winner's); the writer
/// then stamps the times and makes the version even again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StickEntry {
    pub backend: BackendId,
    /// Incremented twice by every replacement (odd while it is in progress).
    pub version: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of the last packet, at [`STICK_REFRESH_NS`] granularity.
    pub last_seen_ns: u64,
    /// `bpf_ktime_get_coarse_ns` when the client was first assigned to this backend.
    pub created_ns: u64,
}

impl StickEntry {
    /// A fresh entry placing a client on `backend` at `now_ns`.
    pub const fn placed(backend: BackendId, now_ns: u64) -> StickEntry {
        StickEntry {
            backend,
            version: 0,
            last_seen_ns: now_ns,
            created_ns: now_ns,
        }
    }

    /// `backend` and `version` as the one 64-bit word the data path compares and exchanges
    /// (little-endian: the backend in the low half).
    pub const fn placement(&self) -> u64 {
        Self::placement_word(self.backend, self.version)
    }

    /// The placement word of `backend` at `version`.
    pub const fn placement_word(backend: BackendId, version: u32) -> u64 {
        backend as u64 | (version as u64) << 32
    }

    pub const fn placement_backend(word: u64) -> BackendId {
        word as u32
    }

    pub const fn placement_version(word: u64) -> u32 {
        (word >> 32) as u32
    }
}

/// Bytes of the stick-event ring buffer ([`map_names::EVENTS`]): a power of two and a multiple
/// of the page size, as the kernel requires. Each event takes 48 bytes with the ring's 8-byte
/// header, so it holds 21,845 events: a second of new clients at 20,000/s while the controller
/// is busy elsewhere.
pub const EVENT_RING_BYTES: u32 = 1 << 20;

/// What the data path reports when it writes a stick entry of a shared service
/// ([`SERVICE_SHARED`]): once per insert or re-placement, never per packet. The controller
/// publishes it to the other balancer nodes (by service and backend *name*: ids are local).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StickEvent {
    pub service: ServiceId,
    /// The backend the client is placed on now.
    pub backend: BackendId,
    /// A redispatch: the live entry's backend the client was moved off (down, disabled or
    /// gone). [`NO_BACKEND`] for a new entry or one that had expired.
    pub previous: BackendId,
    pub _pad: u32,
    /// The client address as it keys the stick table (masked), network order.
    pub client: [u32; 4],
    /// `bpf_ktime_get_coarse_ns` when the entry was written (CLOCK_MONOTONIC_COARSE).
    pub created_ns: u64,
}

/// Key of the connection table: one TCP connection of a service (the VIP and port are the
/// service's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub service: ServiceId,
    /// The client's full address (not masked: each connection counts).
    pub client: [u32; 4],
    /// Client port in network byte order.
    pub client_port: u16,
    pub _pad: u16,
}

/// Value of the connection table: the backend an open connection is forwarded to for its whole
/// life (whatever happens to its client's stick entry), and which counts it as active.
///
/// `backend`, `state` and `tag` share one aligned 64-bit word ([`FlowEntry::word`]) changed only
/// by compare-and-exchange: a connection stops counting on its backend exactly once, by whoever moves
/// it to [`FlowState::Closing`] first (its FIN or RST, or the controller expiring it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub backend: BackendId,
    /// A [`FlowState`] value.
    pub state: u8,
    /// [`FlowKey::tag`] of the connection's key: a CPU that still holds a pointer to an entry
    /// deleted and reused for another connection (a preallocated hash map reuses entries at
    /// once) sees a tag that is not its own and leaves the entry alone.
    pub tag: [u8; 3],
    /// Refreshed at [`refresh_interval_ns`] granularity; the controller expires idle flows.
    pub last_seen_ns: u64,
    /// Source NAT: the balancer port the connection leaves from (network order); else 0.
    pub nat_port: u16,
    pub _pad: [u8; 6],
}

/// Where a connection is in its life, as far as the client's half shows it (in DSR the server's
/// half is never seen). Like IPVS, each state has its own idle timeout, so a flood of SYNs that
/// never complete leaves the table quickly.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// Only the client's SYN seen (IPVS SYN_RECV): `flow_opening_timeout`.
    Opening = 0,
    /// The client sent a segment without SYN (its handshake ACK): `flow_idle_timeout`.
    Established = 1,
    /// The client sent its FIN (IPVS FIN_WAIT/TIME_WAIT): no longer counted, but still
    /// forwarded to its backend, which may go on sending (a half-close) while the client ACKs;
    /// `flow_closing_timeout`.
    Closing = 2,
}

impl FlowState {
    /// Whether a connection in this state counts on its backend's active count.
    pub const fn is_counted(state: u8) -> bool {
        state == FlowState::Opening as u8 || state == FlowState::Established as u8
    }
}

impl FlowEntry {
    /// A new connection of `key` on `backend` in `state`, last seen at `now_ns`.
    pub const fn new(
        key: &FlowKey,
        backend: BackendId,
        state: FlowState,
        now_ns: u64,
    ) -> FlowEntry {
        let tag = key.tag().to_le_bytes();
        FlowEntry {
            backend,
            state: state as u8,
            tag: [tag[0], tag[1], tag[2]],
            last_seen_ns: now_ns,
            nat_port: 0,
            _pad: [0; 6],
        }
    }

    /// The state byte of a word (little-endian: the backend in the low half, then the state,
    /// then the 24-bit tag).
    pub const fn word_state(word: u64) -> u8 {
        (word >> 32) as u8
    }

    pub const fn word_tag(word: u64) -> u32 {
        (word >> 40) as u32
    }

    /// `word` with its state replaced.
    pub const fn word_with_state(word: u64, state: FlowState) -> u64 {
        word & !(0xff << 32) | (state as u64) << 32
    }
}

impl FlowKey {
    /// 24 bits derived from the whole key (murmur3's finaliser over its words).
    pub const fn tag(&self) -> u32 {
        let mut h = self.service ^ (self.client_port as u32) << 16;
        let mut i = 0;
        while i < 4 {
            h = hash::fmix32(h ^ self.client[i]);
            i += 1;
        }
        h & 0x00ff_ffff
    }
}

/// Key of the NAT reply table: a translated connection as its backend's replies carry it.
/// `peer` is the client (plain NAT) or the balancer's source-NAT address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub backend: [u32; 4],
    pub peer: [u32; 4],
    /// Network byte order, as in the TCP header.
    pub backend_port: u16,
    pub peer_port: u16,
    /// A [`Family`] value (a whole word: no padding for the compiler to zero).
    pub family: u32,
}

/// Value of the NAT reply table: what a reply's addresses become, and the connection it belongs
/// to, which must still be open on `backend` (a stale entry never translates anything).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub client: [u32; 4],
    pub vip: [u32; 4],
    pub service: ServiceId,
    pub backend: BackendId,
    /// Network byte order.
    pub client_port: u16,
    pub vip_port: u16,
    /// The L2 source of the client's segments (the client, or the router it is behind): where
    /// replies go.
    pub client_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Input of the `expire_flow` program: which connection to end, and only if its client was
/// last seen before `seen_before_ns` (u64::MAX: whatever its last-seen time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpireRequest {
    pub key: FlowKey,
    pub seen_before_ns: u64,
}

/// What `expire_flow` did (its return value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpireOutcome {
    /// No such connection, or it was used since `seen_before_ns`: kept.
    Kept = 0,
    /// Deleted; it had already stopped counting (closing).
    Deleted = 1,
    /// Deleted, and this call took it off its backend's active count.
    Uncounted = 2,
}

/// Per-CPU, per-service state of the flood guard: a generic cell rate algorithm (GCRA, ITU-T
/// I.371) over new stick entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InsertBudget {
    /// Theoretical arrival time (ns, coarse monotonic clock) of the next new entry.
    pub next_ns: u64,
}

/// A backend's state in the data path.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// The slot holds no backend.
    Unused = 0,
    /// Eligible for new clients and its stuck clients.
    Up = 1,
    /// No new clients; stuck clients keep going until their entries expire.
    Drain = 2,
    /// Failed health checks: stuck clients are redispatched.
    Down = 3,
    /// Taken out by the operator: as `Down`, without checks.
    Disabled = 4,
}

impl BackendState {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Up,
            2 => Self::Drain,
            3 => Self::Down,
            4 => Self::Disabled,
            _ => Self::Unused,
        }
    }

    /// Whether clients already stuck to a backend in this state keep reaching it.
    pub fn keeps_stuck_clients(self) -> bool {
        matches!(self, Self::Up | Self::Drain)
    }
}

/// Value of the backends map, indexed by [`BackendId`]. Slots without a backend hold
/// [`Backend::UNUSED`] and are never forwarded to: every pick checks the state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Destination MAC for DSR.
    pub mac: [u8; 6],
    /// A [`BackendState`] value.
    pub state: u8,
    pub _pad: u8,
    /// The service this backend serves; a stick entry pointing at a backend of another service
    /// (a reused id) is treated as a miss.
    pub service: ServiceId,
    pub weight: u32,
    /// NAT: the port the backend listens on (network order); other modes leave the port alone.
    pub port: u16,
    pub _pad2: u16,
}

impl Backend {
    /// What a slot without a backend holds (also a removed backend's slot).
    pub const UNUSED: Backend = Backend {
        addr: [0; 4],
        mac: [0; 6],
        state: BackendState::Unused as u8,
        _pad: 0,
        service: NO_SERVICE,
        weight: 0,
        port: 0,
        _pad2: 0,
    };
}

/// Indexes of the global per-CPU counters (`slb_stats`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Passed to the kernel: neither IPv4 nor IPv6 (ARP, LLDP...).
    PassNotIp = 0,
    /// Passed: IP not addressed to a configured service (VIP, port, TCP), including ICMP and
    /// ICMPv6 (so neighbour discovery).
    PassNotService = 1,
    /// Passed: an IPv4 fragment or an IPv6 packet with a fragment header (no reliable ports;
    /// see README "Limits").
    PassFragment = 2,
    /// Passed: the frame ends inside a header it claims to carry.
    PassTruncated = 3,
    /// Dropped: the service has no eligible backend.
    DropNoBackend = 4,
    /// Dropped: the table named a backend that is not up (a slot in use by no backend, or one
    /// that changed state in the moment before the controller published a new table).
    DropBadBackend = 5,
    /// Aborted: the service index named a parameters slot that does not exist (a controller
    /// bug; XDP_ABORTED also fires the xdp_exception tracepoint).
    Aborted = 6,
    /// Passed: an IP header that is not well formed (IPv4: version not 4, IHL below 5, total
    /// length shorter than its headers or longer than the frame; IPv6: version not 6, payload
    /// length shorter than its extension and TCP headers or longer than the frame, or 0 (a
    /// jumbogram)).
    PassBadIpHeader = 7,
    /// Passed: a TCP header that is not well formed (data offset below 5 or past the packet).
    PassBadTcpHeader = 8,
    /// Passed: an IPv6 packet with more hop-by-hop, routing and destination-options headers
    /// before TCP than the parser follows ([`MAX_IPV6_EXT_HEADERS`]). (A next header of another
    /// kind, ESP or AH say, is not TCP: `pass_not_service`.)
    PassIpv6ExtHeaders = 9,
    /// Sent back: ICMP "fragmentation needed" or ICMPv6 "packet too big" to a client whose
    /// packet would exceed the interface MTU once encapsulated (tunnel services).
    TxIcmpTooBig = 10,
    /// Dropped: the frame could not be resized for a tunnel's outer header or an ICMP reply
    /// (drivers with XDP support leave 256 bytes in front; passing it instead would make the
    /// host's TCP reset the client's connection).
    DropResizeFailed = 11,
    /// Forwarded: an ICMP "fragmentation needed" / ICMPv6 "packet too big" about a VIP's reply,
    /// sent on to the backend that owns the connection (its connection or its client's stick
    /// entry), so path-MTU discovery works through the balancer.
    TxIcmpToBackend = 12,
    /// Passed: such an ICMP error about a connection no table knows (or whose backend no longer
    /// serves); the host, which has no such connection, ignores it.
    PassIcmpNoFlow = 13,
    /// Dropped: an ICMP error for a tunnel service's backend that does not fit the MTU once
    /// encapsulated (ICMP errors are never answered with ICMP errors, RFC 1122 3.2.2).
    DropTooBig = 14,
    /// Translated: a backend's reply on a NAT connection, sent back to the client.
    TxNatReply = 15,
    /// Dropped: a segment addressed like a NAT reply whose connection is over or now on another
    /// backend (a removed backend still sending, say): never translated wrongly.
    DropNatStaleReply = 16,
    /// Dropped: a new source-NAT connection found no free port among its probes.
    DropNatPortsExhausted = 17,
    /// Dropped: a new NAT connection could not be recorded (connection table full): its replies
    /// could not be translated. The client retries.
    DropNatUntracked = 18,
    /// Dropped: an IPv6 segment to a NAT service with extension headers before TCP (the
    /// translation rewrites the TCP header right after the fixed header only).
    DropNatExtHeaders = 19,
    /// Not a packet verdict: a stick event of a shared service was lost because the event ring
    /// was full (the controller fell behind); the entry itself was written and serves locally,
    /// other nodes learn it at the next resync.
    StickEventsLost = 20,
}

/// Number of [`Counter`]s. Forwarded packets are not counted here but per backend
/// ([`BackendCounters`]), so the forwarding path touches one counter map fewer.
pub const COUNTER_COUNT: u32 = 21;
/// Slots of the counters map: room for counters to come without a layout change.
pub const COUNTER_SLOTS: u32 = 32;
/// IPv6 extension headers the data path skips to reach TCP (RFC 8200 4.1 recommends at most one
/// of each kind, destination options twice: five; real traffic to a VIP carries none or one).
pub const MAX_IPV6_EXT_HEADERS: u32 = 4;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::PassNotIp,
        Counter::PassNotService,
        Counter::PassFragment,
        Counter::PassTruncated,
        Counter::DropNoBackend,
        Counter::DropBadBackend,
        Counter::Aborted,
        Counter::PassBadIpHeader,
        Counter::PassBadTcpHeader,
        Counter::PassIpv6ExtHeaders,
        Counter::TxIcmpTooBig,
        Counter::DropResizeFailed,
        Counter::TxIcmpToBackend,
        Counter::PassIcmpNoFlow,
        Counter::DropTooBig,
        Counter::TxNatReply,
        Counter::DropNatStaleReply,
        Counter::DropNatPortsExhausted,
        Counter::DropNatUntracked,
        Counter::DropNatExtHeaders,
        Counter::StickEventsLost,
    ];

    /// Name used by `status` and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotService => "pass_not_service",
            Counter::PassFragment => "pass_fragment",
            Counter::PassTruncated => "pass_truncated",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropBadBackend => "drop_bad_backend",
            Counter::Aborted => "aborted",
            Counter::PassBadIpHeader => "pass_bad_ip_header",
            Counter::PassBadTcpHeader => "pass_bad_tcp_header",
            Counter::PassIpv6ExtHeaders => "pass_ipv6_ext_headers",
            Counter::TxIcmpTooBig => "tx_icmp_too_big",
            Counter::DropResizeFailed => "drop_resize_failed",
            Counter::TxIcmpToBackend => "tx_icmp_to_backend",
            Counter::PassIcmpNoFlow => "pass_icmp_no_flow",
            Counter::DropTooBig => "drop_too_big",
            Counter::TxNatReply => "tx_nat_reply",
            Counter::DropNatStaleReply => "drop_nat_stale_reply",
            Counter::DropNatPortsExhausted => "drop_nat_ports_exhausted",
            Counter::DropNatUntracked => "drop_nat_untracked",
            Counter::DropNatExtHeaders => "drop_nat_ext_headers",
            Counter::StickEventsLost => "stick_events_lost",
        }
    }
}

/// Per-backend traffic counters (per-CPU array indexed by [`BackendId`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-service stick-table counters (per-CPU array indexed by [`ServiceId`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// The client had a live entry pointing at a backend that still takes it.
    pub stick_hits: u64,
    /// No live entry: the policy chose a backend.
    pub stick_misses: u64,
    /// Entries written after a miss or a redispatch.
    pub stick_inserts: u64,
    /// The stuck backend was down, disabled or gone; the client was moved.
    pub redispatches: u64,
    /// The entry could not be written (should not happen with an LRU map).
    pub insert_failures: u64,
    /// Another CPU placed or moved the same client first; its choice was used.
    pub races_lost: u64,
    /// New clients placed without an entry because the flood guard's rate was exceeded.
    pub inserts_skipped: u64,
    /// New connections not tracked because the connection table was full.
    pub flows_untracked: u64,
}

impl BackendCounters {
    /// Sum of per-CPU values.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a BackendCounters>) -> BackendCounters {
        per_cpu
            .into_iter()
            .fold(BackendCounters::default(), |a, c| BackendCounters {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            })
    }
}

impl ServiceCounters {
    /// Sum of per-CPU values.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a ServiceCounters>) -> ServiceCounters {
        per_cpu
            .into_iter()
            .fold(ServiceCounters::default(), |a, c| ServiceCounters {
                stick_hits: a.stick_hits + c.stick_hits,
                stick_misses: a.stick_misses + c.stick_misses,
                stick_inserts: a.stick_inserts + c.stick_inserts,
                redispatches: a.redispatches + c.redispatches,
                insert_failures: a.insert_failures + c.insert_failures,
                races_lost: a.races_lost + c.races_lost,
                inserts_skipped: a.inserts_skipped + c.inserts_skipped,
                flows_untracked: a.flows_untracked + c.flows_untracked,
            })
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made only of integers and arrays of integers, with
    // every padding byte spelled out as a field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for StickKey {}
    unsafe impl aya::Pod for StickEntry {}
    unsafe impl aya::Pod for StickEvent {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendCounters {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowEntry {}
    unsafe impl aya::Pod for InsertBudget {}
    unsafe impl aya::Pod for ExpireRequest {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for crate::decap::TunnelAddr {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<Service>(), 112);
        assert_eq!(size_of::<StickKey>(), 20);
        assert_eq!(size_of::<StickEntry>(), 24);
        assert_eq!(size_of::<Backend>(), 36);
        assert_eq!(size_of::<BackendCounters>(), 16);
        assert_eq!(size_of::<ServiceCounters>(), 64);
        assert_eq!(size_of::<FlowKey>(), 24);
        assert_eq!(size_of::<FlowEntry>(), 24);
        assert_eq!(size_of::<NatKey>(), 40);
        assert_eq!(size_of::<NatEntry>(), 52);
        assert_eq!(size_of::<InsertBudget>(), 8);
        assert_eq!(size_of::<ExpireRequest>(), 32);
    }

    #[test]
    fn a_last_seen_in_the_future_is_idle_zero() {
        assert_eq!(idle_ns(1_000, 4_000), 0);
        assert_eq!(idle_ns(5_000, 4_000), 1_000);
    }

    #[test]
    fn refresh_comes_before_expiry_for_every_timeout() {
        assert_eq!(refresh_interval_ns(60_000_000_000), STICK_REFRESH_NS);
        assert_eq!(refresh_interval_ns(500_000_000), 250_000_000);
        for timeout in [2, 1_000, 100_000_000, 1_999_999_999, 2_000_000_000] {
            assert!(refresh_interval_ns(timeout) < timeout);
        }
    }

    #[test]
    fn the_flow_word_packs_backend_state_and_tag() {
        let key = FlowKey {
            service: 3,
            client: [0x0100_12c6, 0, 0, 0],
            client_port: 40000u16.to_be(),
            _pad: 0,
        };
        let entry = FlowEntry::new(&key, 7, FlowState::Established, 0);
        // SAFETY: FlowEntry is 24 bytes of integers; the word is its first 8, little-endian.
        let word = u64::from_le_bytes(
            unsafe { core::mem::transmute::<FlowEntry, [u8; 24]>(entry) }[..8]
                .try_into()
                .unwrap(),
        );
        assert_eq!(word as u32, 7);
        assert_eq!(FlowEntry::word_state(word), FlowState::Established as u8);
        assert_eq!(FlowEntry::word_tag(word), key.tag());
        let closing = FlowEntry::word_with_state(word, FlowState::Closing);
        assert_eq!(
            (closing as u32, FlowEntry::word_tag(closing)),
            (7, key.tag())
        );
        assert_eq!(FlowEntry::word_state(closing), FlowState::Closing as u8);
        let other = FlowKey {
            client_port: 40001u16.to_be(),
            ..key
        };
        assert_ne!(key.tag(), other.tag());
    }

    #[test]
    fn the_placement_word_packs_backend_then_version() {
        let e = StickEntry {
            backend: 7,
            version: 2,
            ..Default::default()
        };
        assert_eq!(e.placement(), 7 | (2 << 32));
        assert_eq!(StickEntry::placement_backend(e.placement()), 7);
    }

    #[test]
    fn counter_indexes_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32);
        }
    }
}
