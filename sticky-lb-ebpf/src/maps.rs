//! The maps the data path reads and writes. Sizes here are defaults: the controller sets the
//! stick table, connection table and Maglev array sizes at load time from the config. All are
//! pinned by the controller under /sys/fs/bpf/sticky-lb/<interface>/ so forwarding survives a
//! restart.
//!
//! Every map is a BTF map definition (libbpf's `.maps` section): the object's BTF names each
//! map's key and value types, and the loader passes them to the kernel when it creates the map,
//! so `bpftool map dump` prints a stick entry's fields (`backend`, `last_seen_ns`, ...) instead
//! of raw bytes. The data path's code is the same as with legacy definitions: the same helper
//! calls on the same maps. The BTF is not part of the pinned layout (`LAYOUT_VERSION`): neither
//! the kernel nor the loader compares it when a controller adopts pinned maps, so maps created
//! without it (by an earlier build) are adopted as they are and keep dumping as raw bytes.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use sticky_lb_common::{
    Backend, BackendCounters, BackendId, COUNTER_SLOTS, DEFAULT_FLOW_TABLE_SIZE,
    DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_STICK_TABLE_SIZE, EVENT_RING_BYTES, FlowEntry, FlowKey,
    InsertBudget, MAX_BACKENDS, MAX_SERVICES, NatEntry, NatKey, SERVICE_INDEX_SLOTS, Service,
    ServiceCounters, StickEntry, StickEvent, StickKey,
};

/// Where to find a service: slot `hash::service_slot(VIP, port)` (or one of the next few) holds
/// 1 + the index of its parameters in `SERVICES`; 0 means no service, so the packet is not ours.
#[btf_map(name = "slb_svc_index")]
pub static SERVICE_INDEX: Array<u32, { SERVICE_INDEX_SLOTS as usize }> = Array::new();

/// Service parameters, two copies per service (`id * 2 + generation`): the controller rewrites
/// the copy the index does not point at, then flips the index.
#[btf_map(name = "slb_services")]
pub static SERVICES: Array<Service, { 2 * MAX_SERVICES as usize }> = Array::new();

/// Backends by id: address, MAC, state, owning service.
#[btf_map(name = "slb_backends")]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Maglev lookup tables of all services, two copies each (active and being rebuilt), as backend
/// ids. A service's active copy starts at `Service::ring_base`.
#[btf_map(name = "slb_maglev")]
pub static MAGLEV: Array<BackendId, { 2 * DEFAULT_MAGLEV_TABLE_SIZE as usize }> = Array::new();

/// The stick table: (service, masked client) -> backend. One LRU shared by all CPUs so a client
/// whose packets land on different CPUs still has one entry; the LRU evicts the least recently
/// used client when full, like HAProxy's stick table.
#[btf_map(name = "slb_stick")]
pub static STICK: LruHashMap<StickKey, StickEntry, { DEFAULT_STICK_TABLE_SIZE as usize }> =
    LruHashMap::new();

/// Pass/drop reasons, indexed by `Counter` (per CPU: no atomic ops on the packet path).
#[btf_map(name = "slb_stats")]
pub static STATS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Packets and bytes forwarded, per backend id.
#[btf_map(name = "slb_backend_st")]
pub static BACKEND_STATS: PerCpuArray<BackendCounters, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// Stick hits, misses, inserts and redispatches, per service id.
#[btf_map(name = "slb_service_st")]
pub static SERVICE_STATS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> =
    PerCpuArray::new();

/// The connection table: every open TCP connection of every service -> its backend, from the
/// client's SYN to its FIN or RST (in DSR the server's half is never seen); the controller expires
/// idle ones. A connection keeps its backend for its whole life whatever happens to its client's
/// stick entry (IPVS and Katran keep per-connection state for the same reason). A plain hash,
/// not an LRU: an eviction would silently move a live connection and leave its backend's active
/// count wrong, so a full table refuses new connections (counted) instead.
#[btf_map(name = "slb_flows")]
pub static FLOWS: HashMap<FlowKey, FlowEntry, { DEFAULT_FLOW_TABLE_SIZE as usize }> =
    HashMap::new();

/// Open connections per backend id, shared by all CPUs: what least-connections compares. Only
/// atomic adds in BPF change it: +1 by the SYN that created a connection, -1 by whoever moved
/// it to closing first (its FIN or RST, or the controller through the `expire_flow` program),
/// so the counts are exact at every moment.
#[btf_map(name = "slb_active")]
pub static ACTIVE: Array<i64, { MAX_BACKENDS as usize }> = Array::new();

/// Flood guard state per service, per CPU (no atomics): when the next new stick entry is due.
#[btf_map(name = "slb_ins_budget")]
pub static INSERT_BUDGET: PerCpuArray<InsertBudget, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// The map layout version (slot 0), written when the maps are created. The data path never
/// reads it: a controller checks it before adopting pinned maps, so a binary with another layout
/// refuses instead of misreading them.
#[btf_map(name = "slb_meta")]
pub static META: Array<u32, 4> = Array::new();

/// The NAT reply table: a translated connection as its backend's replies carry it (backend,
/// peer, ports) -> the client and VIP to translate them back to. Written when a NAT connection
/// opens. An LRU, sized like the connection table: an entry left behind by a connection that
/// ended without it being deleted (its backend's address was gone by then) ages out, and a
/// reply is translated only while its connection is open on that backend (checked against
/// the connection table), so no stale entry ever translates anything.
#[btf_map(name = "slb_nat")]
pub static NAT: LruHashMap<NatKey, NatEntry, { DEFAULT_FLOW_TABLE_SIZE as usize }> =
    LruHashMap::new();

/// Slot 0: what the data path needs to look for beyond services (`FEATURE_*` bits), written by
/// the controller; pass-through traffic costs one array read to learn there is nothing more.
#[btf_map(name = "slb_features")]
pub static FEATURES: Array<u32, 4> = Array::new();

/// Stick events of shared services (`SERVICE_SHARED`): one per entry inserted or re-placed,
/// read by the controller, which publishes them to the other balancer nodes. Full: the event is
/// lost and counted (`stick_events_lost`); forwarding never waits for the controller.
#[btf_map(name = "slb_events")]
pub static EVENTS: RingBuf<StickEvent, { EVENT_RING_BYTES as usize }> = RingBuf::new();
