//! Forwarding modes: how a frame reaches the backend chosen for it. Both leave by the interface
//! the frame came in on (XDP_TX), and in both the backend answers the client directly.
//!
//! - L2 DSR (IPVS `-g`): the IP packet is untouched (no checksum work), only the Ethernet
//!   addresses change. The backend is on our L2 segment and holds the VIP on loopback.
//! - Tunnel (IPVS `-i`, Katran): the client's IP packet, unchanged, goes inside an outer IPv4
//!   header (protocol 4, IPIP) or IPv6 header (next header 41, RFC 2473) addressed to the backend
//!   and sent to its next hop (the backend itself or a router), so backends may sit in any
//!   routable subnet. The backend decapsulates (the kernel's `ipip`/`ip6tnl` device, or
//!   `sticky-lb decap`) and holds the VIP on loopback as in DSR.

use crate::{consts::*, csum, parse::Outbound};
use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use sticky_lb_common::{Backend, Service, hash::fmix32};

/// Rewrites the frame for `backend`: its MAC as destination, ours as source.
#[inline(always)]
pub fn dsr(eth: *mut EthHdr, backend: &Backend, our_mac: [u8; 6]) {
    // SAFETY: the parser checked the frame holds the Ethernet header.
    unsafe {
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = our_mac;
    }
}

/// A segment was not tunnelled: the driver left no headroom for the outer header (XDP drivers
/// leave 256 bytes).
pub struct NoHeadroom;

/// Bytes of the outer header of a tunnel service of family `v6`.
#[inline(always)]
pub fn outer_len(v6: bool) -> usize {
    if v6 { Ipv6Hdr::LEN } else { Ipv4Hdr::LEN }
}

/// Whether `inner` still fits the service's MTU once encapsulated. One that does not is
/// answered (see icmp.rs) so the client sends smaller segments; the caller checks before the
/// segment is placed, since an answered segment is not delivered and must change nothing.
#[inline(always)]
pub fn fits(inner: &Outbound, v6: bool, service: &Service) -> bool {
    inner.len + outer_len(v6) <= service.mtu as usize
}

/// Encapsulates the client's packet (`inner`, read from the frame) for `backend` of tunnel
/// service `service`: an outer header of the service's family in front of the unchanged IP
/// packet, the backend's next-hop MAC as the destination and ours as the source (an 802.1Q tag
/// is kept). The caller has checked that it [`fits`]. On error the frame is unchanged.
#[inline(always)]
pub fn tunnel(
    ctx: &XdpContext,
    inner: &Outbound,
    v6: bool,
    service: &Service,
    backend: &Backend,
    our_mac: [u8; 6],
) -> Result<(), NoHeadroom> {
    let outer = outer_len(v6);
    let source = outer_source(inner, v6, service);
    // SAFETY: a helper call on our own context; it fails (and changes nothing) without room.
    // It invalidates every packet pointer: everything needed was read into `inner` before.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer as i32)) } != 0 {
        return Err(NoHeadroom);
    }
    let (tos, len) = (inner.tos, inner.len);
    let outer_v4 = Ipv4Fields {
        tos,
        total_len: (len + Ipv4Hdr::LEN) as u16,
        dont_fragment: true,
        protocol: IPPROTO_IPIP,
        source: source[0],
        dest: backend.addr[0],
    };
    let v4 = |ip| unsafe { write_ipv4(ip, &outer_v4) };
    let v6_header = |ip| unsafe { ipv6_header(ip, tos, inner, len, &source, &backend.addr) };
    // Constant offsets for each layout, so the verifier sees every access as a fixed offset.
    match (v6, inner.vlan) {
        (false, false) => write_headers::<{ Ipv4Hdr::LEN }, ETH_LEN>(ctx, backend, our_mac, v4),
        (false, true) => write_headers::<{ Ipv4Hdr::LEN }, ETH_VLAN_LEN>(ctx, backend, our_mac, v4),
        (true, false) => {
            write_headers::<{ Ipv6Hdr::LEN }, ETH_LEN>(ctx, backend, our_mac, v6_header)
        }
        (true, true) => {
            write_headers::<{ Ipv6Hdr::LEN }, ETH_VLAN_LEN>(ctx, backend, our_mac, v6_header)
        }
    }
}

/// The outer source of `inner`'s client: the service's source prefix with the host bits from
/// a hash of the client's address, so one client always leaves from one address (its
/// connections stay in order on one receive queue) and clients spread over the prefix.
#[inline(always)]
fn outer_source(inner: &Outbound, v6: bool, service: &Service) -> [u32; 4] {
    let c = &inner.saddr;
    let hash = fmix32(c[0] ^ c[1] ^ c[2] ^ c[3]) & service.tunnel_host_bits;
    let mut source = service.tunnel_source;
    if v6 {
        source[3] |= hash;
    } else {
        source[0] |= hash;
    }
    source
}

/// After the head moved `OUTER` bytes forward: copies the `L3` bytes of Ethernet header (and
/// tag) from where they were to the new start with the new MACs, then lets `ip` write the outer
/// header after them. The inner packet is already in place behind them.
#[inline(always)]
fn write_headers<const OUTER: usize, const L3: usize>(
    ctx: &XdpContext,
    backend: &Backend,
    our_mac: [u8; 6],
    ip: impl FnOnce(*mut u8),
) -> Result<(), NoHeadroom> {
    let start = ctx.data();
    // The new Ethernet header, the outer IP header and the old Ethernet header behind them.
    if start + L3 + OUTER + L3 > ctx.data_end() {
        // The inner packet holds at least an IP and a TCP header, so this never happens; the
        // verifier needs the check all the same. The frame is already longer: drop it.
        return Err(NoHeadroom);
    }
    let frame = start as *mut u8;
    // SAFETY: the check above covers every byte touched here.
    unsafe {
        let eth = frame as *mut EthHdr;
        (*eth).dst_addr = backend.mac;
        (*eth).src_addr = our_mac;
        // The EtherType (and the tag with the EtherType it carries) is the inner packet's: the
        // outer header is of the same family.
        let old = frame.add(OUTER);
        let mut i = 12;
        while i < L3 {
            *frame.add(i) = *old.add(i);
            i += 1;
        }
        ip(frame.add(L3));
    }
    Ok(())
}

/// An IPv4 header without options, as the data path writes one (identification 0, TTL
/// [`DEFAULT_TTL`]).
pub struct Ipv4Fields {
    pub tos: u8,
    /// Bytes, header included.
    pub total_len: u16,
    /// DF: set on tunnels (RFC 2003 3.1: the inner packet's path MTU is then discovered end to
    /// end), not on ICMP errors.
    pub dont_fragment: bool,
    pub protocol: u8,
    /// Addresses as map words (network order).
    pub source: u32,
    pub dest: u32,
}

/// Writes `h` at `ip` with its checksum (RFC 1071, summed from the words in registers).
///
/// # Safety
/// `ip` must point at 20 writable packet bytes.
#[inline(always)]
pub unsafe fn write_ipv4(ip: *mut u8, h: &Ipv4Fields) {
    let [len_hi, len_lo] = h.total_len.to_be_bytes();
    let flags = if h.dont_fragment { 0x40 } else { 0 };
    // The header as five words in memory order: version/IHL, TOS, length; id and flags; TTL,
    // protocol, checksum (0 while summing); source; destination.
    let w0 = u32::from_ne_bytes([0x45, h.tos, len_hi, len_lo]);
    let w1 = u32::from_ne_bytes([0, 0, flags, 0]);
    let w2 = u32::from_ne_bytes([DEFAULT_TTL, h.protocol, 0, 0]);
    let mut sum = csum::add_word(0, w0);
    sum = csum::add_word(sum, w1);
    sum = csum::add_word(sum, w2);
    sum = csum::add_word(sum, h.source);
    sum = csum::add_word(sum, h.dest);
    let w2 = w2 | (csum::finish(sum) as u32) << 16;
    // SAFETY: the caller's promise; 32-bit stores at 2 bytes off alignment are fine for packet
    // memory on the architectures sticky-lb runs on (see frame::read_word).
    unsafe {
        let words = ip as *mut u32;
        core::ptr::write_volatile(words, w0);
        core::ptr::write_volatile(words.add(1), w1);
        core::ptr::write_volatile(words.add(2), w2);
        core::ptr::write_volatile(words.add(3), h.source);
        core::ptr::write_volatile(words.add(4), h.dest);
    }
}

/// Writes an outer IPv6 header at `ip`: next header 41, the inner traffic class, a flow label
/// from the client's address (a backend NIC that hashes the flow label spreads clients, RFC
/// 6438), no extension headers.
///
/// # Safety
/// `ip` must point at 40 writable packet bytes.
#[inline(always)]
unsafe fn ipv6_header(
    ip: *mut u8,
    tos: u8,
    inner: &Outbound,
    inner_len: usize,
    source: &[u32; 4],
    dest: &[u32; 4],
) {
    let c = &inner.saddr;
    let label = fmix32(c[0] ^ c[1] ^ c[2] ^ c[3] ^ 0x6c62_272e) & 0x000f_ffff;
    let w0 = u32::from_ne_bytes([
        0x60 | tos >> 4,
        (tos << 4) | (label >> 16) as u8,
        (label >> 8) as u8,
        label as u8,
    ]);
    // SAFETY: the caller's promise.
    unsafe { write_ipv6(ip, w0, inner_len as u16, IPPROTO_IPV6, source, dest) };
}

/// Writes an IPv6 header without extension headers at `ip`: `first` is its first word (version,
/// traffic class, flow label) as it sits in memory; hop limit [`DEFAULT_TTL`]; addresses as map
/// words (network order).
///
/// # Safety
/// `ip` must point at 40 writable packet bytes.
#[inline(always)]
pub unsafe fn write_ipv6(
    ip: *mut u8,
    first: u32,
    payload_len: u16,
    next_header: u8,
    source: &[u32; 4],
    dest: &[u32; 4],
) {
    let [len_hi, len_lo] = payload_len.to_be_bytes();
    let w1 = u32::from_ne_bytes([len_hi, len_lo, next_header, DEFAULT_TTL]);
    // SAFETY: the caller's promise; 32-bit stores at 2 bytes off alignment are fine for packet
    // memory on the architectures sticky-lb runs on (see frame::read_word).
    unsafe {
        let words = ip as *mut u32;
        core::ptr::write_volatile(words, first);
        core::ptr::write_volatile(words.add(1), w1);
        let mut i = 0;
        while i < 4 {
            core::ptr::write_volatile(words.add(2 + i), source[i]);
            core::ptr::write_volatile(words.add(6 + i), dest[i]);
            i += 1;
        }
    }
}
