//! What a tunnel service must send, built from the client's frame and the rules alone (none of
//! it taken from the crates under test): the encapsulated frame (new Ethernet header, an outer
//! IPv4 or IPv6 header with its RFC 1071 checksum, the client's IP packet unchanged) and the
//! ICMP "fragmentation needed" / ICMPv6 "packet too big" reply with its checksums. Used by the
//! tunnel data-path fixtures and the packet fuzzer.

use crate::{
    fixture::{OUR_MAC, TunnelParams},
    packet::{IPV4_LEN, IPV6_LEN},
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol numbers (IANA).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;
/// Bytes of the client's IP packet an ICMP reply quotes.
pub const QUOTE: usize = 64;
/// The outer header's hop limit, and the reply's.
const TTL: u8 = 64;

/// Murmur3's 32-bit finaliser.
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

pub fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The address of 4 or 16 bytes.
pub fn from_octets(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap()).into(),
        _ => Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()).into(),
    }
}

/// The XOR of the client address's 32-bit words as the program loads them from the packet
/// (network-order bytes read as native-endian words; an IPv4 address is one word).
pub fn client_fold(client: IpAddr) -> u32 {
    octets(client)
        .chunks(4)
        .fold(0, |x, w| x ^ u32::from_ne_bytes(w.try_into().unwrap()))
}

/// The outer source of `client`'s packets: `tunnel`'s prefix, its host bits (all in its last 4
/// bytes) taken from the bytes of fmix32 of the client's fold as that word sits in memory.
pub fn outer_source(tunnel: &TunnelParams, client: IpAddr) -> IpAddr {
    let mut bytes = octets(tunnel.source);
    let n = bytes.len();
    let hash = fmix32(client_fold(client)).to_ne_bytes();
    for (i, h) in hash.iter().enumerate() {
        let first_bit = ((n - 4 + i) * 8) as u8;
        let host: u8 = if tunnel.prefix <= first_bit {
            0xff
        } else if tunnel.prefix >= first_bit + 8 {
            0
        } else {
            0xff >> (tunnel.prefix - first_bit)
        };
        bytes[n - 4 + i] = (bytes[n - 4 + i] & !host) | (h & host);
    }
    from_octets(&bytes)
}

/// The 20-bit IPv6 flow label of `client`'s tunnelled packets.
pub fn flow_label(client: IpAddr) -> u32 {
    fmix32(client_fold(client) ^ 0x6c62_272e) & 0x000f_ffff
}

/// The one's-complement sum of `data` as 16-bit big-endian words (an odd last byte padded with
/// zero) added to `sum`, folded to 16 bits (RFC 1071). A checksummed header sums to 0xffff.
pub fn ones_sum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The length of the IP packet at `ip`, from its own header (not the frame).
pub fn ip_len(ip: &[u8]) -> usize {
    match ip[0] >> 4 {
        4 => u16::from_be_bytes([ip[2], ip[3]]) as usize,
        _ => IPV6_LEN + u16::from_be_bytes([ip[4], ip[5]]) as usize,
    }
}

/// The source (client) and destination (VIP) of the IP packet at `ip`.
pub fn ip_addrs(ip: &[u8]) -> (IpAddr, IpAddr) {
    match ip[0] >> 4 {
        4 => (from_octets(&ip[12..16]), from_octets(&ip[16..20])),
        _ => (from_octets(&ip[8..24]), from_octets(&ip[24..40])),
    }
}

/// The outer IPv4 header for `inner` (an IPv4 packet) from `source` to `dest`: no options, the
/// inner TOS, length 20 + the inner packet, id 0, DF, TTL 64, protocol 4, its checksum.
pub fn outer_ipv4(inner: &[u8], source: IpAddr, dest: IpAddr) -> Vec<u8> {
    let total = (IPV4_LEN + ip_len(inner)) as u16;
    let mut h = vec![0x45, inner[1]];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, TTL, IPPROTO_IPIP, 0, 0]);
    h.extend_from_slice(&octets(source));
    h.extend_from_slice(&octets(dest));
    let check = !ones_sum(&h, 0);
    h[10..12].copy_from_slice(&check.to_be_bytes());
    assert_eq!(ones_sum(&h, 0), 0xffff, "the outer checksum verifies");
    h
}

/// The outer IPv6 header for `inner` (an IPv6 packet) from `source` to `dest`: the inner traffic
/// class, the client's flow label, payload length = the inner packet, next header 41, hop 64.
pub fn outer_ipv6(inner: &[u8], source: IpAddr, dest: IpAddr) -> Vec<u8> {
    let tc = (inner[0] << 4) | (inner[1] >> 4);
    let label = flow_label(ip_addrs(inner).0);
    let mut h = vec![
        0x60 | tc >> 4,
        (tc << 4) | (label >> 16) as u8,
        (label >> 8) as u8,
        label as u8,
    ];
    h.extend_from_slice(&(ip_len(inner) as u16).to_be_bytes());
    h.extend_from_slice(&[IPPROTO_IPV6, TTL]);
    h.extend_from_slice(&octets(source));
    h.extend_from_slice(&octets(dest));
    h
}

/// What the frame `input` (IP header at `l3`) must become when tunnelled from `tunnel`'s prefix
/// to the backend at `dest` behind `dst_mac`: Ethernet to that MAC from ours (tag and EtherType
/// kept), the outer header of the packet's family, then every byte of the input from its IP
/// header on (Ethernet padding included).
pub fn encapsulated(
    input: &[u8],
    l3: usize,
    tunnel: &TunnelParams,
    dst_mac: [u8; 6],
    dest: IpAddr,
) -> Vec<u8> {
    let inner = &input[l3..];
    let source = outer_source(tunnel, ip_addrs(inner).0);
    let mut out = dst_mac.to_vec();
    out.extend_from_slice(&OUR_MAC);
    out.extend_from_slice(&input[12..l3]);
    match inner[0] >> 4 {
        4 => out.extend(outer_ipv4(inner, source, dest)),
        _ => out.extend(outer_ipv6(inner, source, dest)),
    }
    out.extend_from_slice(inner);
    out
}

/// What the frame `input` (IP header at `l3`) must become when its packet does not fit `mtu`
/// once encapsulated: back to its sender's MAC from the MAC it was sent to (tag kept), from the
/// VIP to the client, ICMP type 3 code 4 naming mtu - 20 (IPv4 header: TOS 0, length 92, id 0,
/// no flags, TTL 64) or ICMPv6 type 2 code 0 naming mtu - 40 (payload 72, hop limit 64), quoting
/// the first 64 bytes of the client's IP packet; the checksums (ICMPv6's over the pseudo-header
/// too) computed here.
pub fn too_big_reply(input: &[u8], l3: usize, mtu: u16) -> Vec<u8> {
    let inner = &input[l3..];
    let quote = &inner[..QUOTE];
    let (client, vip) = ip_addrs(inner);
    let mut out = input[6..12].to_vec();
    out.extend_from_slice(&input[0..6]);
    out.extend_from_slice(&input[12..l3]);
    if inner[0] >> 4 == 4 {
        let mut ip = vec![0x45, 0, 0, 92, 0, 0, 0, 0, TTL, IPPROTO_ICMP, 0, 0];
        ip.extend_from_slice(&octets(vip));
        ip.extend_from_slice(&octets(client));
        let check = !ones_sum(&ip, 0);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        assert_eq!(ones_sum(&ip, 0), 0xffff);
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&(mtu - 20).to_be_bytes());
        icmp.extend_from_slice(quote);
        let check = !ones_sum(&icmp, 0);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        out.extend(ip);
        out.extend(icmp);
    } else {
        let mut ip = vec![0x60, 0, 0, 0, 0, 72, IPPROTO_ICMPV6, TTL];
        ip.extend_from_slice(&octets(vip));
        ip.extend_from_slice(&octets(client));
        let mut icmp = vec![2, 0, 0, 0];
        icmp.extend_from_slice(&(mtu as u32 - 40).to_be_bytes());
        icmp.extend_from_slice(quote);
        // RFC 8200 8.1: source, destination, upper-layer length (32 bits), next header.
        let mut pseudo = octets(vip);
        pseudo.extend(octets(client));
        pseudo.extend_from_slice(&72u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
        let check = !ones_sum(&icmp, ones_sum(&pseudo, 0) as u32);
        icmp[2..4].copy_from_slice(&check.to_be_bytes());
        out.extend(ip);
        out.extend(icmp);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ones_sum_matches_rfc_1071s_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            ones_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0xddf2
        );
    }

    #[test]
    fn host_bits_come_from_the_hash_and_the_prefix_stays() {
        let tunnel = TunnelParams {
            source: "198.19.100.0".parse().unwrap(),
            prefix: 28,
            mtu: 1500,
        };
        let client: IpAddr = "198.18.1.1".parse().unwrap();
        let IpAddr::V4(source) = outer_source(&tunnel, client) else {
            unreachable!()
        };
        let hash = fmix32(client_fold(client)).to_ne_bytes();
        assert_eq!(source.octets(), [198, 19, 100, hash[3] & 0x0f]);
    }
}
