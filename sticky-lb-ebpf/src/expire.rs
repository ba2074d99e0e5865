//! `expire_flow`: how the controller ends a connection it finds idle or whose backend stopped
//! serving. Never attached: the controller runs it with BPF_PROG_TEST_RUN, one request per call,
//! so ending a connection is the same compare-and-exchange whether a packet or the controller
//! does it, and a connection whose FIN arrives at that moment is still uncounted exactly once (a
//! delete from user space cannot tell whether the FIN got there first).

use crate::{
    conntrack,
    frame::ptr_at,
    maps::{BACKENDS, FLOWS, SERVICES},
    nat,
};
use aya_ebpf::{macros::xdp, programs::XdpContext};
use sticky_lb_common::{BackendId, BackendState, ExpireOutcome, ExpireRequest, Forwarding};

/// Input: an [`ExpireRequest`] as the test run's data. Returns an [`ExpireOutcome`].
#[xdp]
pub fn expire_flow(ctx: XdpContext) -> u32 {
    let Some(request) = ptr_at::<ExpireRequest>(&ctx, 0) else {
        return ExpireOutcome::Kept as u32;
    };
    // SAFETY: ptr_at checked the data holds the request; copied so the key is on the stack.
    let request = unsafe { *request };
    let Some(flow) = FLOWS.get_ptr_mut(&request.key) else {
        return ExpireOutcome::Kept as u32;
    };
    // Used again since the controller decided: it stays.
    let (backend, last_seen) = unsafe { ((*flow).backend, (*flow).last_seen_ns) };
    if last_seen >= request.seen_before_ns {
        return ExpireOutcome::Kept as u32;
    }
    // Ended because its backend stopped serving (the controller's view when its sweep began):
    // if the backend serves again by now (enabled, back up), it stays.
    if request.seen_before_ns == u64::MAX
        && let Some(b) = BACKENDS.get(backend)
        && b.service == request.key.service
        && BackendState::from_u8(b.state).keeps_stuck_clients()
    {
        return ExpireOutcome::Kept as u32;
    }
    let uncounted = conntrack::finish(flow, &request.key);
    end_nat_connection(&request, backend);
    let deleted = conntrack::remove(&request.key);
    match (uncounted, deleted) {
        (true, _) => ExpireOutcome::Uncounted as u32,
        (false, true) => ExpireOutcome::Deleted as u32,
        (false, false) => ExpireOutcome::Kept as u32,
    }
}

/// A NAT connection ends: its reply-table entry goes or holds its port (see
/// `nat::end_connection`). The service's parameters are found by id in both copies of the
/// services array (the program does not know which one is current; both name the same source
/// NAT unless it is being changed right now, and deleting an entry that is not there is
/// harmless).
#[inline(always)]
fn end_nat_connection(request: &ExpireRequest, backend: BackendId) {
    let service = request.key.service;
    let Some(b) = BACKENDS.get(backend) else {
        return;
    };
    if b.service != service {
        return;
    }
    let client = nat::Endpoint {
        addr: request.key.client,
        port: request.key.client_port,
    };
    let mut generation = 0;
    while generation < 2 {
        if let Some(params) = SERVICES.get(service.wrapping_mul(2) + generation)
            && params.id == service
            && params.forwarding == Forwarding::Nat as u8
        {
            nat::end_connection(params, b, &client);
        }
        generation += 1;
    }
}
