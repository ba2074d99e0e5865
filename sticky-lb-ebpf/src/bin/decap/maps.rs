//! The decap program's two maps: the tunnel addresses `sticky-lb decap` writes at start, and the
//! counters it prints at exit. Neither is pinned: they live as long as the process holding the
//! program.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    macros::btf_map,
};
use sticky_lb_common::decap::{DECAP_COUNTER_COUNT, DecapCounter, MAX_TUNNEL_ADDRS, TunnelAddr};

/// This host's tunnel addresses: an outer destination found here is decapsulated. The value is
/// unused (1); only the key's presence counts.
#[btf_map(name = "slbd_addrs")]
pub static ADDRS: HashMap<TunnelAddr, u8, { MAX_TUNNEL_ADDRS as usize }> = HashMap::new();

/// Packets by outcome, indexed by `DecapCounter` (per CPU: no atomic ops on the packet path).
#[btf_map(name = "slbd_stats")]
pub static STATS: PerCpuArray<u64, { DECAP_COUNTER_COUNT as usize }> = PerCpuArray::new();

/// Whether `addr` is one of this host's tunnel addresses.
#[inline(always)]
pub fn is_ours(addr: &TunnelAddr) -> bool {
    ADDRS.get_ptr(addr).is_some()
}

#[inline(always)]
pub fn count(counter: DecapCounter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and XDP does not preempt itself.
        unsafe { *slot += 1 };
    }
}
