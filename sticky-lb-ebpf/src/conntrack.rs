//! Connection counting for least-connections services. A connection is active from the client's
//! SYN until its FIN or RST; in DSR mode the server's half is never seen, so a connection the
//! server closes stays counted until the client's FIN (which normally follows) or until the
//! controller expires the idle flow and recounts.

use crate::{
    maps::{ACTIVE, FLOWS},
    parse::{Ipv4Tcp, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use sticky_lb_common::{BackendId, FlowEntry, FlowKey, STICK_REFRESH_NS, ServiceId};

/// Updates the flow table and the active counters for one packet sent to `backend`.
#[inline(always)]
pub fn track(service: ServiceId, packet: &Ipv4Tcp, backend: BackendId, now: u64) {
    let key = FlowKey {
        service,
        client: [packet.saddr, 0, 0, 0],
        client_port: packet.sport,
        _pad: 0,
    };
    if packet.flags & (TCP_FIN | TCP_RST) != 0 {
        // Count the close once: only the packet whose delete succeeds decrements (a retransmitted
        // FIN finds no flow).
        if let Some(flow) = FLOWS.get_ptr(&key) {
            let counted = unsafe { (*flow).backend };
            if FLOWS.remove(&key).is_ok() {
                add_active(counted, -1);
            }
        }
        return;
    }
    match FLOWS.get_ptr_mut(&key) {
        Some(flow) => {
            // SAFETY: a live LRU value; whole aligned word store.
            let flow = unsafe { &mut *flow };
            if now.wrapping_sub(flow.last_seen_ns) >= STICK_REFRESH_NS {
                flow.last_seen_ns = now;
            }
        }
        None if packet.flags & (TCP_SYN | TCP_ACK) == TCP_SYN => {
            let flow = FlowEntry {
                backend,
                _pad: 0,
                last_seen_ns: now,
            };
            // BPF_NOEXIST: two CPUs racing on the same SYN count it once.
            if FLOWS.insert(&key, &flow, 1).is_ok() {
                add_active(backend, 1);
            }
        }
        // Mid-connection packet of a flow we never saw open (or that was expired): not counted.
        None => {}
    }
}

/// Active connections of a backend, never negative (a recount may race a close).
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
        // SAFETY: an aligned i64 in an array map. core's atomic types lack fetch_add on the BPF
        // target; the intrinsic lowers to BPF's atomic add, which keeps counts right when
        // several CPUs open and close connections at once.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
}
