//! A reference program for `./x bench`, never attached by the controller: one stick-table lookup
//! keyed by the frame's IPv4 source address and nothing else. Measured next to `sticky_lb` on the
//! same map, it separates the map's own cost from the cost of our code.

use crate::maps::STICK;
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use sticky_lb_common::StickKey;

/// Offset of the IPv4 source address in an untagged Ethernet frame.
const SADDR_OFFSET: usize = crate::consts::ETH_LEN + 12;

#[xdp]
pub fn bench_stick_lookup(ctx: XdpContext) -> u32 {
    let Some(saddr) = crate::frame::ptr_at::<[u8; 4]>(&ctx, SADDR_OFFSET) else {
        return xdp_action::XDP_PASS;
    };
    let key = StickKey {
        service: 0,
        client: [u32::from_ne_bytes(unsafe { *saddr }), 0, 0, 0],
    };
    match STICK.get_ptr(&key) {
        Some(_) => xdp_action::XDP_TX,
        None => xdp_action::XDP_PASS,
    }
}
