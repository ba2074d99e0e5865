//! Header parsing with the bounds checks the verifier demands. Every accessor returns `None`
//! when the frame is too short for the header it asks for.
//!
//! IPv4 and IPv6 are parsed into one [`Segment`] holding 16-byte addresses (an IPv4 address in
//! word 0, words 1..4 zero), so everything after the parser (service lookup, stick table,
//! Maglev, least-conn, connection table) is one code path for both families.

use crate::{
    consts::*,
    frame::{ptr_at, read_addr, read_word},
};
use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};
use sticky_lb_common::{Family, MAX_IPV6_EXT_HEADERS};

/// The client's IP packet as forwarding needs it, read again from the frame once the backend is
/// chosen rather than kept from [`tcp_segment`]: a value carried from parsing through the
/// selection's loops (the family, the tag) would split the verifier's states along every path
/// and multiply them in every loop.
pub struct Outbound {
    /// Whether an 802.1Q tag follows the Ethernet addresses (the IP header then starts at byte
    /// 18, else 14).
    pub vlan: bool,
    /// Length of the IP packet (bytes), headers and payload; not the Ethernet padding.
    pub len: usize,
    /// The IPv4 TOS or IPv6 traffic class byte (DSCP and ECN).
    pub tos: u8,
    /// Source and destination as map words.
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Reads [`Outbound`] from a frame the parser accepted as a segment of family `v6` (the
/// service's: a packet only reaches a service of its own family). `None` only if the frame is
/// not what the parser saw, which cannot happen.
#[inline(always)]
pub fn outbound(ctx: &XdpContext, v6: bool) -> Option<Outbound> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at checked every header read here.
    let (src_mac, dst_mac, vlan) = unsafe {
        (
            (*eth).src_addr,
            (*eth).dst_addr,
            (*eth).ether_type == ETH_P_8021Q_BE,
        )
    };
    let l3 = if vlan {
        EthHdr::LEN + VlanHdr::LEN
    } else {
        EthHdr::LEN
    };
    if v6 {
        let ip = unsafe { &*ptr_at::<Ipv6Hdr>(ctx, l3)? };
        Some(Outbound {
            vlan,
            len: Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize,
            tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
            saddr: unsafe { read_addr(ip.src_addr.as_ptr()) },
            daddr: unsafe { read_addr(ip.dst_addr.as_ptr()) },
            src_mac,
            dst_mac,
        })
    } else {
        let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, l3)? };
        Some(Outbound {
            vlan,
            len: u16::from_be_bytes(ip.tot_len) as usize,
            tos: ip.tos,
            saddr: [unsafe { read_word(ip.src_addr.as_ptr()) }, 0, 0, 0],
            daddr: [unsafe { read_word(ip.dst_addr.as_ptr()) }, 0, 0, 0],
            src_mac,
            dst_mac,
        })
    }
}

/// What the parser found in a frame.
pub enum Parsed {
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): none of our business.
    NotIp,
    /// IP but not TCP (ICMP, ICMPv6 and so neighbour discovery, UDP, ...).
    NotTcp,
    /// An IPv4 fragment, or an IPv6 packet with a fragment header.
    Fragment,
    /// The frame ends inside a header.
    Truncated,
    /// The IP header is not well formed: IPv4 version not 4, IHL below 5, total length shorter
    /// than the headers it must hold or longer than the frame; IPv6 version not 6, payload length
    /// 0 (a jumbogram), shorter than its extension and TCP headers or longer than the frame.
    BadIpHeader,
    /// IPv6 with more extension headers before TCP than [`MAX_IPV6_EXT_HEADERS`].
    TooManyExtHeaders,
    /// The TCP header is not well formed: data offset below 5, or reaching past the IP packet.
    BadTcpHeader,
    /// A well-formed, unfragmented TCP segment.
    Tcp(Segment),
    /// ICMP "fragmentation needed" or ICMPv6 "packet too big" about a TCP segment the sender
    /// of the error received from the address it is sent to (a VIP's reply, in DSR and tunnel
    /// modes sent by a backend).
    TooBigError(TooBigError),
}

/// What an ICMP "fragmentation needed" / ICMPv6 "packet too big" says about the segment it
/// quotes (RFC 792, RFC 1191, RFC 4443): the connection it belongs to, seen from our side.
pub struct TooBigError {
    pub eth: *mut EthHdr,
    /// A [`Family`] value.
    pub family: u8,
    /// The quoted segment's source and source port: a VIP and service port if it was ours.
    pub vip: [u32; 4],
    pub port: u16,
    /// The quoted segment's destination: the client and its port.
    pub client: [u32; 4],
    pub client_port: u16,
    /// Where things are in the frame (bytes from its start), for a NAT service's translation:
    /// the IP header, the ICMP header, the quoted IP header and the quoted TCP header.
    pub at: ErrorLayout,
}

/// Offsets (bytes from the frame's start) of an ICMP error's headers.
#[derive(Clone, Copy)]
pub struct ErrorLayout {
    pub l3: usize,
    pub icmp: usize,
    pub quote: usize,
    pub quote_l4: usize,
}

/// The fields of a TCP segment the balancer uses, as raw network-order values.
pub struct Segment {
    pub eth: *mut EthHdr,
    /// A [`Family`] value.
    pub family: u8,
    /// Source and destination address as map words (see sticky_lb_common::addr).
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10).
    pub flags: u8,
}

impl Segment {
    /// The first segment of a connection: SYN without ACK. Only these create stick entries and
    /// connections, so a flood of mid-connection segments from made-up sources records nothing.
    #[inline(always)]
    pub fn opens(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Parses Ethernet (with at most one 802.1Q tag), then IPv4 or IPv6, then TCP, and accepts the
/// segment only if it is well formed (see [`Parsed`] for what is refused). Anything else is
/// reported by kind, so the caller passes it untouched and counts why; a malformed frame is
/// never forwarded.
#[inline(always)]
pub fn tcp_segment(ctx: &XdpContext) -> Parsed {
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
    if ether_type == ETH_P_IPV4_BE {
        ipv4(ctx, eth, offset)
    } else if ether_type == ETH_P_IPV6_BE {
        ipv6(ctx, eth, offset)
    } else {
        Parsed::NotIp
    }
}

/// IPv4 (with options) at `offset`: IHL >= 5; total length covering the IP and TCP headers and
/// not beyond the frame (trailing Ethernet padding is allowed); not a fragment.
#[inline(always)]
fn ipv4(ctx: &XdpContext, eth: *mut EthHdr, offset: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, offset) else {
        return Parsed::Truncated;
    };
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Parsed::BadIpHeader;
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_AND_OFFSET != 0 {
        return match ip.proto {
            IPPROTO_TCP => Parsed::Fragment,
            _ => Parsed::NotTcp,
        };
    }
    if ip.proto == IPPROTO_ICMP {
        // SAFETY: ptr_at checked the frame holds the header.
        let daddr = [unsafe { read_word(ip.dst_addr.as_ptr()) }, 0, 0, 0];
        return icmp_too_big(ctx, eth, offset, offset + ihl, Family::Ipv4, daddr);
    }
    if ip.proto != IPPROTO_TCP {
        return Parsed::NotTcp;
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
    // SAFETY: ptr_at checked the frame holds the whole header, addresses included.
    let saddr = [unsafe { read_word(ip.src_addr.as_ptr()) }, 0, 0, 0];
    let daddr = [unsafe { read_word(ip.dst_addr.as_ptr()) }, 0, 0, 0];
    let ip = IpPacket {
        eth,
        family: Family::Ipv4,
        saddr,
        daddr,
    };
    tcp_header(ip, tcp, total - ihl)
}

/// IPv6 at `offset`, skipping at most [`MAX_IPV6_EXT_HEADERS`] hop-by-hop, routing and
/// destination-options headers to reach TCP; the payload length must cover them and the TCP
/// header and fit the frame. A fragment header ends the walk (passed, like an IPv4 fragment);
/// so does any other next header (ICMPv6 with neighbour discovery, UDP, ESP, AH, ...).
#[inline(always)]
fn ipv6(ctx: &XdpContext, eth: *mut EthHdr, offset: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, offset) else {
        return Parsed::Truncated;
    };
    let ip = unsafe { &*ip };
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let frame = ctx.data_end() - ctx.data();
    if ip.vcf[0] >> 4 != 6 || payload == 0 || offset + Ipv6Hdr::LEN + payload > frame {
        return Parsed::BadIpHeader;
    }
    let mut next = ip.next_hdr;
    // Bytes of extension headers walked so far: at most MAX_IPV6_EXT_HEADERS * 2048, which keeps
    // every offset below bounded for the verifier.
    let mut ext = 0usize;
    let mut walked = 0;
    while next != IPPROTO_TCP {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {}
            IPPROTO_FRAGMENT => return Parsed::Fragment,
            IPPROTO_ICMPV6 => {
                // SAFETY: ptr_at checked the frame holds the fixed header.
                let daddr = unsafe { read_addr(ip.dst_addr.as_ptr()) };
                let at = offset + Ipv6Hdr::LEN + ext;
                return icmp_too_big(ctx, eth, offset, at, Family::Ipv6, daddr);
            }
            _ => return Parsed::NotTcp,
        }
        if walked == MAX_IPV6_EXT_HEADERS {
            return Parsed::TooManyExtHeaders;
        }
        walked += 1;
        // Every one of these starts with (next header, length in 8-byte units beyond the first 8).
        let Some(header) = ptr_at::<[u8; 2]>(ctx, offset + Ipv6Hdr::LEN + ext) else {
            return Parsed::Truncated;
        };
        let header = unsafe { *header };
        next = header[0];
        ext += (header[1] as usize + 1) * 8;
    }
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, offset + Ipv6Hdr::LEN + ext) else {
        return Parsed::Truncated;
    };
    if payload < ext + TcpHdr::LEN {
        return Parsed::BadIpHeader;
    }
    // SAFETY: ptr_at checked the frame holds the whole fixed header, addresses included.
    let saddr = unsafe { read_addr(ip.src_addr.as_ptr()) };
    let daddr = unsafe { read_addr(ip.dst_addr.as_ptr()) };
    let ip = IpPacket {
        eth,
        family: Family::Ipv6,
        saddr,
        daddr,
    };
    tcp_header(ip, tcp, payload - ext)
}

/// The ICMP message at `offset` of a packet sent to `daddr`: a "too big" error quoting a TCP
/// segment from `daddr` (a VIP's reply) is [`Parsed::TooBigError`]; anything else (echo,
/// neighbour discovery, other errors) is not ours ([`Parsed::NotTcp`]), and is passed. The
/// quote must hold the quoted IP header (IPv4 without fragment offset, IPv6 with TCP right
/// after the fixed header) and the TCP ports; the checksum is left to the backend, which checks
/// it before acting on the message.
#[inline(always)]
fn icmp_too_big(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    l3: usize,
    offset: usize,
    family: Family,
    daddr: [u32; 4],
) -> Parsed {
    let Some(icmp) = ptr_at::<[u8; 2]>(ctx, offset) else {
        return Parsed::NotTcp;
    };
    let [kind, code] = unsafe { *icmp };
    let quoted = offset + ICMP_HEADER_LEN;
    let (vip, client, ports_at) = if family == Family::Ipv4 {
        if kind != ICMP_DEST_UNREACH || code != ICMP_FRAG_NEEDED {
            return Parsed::NotTcp;
        }
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, quoted) else {
            return Parsed::Truncated;
        };
        let ip = unsafe { &*ip };
        let ihl = ((ip.vihl & 0x0f) as usize) * 4;
        if ip.vihl >> 4 != 4
            || ihl < Ipv4Hdr::LEN
            || ip.proto != IPPROTO_TCP
            || u16::from_be_bytes(ip.frags) & IP_OFFSET != 0
        {
            return Parsed::NotTcp;
        }
        let vip = [unsafe { read_word(ip.src_addr.as_ptr()) }, 0, 0, 0];
        let client = [unsafe { read_word(ip.dst_addr.as_ptr()) }, 0, 0, 0];
        (vip, client, quoted + ihl)
    } else {
        if kind != ICMPV6_PKT_TOOBIG || code != 0 {
            return Parsed::NotTcp;
        }
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, quoted) else {
            return Parsed::Truncated;
        };
        let ip = unsafe { &*ip };
        if ip.vcf[0] >> 4 != 6 || ip.next_hdr != IPPROTO_TCP {
            return Parsed::NotTcp;
        }
        let vip = unsafe { read_addr(ip.src_addr.as_ptr()) };
        let client = unsafe { read_addr(ip.dst_addr.as_ptr()) };
        (vip, client, quoted + Ipv6Hdr::LEN)
    };
    // An error about a segment we did not send from this address is not about our flows.
    if vip != daddr {
        return Parsed::NotTcp;
    }
    // Source and destination ports: the first 4 bytes of the quoted TCP header.
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, ports_at) else {
        return Parsed::Truncated;
    };
    let [port, client_port] = unsafe { *ports };
    Parsed::TooBigError(TooBigError {
        eth,
        family: family as u8,
        vip,
        port,
        client,
        client_port,
        at: ErrorLayout {
            l3,
            icmp: offset,
            quote: quoted,
            quote_l4: ports_at,
        },
    })
}

/// What the IP layer of a segment told the parser.
struct IpPacket {
    eth: *mut EthHdr,
    family: Family,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// The TCP header at `tcp`, with `room` bytes of IP payload from its start: data offset >= 5 and
/// the header inside the payload.
#[inline(always)]
fn tcp_header(ip: IpPacket, tcp: *mut TcpHdr, room: usize) -> Parsed {
    // The data offset is the high nibble of the 13th byte, the flags the 14th.
    let doff_byte = unsafe { *(tcp as *const u8).add(12) };
    let doff = ((doff_byte >> 4) as usize) * 4;
    if doff < TcpHdr::LEN || doff > room {
        return Parsed::BadTcpHeader;
    }
    let tcp_ref = unsafe { &*tcp };
    let flags = unsafe { *(tcp as *const u8).add(13) };
    Parsed::Tcp(Segment {
        eth: ip.eth,
        family: ip.family as u8,
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: u16::from_ne_bytes(tcp_ref.source),
        dport: u16::from_ne_bytes(tcp_ref.dest),
        flags,
    })
}
