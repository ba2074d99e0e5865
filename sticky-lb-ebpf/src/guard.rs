//! The flood guard: a bound on how fast new clients may create stick entries.
//!
//! Every new client takes a place in one LRU table shared by all services, so a flood of SYNs
//! from made-up sources would evict the entries of real clients who are idle for a moment (a
//! shopper reading a page). Above the service's rate, per CPU, a new client is placed by the
//! policy's stable hash without an entry (Katran's flood guard does the same): for ip-hash that
//! is the choice an entry would have recorded anyway, and the clients already in the table keep
//! theirs. The rate is a generic cell rate algorithm (GCRA, ITU-T I.371) with a burst of one
//! second's worth; it costs nothing on hits, only on a miss that would insert.

use crate::maps::INSERT_BUDGET;
use sticky_lb_common::Service;

/// Burst tolerance (ns): how far ahead of `now` the theoretical arrival time may run, i.e. up to
/// one second's worth of entries at once.
const BURST_NS: u64 = 1_000_000_000;

/// Whether a new stick entry of `service` may be created on this CPU at `now` (ns); takes one
/// entry's worth of the budget if so.
#[inline(always)]
pub fn admits(service: &Service, now: u64) -> bool {
    let interval = service.insert_interval_ns as u64;
    if interval == 0 {
        return true;
    }
    let Some(budget) = INSERT_BUDGET.get_ptr_mut(service.id) else {
        return true;
    };
    // SAFETY: a per-CPU slot only this CPU touches, and XDP does not preempt itself.
    let budget = unsafe { &mut *budget };
    let next = budget.next_ns;
    if next > now + BURST_NS {
        return false;
    }
    budget.next_ns = if next > now { next } else { now } + interval;
    true
}
