//! The connection table: each open TCP connection keeps the backend it started on for its whole
//! life, whatever happens to its client's stick entry (expired while a WebSocket idles, evicted,
//! swept, or its drained backend retired), unless that backend goes down. A connection opens with
//! the client's SYN and ends with its FIN or RST; in DSR the server's half is never seen, so a
//! connection the server closes lasts until the client's FIN (which normally follows at once)
//! or until the controller expires it as idle.
//!
//! Each backend's active count changes only by atomic adds: +1 by the SYN whose insert created
//! the connection, -1 by whoever's delete removed it (the data path on FIN or RST, the controller
//! when it expires one). A delete succeeds once, so each connection is counted exactly once.

use crate::{
    atomic,
    maps::{ACTIVE, FLOWS},
    parse::Ipv4Tcp,
};
use sticky_lb_common::{BackendId, FlowEntry, FlowKey, FlowState, ServiceId, idle_ns};

/// bpf_map_update_elem flag: fail with EEXIST if the key is present.
pub const BPF_NOEXIST: u64 = 1;
/// errno of an insert that found the key present (asm-generic/errno-base.h).
pub const EEXIST: i32 = 17;

/// The connection table's key for a segment of `service`.
#[inline(always)]
pub fn key(service: ServiceId, packet: &Ipv4Tcp) -> FlowKey {
    FlowKey {
        service,
        client: [packet.saddr, 0, 0, 0],
        client_port: packet.sport,
        _pad: 0,
    }
}

/// The open connection `key` names, if any.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowEntry> {
    FLOWS.get_ptr_mut(key)
}

/// Whether the connection has seen more than its SYN.
#[inline(always)]
pub fn established(flow: *mut FlowEntry) -> bool {
    // SAFETY: a live hash-map value.
    unsafe { (*flow).state == FlowState::Established as u8 }
}

/// Notes a segment of an open connection: the client's first segment without SYN establishes it,
/// and its last-seen time is refreshed once it is `refresh_ns` old. Returns whether it was
/// refreshed (the caller then refreshes the client's stick entry too, so a client with an open
/// connection keeps its entry).
#[inline(always)]
pub fn touch(flow: *mut FlowEntry, packet: &Ipv4Tcp, now: u64, refresh_ns: u64) -> bool {
    // SAFETY: a live hash-map value; single-byte and aligned 8-byte stores.
    let flow = unsafe { &mut *flow };
    if flow.state == FlowState::Opening as u8 && !packet.opens() {
        flow.state = FlowState::Established as u8;
    }
    if idle_ns(now, flow.last_seen_ns) >= refresh_ns {
        flow.last_seen_ns = now;
        return true;
    }
    false
}

/// What became of a new connection.
pub enum Opened {
    /// Recorded and counted on its backend.
    New,
    /// Another CPU recorded the same connection first (a retransmitted SYN).
    Exists,
    /// The table is full: the connection is not tracked.
    Full,
}

/// Records a new connection on `backend` and counts it.
#[inline(always)]
pub fn open(key: &FlowKey, backend: BackendId, now: u64) -> Opened {
    let flow = FlowEntry {
        backend,
        state: FlowState::Opening as u8,
        _pad: [0; 3],
        last_seen_ns: now,
    };
    match FLOWS.insert(key, &flow, BPF_NOEXIST) {
        Ok(()) => {
            add_active(backend, 1);
            Opened::New
        }
        Err(e) if e == -EEXIST => Opened::Exists,
        Err(_) => Opened::Full,
    }
}

/// Ends a connection counted on `backend`: only the delete that wins uncounts it (a
/// retransmitted FIN, or the controller's sweep at the same moment, finds nothing to delete).
#[inline(always)]
pub fn close(key: &FlowKey, backend: BackendId) {
    if FLOWS.remove(key).is_ok() {
        add_active(backend, -1);
    }
}

/// Active connections of a backend, never negative.
#[inline(always)]
pub fn active(backend: BackendId) -> i64 {
    match ACTIVE.get_ptr(backend) {
        Some(count) => {
            let count = unsafe { core::ptr::read_volatile(count) };
            if count < 0 { 0 } else { count }
        }
        None => 0,
    }
}

#[inline(always)]
fn add_active(backend: BackendId, delta: i64) {
    if let Some(count) = ACTIVE.get_ptr_mut(backend) {
        // SAFETY: an aligned i64 in an array map.
        unsafe { atomic::add(count, delta) };
    }
}
