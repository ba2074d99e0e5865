//! ICMP the data path sends itself: "fragmentation needed" (ICMP type 3 code 4, RFC 792 and
//! RFC 1191) or "packet too big" (ICMPv6 type 2, RFC 4443) back to a client whose segment would
//! not fit the interface's MTU once a tunnel's outer header is added. The client's TCP lowers its
//! path MTU for the VIP and sends smaller segments, as it would for a router on the way (Katran
//! answers the same way). Passing the segment instead would hand it to the host, whose TCP has
//! no such connection and would reset it.
//!
//! The reply is built in place: the frame is cut to the headers plus [`QUOTE_LEN`] bytes of the
//! client's packet, then grown at the front by the new IP and ICMP headers, so the quote already
//! sits where the ICMP message carries it (Katran's layout).

use crate::{
    consts::*,
    csum,
    forward::{Ipv4Fields, write_ipv4, write_ipv6},
    parse::Outbound,
};
use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// Bytes of the client's packet quoted in the reply: its IP header and the start of TCP (ports
/// and sequence number), which is all a client needs to find its connection (RFC 792 asks for
/// the header and 8 bytes; RFC 4443 for as much as fits, which only costs more to checksum).
pub const QUOTE_LEN: usize = 64;

/// Why no reply was sent (the caller drops the segment).
pub enum NoReply {
    /// The packet is shorter than the quote (only with an MTU far below the IP minimums).
    Short,
    /// The driver could not resize the frame.
    Resize,
}

/// Turns the frame holding `inner` (of family `v6`) into a "too big" reply to its sender, from
/// the address it was sent to, naming `mtu` (bytes: the largest packet the client may send).
/// The caller sends it back with XDP_TX.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, inner: &Outbound, v6: bool, mtu: u32) -> Result<(), NoReply> {
    let l3 = if inner.vlan { ETH_VLAN_LEN } else { ETH_LEN };
    if inner.len < QUOTE_LEN {
        return Err(NoReply::Short);
    }
    // The length as a 64-bit scalar first: narrowed straight from the pointers, LLVM subtracts
    // their low halves, and the verifier refuses 32-bit arithmetic on packet pointers.
    let frame = (ctx.data_end() - ctx.data()) as u64;
    let frame = unsafe { core::ptr::read_volatile(&frame) } as i32;
    let headers = if v6 { Ipv6Hdr::LEN } else { Ipv4Hdr::LEN } + ICMP_HEADER_LEN;
    // SAFETY: helper calls on our own context; each fails without changing the frame. They
    // invalidate every packet pointer: everything needed was read into `inner` before.
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, (l3 + QUOTE_LEN) as i32 - frame) != 0
            || bpf_xdp_adjust_head(ctx.ctx, -(headers as i32)) != 0
        {
            return Err(NoReply::Resize);
        }
    }
    const V4: usize = Ipv4Hdr::LEN + ICMP_HEADER_LEN;
    const V6: usize = Ipv6Hdr::LEN + ICMP_HEADER_LEN;
    // Constant offsets for each layout, so the verifier sees every access as a fixed offset.
    match (v6, inner.vlan) {
        (false, false) => write::<V4, ETH_LEN>(ctx, inner, v6, mtu),
        (false, true) => write::<V4, ETH_VLAN_LEN>(ctx, inner, v6, mtu),
        (true, false) => write::<V6, ETH_LEN>(ctx, inner, v6, mtu),
        (true, true) => write::<V6, ETH_VLAN_LEN>(ctx, inner, v6, mtu),
    }
}

/// Writes Ethernet (`L3` bytes with its tag), IP and ICMP headers in the `HEADERS` bytes freed
/// at the front (the old Ethernet header and the quote follow them).
#[inline(always)]
fn write<const HEADERS: usize, const L3: usize>(
    ctx: &XdpContext,
    inner: &Outbound,
    v6: bool,
    mtu: u32,
) -> Result<(), NoReply> {
    let start = ctx.data();
    // The frame is now exactly L3 + HEADERS + QUOTE_LEN bytes.
    if start + L3 + HEADERS + QUOTE_LEN > ctx.data_end() {
        return Err(NoReply::Resize);
    }
    let frame = start as *mut u8;
    // SAFETY: the check above covers every byte touched.
    unsafe {
        let eth = frame as *mut EthHdr;
        (*eth).dst_addr = inner.src_mac;
        (*eth).src_addr = inner.dst_mac;
        let old = frame.add(HEADERS);
        let mut i = 12;
        while i < L3 {
            *frame.add(i) = *old.add(i);
            i += 1;
        }
        let ip = frame.add(L3);
        if v6 {
            ipv6(ip, inner, mtu);
        } else {
            ipv4(ip, inner, mtu);
        }
    }
    Ok(())
}

/// IPv4 header and ICMP "fragmentation needed" with next-hop MTU `mtu`, from the VIP to the
/// client.
///
/// # Safety
/// `ip` must point at the 28 header bytes followed by the quote, all in the frame.
#[inline(always)]
unsafe fn ipv4(ip: *mut u8, inner: &Outbound, mtu: u32) {
    let header = Ipv4Fields {
        tos: 0,
        total_len: (Ipv4Hdr::LEN + ICMP_HEADER_LEN + QUOTE_LEN) as u16,
        dont_fragment: false,
        protocol: IPPROTO_ICMP,
        source: inner.daddr[0],
        dest: inner.saddr[0],
    };
    let [mtu_hi, mtu_lo] = (mtu as u16).to_be_bytes();
    let i0 = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]);
    let i1 = u32::from_ne_bytes([0, 0, mtu_hi, mtu_lo]);
    // SAFETY: the caller's promise (unaligned 32-bit packet stores: see frame::read_word).
    unsafe {
        write_ipv4(ip, &header);
        let words = ip as *mut u32;
        let icmp = words.add(5);
        core::ptr::write_volatile(icmp, i0);
        core::ptr::write_volatile(icmp.add(1), i1);
        // The ICMP checksum covers its header and the quote.
        let sum = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            icmp,
            (ICMP_HEADER_LEN + QUOTE_LEN) as u32,
            0,
        ) as u32 as u64;
        core::ptr::write_volatile(icmp, i0 | (csum::finish(sum) as u32) << 16);
    }
}

/// IPv6 header and ICMPv6 "packet too big" with MTU `mtu`, from the VIP to the client.
///
/// # Safety
/// `ip` must point at the 48 header bytes followed by the quote, all in the frame.
#[inline(always)]
unsafe fn ipv6(ip: *mut u8, inner: &Outbound, mtu: u32) {
    let payload = (ICMP_HEADER_LEN + QUOTE_LEN) as u16;
    let [len_hi, len_lo] = payload.to_be_bytes();
    let w0 = u32::from_ne_bytes([0x60, 0, 0, 0]);
    let i0 = u32::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0, 0, 0]);
    let i1 = u32::from_ne_bytes(mtu.to_be_bytes());
    // The checksum covers a pseudo-header (RFC 8200 8.1): both addresses, the upper-layer length
    // as 32 bits and the next header; then the ICMPv6 header and the quote.
    let mut sum = csum::add_word(0, u32::from_ne_bytes([0, 0, len_hi, len_lo]));
    sum = csum::add_word(sum, u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]));
    let mut i = 0;
    while i < 4 {
        sum = csum::add_word(sum, inner.daddr[i]);
        sum = csum::add_word(sum, inner.saddr[i]);
        i += 1;
    }
    // SAFETY: the caller's promise (unaligned 32-bit packet stores: see frame::read_word).
    unsafe {
        write_ipv6(ip, w0, payload, IPPROTO_ICMPV6, &inner.daddr, &inner.saddr);
        let icmp = (ip as *mut u32).add(10);
        core::ptr::write_volatile(icmp, i0);
        core::ptr::write_volatile(icmp.add(1), i1);
        let body = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            icmp,
            (ICMP_HEADER_LEN + QUOTE_LEN) as u32,
            0,
        ) as u32 as u64;
        sum += body;
        core::ptr::write_volatile(icmp, i0 | (csum::finish(sum) as u32) << 16);
    }
}
