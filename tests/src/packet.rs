//! Frames built byte by byte for BPF_PROG_TEST_RUN fixtures: Ethernet (optionally 802.1Q),
//! IPv4 (optionally with options and fragment bits), TCP or UDP, with valid checksums.

use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const TCP_LEN: usize = 20;

/// A frame to build. Start from [`Frame::tcp_syn`] and adjust fields.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlan: Option<u16>,
    /// EtherType after any VLAN tag (0x0800 IPv4, 0x0806 ARP, 0x86dd IPv6).
    pub ether_type: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IPv4 options (padded to a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// The 16-bit flags + fragment offset field.
    pub frag: u16,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 1];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 2];

impl Frame {
    /// A TCP SYN from `src` to `dst:port`, as a client sends it to the balancer.
    pub fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Frame {
        Frame {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            vlan: None,
            ether_type: 0x0800,
            src,
            dst,
            ip_options: Vec::new(),
            frag: 0x4000, // don't fragment
            protocol: 6,
            src_port: 40000,
            dst_port: port,
            tcp_flags: 0x02,
            payload: Vec::new(),
        }
    }

    /// Offset of the IPv4 header in the built frame.
    pub fn ip_offset(&self) -> usize {
        ETH_LEN + if self.vlan.is_some() { VLAN_LEN } else { 0 }
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
        out.extend_from_slice(&self.src.octets());
        out.extend_from_slice(&self.dst.octets());
        out.extend_from_slice(&options);
        let sum = checksum(&out[ip_start..], 0);
        out[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&l4);
        out
    }

    fn pseudo_header_sum(&self, len: usize) -> u32 {
        let mut sum = 0u32;
        for pair in self
            .src
            .octets()
            .chunks(2)
            .chain(self.dst.octets().chunks(2))
        {
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
            "198.18.1.1".parse().unwrap(),
            "198.18.0.100".parse().unwrap(),
            80,
        )
        .build();
        assert_eq!(checksum(&frame[ETH_LEN..ETH_LEN + IPV4_LEN], 0), 0);
    }
}
