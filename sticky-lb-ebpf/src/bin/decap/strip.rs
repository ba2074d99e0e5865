//! Removing the outer header: the frame's Ethernet header (and 802.1Q tag) moves forward over
//! the outer IP header, its EtherType becomes the inner packet's, and the frame's start moves to
//! it with `bpf_xdp_adjust_head`. The MACs stay as they came: the frame was addressed to this
//! host, and the kernel takes the inner packet as received on this interface.

use crate::{
    consts::{ETH_P_IPV4_BE, ETH_P_IPV6_BE},
    frame::ptr_at,
    parse::Tunnel,
};
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use core::ptr::{read_volatile, write_volatile};
use sticky_lb_common::Family;

/// The Ethernet header and 802.1Q tag, at most: the bytes moved.
const MAX_L2_LEN: usize = 18;

/// Removing the header failed; the frame may be half rewritten and must not go on.
pub struct Failed;

/// Removes the outer header of `tunnel` (checked by `parse::outer` and `parse::inner_fits`).
///
/// The Ethernet header is written first, over the end of the outer header, then the frame's start
/// moves: no packet pointer is used after `bpf_xdp_adjust_head`, which invalidates them all. The
/// new header starts `outer_len` bytes into the frame, a multiple of 4 (20 to 60 for IPv4, 40 for
/// IPv6), never overlapping the old one (at most 18 bytes), so its words are copied with aligned
/// 32-bit loads and stores wherever the old header is aligned.
#[inline(always)]
pub fn outer_header(ctx: &XdpContext, tunnel: &Tunnel) -> Result<(), Failed> {
    let Some(old) = ptr_at::<[u32; 4]>(ctx, 0) else {
        return Err(Failed);
    };
    // The inner header (at least 20 bytes at l2_len + outer_len) is in the frame, so these 18
    // bytes are; checked again for the verifier.
    let Some(new) = ptr_at::<[u8; MAX_L2_LEN]>(ctx, tunnel.outer_len) else {
        return Err(Failed);
    };
    let old = old as *const u32;
    let new = new as *mut u8;
    let ether_type = match tunnel.inner {
        Family::Ipv4 => ETH_P_IPV4_BE,
        Family::Ipv6 => ETH_P_IPV6_BE,
    };
    // SAFETY: both ranges were checked to lie in the frame; they do not overlap.
    unsafe {
        let words = new as *mut u32;
        // Destination and source MACs: 12 bytes.
        write_volatile(words, read_volatile(old));
        write_volatile(words.add(1), read_volatile(old.add(1)));
        write_volatile(words.add(2), read_volatile(old.add(2)));
        if tunnel.vlan {
            // The tag's TPID (0x8100) and TCI, as they came.
            write_volatile(words.add(3), read_volatile(old.add(3)));
        }
        write_volatile(new.add(tunnel.l2_len - 2) as *mut u16, ether_type);
    }
    // SAFETY: ctx.ctx is the program's own context; a positive delta shrinks the frame from the
    // front, to the new Ethernet header.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, tunnel.outer_len as i32) } != 0 {
        return Err(Failed);
    }
    Ok(())
}
