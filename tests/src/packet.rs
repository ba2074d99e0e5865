//! Frames built byte by byte for BPF_PROG_TEST_RUN fixtures: Ethernet (optionally 802.1Q),
//! IPv4 (optionally with options and fragment bits) or IPv6 (optionally with extension headers),
//! TCP or UDP, with valid checksums; and tunnel frames, an IP packet inside an outer IPv4 or
//! IPv6 header.

use std::net::IpAddr;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;

/// A frame to build. Start from [`Frame::tcp_syn`] and adjust fields.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    /// EtherType after any VLAN tag (0x0800 IPv4, 0x0806 ARP, 0x86dd IPv6).
    pub ether_type: u16,
    /// Source and destination; their family picks the IP header (both must be of one family).
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IPv4 options (padded to a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// The 16-bit flags + fragment offset field (IPv4).
    pub frag: u16,
    /// IPv6 extension headers between the fixed header and `protocol`'s header, in order: each
    /// (its next-header number, its bytes after the first two). The builder fills in each
    /// header's next-header and length bytes and pads the body to a multiple of 8 bytes.
    pub ipv6_ext: Vec<(u8, Vec<u8>)>,
    /// Overrides the IPv6 payload length field (None: the real length).
    pub ipv6_payload_len: Option<u16>,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

/// IP protocol / IPv6 next-header numbers of a tunnel's inner packet (IANA): IPv4 (IP-in-IP,
/// RFC 2003) and IPv6 (RFC 4213, RFC 2473).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 1];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 2];

impl Frame {
    /// A TCP SYN from `src` to `dst:port`, as a client sends it to the balancer.
    pub fn tcp_syn(src: impl Into<IpAddr>, dst: impl Into<IpAddr>, port: u16) -> Frame {
        let src = src.into();
        Frame {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            ether_type: if src.is_ipv6() { 0x86dd } else { 0x0800 },
            src,
            dst: dst.into(),
            ip_options: Vec::new(),
            frag: 0x4000, // don't fragment
            ipv6_ext: Vec::new(),
            ipv6_payload_len: None,
            protocol: 6,
            src_port: 40000,
            dst_port: port,
            tcp_flags: 0x02,
            payload: Vec::new(),
        }
    }

    /// Offset of the IP header in the built frame.
    pub fn ip_offset(&self) -> usize {
        ETH_LEN + if self.vlan.is_some() { VLAN_LEN } else { 0 }
    }

    /// The frame's IP packet: everything after the Ethernet header and any tag.
    pub fn ip_packet(&self) -> Vec<u8> {
        self.build().split_off(self.ip_offset())
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        if let Some(tci) = self.vlan {
            out.extend_from_slice(&0x8100u16.to_be_bytes());
            out.extend_from_slice(&tci.to_be_bytes());
        }
        out.extend_from_slice(&self.ether_type.to_be_bytes());
        if self.ether_type == 0x86dd {
            return self.ipv6(out);
        }
        if self.ether_type != 0x0800 {
            out.extend_from_slice(&[0u8; 46]);
            return out;
        }
        let mut options = self.ip_options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0); // end-of-options padding
        }
        let ihl = (IPV4_LEN + options.len()) / 4;
        let l4 = match self.protocol {
            6 => self.tcp(),
            17 => self.udp(),
            _ => {
                // ICMP echo request, checksum over the header.
                let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
                let sum = checksum(&icmp, 0);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                icmp
            }
        };
        let total = ihl * 4 + l4.len();
        let ip_start = out.len();
        out.push(0x40 | ihl as u8);
        out.push(0);
        out.extend_from_slice(&(total as u16).to_be_bytes());
        out.extend_from_slice(&0x1234u16.to_be_bytes());
        out.extend_from_slice(&self.frag.to_be_bytes());
        out.push(64);
        out.push(self.protocol);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&octets(self.src));
        out.extend_from_slice(&octets(self.dst));
        out.extend_from_slice(&options);
        let sum = checksum(&out[ip_start..], 0);
        out[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&l4);
        out
    }

    /// The IPv6 header, extension headers and upper-layer header after Ethernet `out`.
    fn ipv6(&self, mut out: Vec<u8>) -> Vec<u8> {
        let l4 = self.l4();
        let mut ext = Vec::new();
        for (i, (_, body)) in self.ipv6_ext.iter().enumerate() {
            let next = match self.ipv6_ext.get(i + 1) {
                Some((kind, _)) => *kind,
                None => self.protocol,
            };
            let mut header = vec![next, 0];
            header.extend_from_slice(body);
            while header.len() < 8 || !header.len().is_multiple_of(8) {
                header.push(0);
            }
            header[1] = (header.len() / 8 - 1) as u8;
            ext.extend_from_slice(&header);
        }
        let first = match self.ipv6_ext.first() {
            Some((kind, _)) => *kind,
            None => self.protocol,
        };
        let payload = self
            .ipv6_payload_len
            .unwrap_or((ext.len() + l4.len()) as u16);
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&payload.to_be_bytes());
        out.push(first);
        out.push(64);
        out.extend_from_slice(&octets(self.src));
        out.extend_from_slice(&octets(self.dst));
        out.extend_from_slice(&ext);
        out.extend_from_slice(&l4);
        out
    }

    fn l4(&self) -> Vec<u8> {
        match self.protocol {
            6 => self.tcp(),
            17 => self.udp(),
            _ => vec![128, 0, 0, 0, 0, 1, 0, 1], // an ICMPv6 echo request (checksum not needed)
        }
    }

    fn pseudo_header_sum(&self, len: usize) -> u32 {
        let mut sum = 0u32;
        let (src, dst) = (octets(self.src), octets(self.dst));
        for pair in src.chunks(2).chain(dst.chunks(2)) {
            sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
        }
        sum + self.protocol as u32 + len as u32
    }

    fn tcp(&self) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&self.src_port.to_be_bytes());
        tcp.extend_from_slice(&self.dst_port.to_be_bytes());
        tcp.extend_from_slice(&1u32.to_be_bytes()); // seq
        tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
        tcp.push(5 << 4); // data offset
        tcp.push(self.tcp_flags);
        tcp.extend_from_slice(&64240u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        tcp.extend_from_slice(&self.payload);
        let sum = checksum(&tcp, self.pseudo_header_sum(tcp.len()));
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        tcp
    }

    fn udp(&self) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&self.src_port.to_be_bytes());
        udp.extend_from_slice(&self.dst_port.to_be_bytes());
        udp.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let sum = checksum(&udp, self.pseudo_header_sum(udp.len()));
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        udp
    }
}

/// `inner` (an IP packet) inside an outer header from `outer_src` to `outer_dst`, as a
/// tunnel-mode balancer sends it, in a frame with `l2`'s MACs and VLAN tag. The outer header's
/// family is the addresses'; its protocol (next header) is 4 for an IPv4 inner packet and 41 for
/// anything else (an IPv6 one). IPv4: no options, DF set, TTL 64, a valid checksum; IPv6: no
/// extension headers, hop limit 64.
pub fn tunnel_frame(l2: &Frame, outer_src: IpAddr, outer_dst: IpAddr, inner: &[u8]) -> Vec<u8> {
    let protocol = match inner.first() {
        Some(byte) if byte >> 4 == 4 => IPPROTO_IPIP,
        _ => IPPROTO_IPV6,
    };
    let mut out = l2.build();
    // MACs and any tag; the EtherType is the outer header's.
    out.truncate(l2.ip_offset() - 2);
    if outer_src.is_ipv4() {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip_start = out.len();
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&((IPV4_LEN + inner.len()) as u16).to_be_bytes());
        out.extend_from_slice(&0x4321u16.to_be_bytes());
        out.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
        out.extend_from_slice(&[64, protocol, 0, 0]);
        out.extend_from_slice(&octets(outer_src));
        out.extend_from_slice(&octets(outer_dst));
        let sum = checksum(&out[ip_start..], 0);
        out[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    } else {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(inner.len() as u16).to_be_bytes());
        out.extend_from_slice(&[protocol, 64]);
        out.extend_from_slice(&octets(outer_src));
        out.extend_from_slice(&octets(outer_dst));
    }
    out.extend_from_slice(inner);
    out
}

/// The address's bytes in network order (4 or 16).
fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The Internet checksum (RFC 1071) of `data`, starting from a partial `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let frame = Frame::tcp_syn(
            "198.18.1.1".parse::<IpAddr>().unwrap(),
            "198.18.0.100".parse::<IpAddr>().unwrap(),
            80,
        )
        .build();
        assert_eq!(checksum(&frame[ETH_LEN..ETH_LEN + IPV4_LEN], 0), 0);
    }

    #[test]
    fn tunnel_frames_carry_the_inner_packet_under_a_valid_outer_header() {
        let inner = Frame::tcp_syn(
            "198.18.1.1".parse::<IpAddr>().unwrap(),
            "198.18.0.100".parse::<IpAddr>().unwrap(),
            80,
        );
        let packet = inner.ip_packet();
        let outer_src = "198.18.0.1".parse().unwrap();
        let frame = tunnel_frame(&inner, outer_src, "198.18.0.2".parse().unwrap(), &packet);
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(checksum(&frame[ETH_LEN..ETH_LEN + IPV4_LEN], 0), 0);
        assert_eq!(frame[ETH_LEN + 9], IPPROTO_IPIP);
        assert_eq!(frame[ETH_LEN + IPV4_LEN..], packet[..]);
        // An IPv6 packet in an IPv6 tunnel: next header 41, payload length the inner packet's.
        let inner6 = Frame::tcp_syn(
            "2001:db8:1::1".parse::<IpAddr>().unwrap(),
            "2001:db8::100".parse::<IpAddr>().unwrap(),
            80,
        );
        let packet6 = inner6.ip_packet();
        let frame6 = tunnel_frame(
            &inner6,
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            &packet6,
        );
        assert_eq!(&frame6[12..14], &[0x86, 0xdd]);
        assert_eq!(frame6[ETH_LEN + 6], IPPROTO_IPV6);
        assert_eq!(
            frame6[ETH_LEN + 4..ETH_LEN + 6],
            (packet6.len() as u16).to_be_bytes()
        );
        assert_eq!(frame6[ETH_LEN + IPV6_LEN..], packet6[..]);
    }

    #[test]
    fn ipv6_tcp_checksum_verifies_through_extension_headers() {
        let mut f = Frame::tcp_syn(
            "2001:db8:1::1".parse::<IpAddr>().unwrap(),
            "2001:db8::100".parse::<IpAddr>().unwrap(),
            80,
        );
        f.ipv6_ext = vec![(0, vec![1, 4, 0, 0, 0, 0]), (60, vec![])];
        let frame = f.build();
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
        assert_eq!(frame[ETH_LEN + 6], 0, "first next header: hop-by-hop");
        let tcp = &frame[ETH_LEN + IPV6_LEN + 16..];
        assert_eq!(tcp.len(), 20);
        // The checksum over the pseudo-header and the segment verifies to zero.
        let pseudo: u32 = frame[ETH_LEN + 8..ETH_LEN + 40]
            .chunks(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]) as u32)
            .sum::<u32>()
            + 6
            + tcp.len() as u32;
        assert_eq!(checksum(tcp, pseudo), 0);
    }
}
