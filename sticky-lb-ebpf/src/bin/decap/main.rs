//! sticky-lb's decapsulation program, for the backends of a `forwarding: tunnel` service.
//!
//! The balancer sends a client's packet to a backend inside an outer IPv4 header (protocol 4) or
//! IPv6 header (next header 41). Attached to the interface those packets arrive on, this program
//! removes the outer header of every IPv4-in-IPv4, IPv6-in-IPv4, IPv4-in-IPv6 and IPv6-in-IPv6
//! packet addressed to one of this host's tunnel addresses and passes the inner packet to the
//! kernel, as the kernel's ipip and ip6tnl devices would (Katran ships its decap program for the
//! same reason). Everything else is passed untouched.
//!
//! A separate object from the balancer's: a backend loads two small maps, not the balancer's
//! stick and connection tables.
#![no_std]
#![no_main]

// Wire-format numbers and packet access shared with the balancer's program.
#[allow(dead_code)] // the balancer's numbers this program has no use for
#[path = "../../consts.rs"]
mod consts;
#[allow(dead_code)]
#[path = "../../frame.rs"]
mod frame;
mod maps;
mod parse;
mod strip;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use sticky_lb_common::{Family, decap::DecapCounter};

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let (counter, action) = try_decap(&ctx);
    // One counter update for every outcome, not one inlined at each return.
    maps::count(counter);
    action
}

/// What to do with the frame, and the counter that says why.
#[inline(always)]
fn try_decap(ctx: &XdpContext) -> (DecapCounter, u32) {
    let Some(tunnel) = parse::outer(ctx) else {
        return (DecapCounter::PassNotTunnel, xdp_action::XDP_PASS);
    };
    if !maps::is_ours(&tunnel.dst) {
        return (DecapCounter::PassNotOurs, xdp_action::XDP_PASS);
    }
    // From here on the packet is ours: the kernel cannot decapsulate it (that is why this
    // program runs), so one it would not take after decapsulation is dropped, not passed.
    if !parse::inner_fits(ctx, &tunnel) {
        return (DecapCounter::DropBadInner, xdp_action::XDP_DROP);
    }
    if strip::outer_header(ctx, &tunnel).is_err() {
        // XDP_ABORTED also fires the xdp_exception tracepoint, so the failure is visible.
        return (DecapCounter::Aborted, xdp_action::XDP_ABORTED);
    }
    let decapsulated = match tunnel.inner {
        Family::Ipv4 => DecapCounter::DecapIpv4,
        Family::Ipv6 => DecapCounter::DecapIpv6,
    };
    (decapsulated, xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
