//! Header parsing with the bounds checks the verifier demands. Every accessor returns `None`
//! when the frame is too short for the header it asks for.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, vlan::VlanHdr};

/// EtherType values in network byte order, compared against the raw header field.
const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
/// "More fragments" flag and fragment offset bits of the IPv4 `frags` field (host order).
const IP_MF_AND_OFFSET: u16 = 0x3fff;
const IPPROTO_TCP: u8 = 6;

/// Pointer to a `T` at `offset` bytes into the frame, if the frame holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the parser found in a frame.
pub enum Parsed {
    /// Not IPv4 (ARP, IPv6, ...): none of our business.
    NotIpv4,
    /// IPv4 but not TCP.
    NotTcp,
    /// An IPv4 fragment.
    Fragment,
    /// The frame ends inside a header.
    Truncated,
    /// A TCP segment.
    Tcp(Ipv4Tcp),
}

/// The fields of an IPv4/TCP packet the balancer uses, as raw network-order values.
pub struct Ipv4Tcp {
    pub eth: *mut EthHdr,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10).
    pub flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Parses Ethernet (with at most one 802.1Q tag), IPv4 (with options) and the TCP ports.
#[inline(always)]
pub fn ipv4_tcp(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Truncated;
    };
    let mut offset = EthHdr::LEN;
    // SAFETY: ptr_at checked the frame holds the header.
    let mut ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_8021Q_BE {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, offset) else {
            return Parsed::Truncated;
        };
        ether_type = unsafe { (*vlan).ether_type };
        offset += VlanHdr::LEN;
    }
    if ether_type != ETH_P_IPV4_BE {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, offset) else {
        return Parsed::Truncated;
    };
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Parsed::Truncated;
    }
    if ip.proto != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_AND_OFFSET != 0 {
        return Parsed::Fragment;
    }
    // Options make the header longer than 20 bytes; the TCP header starts after them.
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, offset + ihl) else {
        return Parsed::Truncated;
    };
    let tcp_ref = unsafe { &*tcp };
    // The flags are the 14th byte of the TCP header (after the data offset byte).
    let flags = unsafe { *(tcp as *const u8).add(13) };
    Parsed::Tcp(Ipv4Tcp {
        eth,
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: u16::from_ne_bytes(tcp_ref.source),
        dport: u16::from_ne_bytes(tcp_ref.dest),
        flags,
    })
}
