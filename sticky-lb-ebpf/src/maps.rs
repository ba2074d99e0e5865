//! The maps the data path reads and writes. Sizes here are defaults: the controller sets the
//! stick table and Maglev array sizes at load time from the config. All are pinned by the
//! controller under /sys/fs/bpf/sticky-lb/<interface>/ so forwarding survives a restart.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use sticky_lb_common::{
    Backend, BackendCounters, BackendId, COUNTER_COUNT, DEFAULT_FLOW_TABLE_SIZE,
    DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_STICK_TABLE_SIZE, FlowEntry, FlowKey, InsertBudget,
    MAX_BACKENDS, MAX_SERVICES, SERVICE_INDEX_SLOTS, Service, ServiceCounters, StickEntry,
    StickKey,
};

/// Where to find a service: slot `hash::service_slot(VIP, port)` (or one of the next few) holds
/// 1 + the index of its parameters in `SERVICES`; 0 means no service, so the packet is not ours.
#[map(name = "slb_svc_index")]
pub static SERVICE_INDEX: Array<u32> = Array::with_max_entries(SERVICE_INDEX_SLOTS, 0);

/// Service parameters, two copies per service (`id * 2 + generation`): the controller rewrites
/// the copy the index does not point at, then flips the index.
#[map(name = "slb_services")]
pub static SERVICES: Array<Service> = Array::with_max_entries(2 * MAX_SERVICES, 0);

/// Backends by id: address, MAC, state, owning service.
#[map(name = "slb_backends")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev lookup tables of all services, two copies each (active and being rebuilt), as backend
/// ids. A service's active copy starts at `Service::ring_base`.
#[map(name = "slb_maglev")]
pub static MAGLEV: Array<BackendId> = Array::with_max_entries(2 * DEFAULT_MAGLEV_TABLE_SIZE, 0);

/// The stick table: (service, masked client) -> backend. One LRU shared by all CPUs so a client
/// whose packets land on different CPUs still has one entry; the LRU evicts the least recently
/// used client when full, like HAProxy's stick table.
#[map(name = "slb_stick")]
pub static STICK: LruHashMap<StickKey, StickEntry> =
    LruHashMap::with_max_entries(DEFAULT_STICK_TABLE_SIZE, 0);

/// Pass/drop reasons, indexed by `Counter` (per CPU: no atomic ops on the packet path).
#[map(name = "slb_stats")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Packets and bytes forwarded, per backend id.
#[map(name = "slb_backend_st")]
pub static BACKEND_STATS: PerCpuArray<BackendCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Stick hits, misses, inserts and redispatches, per service id.
#[map(name = "slb_service_st")]
pub static SERVICE_STATS: PerCpuArray<ServiceCounters> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// The connection table: every open TCP connection of every service -> its backend, from the
/// client's SYN to its FIN or RST (in DSR the server's half is never seen); the controller expires
/// idle ones. A connection keeps its backend for its whole life whatever happens to its client's
/// stick entry (IPVS and Katran keep per-connection state for the same reason). A plain hash,
/// not an LRU: an eviction would silently move a live connection and leave its backend's active
/// count wrong, so a full table refuses new connections (counted) instead.
#[map(name = "slb_flows")]
pub static FLOWS: HashMap<FlowKey, FlowEntry> =
    HashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Open connections per backend id, shared by all CPUs: what least-connections compares. Only
/// atomic adds in BPF change it: +1 by the SYN that created a connection, -1 by whoever moved
/// it to closing first (its FIN or RST, or the controller through the `expire_flow` program),
/// so the counts are exact at every moment.
#[map(name = "slb_active")]
pub static ACTIVE: Array<i64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Flood guard state per service, per CPU (no atomics): when the next new stick entry is due.
#[map(name = "slb_ins_budget")]
pub static INSERT_BUDGET: PerCpuArray<InsertBudget> =
    PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// The map layout version (slot 0), written when the maps are created. The data path never
/// reads it: a controller checks it before adopting pinned maps, so a binary with another layout
/// refuses instead of misreading them.
#[map(name = "slb_meta")]
pub static META: Array<u32> = Array::with_max_entries(4, 0);
