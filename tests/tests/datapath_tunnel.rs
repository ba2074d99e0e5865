//! Tunnel forwarding through the XDP program under BPF_PROG_TEST_RUN: packet-in /
//! verdict-and-packet-out tables for IPv4-in-IPv4 and IPv6-in-IPv6, tagged and untagged, with
//! every output byte compared to a frame rebuilt here (new Ethernet header, an outer header
//! built and checksummed independently, the client's IP packet unchanged); the RSS-friendly
//! outer source and the flow label over many clients; the MTU edge and the ICMP / ICMPv6 "too
//! big" reply checked byte by byte; a DSR service beside a tunnel service; malformed frames.
//!
//! The fixture (`sticky_lb_tests::fixture`) loads the program unpinned and unattached, with
//! small tables, one service (198.18.0.100:80 or [2001:db8::100]:80) and three backends;
//! [`Fixture::tunnel`] makes that service a tunnel service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use sticky_lb_common::{
    BackendState, Counter, FlowEntry, FlowKey, FlowState, ServiceCounters, addr, addr::Family,
};
use sticky_lb_tests::{
    fixture::*,
    packet::{ETH_LEN, Frame, IPV4_LEN, IPV6_LEN, TCP_LEN},
    tunnel::{
        self, IPPROTO_ICMP, IPPROTO_ICMPV6, QUOTE, flow_label, from_octets, ip_addrs, ip_len,
        ones_sum,
    },
};

/// The outer source prefixes: a /24 and a /112 (8 and 16 host bits), and single addresses.
const SOURCE4: Ipv4Addr = Ipv4Addr::new(198, 19, 100, 0);
const SOURCE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0x5b, 0);
const MTU: u16 = 1500;
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];

fn prefix_tunnel(family: Family, mtu: u16) -> TunnelParams {
    match family {
        Family::Ipv4 => TunnelParams {
            source: SOURCE4.into(),
            prefix: 24,
            mtu,
        },
        Family::Ipv6 => TunnelParams {
            source: SOURCE6.into(),
            prefix: 112,
            mtu,
        },
    }
}

/// A fixture of `family` (clients masked to /32 or /64) whose service tunnels from `tunnel`.
fn tunnel_fixture(family: Family, tunnel: TunnelParams) -> (Fixture, sticky_lb::maglev::Table) {
    let mut f = Fixture::with_family(family, family.default_client_mask());
    let table = f.tunnel(tunnel);
    (f, table)
}

/// Client `n` of `family`: 198.18.1.N, or 2001:db8:1:N::N (one per /64).
fn client_of(family: Family, n: u16) -> IpAddr {
    match family {
        Family::Ipv4 => client(n as u8).into(),
        Family::Ipv6 => client6(n, n).into(),
    }
}

/// A TCP segment from `client:port` to `dst_port` of the VIP of the client's family.
fn tcp(
    client: IpAddr,
    dst_port: u16,
    port: u16,
    flags: u8,
    payload: usize,
    vlan: Option<u16>,
) -> Vec<u8> {
    let mut frame = Frame::tcp_syn(client, vip_of(Family::of(&client)), dst_port);
    frame.src_port = port;
    frame.tcp_flags = flags;
    frame.payload = (0..payload).map(|i| i as u8).collect();
    frame.vlan = vlan;
    frame.build()
}

fn seg(client: IpAddr, port: u16, flags: u8, payload: usize, vlan: Option<u16>) -> Vec<u8> {
    tcp(client, PORT, port, flags, payload, vlan)
}

/// The offset of the IP header: after the MACs and an 802.1Q tag if there is one.
fn l3_of(frame: &[u8]) -> usize {
    if frame[12..14] == ETH_P_8021Q { 18 } else { 14 }
}

/// What `input` must become when tunnelled to backend `backend` of `f` from `tunnel`'s prefix
/// (built by `sticky_lb_tests::tunnel` from the bytes and the rules alone).
fn encapsulated(f: &Fixture, tunnel: &TunnelParams, input: &[u8], backend: usize) -> Vec<u8> {
    let dest = addr::from_words(f.family, f.backend_entry(backend).addr);
    tunnel::encapsulated(input, l3_of(input), tunnel, f.backends[backend].2, dest)
}

fn too_big_reply(input: &[u8], mtu: u16) -> Vec<u8> {
    tunnel::too_big_reply(input, l3_of(input), mtu)
}

/// Asserts `result` is `input` tunnelled to `backend`, byte for byte.
fn assert_tunnelled(
    f: &Fixture,
    tunnel: &TunnelParams,
    what: &str,
    input: &[u8],
    (verdict, output): &(u32, Vec<u8>),
    backend: usize,
) {
    assert_eq!(*verdict, XDP_TX, "{what}: expected XDP_TX");
    let expected = encapsulated(f, tunnel, input, backend);
    assert_eq!(
        hex(output),
        hex(&expected),
        "{what}: not the encapsulation to {}",
        f.backends[backend].1
    );
    let outer = &output[l3_of(output)..];
    if f.family == Family::Ipv4 {
        assert_eq!(
            ones_sum(&outer[..IPV4_LEN], 0),
            0xffff,
            "{what}: outer checksum"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// --- Frames in, frames out ----------------------------------------------------------------------

#[test]
fn tunnel_frames_in_encapsulated_frames_out() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for vlan in [None, Some(7)] {
            let tunnel = prefix_tunnel(family, MTU);
            let (mut f, table) = tunnel_fixture(family, tunnel);
            let mut backends = BTreeSet::new();
            for n in 1..=12 {
                let client = client_of(family, n);
                let port = 40000 + n;
                let backend = f.predicted(&table, client);
                backends.insert(backend);
                let key = FlowKey {
                    service: f.service.id,
                    client: addr::words(&client),
                    client_port: port.to_be(),
                    _pad: 0,
                };
                let rows: [(&str, Vec<u8>, FlowState); 3] = [
                    ("SYN", seg(client, port, SYN, 0, vlan), FlowState::Opening),
                    (
                        "ACK with payload",
                        seg(client, port, ACK, 100 + n as usize, vlan),
                        FlowState::Established,
                    ),
                    (
                        "FIN",
                        seg(client, port, FIN_ACK, 0, vlan),
                        FlowState::Closing,
                    ),
                ];
                for (what, input, state) in rows {
                    let what = format!("{family} {vlan:?} client {client}: {what}");
                    let result = f.run(&input);
                    assert_tunnelled(&f, &tunnel, &what, &input, &result, backend);
                    // Recorded exactly as for DSR: the client's entry and its connection name
                    // the backend the packet went to.
                    let entry = f.stick_entry(client).expect("a stick entry");
                    assert_eq!(f.index_of(entry.backend), backend, "{what}");
                    let flow = f.flows.get(&key, 0).expect("a connection");
                    assert_eq!(f.index_of(flow.backend), backend, "{what}");
                    assert_eq!(flow.state, state as u8, "{what}");
                }
            }
            assert_eq!(backends.len(), 3, "12 clients over all three backends");
            assert_eq!((f.active(0), f.active(1), f.active(2)), (0, 0, 0));
            let c = f.service_counters();
            assert_eq!((c.stick_misses, c.stick_inserts), (12, 12));
            assert_eq!(f.counter(Counter::TxIcmpTooBig), 0);
            assert_eq!(f.counter(Counter::DropResizeFailed), 0);
        }
    }
}

#[test]
fn the_inner_tos_is_copied_and_ethernet_padding_travels_behind_the_packet() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let tunnel = prefix_tunnel(family, MTU);
        let (mut f, table) = tunnel_fixture(family, tunnel);
        let client = client_of(family, 3);
        let backend = f.predicted(&table, client);
        for vlan in [None, Some(4094)] {
            // DSCP EF and ECT(0): 0xba.
            let mut input = seg(client, 41000, SYN, 0, vlan);
            let l3 = l3_of(&input);
            match family {
                Family::Ipv4 => {
                    input[l3 + 1] = 0xba;
                    input[l3 + 10..l3 + 12].fill(0);
                    let check = !ones_sum(&input[l3..l3 + IPV4_LEN], 0);
                    input[l3 + 10..l3 + 12].copy_from_slice(&check.to_be_bytes());
                }
                Family::Ipv6 => {
                    input[l3] = 0x60 | 0xb;
                    input[l3 + 1] = 0xa0 | (input[l3 + 1] & 0x0f);
                }
            }
            let result = f.run(&input);
            assert_tunnelled(&f, &tunnel, "TOS 0xba", &input, &result, backend);
            let outer_tos = match family {
                Family::Ipv4 => result.1[l3 + 1],
                Family::Ipv6 => (result.1[l3] << 4) | (result.1[l3 + 1] >> 4),
            };
            assert_eq!(outer_tos, 0xba);
            // A short frame padded to Ethernet's 60 bytes (and a longer pad): the outer length
            // counts the IP packet only; the padding follows it unchanged.
            let mut padded = seg(client, 41001, ACK, 0, vlan);
            let ip = padded.len() - l3;
            padded.resize(padded.len().max(60) + 7, 0xee);
            let result = f.run(&padded);
            assert_tunnelled(&f, &tunnel, "padded", &padded, &result, backend);
            let outer = if family == Family::Ipv4 { 20 } else { 40 };
            assert_eq!(ip_len(&result.1[l3..]), outer + ip);
        }
    }
}

#[test]
fn connections_and_stick_entries_are_recorded_as_in_dsr() {
    // One script of packets through a DSR service and a tunnel service: every packet goes to
    // the same backend in both, and the tables and counts end the same.
    for family in [Family::Ipv4, Family::Ipv6] {
        let mut dsr = Fixture::with_family(family, family.default_client_mask());
        let (mut tun, _) = tunnel_fixture(family, prefix_tunnel(family, MTU));
        let script = |phase: u16| -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            for n in 1..=24u16 {
                let client = client_of(family, n);
                let port = 42000 + n;
                let vlan = (n % 3 == 0).then_some(n);
                match phase {
                    0 => {
                        frames.push(seg(client, port, SYN, 0, vlan));
                        frames.push(seg(client, port, ACK, 0, vlan));
                        frames.push(seg(client, port, ACK, 300, vlan));
                        if n % 4 == 0 {
                            frames.push(seg(client, port, FIN_ACK, 0, vlan));
                        }
                        if n % 5 == 0 {
                            frames.push(seg(client, port + 1000, SYN, 0, vlan));
                            frames.push(seg(client, port + 1000, RST, 0, vlan));
                        }
                        // Not a SYN, never seen opening: no entry, no connection.
                        frames.push(seg(client_of(family, 100 + n), port, ACK, 10, vlan));
                    }
                    _ => {
                        frames.push(seg(client, port, ACK, 20, vlan));
                        frames.push(seg(client, port + 2000, SYN, 0, vlan));
                    }
                }
            }
            frames
        };
        let run_both = |dsr: &mut Fixture, tun: &mut Fixture, frames: Vec<Vec<u8>>| {
            for frame in frames {
                let a = dsr.run(&frame);
                let b = tun.run(&frame);
                assert_eq!((a.0, b.0), (XDP_TX, XDP_TX));
                assert_eq!(
                    dsr.forwarded_to(&a),
                    tun.forwarded_to(&b),
                    "{family}: one backend in both modes"
                );
            }
        };
        run_both(&mut dsr, &mut tun, script(0));
        // A backend fails: both move its clients and connections alike.
        for f in [&mut dsr, &mut tun] {
            f.set_state(0, BackendState::Down);
            f.publish(&[1, 2]);
        }
        run_both(&mut dsr, &mut tun, script(1));
        let tables = |f: &Fixture| {
            let stick: BTreeMap<_, _> = f
                .stick
                .iter()
                .map(|r| r.unwrap())
                .map(|(k, e)| (k.client, f.index_of(e.backend)))
                .collect();
            let flows: BTreeMap<_, _> = f
                .flows
                .iter()
                .map(|r| r.unwrap())
                .map(|(k, e): (FlowKey, FlowEntry)| {
                    ((k.client, k.client_port), (f.index_of(e.backend), e.state))
                })
                .collect();
            let active = [f.active(0), f.active(1), f.active(2)];
            let c = f.service_counters();
            (stick, flows, active, c)
        };
        let (d, t) = (tables(&dsr), tables(&tun));
        assert_eq!(d.0.len(), 24, "{family}: one entry per client");
        assert!(d.1.len() > 24);
        assert_eq!(d.0, t.0, "{family}: stick tables");
        assert_eq!(d.1, t.1, "{family}: connection tables");
        assert_eq!(d.2, t.2, "{family}: active counts");
        let counts = |c: ServiceCounters| {
            (
                c.stick_hits,
                c.stick_misses,
                c.stick_inserts,
                c.redispatches,
            )
        };
        assert_eq!(counts(d.3), counts(t.3), "{family}: service counters");
        assert!(d.3.redispatches > 0);
    }
}

// --- The outer source and the flow label --------------------------------------------------------

/// Client `n` of `family` for the spread: 198.18.1.N, or an address of 2001:db8:1:N::/64 with
/// an interface identifier as privacy extensions make them (random-looking).
///
/// Not [`client_of`]'s 2001:db8:1:N::N: the outer source hashes the XOR of the address's four
/// words, in which N in word 1 cancels N in word 3, so those 64 clients share one source.
fn spread_client(family: Family, n: u16) -> IpAddr {
    match family {
        Family::Ipv4 => client(n as u8).into(),
        Family::Ipv6 => Ipv6Addr::new(0x2001, 0xdb8, 1, n, 0xa5a5 ^ n, n * 77, 3, n).into(),
    }
}

#[test]
fn clients_spread_over_the_source_prefix_each_always_from_one_address() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let tunnel = prefix_tunnel(family, MTU);
        let (mut f, table) = tunnel_fixture(family, tunnel);
        let src_at = match family {
            Family::Ipv4 => 12..16,
            Family::Ipv6 => 8..24,
        };
        let mask = addr::prefix_mask(family, tunnel.prefix);
        let mut sources = BTreeSet::new();
        let mut labels = BTreeSet::new();
        for n in 1..=64u16 {
            let client = spread_client(family, n);
            let backend = f.predicted(&table, client);
            let mut seen = BTreeSet::new();
            let mut seen_labels = BTreeSet::new();
            for (i, flags) in [SYN, ACK, ACK, FIN_ACK, SYN].into_iter().enumerate() {
                let port = 43000 + (i as u16 / 4);
                let vlan = (i == 2).then_some(12);
                let input = seg(client, port, flags, i * 10, vlan);
                let result = f.run(&input);
                assert_tunnelled(&f, &tunnel, "spread", &input, &result, backend);
                let outer = &result.1[l3_of(&result.1)..];
                seen.insert(from_octets(&outer[src_at.clone()]));
                if family == Family::Ipv6 {
                    seen_labels.insert(u32::from_be_bytes([
                        0,
                        outer[1] & 0x0f,
                        outer[2],
                        outer[3],
                    ]));
                }
            }
            assert_eq!(seen.len(), 1, "{client}: always one outer source");
            let source = *seen.first().unwrap();
            assert_eq!(
                addr::masked(addr::words(&source), mask),
                addr::words(&tunnel.source),
                "{source} inside {}/{}",
                tunnel.source,
                tunnel.prefix
            );
            sources.insert(source);
            if family == Family::Ipv6 {
                assert_eq!(seen_labels.len(), 1, "{client}: one flow label");
                assert_eq!(*seen_labels.first().unwrap(), flow_label(client));
                labels.insert(*seen_labels.first().unwrap());
            }
        }
        assert!(
            sources.len() > 32,
            "{family}: 64 clients from only {} outer sources",
            sources.len()
        );
        if family == Family::Ipv6 {
            assert!(
                labels.len() > 32,
                "64 clients with {} flow labels",
                labels.len()
            );
        }
    }
}

#[test]
fn a_single_source_address_is_every_clients_source() {
    for (family, source, prefix) in [
        (
            Family::Ipv4,
            IpAddr::from(Ipv4Addr::new(198, 19, 100, 7)),
            32,
        ),
        (Family::Ipv6, IpAddr::from(SOURCE6), 128),
    ] {
        let tunnel = TunnelParams {
            source,
            prefix,
            mtu: MTU,
        };
        let (mut f, table) = tunnel_fixture(family, tunnel);
        assert_eq!(f.service.tunnel_host_bits, 0);
        for n in 1..=64u16 {
            let client = client_of(family, n);
            let input = seg(client, 44000, SYN, 0, None);
            let result = f.run(&input);
            assert_tunnelled(
                &f,
                &tunnel,
                "single",
                &input,
                &result,
                f.predicted(&table, client),
            );
            let outer = &result.1[ETH_LEN..];
            let got = match family {
                Family::Ipv4 => from_octets(&outer[12..16]),
                Family::Ipv6 => from_octets(&outer[8..24]),
            };
            assert_eq!(got, source, "{client}");
        }
    }
}

// --- The MTU --------------------------------------------------------------------------------------

/// The payload that makes a segment's IP packet exactly `len` bytes.
fn payload_for(family: Family, len: usize) -> usize {
    len - TCP_LEN
        - match family {
            Family::Ipv4 => IPV4_LEN,
            Family::Ipv6 => IPV6_LEN,
        }
}

#[test]
fn a_packet_that_just_fits_is_tunnelled_and_one_byte_more_is_answered_too_big() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for vlan in [None, Some(100)] {
            let tunnel = prefix_tunnel(family, MTU);
            let (mut f, table) = tunnel_fixture(family, tunnel);
            let outer = if family == Family::Ipv4 { 20 } else { 40 };
            let fits = payload_for(family, MTU as usize - outer);
            let client = client_of(family, 5);
            let backend = f.predicted(&table, client);
            let port = 45000;
            for flags in [SYN, ACK] {
                let input = seg(client, port, flags, 0, vlan);
                let result = f.run(&input);
                assert_tunnelled(&f, &tunnel, "handshake", &input, &result, backend);
            }
            let largest = seg(client, port, ACK, fits, vlan);
            let result = f.run(&largest);
            assert_tunnelled(
                &f,
                &tunnel,
                "inner + outer == MTU",
                &largest,
                &result,
                backend,
            );
            let l3 = l3_of(&result.1);
            assert_eq!(
                ip_len(&result.1[l3..]),
                MTU as usize,
                "the outer packet is the MTU"
            );

            let stick = f.stick_entry(client).unwrap();
            let key = FlowKey {
                service: f.service.id,
                client: addr::words(&client),
                client_port: port.to_be(),
                _pad: 0,
            };
            let flow = f.flows.get(&key, 0).unwrap();
            let active = [f.active(0), f.active(1), f.active(2)];
            let service = f.service_counters();
            // One byte more, as a data segment and as the FIN that ends the data: each answered,
            // nothing recorded.
            for flags in [ACK, FIN_ACK] {
                let what = format!("{family} {vlan:?} one byte over, flags {flags:#x}");
                let input = seg(client, port, flags, fits + 1, vlan);
                let before = f.counter(Counter::TxIcmpTooBig);
                let (verdict, output) = f.run(&input);
                assert_eq!(verdict, XDP_TX, "{what}: the reply goes back out");
                let expected = too_big_reply(&input, MTU);
                assert_eq!(hex(&output), hex(&expected), "{what}");
                check_reply_fields(family, &input, &output, MTU);
                assert_eq!(f.counter(Counter::TxIcmpTooBig), before + 1, "{what}");
                assert_eq!(
                    f.stick_entry(client),
                    Some(stick),
                    "{what}: stick entry unchanged"
                );
                assert_eq!(
                    f.flows.get(&key, 0).ok(),
                    Some(flow),
                    "{what}: connection unchanged"
                );
                assert_eq!([f.active(0), f.active(1), f.active(2)], active, "{what}");
                assert_eq!(f.service_counters(), service, "{what}");
            }
            // The client then sends segments that fit: same backend, same connection.
            let input = seg(client, port, ACK, fits, vlan);
            let result = f.run(&input);
            assert_tunnelled(&f, &tunnel, "after the reply", &input, &result, backend);
            assert_eq!(
                f.flows.get(&key, 0).unwrap().state,
                FlowState::Established as u8
            );
            assert_eq!(f.counter(Counter::DropResizeFailed), 0);
        }
    }
}

/// Reads the reply's fields one by one (the byte comparison says what differs; this says what
/// each field means): addresses, types, the MTU, the quote and every checksum.
fn check_reply_fields(family: Family, input: &[u8], output: &[u8], mtu: u16) {
    let l3 = l3_of(input);
    assert_eq!(output[0..6], input[6..12], "to the client's MAC");
    assert_eq!(output[6..12], input[0..6], "from the MAC it sent to");
    assert_eq!(output[12..l3], input[12..l3], "tag and EtherType kept");
    let ip = &output[l3..];
    let (client, vip) = ip_addrs(&input[l3..]);
    match family {
        Family::Ipv4 => {
            assert_eq!(ip.len(), 20 + 8 + QUOTE);
            assert_eq!(ip_len(ip), 92);
            assert_eq!((ip[0], ip[8], ip[9]), (0x45, 64, IPPROTO_ICMP));
            assert_eq!(ip_addrs(ip), (vip, client), "from the VIP to the client");
            assert_eq!(ones_sum(&ip[..20], 0), 0xffff, "IPv4 header checksum");
            let icmp = &ip[20..];
            assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
            assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), mtu - 20);
            assert_eq!(icmp[8..], input[l3..l3 + QUOTE], "the quote");
            assert_eq!(ones_sum(icmp, 0), 0xffff, "ICMP checksum");
        }
        Family::Ipv6 => {
            assert_eq!(ip.len(), 40 + 8 + QUOTE);
            assert_eq!(ip_len(ip), 40 + 72);
            assert_eq!((ip[0], ip[6], ip[7]), (0x60, IPPROTO_ICMPV6, 64));
            assert_eq!(ip_addrs(ip), (vip, client), "from the VIP to the client");
            let icmp = &ip[40..];
            assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
            assert_eq!(
                u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
                mtu as u32 - 40
            );
            assert_eq!(icmp[8..], input[l3..l3 + QUOTE], "the quote");
            let mut pseudo = ip[8..40].to_vec();
            pseudo.extend_from_slice(&72u32.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
            assert_eq!(
                ones_sum(icmp, ones_sum(&pseudo, 0) as u32),
                0xffff,
                "ICMPv6 checksum with the pseudo-header"
            );
        }
    }
}

#[test]
fn a_new_clients_syn_too_big_to_tunnel_records_nothing() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let tunnel = prefix_tunnel(family, 576);
        let (mut f, table) = tunnel_fixture(family, tunnel);
        let client = client_of(family, 9);
        let over = payload_for(family, 576 - if family == Family::Ipv4 { 20 } else { 40 }) + 1;
        // A SYN carrying data (TCP Fast Open) that does not fit once encapsulated.
        let input = seg(client, 46000, SYN, over, None);
        let (verdict, output) = f.run(&input);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(hex(&output), hex(&too_big_reply(&input, 576)));
        assert_eq!(f.stick_entry(client), None, "{family}: no stick entry");
        assert!(f.flows.keys().next().is_none(), "{family}: no connection");
        assert_eq!((f.active(0), f.active(1), f.active(2)), (0, 0, 0));
        // The smaller SYN that follows opens the connection as usual.
        let input = seg(client, 46000, SYN, 0, None);
        let result = f.run(&input);
        assert_tunnelled(
            &f,
            &tunnel,
            "smaller SYN",
            &input,
            &result,
            f.predicted(&table, client),
        );
        assert_eq!(f.flows.keys().count(), 1);
    }
}

// --- Neighbours ---------------------------------------------------------------------------------

/// Asserts `result` is `input` sent by DSR to the backend of `backends` whose MAC it carries.
fn assert_dsr(
    backends: &[(u32, String, [u8; 6])],
    input: &[u8],
    (verdict, output): &(u32, Vec<u8>),
) {
    assert_eq!(*verdict, XDP_TX);
    assert_eq!(output.len(), input.len(), "DSR adds nothing");
    assert!(
        backends.iter().any(|b| output[0..6] == b.2),
        "to a backend of the DSR service"
    );
    assert_eq!(output[6..12], OUR_MAC);
    assert_eq!(output[12..], input[12..], "only the MACs change");
}

#[test]
fn a_dsr_service_beside_a_tunnel_service_only_rewrites_macs() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let other_family = match family {
            Family::Ipv4 => Family::Ipv6,
            Family::Ipv6 => Family::Ipv4,
        };
        let tunnel = prefix_tunnel(family, MTU);
        let (mut f, table) = tunnel_fixture(family, tunnel);
        // The other family's DSR service on the same port, and a DSR service of the tunnel's
        // own family and VIP on port 81.
        let other = f
            .add_other_family(other_family.default_client_mask())
            .backends
            .clone();
        let beside = f.add_service(family, 81, 2, family.default_client_mask(), None);
        for n in 1..=8u16 {
            for vlan in [None, Some(9)] {
                let client = client_of(family, n);
                let input = seg(client, 47000, SYN, 0, vlan);
                let result = f.run(&input);
                assert_tunnelled(
                    &f,
                    &tunnel,
                    "tunnel",
                    &input,
                    &result,
                    f.predicted(&table, client),
                );
                let input = tcp(client, 81, 47000, SYN, 0, vlan);
                assert_dsr(&beside.backends, &input, &f.run(&input));
                let input = seg(client_of(other_family, n), 47000, SYN, 0, vlan);
                assert_dsr(&other, &input, &f.run(&input));
                // Even one far past the tunnel's MTU: DSR has no outer header to fit.
                let input = tcp(client, 81, 47001, ACK, 1600, vlan);
                assert_dsr(&beside.backends, &input, &f.run(&input));
            }
        }
        assert_eq!(f.counter(Counter::TxIcmpTooBig), 0);
    }
}

#[test]
fn malformed_frames_to_a_tunnel_service_pass_untouched() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let (mut f, _) = tunnel_fixture(family, prefix_tunnel(family, MTU));
        let client = client_of(family, 1);
        let syn = seg(client, 48000, SYN, 0, None);
        let ip = ETH_LEN;
        let tcp_at = ip
            + if family == Family::Ipv4 {
                IPV4_LEN
            } else {
                IPV6_LEN
            };
        let edit = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut b = syn.clone();
            change(&mut b);
            b
        };
        let mut cases: Vec<(String, Vec<u8>, &[Counter])> = vec![
            (
                "TCP data offset 4".into(),
                edit(&|b| b[tcp_at + 12] = 4 << 4),
                &[Counter::PassBadTcpHeader],
            ),
            (
                "TCP data offset 15".into(),
                edit(&|b| b[tcp_at + 12] = 15 << 4),
                &[Counter::PassBadTcpHeader],
            ),
        ];
        match family {
            Family::Ipv4 => cases.extend([
                (
                    "total length 1400 in a short frame".into(),
                    edit(&|b| b[ip + 2..ip + 4].copy_from_slice(&1400u16.to_be_bytes())),
                    &[Counter::PassBadIpHeader][..],
                ),
                (
                    "total length 30".into(),
                    edit(&|b| b[ip + 2..ip + 4].copy_from_slice(&30u16.to_be_bytes())),
                    &[Counter::PassBadIpHeader],
                ),
                (
                    "first fragment".into(),
                    edit(&|b| b[ip + 6..ip + 8].copy_from_slice(&0x2000u16.to_be_bytes())),
                    &[Counter::PassFragment],
                ),
                (
                    "IHL 4".into(),
                    edit(&|b| b[ip] = 0x44),
                    &[Counter::PassBadIpHeader],
                ),
            ]),
            Family::Ipv6 => cases.extend([
                (
                    "payload length 0".into(),
                    edit(&|b| b[ip + 4..ip + 6].fill(0)),
                    &[Counter::PassBadIpHeader][..],
                ),
                (
                    "payload length past the frame".into(),
                    edit(&|b| b[ip + 4..ip + 6].copy_from_slice(&1400u16.to_be_bytes())),
                    &[Counter::PassBadIpHeader],
                ),
                (
                    "version 4".into(),
                    edit(&|b| b[ip] = 0x40),
                    &[Counter::PassBadIpHeader],
                ),
                (
                    "atomic fragment".into(),
                    {
                        let mut frame = Frame::tcp_syn(client, VIP6, PORT);
                        frame.ipv6_ext = vec![(44, vec![0; 6])];
                        frame.build()
                    },
                    &[Counter::PassFragment],
                ),
                (
                    "5 extension headers".into(),
                    {
                        let mut frame = Frame::tcp_syn(client, VIP6, PORT);
                        frame.ipv6_ext = vec![(60, vec![0; 6]); 5];
                        frame.build()
                    },
                    &[Counter::PassIpv6ExtHeaders],
                ),
            ]),
        }
        // Cut at every length: the header it ends in, or a length past the frame.
        for len in ETH_LEN..syn.len() {
            cases.push((
                format!("cut to {len} bytes"),
                syn[..len].to_vec(),
                &[Counter::PassTruncated, Counter::PassBadIpHeader],
            ));
        }
        // The largest cut also fails a tunnel's MTU check if it were reached: a frame cut short
        // of a 1500-byte packet must pass, not be answered.
        let big = seg(client, 48001, ACK, 1480, None);
        cases.push((
            "a too-big segment cut short".into(),
            big[..big.len() - 1].to_vec(),
            &[Counter::PassBadIpHeader],
        ));
        for (what, input, reasons) in cases {
            let before: Vec<u64> = Counter::ALL.iter().map(|c| f.counter(*c)).collect();
            let (verdict, output) = f.run(&input);
            assert_eq!(verdict, XDP_PASS, "{family} {what}");
            assert_eq!(output, input, "{family} {what}: untouched");
            let moved: Vec<Counter> = Counter::ALL
                .iter()
                .zip(&before)
                .filter(|(c, b)| f.counter(**c) != **b)
                .map(|(c, _)| *c)
                .collect();
            assert!(
                moved.len() == 1 && reasons.contains(&moved[0]),
                "{family} {what}: counted as {moved:?}"
            );
        }
        assert_eq!(f.stick_entry(client), None, "{family}: nothing recorded");
        assert!(f.flows.keys().next().is_none());
    }
}
