//! Per-CPU counter updates. Per-CPU maps need no atomics: each CPU adds to its own slot and the
//! controller sums the slots when it reads them.

use crate::maps::{BACKEND_STATS, SERVICE_STATS, STATS};
use sticky_lb_common::{BackendId, Counter, ServiceCounters, ServiceId};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and XDP does not preempt itself.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_backend(backend: BackendId, bytes: u64) {
    if let Some(slot) = BACKEND_STATS.get_ptr_mut(backend) {
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}

/// Adds one to the service counter `field` picks.
#[inline(always)]
pub fn count_service(service: ServiceId, field: fn(&mut ServiceCounters) -> &mut u64) {
    if let Some(slot) = SERVICE_STATS.get_ptr_mut(service) {
        unsafe { *field(&mut *slot) += 1 };
    }
}
