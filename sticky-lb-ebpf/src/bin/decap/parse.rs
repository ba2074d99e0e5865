//! The outer and inner headers of a tunnel packet, with the bounds checks the verifier demands.
//!
//! A tunnel packet is Ethernet (at most one 802.1Q tag), then an outer IPv4 header whose
//! protocol is 4 (IPv4 inside, RFC 2003) or 41 (IPv6 inside, RFC 4213), or an outer IPv6 header
//! whose next header is one of those (RFC 2473), with no extension headers (the balancer sends
//! none), then the inner packet.

use crate::{
    consts::*,
    frame::{ptr_at, read_addr, read_word},
};
use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};
use sticky_lb_common::{Family, decap::TunnelAddr};

/// A well-formed, unfragmented tunnel packet, as far as its outer header goes.
pub struct Tunnel {
    /// Bytes of Ethernet header: 14, or 18 with an 802.1Q tag. The outer IP header starts here.
    pub l2_len: usize,
    /// Bytes of the outer IP header: IHL * 4 for IPv4 (20 to 60, options included), 40 for IPv6.
    pub outer_len: usize,
    /// Bytes of the outer packet after its header, as its length field says (it fits the frame;
    /// the frame may be longer, Ethernet pads short frames).
    pub payload_len: usize,
    /// The inner packet's family, as the outer protocol number says.
    pub inner: Family,
    /// Whether the frame carries an 802.1Q tag (kept on the decapsulated frame).
    pub vlan: bool,
    /// The outer destination, as a tunnel-address map key.
    pub dst: TunnelAddr,
}

/// The tunnel packet in the frame, or `None` for anything else: not IPv4 or IPv6, a protocol
/// other than 4 or 41, an outer IPv4 fragment (MF set or an offset), an outer header cut short
/// by the frame or not well formed (IPv4: version not 4, IHL below 5, total length shorter than
/// the header or beyond the frame; IPv6: version not 6, payload length beyond the frame). The
/// outer IPv4 checksum is not verified: a frame's FCS already covers it on the wire, and Katran's
/// decap does not either.
#[inline(always)]
pub fn outer(ctx: &XdpContext) -> Option<Tunnel> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked the frame holds the header.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l2_len = EthHdr::LEN;
    let vlan = ether_type == ETH_P_8021Q_BE;
    if vlan {
        let tag = ptr_at::<VlanHdr>(ctx, l2_len)?;
        ether_type = unsafe { (*tag).ether_type };
        l2_len += VlanHdr::LEN;
    }
    if ether_type == ETH_P_IPV4_BE {
        ipv4(ctx, l2_len, vlan)
    } else if ether_type == ETH_P_IPV6_BE {
        ipv6(ctx, l2_len, vlan)
    } else {
        None
    }
}

/// The family of the inner packet an IP protocol number announces, if it is a tunnel's.
#[inline(always)]
fn inner_family(protocol: u8) -> Option<Family> {
    match protocol {
        IPPROTO_IPIP => Some(Family::Ipv4),
        IPPROTO_IPV6 => Some(Family::Ipv6),
        _ => None,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l2_len: usize, vlan: bool) -> Option<Tunnel> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l2_len)?;
    let ip = unsafe { &*ip };
    // The protocol first: it sends the host's own traffic on its way with the fewest checks.
    let inner = inner_family(ip.proto)?;
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_AND_OFFSET != 0 {
        return None;
    }
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let frame = ctx.data_end() - ctx.data();
    if total < ihl || l2_len + total > frame {
        return None;
    }
    Some(Tunnel {
        l2_len,
        outer_len: ihl,
        payload_len: total - ihl,
        inner,
        vlan,
        // SAFETY: ptr_at checked the frame holds the whole fixed header, addresses included.
        dst: TunnelAddr::new(
            Family::Ipv4,
            [unsafe { read_word(ip.dst_addr.as_ptr()) }, 0, 0, 0],
        ),
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l2_len: usize, vlan: bool) -> Option<Tunnel> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l2_len)?;
    let ip = unsafe { &*ip };
    let inner = inner_family(ip.next_hdr)?;
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let frame = ctx.data_end() - ctx.data();
    if ip.vcf[0] >> 4 != 6 || l2_len + Ipv6Hdr::LEN + payload > frame {
        return None;
    }
    // SAFETY: ptr_at checked the frame holds the whole header, addresses included.
    let words = unsafe { read_addr(ip.dst_addr.as_ptr()) };
    Some(Tunnel {
        l2_len,
        outer_len: Ipv6Hdr::LEN,
        payload_len: payload,
        inner,
        vlan,
        dst: TunnelAddr::new(Family::Ipv6, words),
    })
}

/// Whether the inner packet is one the kernel can take: of the family the outer protocol says,
/// with a well-formed header (IPv4: IHL at least 5, total length covering it; IPv6: version 6),
/// and its length (IPv4 total length, IPv6 40 + payload length) inside the outer packet. A
/// jumbogram (IPv6 payload length 0) is left to the kernel, like any other inner packet.
#[inline(always)]
pub fn inner_fits(ctx: &XdpContext, tunnel: &Tunnel) -> bool {
    let at = tunnel.l2_len + tunnel.outer_len;
    match tunnel.inner {
        Family::Ipv4 => {
            let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, at) else {
                return false;
            };
            let ip = unsafe { &*ip };
            let ihl = ((ip.vihl & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes(ip.tot_len) as usize;
            ip.vihl >> 4 == 4 && ihl >= Ipv4Hdr::LEN && total >= ihl && total <= tunnel.payload_len
        }
        Family::Ipv6 => {
            let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, at) else {
                return false;
            };
            let ip = unsafe { &*ip };
            let payload = u16::from_be_bytes(ip.payload_len) as usize;
            ip.vcf[0] >> 4 == 6 && Ipv6Hdr::LEN + payload <= tunnel.payload_len
        }
    }
}
