//! The connection table: each open TCP connection keeps the backend it started on for its whole
//! life, whatever happens to its client's stick entry (expired while a WebSocket idles, evicted,
//! swept, or its drained backend retired), unless that backend goes down. A connection opens with
//! the client's SYN and closes with its FIN or RST; in DSR the server's half is never seen, so a
//! connection the server closes lasts until the client's FIN (which normally follows at once)
//! or until the controller expires it as idle.
//!
//! Each backend's active count changes only by atomic adds: +1 by the SYN whose insert created
//! the connection, -1 by whoever moves it to closing first (its FIN or RST, or the controller
//! expiring it through the `expire_flow` program): a compare-and-exchange succeeds once, so each
//! connection is uncounted exactly once. A closing connection keeps forwarding to its backend
//! (in DSR the server may still be sending after the client's FIN) until the controller deletes
//! it after `flow_closing_timeout` without a packet; a RST closes it the same way (a made-up RST
//! cannot end a connection's pinning at once).

use crate::{
    atomic,
    consts::{BPF_NOEXIST, EEXIST},
    maps::{ACTIVE, FLOWS},
    parse::Segment,
};
use sticky_lb_common::{BackendId, FlowEntry, FlowKey, FlowState, ServiceId, idle_ns};

/// The connection table's key for a segment of `service`.
#[inline(always)]
pub fn key(service: ServiceId, packet: &Segment) -> FlowKey {
    FlowKey {
        service,
        client: packet.saddr,
        client_port: packet.sport,
        _pad: 0,
    }
}

/// The open connection `key` names, if any.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut FlowEntry> {
    FLOWS.get_ptr_mut(key)
}

/// Notes a segment of open connection `key`: the client's first segment without SYN establishes
/// it, and its last-seen time is refreshed once it is `refresh_ns` old. Returns whether it was
/// refreshed (the caller then refreshes the client's stick entry too, so a client with an open
/// connection keeps its entry).
#[inline(always)]
pub fn touch(
    flow: *mut FlowEntry,
    key: &FlowKey,
    packet: &Segment,
    now: u64,
    refresh_ns: u64,
) -> bool {
    // SAFETY: a live hash-map value; the state changes only by compare-and-exchange of its
    // aligned first word, the last-seen time by whole aligned stores.
    unsafe {
        if (*flow).state == FlowState::Opening as u8 && !packet.opens() {
            let word = flow as *mut u64;
            let seen = atomic::load(word);
            // Once per connection, so the tag is computed only here.
            if FlowEntry::word_state(seen) == FlowState::Opening as u8
                && FlowEntry::word_tag(seen) == key.tag()
            {
                // Fails only if a FIN or RST moved it to closing meanwhile; that stays.
                let _ = atomic::compare_exchange(
                    word,
                    seen,
                    FlowEntry::word_with_state(seen, FlowState::Established),
                );
            }
        }
        if idle_ns(now, (*flow).last_seen_ns) >= refresh_ns {
            (*flow).last_seen_ns = now;
            return true;
        }
    }
    false
}

/// Notes a segment of the server's half (NAT sees it): the connection's last-seen time is
/// refreshed once a second at most, so a connection only the server speaks on stays.
#[inline(always)]
pub fn seen(flow: *mut FlowEntry, now: u64) {
    // SAFETY: a live hash-map value; the last-seen time changes by whole aligned stores.
    unsafe {
        if idle_ns(now, (*flow).last_seen_ns) >= sticky_lb_common::STICK_REFRESH_NS {
            (*flow).last_seen_ns = now;
        }
    }
}

/// Ends connection `key`: moves it to closing and takes it off its backend's active count,
/// exactly once whoever else ends it at the same moment (its FIN and RST on two CPUs, the
/// controller expiring it). The entry stays, so the client's last segments still reach its
/// backend. An entry whose tag is not `key`'s was deleted and reused for another connection
/// meanwhile: it is left alone. Returns whether this call uncounted the connection.
#[inline(always)]
pub fn finish(flow: *mut FlowEntry, key: &FlowKey) -> bool {
    let word = flow as *mut u64;
    let tag = key.tag();
    // A compare-and-exchange fails only if the state changed under it: opening to established
    // (once) or to closing (then the next round sees it closed); three rounds always decide.
    let mut round = 0;
    while round < 3 {
        // SAFETY: a live hash-map value; its aligned first word holds backend, state and tag.
        let seen = unsafe { atomic::load(word) };
        if FlowEntry::word_tag(seen) != tag || !FlowState::is_counted(FlowEntry::word_state(seen)) {
            return false;
        }
        let closing = FlowEntry::word_with_state(seen, FlowState::Closing);
        if unsafe { atomic::compare_exchange(word, seen, closing) }.is_ok() {
            add_active(seen as u32, -1);
            return true;
        }
        round += 1;
    }
    false
}

/// Deletes a connection (after [`finish`]: deleting never changes a count).
#[inline(always)]
pub fn remove(key: &FlowKey) -> bool {
    FLOWS.remove(key).is_ok()
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

/// Records a new connection on `backend` (with source-NAT port `nat_port`, network order, or 0)
/// and counts it.
#[inline(always)]
pub fn open(key: &FlowKey, backend: BackendId, now: u64, nat_port: u16) -> Opened {
    let mut flow = FlowEntry::new(key, backend, FlowState::Opening, now);
    flow.nat_port = nat_port;
    match FLOWS.insert(key, &flow, BPF_NOEXIST) {
        Ok(()) => {
            add_active(backend, 1);
            Opened::New
        }
        Err(e) if e == -EEXIST => Opened::Exists,
        Err(_) => Opened::Full,
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
