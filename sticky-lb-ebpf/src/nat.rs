//! NAT forwarding (IPVS `-m`) and full NAT (IPVS FNAT): a client's segment leaves with the
//! backend's address and port as destination (and with source NAT a balancer address and port
//! as source); the backend's replies come back through the balancer and leave with the VIP and
//! service port as source (and the client as destination). Checksums are updated incrementally
//! (RFC 1624): only the changed addresses and ports are summed, never the payload.
//!
//! The connection table (conntrack.rs) holds every translated connection from the client's
//! side; the NAT reply table (maps.rs) finds it from the backend's side. A reply is translated
//! only while its connection is open on the backend that sent it.

use crate::{
    consts::*,
    csum,
    frame::{ptr_at, read_word, write_word},
    maps::NAT,
    parse::ErrorLayout,
};
use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};
use sticky_lb_common::{
    Backend, Family, NAT_PORT_PROBES, NatEntry, NatKey, SERVICE_SOURCE_NAT, Service, hash::fmix32,
};

/// Why a segment could not be translated.
pub enum NotTranslated {
    /// IPv6 with extension headers before TCP: only a TCP header right after the fixed header
    /// is rewritten.
    ExtHeaders,
    /// The frame is not what the parser saw (cannot happen; the verifier needs the checks).
    Truncated,
}

/// One side of a connection: an address (map words) and a port (network order).
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub addr: [u32; 4],
    pub port: u16,
}

/// What a translation writes: the source and/or the destination. Both sides are always
/// initialised (an `Option` would leave the payload of `None` undefined, and the verifier
/// refuses a program that copies an undefined register).
pub struct Translation {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub change_src: bool,
    pub change_dst: bool,
}

/// Rewrites the frame as `t` says, with the IPv4 header and TCP checksums updated, and its MACs
/// to `dst_mac` from `src_mac`. The frame holds a TCP segment of family `v6` (the parser
/// checked it).
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    v6: bool,
    t: &Translation,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Result<(), NotTranslated> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(NotTranslated::Truncated)?;
    // SAFETY: ptr_at checked every header touched here.
    let l3 = unsafe {
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
        if (*eth).ether_type == ETH_P_8021Q_BE {
            EthHdr::LEN + VlanHdr::LEN
        } else {
            EthHdr::LEN
        }
    };
    // Words of the pseudo-header (and the IPv4 header) that change, summed as they change.
    let (l4, mut tcp_sum_delta, saddr_at, daddr_at, words) = if v6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, l3).ok_or(NotTranslated::Truncated)?;
        if unsafe { (*ip).next_hdr } != IPPROTO_TCP {
            return Err(NotTranslated::ExtHeaders);
        }
        (l3 + Ipv6Hdr::LEN, 0u64, l3 + 8, l3 + 24, 4)
    } else {
        let ip = ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(NotTranslated::Truncated)?;
        let ihl = ((unsafe { (*ip).vihl } & 0x0f) as usize) * 4;
        (l3 + ihl, 0u64, l3 + 12, l3 + 16, 1)
    };
    let ip_sum_delta = {
        let mut delta = 0u64;
        if t.change_src {
            delta = swap_address(ctx, saddr_at, words, &t.src.addr, delta)?;
        }
        if t.change_dst {
            delta = swap_address(ctx, daddr_at, words, &t.dst.addr, delta)?;
        }
        delta
    };
    // The IPv4 header checksum covers the addresses; IPv6 has none.
    if !v6 {
        let check = ptr_at::<[u8; 2]>(ctx, l3 + 10).ok_or(NotTranslated::Truncated)?;
        // SAFETY: ptr_at checked it.
        unsafe {
            let old = u16::from_ne_bytes(*check);
            *check = csum::finish(csum::start(old) + ip_sum_delta).to_ne_bytes();
        }
    }
    // TCP's checksum covers the addresses through its pseudo-header, and the ports.
    let tcp = ptr_at::<TcpHdr>(ctx, l4).ok_or(NotTranslated::Truncated)?;
    tcp_sum_delta += ip_sum_delta;
    // SAFETY: ptr_at checked the TCP header.
    unsafe {
        let ports = tcp as *mut u16;
        if t.change_src {
            tcp_sum_delta = csum::replace_half(tcp_sum_delta, *ports, t.src.port);
            *ports = t.src.port;
        }
        if t.change_dst {
            tcp_sum_delta = csum::replace_half(tcp_sum_delta, *ports.add(1), t.dst.port);
            *ports.add(1) = t.dst.port;
        }
        let check = (tcp as *mut u8).add(TCP_CHECK) as *mut u16;
        *check = csum::finish(csum::start(*check) + tcp_sum_delta);
    }
    Ok(())
}

/// Translates an ICMP error about a NAT connection (laid out as `at` says; the parser checked
/// the headers up to the quoted ports) for the backend that owns it: the outer destination (the
/// VIP) becomes `backend`'s address; in the quoted segment (the reply the error is about) the
/// source becomes `t.src` (the backend's address and port) and, with source NAT, the destination
/// `t.dst` (the balancer's address and port), so the backend's kernel finds its own connection.
/// The outer IPv4, quoted IPv4 and ICMP checksums are updated (the ICMPv6 one over its
/// pseudo-header too). MACs: `dst_mac` from `src_mac`. Nothing is written unless every byte
/// touched is in the frame (a router may quote as little as the IP header and 8 bytes).
#[inline(always)]
pub fn error_to_backend(
    ctx: &XdpContext,
    v6: bool,
    at: &ErrorLayout,
    backend: &[u32; 4],
    t: &Translation,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Result<(), NotTranslated> {
    // Offsets are bounded for the verifier (the parser's are far below this).
    let (l3, icmp, quote, quote_l4) = (
        at.l3 & 0x3fff,
        at.icmp & 0x3fff,
        at.quote & 0x3fff,
        at.quote_l4 & 0x3fff,
    );
    // The farthest bytes written: the quoted ports.
    ptr_at::<[u16; 2]>(ctx, quote_l4).ok_or(NotTranslated::Truncated)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(NotTranslated::Truncated)?;
    // SAFETY: ptr_at checked the Ethernet header.
    unsafe {
        (*eth).dst_addr = dst_mac;
        (*eth).src_addr = src_mac;
    }
    let (outer_daddr, quoted_saddr, quoted_daddr) = if v6 {
        (l3 + 24, quote + 8, quote + 24)
    } else {
        (l3 + 16, quote + 12, quote + 16)
    };
    let outer_delta = swap(ctx, v6, outer_daddr, backend, 0)?;
    if !v6 {
        let check = ptr_at::<u16>(ctx, l3 + 10).ok_or(NotTranslated::Truncated)?;
        // SAFETY: ptr_at checked it.
        unsafe { *check = csum::finish(csum::start(*check) + outer_delta) };
    }
    let mut quoted_delta = swap(ctx, v6, quoted_saddr, &t.src.addr, 0)?;
    if t.change_dst {
        quoted_delta = swap(ctx, v6, quoted_daddr, &t.dst.addr, quoted_delta)?;
    }
    // The ICMP checksum covers everything quoted: the addresses, the quoted IPv4 header's own
    // checksum (which changes with them), the ports; ICMPv6's also its pseudo-header, whose
    // destination is the outer one.
    let mut icmp_delta = quoted_delta;
    if v6 {
        icmp_delta += outer_delta;
    } else {
        let check = ptr_at::<u16>(ctx, quote + 10).ok_or(NotTranslated::Truncated)?;
        // SAFETY: ptr_at checked it.
        unsafe {
            let old = *check;
            let new = csum::finish(csum::start(old) + quoted_delta);
            *check = new;
            icmp_delta = csum::replace_half(icmp_delta, old, new);
        }
    }
    let ports = ptr_at::<[u16; 2]>(ctx, quote_l4).ok_or(NotTranslated::Truncated)? as *mut u16;
    // SAFETY: ptr_at checked both ports.
    unsafe {
        icmp_delta = csum::replace_half(icmp_delta, *ports, t.src.port);
        *ports = t.src.port;
        if t.change_dst {
            icmp_delta = csum::replace_half(icmp_delta, *ports.add(1), t.dst.port);
            *ports.add(1) = t.dst.port;
        }
    }
    let check = ptr_at::<u16>(ctx, icmp + 2).ok_or(NotTranslated::Truncated)?;
    // SAFETY: ptr_at checked it.
    unsafe { *check = csum::finish(csum::start(*check) + icmp_delta) };
    Ok(())
}

/// [`swap_address`] of one word (IPv4) or four (IPv6), checking only the bytes it touches.
#[inline(always)]
fn swap(
    ctx: &XdpContext,
    v6: bool,
    at: usize,
    new: &[u32; 4],
    delta: u64,
) -> Result<u64, NotTranslated> {
    if v6 {
        swap_address(ctx, at, 4, new, delta)
    } else {
        let addr = ptr_at::<u32>(ctx, at).ok_or(NotTranslated::Truncated)? as *mut u8;
        // SAFETY: ptr_at checked the 4 bytes.
        unsafe {
            let old = read_word(addr);
            write_word(addr, new[0]);
            Ok(csum::replace_word(delta, old, new[0]))
        }
    }
}

/// Whether [`rewrite`] can translate the frame, a TCP segment of family `v6` (the parser
/// checked it): IPv6 only with TCP right after the fixed header. Asked before a segment touches
/// any table: rewrite() finds out only after the connection was recorded (or a reply ended it),
/// so an IPv6 SYN with a hop-by-hop header would leave an open connection, a counted backend and
/// a source-NAT port held by a segment that was dropped (and so would each retransmission of
/// it that opened anew), and a server FIN with one would close a connection it never reached.
#[inline(always)]
pub fn translatable(ctx: &XdpContext, v6: bool) -> bool {
    if !v6 {
        return true;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: ptr_at checked every header read here.
    let l3 = if unsafe { (*eth).ether_type } == ETH_P_8021Q_BE {
        EthHdr::LEN + VlanHdr::LEN
    } else {
        EthHdr::LEN
    };
    match ptr_at::<Ipv6Hdr>(ctx, l3) {
        Some(ip) => (unsafe { (*ip).next_hdr }) == IPPROTO_TCP,
        None => false,
    }
}

/// Replaces the `words` address words at `at` with `new`; returns `delta` plus their change
/// for the checksums.
#[inline(always)]
fn swap_address(
    ctx: &XdpContext,
    at: usize,
    words: usize,
    new: &[u32; 4],
    mut delta: u64,
) -> Result<u64, NotTranslated> {
    // An IPv4 address is one word; checking 16 bytes also demands the 12 after it, which every
    // IPv4 segment holds (the rest of the header and TCP), so one check serves both families.
    let addr = ptr_at::<[u32; 4]>(ctx, at).ok_or(NotTranslated::Truncated)? as *mut u8;
    let mut i = 0;
    while i < 4 {
        if i < words {
            // SAFETY: ptr_at checked 16 bytes from `at`.
            unsafe {
                let old = read_word(addr.add(i * 4));
                delta = csum::replace_word(delta, old, new[i]);
                write_word(addr.add(i * 4), new[i]);
            }
        }
        i += 1;
    }
    Ok(delta)
}

/// Distance between two source-NAT probes (a prime: ports of most ranges all get visited).
const PROBE_STRIDE: u32 = 40_009;

/// Picks a free source-NAT port for a new connection of the client at `client` towards
/// `backend`, and records the reply-table entry `entry` under it: up to [`NAT_PORT_PROBES`]
/// ports of the service's range, starting from a hash of the client's address and port, each
/// taken only if no entry holds it (BPF_NOEXIST, so two CPUs never take one port). Returns the
/// port (network order), or `None` if every probe was taken.
#[inline(always)]
pub fn allocate_port(
    service: &Service,
    backend: &Backend,
    client: &Endpoint,
    entry: &NatEntry,
    now: u64,
) -> Option<u16> {
    let c = &client.addr;
    // Address, port and time each mixed in whole: clients of one network do not share starts,
    // and a retransmitted SYN (a second later) probes other ports.
    let start = fmix32(c[0] ^ c[1] ^ c[2] ^ c[3] ^ fmix32(client.port as u32 ^ now as u32));
    let count = if service.nat_port_count == 0 {
        1
    } else {
        service.nat_port_count
    };
    let mut probe = 0;
    while probe < NAT_PORT_PROBES {
        // Probes a stride apart (a large prime, so a crowded stretch of the range does not fail
        // them all).
        let offset = start.wrapping_add(probe.wrapping_mul(PROBE_STRIDE)) % count;
        let port = (service.nat_port_first as u32 + offset) as u16;
        let key = NatKey {
            backend: backend.addr,
            peer: service.nat_source,
            backend_port: backend.port,
            peer_port: port.to_be(),
            family: service.family as u32,
        };
        if NAT.insert(&key, entry, BPF_NOEXIST).is_ok() {
            return Some(port.to_be());
        }
        probe += 1;
    }
    None
}

/// What becomes of a connection's reply-table entry when the controller's sweep ends the
/// connection (closed or idle past its timeout, or its backend gone): plain NAT's is deleted
/// (the client's next connection from that port records its own); full NAT's stays, holding its
/// port for the backend's TIME_WAIT until the sweep frees it (`NAT_PORT_REUSE_NS` after the
/// connection ended). Either way it translates nothing more: replies are checked against the
/// connection table.
#[inline(always)]
pub fn end_connection(service: &Service, backend: &Backend, client: &Endpoint) {
    if service.flags & SERVICE_SOURCE_NAT == 0 {
        forget_reply(service, backend, client, 0);
    }
}

/// Records the reply-table entry of a plain-NAT connection (replies go to the client itself).
/// An entry a finished connection of the same client port left behind is replaced.
#[inline(always)]
pub fn record_reply(service: &Service, backend: &Backend, client: &Endpoint, entry: &NatEntry) {
    let key = NatKey {
        backend: backend.addr,
        peer: client.addr,
        backend_port: backend.port,
        peer_port: client.port,
        family: service.family as u32,
    };
    let _ = NAT.insert(&key, entry, 0);
}

/// Deletes the reply-table entry of a connection of `service` from `client` on `backend`
/// (`nat_port` its source-NAT port, or 0).
#[inline(always)]
pub fn forget_reply(service: &Service, backend: &Backend, client: &Endpoint, nat_port: u16) {
    let key = if service.flags & sticky_lb_common::SERVICE_SOURCE_NAT != 0 {
        NatKey {
            backend: backend.addr,
            peer: service.nat_source,
            backend_port: backend.port,
            peer_port: nat_port,
            family: service.family as u32,
        }
    } else {
        NatKey {
            backend: backend.addr,
            peer: client.addr,
            backend_port: backend.port,
            peer_port: client.port,
            family: service.family as u32,
        }
    };
    let _ = NAT.remove(&key);
}

/// Whether a family value is IPv6.
#[inline(always)]
pub fn is_v6(family: u8) -> bool {
    family == Family::Ipv6 as u8
}
