//! Wire-format numbers both XDP programs compare packets against (Katran's
//! `balancer_consts.h`), each with its source. Multi-byte values that are compared with raw
//! header fields are in network byte order (`_BE`).

use network_types::eth::EthHdr;

/// EtherTypes (IEEE 802), network byte order.
pub const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
pub const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();
/// Bytes from the frame start to the IP header: Ethernet, or Ethernet and one 802.1Q tag.
pub const ETH_LEN: usize = EthHdr::LEN;
pub const ETH_VLAN_LEN: usize = EthHdr::LEN + 4;

/// "More fragments" flag and fragment offset bits of the IPv4 `frags` field (host order,
/// RFC 791).
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;
/// The fragment offset bits alone.
pub const IP_OFFSET: u16 = 0x1fff;

/// IP protocol / IPv6 next-header numbers (IANA "Assigned Internet Protocol Numbers").
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 inside (IP-in-IP, RFC 2003).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
/// IPv6 inside (RFC 4213, RFC 2473).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// ICMP "destination unreachable" / "fragmentation needed" (RFC 792, RFC 1191) and ICMPv6
/// "packet too big" (RFC 4443) type and code.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// The ICMP header before the quoted packet: type, code, checksum, 4 bytes (unused and the
/// next-hop MTU, or the 32-bit MTU).
pub const ICMP_HEADER_LEN: usize = 8;

/// TCP flags (the 14th header byte, RFC 9293).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header (RFC 9293).
pub const TCP_CHECK: usize = 16;

/// TTL / hop limit of the headers the data path writes (Linux's default).
pub const DEFAULT_TTL: u8 = 64;

/// bpf_map_update_elem flag: fail with EEXIST if the key is present.
pub const BPF_NOEXIST: u64 = 1;
/// errno of an insert that found the key present (asm-generic/errno-base.h).
pub const EEXIST: i32 = 17;
