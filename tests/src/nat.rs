//! What a NAT service must send, built from the input frame and the rules alone (none of it
//! taken from the crates under test): the same frame with new MACs, the destination (and with
//! source NAT the source) address and port replaced, and the IPv4 header and TCP checksums as
//! they must then be. Used by the NAT data-path fixtures and the packet fuzzer.
//!
//! The checksums: a translation changes only addresses and ports, so the balancer updates the
//! checksums incrementally (RFC 1624). For an input whose checksum is right, the result must be
//! the checksum of the output computed from scratch (RFC 1071 over the IPv4 header, or over the
//! pseudo-header and the whole TCP segment). For an input whose checksum is wrong, it must stay
//! exactly as wrong: the receiver's one's-complement sum over the output (checksum included)
//! equals the sum over the input, so the backend (or the client) drops it as it would have
//! dropped the input. Both are one rule: out = ~(~in + ~right_out + right_in) in one's
//! complement arithmetic ([`carried_check`]), which is right_out when in == right_in.

use crate::tunnel::{octets, ones_sum};
use std::net::IpAddr;

pub const IPPROTO_TCP: u8 = 6;

/// An address and port (host order).
pub type Endpoint = (IpAddr, u16);

/// Where a frame's IP header, TCP header and the end of its IP packet are (Ethernet padding
/// after it is not checksummed).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub l3: usize,
    pub l4: usize,
    pub end: usize,
    pub v6: bool,
}

/// The layout of a frame holding an IPv4 packet (any options) or an IPv6 packet with TCP right
/// after the fixed header, the IP header at `l3`.
pub fn layout(frame: &[u8], l3: usize) -> Layout {
    let ip = &frame[l3..];
    if ip[0] >> 4 == 4 {
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        Layout {
            l3,
            l4: l3 + ihl,
            end: l3 + total,
            v6: false,
        }
    } else {
        let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        Layout {
            l3,
            l4: l3 + 40,
            end: l3 + 40 + payload,
            v6: true,
        }
    }
}

/// The offset of the IP header: after the MACs and an 802.1Q tag if there is one.
pub fn l3_of(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// The byte ranges of the source and destination addresses in the IP header at `l3`.
fn addr_ranges(at: &Layout) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    if at.v6 {
        (at.l3 + 8..at.l3 + 24, at.l3 + 24..at.l3 + 40)
    } else {
        (at.l3 + 12..at.l3 + 16, at.l3 + 16..at.l3 + 20)
    }
}

/// The RFC 1071 checksum the IPv4 header at `at` must carry (computed over the header with its
/// checksum field taken as zero).
pub fn ipv4_header_check(frame: &[u8], at: &Layout) -> u16 {
    let mut header = frame[at.l3..at.l4].to_vec();
    header[10..12].fill(0);
    !ones_sum(&header, 0)
}

/// The one's-complement sum of the TCP pseudo-header (RFC 9293 3.1, RFC 8200 8.1) of the
/// segment at `at`.
fn pseudo_sum(frame: &[u8], at: &Layout) -> u32 {
    let (src, dst) = addr_ranges(at);
    let mut pseudo = frame[src].to_vec();
    pseudo.extend_from_slice(&frame[dst]);
    let len = (at.end - at.l4) as u32;
    if at.v6 {
        pseudo.extend_from_slice(&len.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
    } else {
        pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
        pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    }
    ones_sum(&pseudo, 0) as u32
}

/// The TCP checksum the segment at `at` must carry: computed from scratch over the
/// pseudo-header and the whole segment with the checksum field taken as zero.
pub fn tcp_check(frame: &[u8], at: &Layout) -> u16 {
    let mut segment = frame[at.l4..at.end].to_vec();
    segment[16..18].fill(0);
    !ones_sum(&segment, pseudo_sum(frame, at))
}

/// The receiver's sum over the TCP segment at `at` and its pseudo-header, checksum included:
/// 0xffff for a segment whose checksum is right.
pub fn tcp_residue(frame: &[u8], at: &Layout) -> u16 {
    ones_sum(&frame[at.l4..at.end], pseudo_sum(frame, at))
}

/// The same for the IPv4 header.
pub fn ipv4_residue(frame: &[u8], at: &Layout) -> u16 {
    ones_sum(&frame[at.l3..at.l4], 0)
}

/// Whether the frame's IPv4 header checksum (if IPv4) and TCP checksum are right.
pub fn checksums_valid(frame: &[u8], at: &Layout) -> bool {
    (at.v6 || ipv4_residue(frame, at) == 0xffff) && tcp_residue(frame, at) == 0xffff
}

/// The checksum a translation must leave when the input carried `input` where `right_in` was
/// right and the output's right checksum is `right_out`: the input's error carried over
/// (~out = ~in + ~right_out - ~right_in, in one's-complement arithmetic; equal to `right_out`
/// when the input was right).
pub fn carried_check(input: u16, right_in: u16, right_out: u16) -> u16 {
    let sum = (!input) as u32 + (!right_out) as u32 + right_in as u32;
    !ones_sum(&[], sum)
}

fn read_check(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// What `input` (IP header at `l3`; IPv6 with TCP right after the fixed header) must become
/// when translated: Ethernet to `dst_mac` from `src_mac` (tag and EtherType kept), the
/// destination replaced by `dst` and, if given, the source by `src`, every other byte of the
/// frame the same except the IPv4 header checksum and the TCP checksum, computed here (see the
/// module's notes).
pub fn translated(
    input: &[u8],
    l3: usize,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Vec<u8> {
    let at = layout(input, l3);
    let (src_at, dst_at) = addr_ranges(&at);
    let right_ip_in = (!at.v6).then(|| ipv4_header_check(input, &at));
    let right_tcp_in = tcp_check(input, &at);
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    let mut set = |range: std::ops::Range<usize>, port_at: usize, (addr, port): Endpoint| {
        let bytes = octets(addr);
        assert_eq!(
            bytes.len(),
            range.len(),
            "an address of the packet's family"
        );
        out[range].copy_from_slice(&bytes);
        out[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    };
    if let Some(src) = src {
        set(src_at, at.l4, src);
    }
    if let Some(dst) = dst {
        set(dst_at, at.l4 + 2, dst);
    }
    if let Some(right_in) = right_ip_in {
        let check = carried_check(read_check(input, l3 + 10), right_in, {
            ipv4_header_check(&out, &at)
        });
        out[l3 + 10..l3 + 12].copy_from_slice(&check.to_be_bytes());
    }
    let check = carried_check(
        read_check(input, at.l4 + 16),
        right_tcp_in,
        tcp_check(&out, &at),
    );
    out[at.l4 + 16..at.l4 + 18].copy_from_slice(&check.to_be_bytes());
    out
}

/// The source and destination endpoints of the TCP segment in `frame` (IP header at `l3`).
pub fn endpoints(frame: &[u8], l3: usize) -> (Endpoint, Endpoint) {
    let at = layout(frame, l3);
    let (src, dst) = addr_ranges(&at);
    let port = |i: usize| u16::from_be_bytes([frame[at.l4 + i], frame[at.l4 + i + 1]]);
    (
        (crate::tunnel::from_octets(&frame[src]), port(0)),
        (crate::tunnel::from_octets(&frame[dst]), port(2)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;

    #[test]
    fn a_translated_valid_segment_has_valid_checksums_and_the_new_endpoints() {
        for (client, vip, backend) in [
            ("198.18.1.1", "198.18.0.100", "198.18.0.16"),
            ("2001:db8:1::1", "2001:db8::100", "2001:db8::16"),
        ] {
            let (client, vip, backend): (IpAddr, IpAddr, IpAddr) = (
                client.parse().unwrap(),
                vip.parse().unwrap(),
                backend.parse().unwrap(),
            );
            let mut frame = Frame::tcp_syn(client, vip, 80);
            frame.payload = (0..33).collect();
            frame.vlan = Some(3);
            let input = frame.build();
            let at = layout(&input, 18);
            assert!(checksums_valid(&input, &at));
            let out = translated(&input, 18, None, Some((backend, 8080)), [1; 6], [2; 6]);
            assert!(checksums_valid(&out, &at));
            assert_eq!(endpoints(&out, 18), ((client, 40000), (backend, 8080)));
            // The same frame built with those addresses from the start.
            let mut direct = frame.clone();
            direct.dst = backend;
            direct.dst_port = 8080;
            direct.dst_mac = [1; 6];
            direct.src_mac = [2; 6];
            assert_eq!(out, direct.build());
        }
    }

    #[test]
    fn a_wrong_checksum_stays_exactly_as_wrong() {
        let input = Frame::tcp_syn(
            "198.18.1.1".parse::<IpAddr>().unwrap(),
            "198.18.0.100".parse::<IpAddr>().unwrap(),
            80,
        )
        .build();
        let mut bad = input.clone();
        bad[14 + 20 + 16] ^= 0x5a;
        let at = layout(&bad, 14);
        let residue = tcp_residue(&bad, &at);
        assert_ne!(residue, 0xffff);
        let to = Some(("198.18.0.16".parse().unwrap(), 8080));
        let from = Some(("198.19.100.1".parse().unwrap(), 1024));
        let out = translated(&bad, 14, from, to, [1; 6], [2; 6]);
        assert_eq!(tcp_residue(&out, &at), residue);
        assert_eq!(ipv4_residue(&out, &at), 0xffff);
    }
}
