//! Stick events for shared services: the data path tells the controller about each entry it
//! writes, so other balancer nodes learn what this one decided (see `StickEvent`).

use crate::{maps::EVENTS, stats::count};
use sticky_lb_common::{BackendId, Counter, SERVICE_SHARED, Service, StickEvent};

/// Reports that `client` (masked) of `service` was placed on `backend` at `now` (ns), moved off
/// `previous` ([`sticky_lb_common::NO_BACKEND`] for a new or expired entry). Costs nothing for a
/// service that is not shared; a full ring loses the event (counted), never the packet.
#[inline(always)]
pub fn placed(
    service: &Service,
    client: &[u32; 4],
    backend: BackendId,
    previous: BackendId,
    now: u64,
) {
    if service.flags & SERVICE_SHARED == 0 {
        return;
    }
    let event = StickEvent {
        service: service.id,
        backend,
        previous,
        _pad: 0,
        client: *client,
        created_ns: now,
    };
    if EVENTS.output(&event, 0).is_err() {
        count(Counter::StickEventsLost);
    }
}
