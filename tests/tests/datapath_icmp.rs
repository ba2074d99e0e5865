//! ICMP for live flows under BPF_PROG_TEST_RUN: a router between a backend and its client finds
//! the backend's reply (VIP:80 -> client) too big and sends ICMP "fragmentation needed" or
//! ICMPv6 "packet too big" to the VIP. The data path must send it to the backend that owns the
//! connection (DSR: new MACs; tunnel: encapsulated; NAT: translated back as the reply was),
//! and pass anything that is not about a connection it knows. Expected frames are built here
//! from the input and the rules, with every checksum computed independently.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use sticky_lb_common::{
    BackendState, Counter, FEATURE_NAT, FlowKey, Forwarding, SERVICE_SOURCE_NAT, addr, addr::Family,
};
use sticky_lb_tests::{
    fixture::*,
    packet::{Frame, LB_MAC, checksum},
    tunnel,
};

const ROUTER_MAC: [u8; 6] = [0x02, 0x7e, 0, 0, 0, 0xfe];
const CLIENT_PORT: u16 = 40000;
/// The port NAT backends listen on in these tests.
const BACKEND_PORT: u16 = 8080;

fn router(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => Ipv4Addr::new(198, 18, 9, 1).into(),
        Family::Ipv6 => Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1).into(),
    }
}

fn client_of(family: Family, n: u8) -> IpAddr {
    match family {
        Family::Ipv4 => client(n).into(),
        Family::Ipv6 => client6(n as u16, 1).into(),
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The reply the error is about: `from` port `from_port` to `to` port `to_port`, an ACK with
/// 1000 bytes, as the backend sent it (the router quotes its first `quote` bytes).
fn quoted_reply(from: IpAddr, from_port: u16, to: IpAddr, to_port: u16, quote: usize) -> Vec<u8> {
    let mut reply = Frame::tcp_syn(from, to, to_port);
    reply.src_port = from_port;
    reply.tcp_flags = ACK;
    reply.payload = vec![0x5a; 1000];
    let mut ip = reply.ip_packet();
    ip.truncate(quote);
    ip
}

/// An ICMP "fragmentation needed" (IPv4) or ICMPv6 "packet too big" from `router` to `to`,
/// naming `mtu` and quoting `quote`; `kind`/`code` override the type and code.
fn icmp_error(from: IpAddr, to: IpAddr, kind: u8, code: u8, mtu: u16, quote: &[u8]) -> Vec<u8> {
    let mut out = LB_MAC.to_vec();
    out.extend_from_slice(&ROUTER_MAC);
    let mut icmp = vec![kind, code, 0, 0];
    if from.is_ipv4() {
        icmp.extend_from_slice(&[0, 0]);
        icmp.extend_from_slice(&mtu.to_be_bytes());
    } else {
        icmp.extend_from_slice(&(mtu as u32).to_be_bytes());
    }
    icmp.extend_from_slice(quote);
    if from.is_ipv4() {
        let sum = checksum(&icmp, 0);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let ip_start = out.len();
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
        out.extend_from_slice(&octets(from));
        out.extend_from_slice(&octets(to));
        let sum = checksum(&out[ip_start..], 0);
        out[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
    } else {
        let sum = icmpv6_checksum(from, to, &icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        out.extend_from_slice(&[58, 64]);
        out.extend_from_slice(&octets(from));
        out.extend_from_slice(&octets(to));
    }
    out.extend_from_slice(&icmp);
    out
}

/// The ICMPv6 checksum of `icmp` (its checksum field zero) from `from` to `to` (RFC 4443 2.3,
/// over the RFC 8200 8.1 pseudo-header).
fn icmpv6_checksum(from: IpAddr, to: IpAddr, icmp: &[u8]) -> u16 {
    let mut pseudo = octets(from);
    pseudo.extend(octets(to));
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let mut zeroed = icmp.to_vec();
    zeroed[2..4].copy_from_slice(&[0, 0]);
    pseudo.extend(zeroed);
    checksum(&pseudo, 0)
}

/// A fixture whose connection from `client` port [`CLIENT_PORT`] is open: returns its backend's
/// index.
fn open_connection(f: &mut Fixture, client: IpAddr) -> usize {
    let mut syn = Frame::tcp_syn(client, vip_of(f.family), PORT);
    syn.src_port = CLIENT_PORT;
    let out = f.run(&syn.build());
    f.forwarded_to(&out)
}

fn error_about(f: &Fixture, client: IpAddr, vip_port: u16, quote: usize) -> Vec<u8> {
    let vip = vip_of(f.family);
    let reply = quoted_reply(vip, vip_port, client, CLIENT_PORT, quote);
    let kind = if f.family == Family::Ipv4 { 3 } else { 2 };
    let code = if f.family == Family::Ipv4 { 4 } else { 0 };
    icmp_error(router(f.family), vip, kind, code, 1400, &reply)
}

fn families() -> [(Family, usize); 2] {
    // The shortest quote a router may send: the IP header and 8 bytes (RFC 792); IPv6 routers
    // quote as much as fits 1280 bytes (RFC 4443), here 600.
    [(Family::Ipv4, 28), (Family::Ipv6, 600)]
}

#[test]
fn dsr_errors_reach_the_connections_backend_or_pass() {
    for (family, quote) in families() {
        let mut f = Fixture::with_family(family, family.default_client_mask());
        f.publish(&[0, 1, 2]);
        let c = client_of(family, 1);
        let owner = open_connection(&mut f, c);
        let error = error_about(&f, c, PORT, quote);
        // Forwarded as DSR forwards: only the MACs change.
        let (verdict, out) = f.run(&error);
        assert_eq!(verdict, XDP_TX, "{family:?}");
        let mut expected = error.clone();
        expected[0..6].copy_from_slice(&f.backends[owner].2);
        expected[6..12].copy_from_slice(&OUR_MAC);
        assert_eq!(out, expected, "{family:?}: only the MACs change");
        assert_eq!(f.counter(Counter::TxIcmpToBackend), 1);
        // Without its connection, the client's stick entry names the backend.
        let key = FlowKey {
            service: f.service.id,
            client: addr::words(&c),
            client_port: CLIENT_PORT.to_be(),
            _pad: 0,
        };
        f.flows.remove(&key).unwrap();
        let again = f.run(&error);
        assert_eq!(f.forwarded_to(&again), owner, "{family:?}: stick entry");
        // A client the balancer never saw: passed untouched.
        let stranger = error_about(&f, client_of(family, 9), PORT, quote);
        assert_passed_untouched(&stranger, f.run(&stranger));
        assert_eq!(f.counter(Counter::PassIcmpNoFlow), 1);
        // Its backend is down: passed (the client will be placed anew anyway).
        f.set_state(owner, BackendState::Down);
        assert_passed_untouched(&error, f.run(&error));
        assert_eq!(f.counter(Counter::PassIcmpNoFlow), 2);
        f.set_state(owner, BackendState::Up);
    }
}

#[test]
fn other_icmp_is_passed_untouched() {
    for (family, quote) in families() {
        let mut f = Fixture::with_family(family, family.default_client_mask());
        f.publish(&[0, 1, 2]);
        let c = client_of(family, 1);
        open_connection(&mut f, c);
        let vip = vip_of(family);
        let reply = quoted_reply(vip, PORT, c, CLIENT_PORT, quote);
        let (unreach, too_big) = match family {
            Family::Ipv4 => ((3, 1), (3, 4)),
            Family::Ipv6 => ((1, 0), (2, 0)),
        };
        let passed = pass_counters(&f);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "another error (host unreachable / no route)",
                icmp_error(router(family), vip, unreach.0, unreach.1, 0, &reply),
            ),
            (
                "too big with another code",
                icmp_error(router(family), vip, too_big.0, 9, 1400, &reply),
            ),
            (
                "about a segment from another address than the one the error went to",
                icmp_error(
                    router(family),
                    vip,
                    too_big.0,
                    too_big.1,
                    1400,
                    &quoted_reply(router(family), PORT, c, CLIENT_PORT, quote),
                ),
            ),
            (
                "about a port with no service",
                error_about(&f, c, 81, quote),
            ),
            (
                "quoting less than the ports",
                icmp_error(
                    router(family),
                    vip,
                    too_big.0,
                    too_big.1,
                    1400,
                    &reply[..if family == Family::Ipv4 { 21 } else { 41 }],
                ),
            ),
        ];
        for (name, frame) in &cases {
            let (verdict, out) = f.run(frame);
            assert_eq!(verdict, XDP_PASS, "{family:?}: {name}");
            assert_eq!(&out, frame, "{family:?}: {name}: untouched");
        }
        // Echo to the VIP: the host answers it.
        let mut echo = Frame::tcp_syn(c, vip, 0);
        echo.protocol = if family == Family::Ipv4 { 1 } else { 58 };
        let echo = echo.build();
        assert_passed_untouched(&echo, f.run(&echo));
        assert_eq!(f.counter(Counter::TxIcmpToBackend), 0, "{family:?}");
        assert!(pass_counters(&f) > passed, "{family:?}: counted as passed");
    }
}

fn pass_counters(f: &Fixture) -> u64 {
    [
        Counter::PassNotService,
        Counter::PassTruncated,
        Counter::PassIcmpNoFlow,
    ]
    .iter()
    .map(|c| f.counter(*c))
    .sum()
}

#[test]
fn tunnel_errors_are_encapsulated_to_the_backend() {
    for (family, quote) in families() {
        let mut f = Fixture::with_family(family, family.default_client_mask());
        let source = match family {
            Family::Ipv4 => "198.18.250.0".parse().unwrap(),
            Family::Ipv6 => "2001:db8::fa:0".parse().unwrap(),
        };
        let params = TunnelParams {
            source,
            prefix: if family == Family::Ipv4 { 24 } else { 112 },
            mtu: 1500,
        };
        f.tunnel(params);
        let c = client_of(family, 1);
        let owner = open_connection(&mut f, c);
        let error = error_about(&f, c, PORT, quote);
        let (verdict, out) = f.run(&error);
        assert_eq!(verdict, XDP_TX, "{family:?}");
        let backend = f.backend_entry(owner);
        let expected = tunnel::encapsulated(
            &error,
            14,
            &params,
            f.backends[owner].2,
            addr::from_words(family, backend.addr),
        );
        assert_eq!(
            out, expected,
            "{family:?}: the error inside an outer header"
        );
        // An error that does not fit once encapsulated is dropped, never answered.
        let small = TunnelParams { mtu: 200, ..params };
        f.tunnel(small);
        open_connection(&mut f, c);
        let (verdict, _) = f.run(&error_about(&f, c, PORT, 200));
        assert_eq!(verdict, XDP_DROP, "{family:?}: too big to encapsulate");
        assert_eq!(f.counter(Counter::DropTooBig), 1);
        assert_eq!(
            f.counter(Counter::TxIcmpTooBig),
            0,
            "no error about an error"
        );
    }
}

/// The frame `error` (IP header at 14) must become for a NAT backend: the outer destination
/// `backend`, the quoted source `backend:backend_port`, with source NAT the quoted destination
/// `nat`; every checksum recomputed from scratch.
fn translated_error(
    error: &[u8],
    backend_mac: [u8; 6],
    backend: IpAddr,
    nat: Option<(IpAddr, u16)>,
) -> Vec<u8> {
    let mut out = error.to_vec();
    out[0..6].copy_from_slice(&backend_mac);
    out[6..12].copy_from_slice(&OUR_MAC);
    let v4 = backend.is_ipv4();
    let (l3_len, dst_at, icmp_at) = if v4 { (20, 16, 34) } else { (40, 24, 54) };
    let a = octets(backend);
    out[14 + dst_at..14 + dst_at + a.len()].copy_from_slice(&a);
    let quote = icmp_at + 8;
    let (qsrc, qdst) = if v4 { (12, 16) } else { (8, 24) };
    out[quote + qsrc..quote + qsrc + a.len()].copy_from_slice(&a);
    let ports = quote + l3_len;
    out[ports..ports + 2].copy_from_slice(&BACKEND_PORT.to_be_bytes());
    if let Some((address, port)) = nat {
        let n = octets(address);
        out[quote + qdst..quote + qdst + n.len()].copy_from_slice(&n);
        out[ports + 2..ports + 4].copy_from_slice(&port.to_be_bytes());
    }
    if v4 {
        out[24..26].copy_from_slice(&[0, 0]);
        let sum = checksum(&out[14..34], 0);
        out[24..26].copy_from_slice(&sum.to_be_bytes());
        out[quote + 10..quote + 12].copy_from_slice(&[0, 0]);
        let sum = checksum(&out[quote..quote + 20], 0);
        out[quote + 10..quote + 12].copy_from_slice(&sum.to_be_bytes());
        out[icmp_at + 2..icmp_at + 4].copy_from_slice(&[0, 0]);
        let sum = checksum(&out[icmp_at..], 0);
        out[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
    } else {
        let from: IpAddr = <[u8; 16]>::try_from(&out[22..38]).unwrap().into();
        let sum = icmpv6_checksum(from, backend, &out[icmp_at..]);
        out[icmp_at + 2..icmp_at + 4].copy_from_slice(&sum.to_be_bytes());
    }
    out
}

#[test]
fn nat_errors_are_translated_for_the_backend() {
    for (family, quote) in [(Family::Ipv4, 28), (Family::Ipv4, 548), (Family::Ipv6, 600)] {
        for source_nat in [false, true] {
            let mut f = Fixture::with_family(family, family.default_client_mask());
            let lb: IpAddr = match family {
                Family::Ipv4 => "198.18.0.2".parse().unwrap(),
                Family::Ipv6 => "2001:db8::2".parse().unwrap(),
            };
            f.service.forwarding = Forwarding::Nat as u8;
            if source_nat {
                f.service.flags |= SERVICE_SOURCE_NAT;
                f.service.nat_source = addr::words(&lb);
                f.service.nat_port_first = 1024;
                f.service.nat_port_count = 31744;
            }
            for i in 0..3 {
                let id = f.backends[i].0;
                let mut entry = f.dataplane.backends.get(&id, 0).unwrap();
                entry.port = BACKEND_PORT.to_be();
                f.dataplane.backends.set(id, &entry, 0).unwrap();
            }
            f.dataplane.set_features(FEATURE_NAT).unwrap();
            f.publish(&[0, 1, 2]);
            let c = client_of(family, 1);
            let owner = open_connection(&mut f, c);
            let key = FlowKey {
                service: f.service.id,
                client: addr::words(&c),
                client_port: CLIENT_PORT.to_be(),
                _pad: 0,
            };
            let nat_port = u16::from_be(f.flows.get(&key, 0).unwrap().nat_port);
            let error = error_about(&f, c, PORT, quote);
            let (verdict, out) = f.run(&error);
            assert_eq!(verdict, XDP_TX, "{family:?} source_nat {source_nat}");
            let backend = addr::from_words(family, f.backend_entry(owner).addr);
            let expected = translated_error(
                &error,
                f.backends[owner].2,
                backend,
                source_nat.then_some((lb, nat_port)),
            );
            assert_eq!(
                out, expected,
                "{family:?} quote {quote} source_nat {source_nat}: translated for the backend"
            );
            assert_eq!(f.counter(Counter::TxIcmpToBackend), 1);
            // No connection: passed untouched (NAT has no stick-entry fallback: only the
            // connection knows the translation).
            f.flows.remove(&key).unwrap();
            assert_passed_untouched(&error, f.run(&error));
        }
    }
}
