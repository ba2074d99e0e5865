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
    /// The IPv4 header is not well formed: version not 4, IHL below 5, total length shorter
    /// than the headers it must hold or longer than the frame.
    BadIpHeader,
    /// The TCP header is not well formed: data offset below 5, or reaching past the IP packet.
    BadTcpHeader,
    /// A well-formed, unfragmented TCP segment.
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

impl Ipv4Tcp {
    /// The first segment of a connection: SYN without ACK. Only these create stick entries and
    /// connections, so a flood of mid-connection segments from made-up sources records nothing.
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Parses Ethernet (with at most one 802.1Q tag), IPv4 (with options) and TCP, and accepts the
/// segment only if it is well formed: IHL >= 5; total length covering the IP and TCP headers and
/// not beyond the frame (trailing Ethernet padding is allowed); not a fragment; TCP data offset
/// >= 5 with the TCP header inside the total length. Anything else is reported by kind, so the
/// caller passes it untouched and counts why; a malformed frame is never forwarded.
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
        return Parsed::BadIpHeader;
    }
    if ip.proto != IPPROTO_TCP {
        return Parsed::NotTcp;
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_AND_OFFSET != 0 {
        return Parsed::Fragment;
    }
    // Options make the header longer than 20 bytes; the TCP header starts after them. (Bounds
    // first: the verifier needs this check on the pointer itself, and a check placed after the
    // length checks below would be folded away by the compiler.)
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, offset + ihl) else {
        return Parsed::Truncated;
    };
    // The IP packet must hold its own header and a minimal TCP header, and must fit the frame;
    // the frame may be longer (Ethernet pads short frames to 60 bytes).
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let frame = ctx.data_end() - ctx.data();
    if total < ihl + TcpHdr::LEN || offset + total > frame {
        return Parsed::BadIpHeader;
    }
    // The data offset is the high nibble of the 13th byte, the flags the 14th.
    let doff_byte = unsafe { *(tcp as *const u8).add(12) };
    let doff = ((doff_byte >> 4) as usize) * 4;
    if doff < TcpHdr::LEN || ihl + doff > total {
        return Parsed::BadTcpHeader;
    }
    let tcp_ref = unsafe { &*tcp };
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
