//! NAT forwarding (IPVS `-m`) and full NAT through the XDP program under BPF_PROG_TEST_RUN:
//! packet-in / verdict-and-packet-out tables for IPv4 and IPv6, tagged and untagged, with every
//! output byte compared to a frame rebuilt here (`sticky_lb_tests::nat`: new MACs, the
//! destination and with source NAT the source replaced, the checksums computed from scratch,
//! or carried over exactly as wrong as they came); the connection and NAT reply tables after
//! each step; source-NAT ports (distinct, inside the range, exhausted); replies translated back
//! and stale ones dropped untouched; the server's FIN; client port reuse; the controller's
//! expiry; segments that cannot be translated; DSR and tunnel services beside a NAT service.
//!
//! The fixture (`sticky_lb_tests::fixture`) loads the program unpinned and unattached, with
//! small tables, one service (198.18.0.100:80 or [2001:db8::100]:80) and three backends;
//! [`Fixture::nat`] makes that service a NAT service and sets FEATURE_NAT.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use sticky_lb::{
    conntrack::{NatOrphans, free_nat_ports},
    dataplane::monotonic_ns,
    maglev,
};
use sticky_lb_common::{
    Backend, BackendState, Counter, ExpireOutcome, FEATURE_NAT, FlowEntry, FlowKey, FlowState,
    NAT_PORT_REUSE_NS, NatEntry, NatKey, addr, addr::Family,
};
use sticky_lb_tests::{
    fixture::*,
    nat::{self, Endpoint, checksums_valid, l3_of, layout, tcp_residue},
    packet::{CLIENT_MAC, ETH_LEN, Frame},
    tunnel,
};

/// The source-NAT addresses and the range the tests use unless they say otherwise.
const SNAT4: Ipv4Addr = Ipv4Addr::new(198, 19, 100, 7);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0x5b, 7);
const FIRST: u16 = 20000;
const COUNT: u32 = 1000;
const SYN_ACK: u8 = 0x12;
const PSH_ACK: u8 = 0x18;

fn snat_addr(family: Family) -> IpAddr {
    match family {
        Family::Ipv4 => SNAT4.into(),
        Family::Ipv6 => SNAT6.into(),
    }
}

/// Plain NAT, or full NAT from the family's source address and `count` ports from [`FIRST`].
fn params(family: Family, source_nat: bool, count: u32) -> NatParams {
    if source_nat {
        NatParams::source(snat_addr(family), FIRST, count)
    } else {
        NatParams::PLAIN
    }
}

/// A fixture of `family` (clients masked to /32 or /64) whose service forwards by NAT.
fn nat_fixture(family: Family, nat: NatParams) -> (Fixture, maglev::Table) {
    let mut f = Fixture::with_family(family, family.default_client_mask());
    let table = f.nat(nat);
    (f, table)
}

fn source_nat(f: &Fixture) -> bool {
    f.service.flags & sticky_lb_common::SERVICE_SOURCE_NAT != 0
}

/// Client `n` of `family`: 198.18.1.N, or 2001:db8:1:N::N (one per /64).
fn client_of(family: Family, n: u16) -> IpAddr {
    match family {
        Family::Ipv4 => client(n as u8).into(),
        Family::Ipv6 => client6(n, n).into(),
    }
}

/// A TCP segment from `client:port` to `dst_port` of the VIP of the client's family, checksums
/// right.
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
    frame.payload = (0..payload).map(|i| (i * 7) as u8).collect();
    frame.vlan = vlan;
    frame.build()
}

fn seg(client: IpAddr, port: u16, flags: u8, payload: usize, vlan: Option<u16>) -> Vec<u8> {
    tcp(client, PORT, port, flags, payload, vlan)
}

fn flow_key(f: &Fixture, client: IpAddr, port: u16) -> FlowKey {
    FlowKey {
        service: f.service.id,
        client: addr::words(&client),
        client_port: port.to_be(),
        _pad: 0,
    }
}

fn flow(f: &Fixture, client: IpAddr, port: u16) -> Option<FlowEntry> {
    f.flows.get(&flow_key(f, client, port), 0).ok()
}

/// Backend `backend`'s address and port (host order) as the program reads them.
fn backend_endpoint(f: &Fixture, backend: usize) -> Endpoint {
    let entry = f.backend_entry(backend);
    (
        addr::from_words(f.family, entry.addr),
        u16::from_be(entry.port),
    )
}

/// What the client's `input` must become on its way to `backend`: to the backend's address
/// and port, and with source NAT from the source address and `nat_port` (host order).
fn to_backend(f: &Fixture, input: &[u8], backend: usize, nat_port: u16) -> Vec<u8> {
    let src = source_nat(f).then(|| (snat_addr(f.family), nat_port));
    nat::translated(
        input,
        l3_of(input),
        src,
        Some(backend_endpoint(f, backend)),
        f.backends[backend].2,
        OUR_MAC,
    )
}

/// A backend's reply on the connection of `client:port` (its source-NAT port `nat_port`),
/// from the backend's address and port to the client or the source-NAT address, as the
/// backend sends it to its gateway (us).
fn reply(
    f: &Fixture,
    backend: usize,
    (client, port): Endpoint,
    nat_port: u16,
    flags: u8,
    payload: usize,
    vlan: Option<u16>,
) -> Vec<u8> {
    let (addr, backend_port) = backend_endpoint(f, backend);
    let (peer, peer_port) = match source_nat(f) {
        true => (snat_addr(f.family), nat_port),
        false => (client, port),
    };
    let mut frame = Frame::tcp_syn(addr, peer, peer_port);
    frame.src_port = backend_port;
    frame.tcp_flags = flags;
    frame.payload = (0..payload).map(|i| (i * 13) as u8).collect();
    frame.vlan = vlan;
    frame.src_mac = f.backends[backend].2;
    frame.dst_mac = OUR_MAC;
    frame.build()
}

/// What a reply `input` must become on its way back to the client `client:port` behind
/// `client_mac`: from the VIP and service port, and with source NAT to the client.
fn to_client(f: &Fixture, input: &[u8], (client, port): Endpoint, client_mac: [u8; 6]) -> Vec<u8> {
    let vip = (vip_of(f.family), PORT);
    let dst = source_nat(f).then_some((client, port));
    nat::translated(input, l3_of(input), Some(vip), dst, client_mac, OUR_MAC)
}

/// Asserts `result` is exactly `expected`, transmitted, and (for an input with right
/// checksums) that its checksums verify when computed from scratch here.
fn assert_sent(what: &str, input: &[u8], (verdict, output): &(u32, Vec<u8>), expected: &[u8]) {
    assert_eq!(*verdict, XDP_TX, "{what}: expected XDP_TX");
    assert_eq!(hex(output), hex(expected), "{what}: not the translation");
    let at = layout(input, l3_of(input));
    if checksums_valid(input, &at) {
        assert!(
            checksums_valid(output, &at),
            "{what}: the output's checksums do not verify"
        );
    }
}

fn assert_dropped_untouched(what: &str, input: &[u8], (verdict, output): &(u32, Vec<u8>)) {
    assert_eq!(*verdict, XDP_DROP, "{what}: expected XDP_DROP");
    assert_eq!(
        hex(output),
        hex(input),
        "{what}: a dropped frame is untouched"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The source port (host order) of a transmitted TCP frame.
fn source_port(frame: &[u8]) -> u16 {
    nat::endpoints(frame, l3_of(frame)).0.1
}

fn counters(f: &Fixture) -> Vec<u64> {
    Counter::ALL.iter().map(|c| f.counter(*c)).collect()
}

/// The counters that moved since `before`, with how much.
fn moved(f: &Fixture, before: &[u64]) -> Vec<(Counter, u64)> {
    Counter::ALL
        .iter()
        .zip(before)
        .filter_map(|(c, b)| {
            let now = f.counter(*c);
            (now != *b).then_some((*c, now - b))
        })
        .collect()
}

fn actives(f: &Fixture) -> [i64; 3] {
    [f.active(0), f.active(1), f.active(2)]
}

// --- Frames in, frames out ----------------------------------------------------------------------

#[test]
fn nat_frames_in_translated_frames_out() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            for vlan in [None, Some(7)] {
                let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
                let mut backends = BTreeSet::new();
                for n in 1..=12 {
                    let client = client_of(family, n);
                    let port = 40000 + n;
                    let backend = f.predicted(&table, client);
                    backends.insert(backend);
                    let mut nat_port = None;
                    let rows: [(&str, Vec<u8>, FlowState); 4] = [
                        ("SYN", seg(client, port, SYN, 0, vlan), FlowState::Opening),
                        (
                            "ACK with payload",
                            seg(client, port, PSH_ACK, 100 + n as usize, vlan),
                            FlowState::Established,
                        ),
                        (
                            "ACK",
                            seg(client, port, ACK, 0, vlan),
                            FlowState::Established,
                        ),
                        (
                            "FIN",
                            seg(client, port, FIN_ACK, 3, vlan),
                            FlowState::Closing,
                        ),
                    ];
                    for (what, input, state) in rows {
                        let what = format!("{family} snat {snat} {vlan:?} {client}: {what}");
                        let result = f.run(&input);
                        let entry = flow(&f, client, port).expect("a connection");
                        assert_eq!(f.index_of(entry.backend), backend, "{what}");
                        assert_eq!(entry.state, state as u8, "{what}");
                        let port_now = u16::from_be(entry.nat_port);
                        if snat {
                            assert!(
                                (FIRST as u32..FIRST as u32 + COUNT).contains(&(port_now as u32)),
                                "{what}: port {port_now} outside the range"
                            );
                            assert_eq!(*nat_port.get_or_insert(port_now), port_now, "{what}");
                        } else {
                            assert_eq!(port_now, 0, "{what}: no source-NAT port");
                        }
                        let expected = to_backend(&f, &input, backend, port_now);
                        assert_sent(&what, &input, &result, &expected);
                        // Field by field, what the byte comparison means.
                        let l3 = l3_of(&input);
                        let ((src, sport), (dst, dport)) = nat::endpoints(&result.1, l3);
                        assert_eq!((dst, dport), backend_endpoint(&f, backend), "{what}");
                        match snat {
                            true => assert_eq!((src, sport), (snat_addr(family), port_now)),
                            false => assert_eq!((src, sport), (client, port)),
                        }
                        assert_eq!(result.1.len(), input.len(), "{what}: same length");
                    }
                }
                assert_eq!(backends.len(), 3, "12 clients over all three backends");
                assert_eq!(actives(&f), [0, 0, 0], "every connection closed by its FIN");
                assert_eq!(f.nat_entries().len(), 12, "one reply entry per connection");
                for c in [
                    Counter::DropNatUntracked,
                    Counter::DropNatExtHeaders,
                    Counter::DropNatPortsExhausted,
                    Counter::DropNatStaleReply,
                    Counter::TxNatReply,
                ] {
                    assert_eq!(f.counter(c), 0, "{family} {c:?}");
                }
            }
        }
    }
}

#[test]
fn ip_options_and_ethernet_padding_travel_unchanged() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            let client = client_of(family, 3);
            let backend = f.predicted(&table, client);
            let syn = seg(client, 41000, SYN, 0, Some(4094));
            let result = f.run(&syn);
            let nat_port = u16::from_be(flow(&f, client, 41000).unwrap().nat_port);
            assert_sent(
                "SYN",
                &syn,
                &result,
                &to_backend(&f, &syn, backend, nat_port),
            );
            // A short frame padded past Ethernet's 60 bytes: the checksum covers the IP
            // packet only, the padding follows it unchanged.
            let mut padded = seg(client, 41000, ACK, 0, None);
            padded.resize(padded.len().max(60) + 7, 0xee);
            let result = f.run(&padded);
            let expected = to_backend(&f, &padded, backend, nat_port);
            assert_sent("padded", &padded, &result, &expected);
            assert!(result.1.ends_with(&[0xee; 7]));
            if family == Family::Ipv4 {
                // 12 bytes of IPv4 options (NOPs and a timestamp-like option).
                let mut frame = Frame::tcp_syn(client, VIP, PORT);
                frame.src_port = 41000;
                frame.tcp_flags = PSH_ACK;
                frame.ip_options = vec![1, 1, 0x44, 10, 5, 0, 1, 2, 3, 4, 1, 0];
                frame.payload = vec![0x42; 21];
                let input = frame.build();
                let result = f.run(&input);
                let expected = to_backend(&f, &input, backend, nat_port);
                assert_sent("IPv4 options", &input, &result, &expected);
            }
        }
    }
}

#[test]
fn a_wrong_checksum_stays_exactly_as_wrong() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            for (direction, flags) in [("to the backend", SYN), ("to the client", SYN_ACK)] {
                let client = client_of(family, 5 + flags as u16);
                let backend = f.predicted(&table, client);
                f.run(&seg(client, 42000, SYN, 0, None));
                let nat_port = u16::from_be(flow(&f, client, 42000).unwrap().nat_port);
                let mut input = match flags {
                    SYN => seg(client, 42000, ACK, 30, None),
                    _ => reply(&f, backend, (client, 42000), nat_port, flags, 30, None),
                };
                let at = layout(&input, ETH_LEN);
                let right = nat::tcp_check(&input, &at);
                // Wrong by 0x1234 (as a corrupted payload word would leave it).
                let wrong = right.wrapping_add(0x1234);
                input[at.l4 + 16..at.l4 + 18].copy_from_slice(&wrong.to_be_bytes());
                let residue = tcp_residue(&input, &at);
                assert_ne!(residue, 0xffff);
                let (verdict, output) = f.run(&input);
                let what = format!("{family} snat {snat} {direction}");
                assert_eq!(verdict, XDP_TX, "{what}");
                // What it must be: the output's right checksum, off by exactly what the
                // input's was off (in one's-complement arithmetic).
                let right_out = nat::tcp_check(&output, &at);
                let must = nat::carried_check(wrong, right, right_out);
                assert_ne!(must, right_out);
                let got = u16::from_be_bytes([output[at.l4 + 16], output[at.l4 + 17]]);
                assert_eq!(
                    got, must,
                    "{what}: {got:#06x}, right would be {right_out:#06x}"
                );
                // So the receiver's sum over it is what it was over the input: not 0xffff, and
                // the backend (or the client) drops it as it would have dropped the input.
                assert_eq!(tcp_residue(&output, &at), residue, "{what}");
                let expected = match flags {
                    SYN => to_backend(&f, &input, backend, nat_port),
                    _ => to_client(&f, &input, (client, 42000), CLIENT_MAC),
                };
                assert_eq!(hex(&output), hex(&expected), "{what}");
                if family == Family::Ipv4 {
                    // The same with a wrong IPv4 header checksum (and a right TCP one).
                    let mut input = match flags {
                        SYN => seg(client, 42000, ACK, 0, None),
                        _ => reply(&f, backend, (client, 42000), nat_port, flags, 0, None),
                    };
                    input[ETH_LEN + 10] ^= 0x80;
                    let at = layout(&input, ETH_LEN);
                    let ip_residue = nat::ipv4_residue(&input, &at);
                    assert_ne!(ip_residue, 0xffff);
                    let (verdict, output) = f.run(&input);
                    assert_eq!(verdict, XDP_TX);
                    assert_eq!(nat::ipv4_residue(&output, &at), ip_residue, "{what}");
                    assert_eq!(tcp_residue(&output, &at), 0xffff, "{what}: TCP still right");
                }
            }
        }
    }
}

#[test]
fn a_backend_on_another_port_gets_its_own_port_and_replies_come_from_the_services() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            // Backend 0 on 8080, backend 1 on 65535, backend 2 on the service's port.
            f.set_backend_port(0, 8080);
            f.set_backend_port(1, 65535);
            let mut seen = BTreeSet::new();
            for n in 1..=18 {
                let client = client_of(family, n);
                let backend = f.predicted(&table, client);
                let input = seg(client, 43000, SYN, 0, None);
                let result = f.run(&input);
                let nat_port = u16::from_be(flow(&f, client, 43000).unwrap().nat_port);
                assert_sent(
                    "SYN",
                    &input,
                    &result,
                    &to_backend(&f, &input, backend, nat_port),
                );
                let port = nat::endpoints(&result.1, ETH_LEN).1.1;
                assert_eq!(port, [8080, 65535, PORT][backend]);
                seen.insert(port);
                let answer = reply(&f, backend, (client, 43000), nat_port, SYN_ACK, 0, None);
                let result = f.run(&answer);
                let expected = to_client(&f, &answer, (client, 43000), CLIENT_MAC);
                assert_sent("SYN-ACK", &answer, &result, &expected);
                assert_eq!(source_port(&result.1), PORT, "from the service's port");
            }
            assert_eq!(seen.len(), 3);
        }
    }
}

// --- The tables ---------------------------------------------------------------------------------

#[test]
fn the_syn_records_the_connection_and_its_reply_entry() {
    // The client is behind a router: replies go to the MAC its SYN came from.
    const ROUTER_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x42];
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            f.set_backend_port(1, 8443);
            for vlan in [None, Some(300)] {
                for n in 1..=6 {
                    let client = client_of(family, n + vlan.map_or(0, |_| 6));
                    let backend = f.predicted(&table, client);
                    let port = 44000 + n;
                    let mut frame = Frame::tcp_syn(client, vip_of(family), PORT);
                    frame.src_port = port;
                    frame.src_mac = ROUTER_MAC;
                    frame.vlan = vlan;
                    let before = f.nat_entries().len();
                    let active = actives(&f);
                    assert_eq!(f.run(&frame.build()).0, XDP_TX);
                    let key = flow_key(&f, client, port);
                    let entry = f.flows.get(&key, 0).unwrap();
                    let nat_port = entry.nat_port;
                    let id = f.backends[backend].0;
                    let mut expected = FlowEntry::new(&key, id, FlowState::Opening, 0);
                    expected.last_seen_ns = entry.last_seen_ns;
                    expected.nat_port = nat_port;
                    assert_eq!(entry, expected, "{family} {client}");
                    let mut counted = active;
                    counted[backend] += 1;
                    assert_eq!(actives(&f), counted, "counted on its backend");
                    let b: Backend = f.backend_entry(backend);
                    let nat_key = NatKey {
                        backend: b.addr,
                        peer: match snat {
                            true => addr::words(&snat_addr(family)),
                            false => addr::words(&client),
                        },
                        backend_port: b.port,
                        peer_port: if snat { nat_port } else { port.to_be() },
                        family: family as u32,
                    };
                    let nat_entry = NatEntry {
                        client: addr::words(&client),
                        vip: addr::words(&vip_of(family)),
                        service: f.service.id,
                        backend: id,
                        client_port: port.to_be(),
                        vip_port: PORT.to_be(),
                        client_mac: ROUTER_MAC,
                        _pad: [0; 2],
                    };
                    assert_eq!(
                        f.nat.get(&nat_key, 0).ok(),
                        Some(nat_entry),
                        "{family} {client}: the reply entry"
                    );
                    assert_eq!(
                        f.nat_entries().len(),
                        before + 1,
                        "one entry per connection"
                    );
                    // And it is the entry the reply finds: back to the router's MAC.
                    let answer = reply(
                        &f,
                        backend,
                        (client, port),
                        u16::from_be(nat_port),
                        SYN_ACK,
                        0,
                        vlan,
                    );
                    let result = f.run(&answer);
                    let expected = to_client(&f, &answer, (client, port), ROUTER_MAC);
                    assert_sent("SYN-ACK", &answer, &result, &expected);
                }
            }
        }
    }
}

/// A last-seen bound every connection of a test is older than: the controller's "idle since"
/// (u64::MAX would mean "its backend stopped serving", and these backends serve).
fn later() -> u64 {
    monotonic_ns() + 1_000_000_000
}

/// A client whose Maglev backend is `backend`.
fn client_on(f: &Fixture, table: &maglev::Table, backend: usize, skip: usize) -> IpAddr {
    (1..=200)
        .map(|n| client_of(f.family, n))
        .filter(|c| f.predicted(table, *c) == backend)
        .nth(skip)
        .expect("a client of that backend")
}

#[test]
fn source_nat_gives_200_connections_of_one_client_distinct_ports_in_the_range() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let (mut f, table) = nat_fixture(family, params(family, true, COUNT));
        let client = client_on(&f, &table, 1, 0);
        let mut ports = BTreeSet::new();
        for i in 0..200u16 {
            let port = 30000 + i * 7;
            let input = seg(client, port, SYN, 0, None);
            let result = f.run(&input);
            let entry = flow(&f, client, port).expect("recorded");
            let nat_port = u16::from_be(entry.nat_port);
            assert_sent("SYN", &input, &result, &to_backend(&f, &input, 1, nat_port));
            assert_eq!(source_port(&result.1), nat_port);
            assert!(
                (FIRST..FIRST + COUNT as u16).contains(&nat_port),
                "{nat_port}"
            );
            assert!(
                ports.insert(nat_port),
                "{family}: port {nat_port} given twice"
            );
        }
        // Each connection's reply entry is under its own port and names it.
        let entries = f.nat_entries();
        assert_eq!(entries.len(), 200);
        let b = f.backend_entry(1);
        for (key, entry) in entries {
            assert_eq!(
                (key.backend, key.peer, key.backend_port),
                (b.addr, addr::words(&snat_addr(family)), b.port)
            );
            let flow = flow(&f, client, u16::from_be(entry.client_port)).unwrap();
            assert_eq!(flow.nat_port, key.peer_port, "{family}");
            assert_eq!(entry.client, addr::words(&client));
        }
        assert_eq!(f.active(1), 200);
        assert_eq!(f.counter(Counter::DropNatPortsExhausted), 0);
    }
}

#[test]
fn a_range_of_four_ports_holds_four_connections_per_backend() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let (mut f, table) = nat_fixture(family, params(family, true, 4));
        let client = client_on(&f, &table, 0, 0);
        let mut ports = BTreeSet::new();
        for port in 50001..=50004 {
            let result = f.run(&seg(client, port, SYN, 0, None));
            assert_eq!(result.0, XDP_TX);
            ports.insert(source_port(&result.1));
        }
        assert_eq!(
            ports,
            (FIRST..FIRST + 4).collect(),
            "{family}: all four ports"
        );
        let flows = f.flows.keys().count();
        let entries = f.nat_entries();
        let stick = f.stick_entry(client);
        let before = counters(&f);
        // The fifth: dropped, nothing recorded.
        let fifth = seg(client, 50005, SYN, 0, None);
        assert_dropped_untouched("fifth SYN", &fifth, &f.run(&fifth));
        assert_eq!(moved(&f, &before), [(Counter::DropNatPortsExhausted, 1)]);
        assert_eq!(flow(&f, client, 50005), None);
        assert_eq!(f.flows.keys().count(), flows);
        assert_eq!(f.nat_entries(), entries);
        assert_eq!(actives(&f), [4, 0, 0]);
        assert_eq!(
            f.stick_entry(client).map(|e| e.backend),
            stick.map(|e| e.backend)
        );
        // Another backend has the four ports to itself.
        let other = client_on(&f, &table, 2, 0);
        let result = f.run(&seg(other, 50001, SYN, 0, None));
        assert_eq!(result.0, XDP_TX);
        assert!((FIRST..FIRST + 4).contains(&source_port(&result.1)));
        // One connection ends (the controller expires it): its port stays held for the
        // backend's TIME_WAIT, then the sweep frees it and it serves the fifth.
        let expirer = f.dataplane.expirer().unwrap();
        let freed = u16::from_be(flow(&f, client, 50002).unwrap().nat_port);
        let key = flow_key(&f, client, 50002);
        assert_eq!(
            expirer.expire(&key, later()).unwrap(),
            ExpireOutcome::Uncounted
        );
        assert_dropped_untouched("fifth SYN, port held", &fifth, &f.run(&fifth));
        let mut orphans = NatOrphans::default();
        let now = monotonic_ns();
        let flows = f.flows_handle();
        assert_eq!(
            free_nat_ports(&mut f.nat, &flows, &mut orphans, now).unwrap(),
            0
        );
        assert_eq!(
            free_nat_ports(
                &mut f.nat,
                &flows,
                &mut orphans,
                now + NAT_PORT_REUSE_NS - 1
            )
            .unwrap(),
            0,
            "{family}: held until the backend's TIME_WAIT is over"
        );
        assert_eq!(
            free_nat_ports(&mut f.nat, &flows, &mut orphans, now + NAT_PORT_REUSE_NS).unwrap(),
            1,
            "{family}: then freed, and only that one"
        );
        let result = f.run(&fifth);
        assert_sent(
            "fifth SYN again",
            &fifth,
            &result,
            &to_backend(&f, &fifth, 0, freed),
        );
        assert_eq!(actives(&f), [4, 0, 1]);
    }
}

// --- Replies ------------------------------------------------------------------------------------

#[test]
fn replies_are_translated_back_exactly() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            for vlan in [None, Some(12)] {
                let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
                for n in 1..=9 {
                    let client = client_of(family, n);
                    let backend = f.predicted(&table, client);
                    let port = 45000 + n;
                    f.run(&seg(client, port, SYN, 0, vlan));
                    let nat_port = u16::from_be(flow(&f, client, port).unwrap().nat_port);
                    let before = f.counter(Counter::TxNatReply);
                    for (what, flags, payload) in [
                        ("SYN-ACK", SYN_ACK, 0),
                        ("data", PSH_ACK, 200 + n as usize),
                        ("ACK", ACK, 0),
                    ] {
                        let what = format!("{family} snat {snat} {vlan:?} {client}: {what}");
                        let input =
                            reply(&f, backend, (client, port), nat_port, flags, payload, vlan);
                        let result = f.run(&input);
                        let expected = to_client(&f, &input, (client, port), CLIENT_MAC);
                        assert_sent(&what, &input, &result, &expected);
                        let ((src, sport), (dst, dport)) = nat::endpoints(&result.1, l3_of(&input));
                        assert_eq!((src, sport), (vip_of(family), PORT), "{what}");
                        assert_eq!((dst, dport), (client, port), "{what}");
                        // The client's own segments go on as before.
                        let ack = seg(client, port, ACK, 0, vlan);
                        let result = f.run(&ack);
                        assert_sent(
                            &what,
                            &ack,
                            &result,
                            &to_backend(&f, &ack, backend, nat_port),
                        );
                    }
                    assert_eq!(f.counter(Counter::TxNatReply), before + 3);
                    let entry = flow(&f, client, port).unwrap();
                    assert_eq!(
                        entry.state,
                        FlowState::Established as u8,
                        "replies change no state"
                    );
                    // A reply refreshes an idle connection's last-seen time (a connection only
                    // the server speaks on stays).
                    let key = flow_key(&f, client, port);
                    let idle = FlowEntry {
                        last_seen_ns: 1,
                        ..entry
                    };
                    f.flows.insert(&key, &idle, 0).unwrap();
                    let now = monotonic_ns();
                    let input = reply(&f, backend, (client, port), nat_port, ACK, 0, vlan);
                    assert_eq!(f.run(&input).0, XDP_TX);
                    let seen = flow(&f, client, port).unwrap().last_seen_ns;
                    assert!(seen + 20_000_000 >= now, "refreshed: {seen} vs {now}");
                }
                assert_eq!(f.counter(Counter::DropNatStaleReply), 0);
            }
        }
    }
}

#[test]
fn without_the_features_word_replies_pass_untouched() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            let client = client_of(family, 1);
            let backend = f.predicted(&table, client);
            f.run(&seg(client, 46000, SYN, 0, None));
            let nat_port = u16::from_be(flow(&f, client, 46000).unwrap().nat_port);
            let input = reply(&f, backend, (client, 46000), nat_port, SYN_ACK, 10, None);
            f.set_features(0);
            let before = counters(&f);
            assert_passed_untouched(&input, f.run(&input));
            assert_eq!(moved(&f, &before), [(Counter::PassNotService, 1)]);
            f.set_features(FEATURE_NAT);
            let result = f.run(&input);
            assert_sent(
                "with the word",
                &input,
                &result,
                &to_client(&f, &input, (client, 46000), CLIENT_MAC),
            );
            // Traffic no connection knows passes untouched, word or not.
            let (addr, _) = backend_endpoint(&f, backend);
            let mut other = Frame::tcp_syn(addr, client, 46000);
            other.src_port = 22;
            let other = other.build();
            assert_passed_untouched(&other, f.run(&other));
        }
    }
}

/// One way a reply may have lost its connection, made on fixture `f` whose connection is
/// `client:port` on `backend` (source-NAT port `nat_port`); returns the reply to send.
type Staling = fn(&mut Fixture, usize, IpAddr, u16, u16) -> Vec<u8>;

#[test]
fn stale_replies_are_dropped_untouched_and_end_nothing() {
    let cases: [(&str, bool, Staling); 6] = [
        ("the connection is gone", false, |f, b, c, p, np| {
            f.flows.remove(&flow_key(f, c, p)).unwrap();
            reply(f, b, (c, p), np, FIN_ACK, 0, None)
        }),
        (
            "the backend id holds another address (removed, slot reused)",
            false,
            |f, b, c, p, np| {
                let answer = reply(f, b, (c, p), np, FIN_ACK, 5, None);
                let id = f.backends[b].0;
                let mut entry = f.backend_entry(b);
                entry.addr[0] ^= 0x0100_0000;
                entry.addr[3] ^= 0x0100_0000;
                f.dataplane.backends.set(id, &entry, 0).unwrap();
                answer
            },
        ),
        (
            "the backend now listens on another port",
            false,
            |f, b, c, p, np| {
                let answer = reply(f, b, (c, p), np, RST, 0, None);
                f.set_backend_port(b, 8081);
                answer
            },
        ),
        (
            "the connection is now on another backend id",
            false,
            |f, b, c, p, np| {
                let key = flow_key(f, c, p);
                let mut entry = f.flows.get(&key, 0).unwrap();
                entry.backend = f.backends[(b + 1) % 3].0;
                f.flows.insert(&key, &entry, 0).unwrap();
                reply(f, b, (c, p), np, FIN_ACK, 0, None)
            },
        ),
        (
            "the backend id now serves another service",
            false,
            |f, b, c, p, np| {
                let id = f.backends[b].0;
                let mut entry = f.backend_entry(b);
                entry.service = 2;
                f.dataplane.backends.set(id, &entry, 0).unwrap();
                reply(f, b, (c, p), np, FIN_ACK, 0, None)
            },
        ),
        (
            "(source NAT) to a port that is not the connection's",
            true,
            |f, b, c, p, np| {
                // An entry for another port naming this connection (as one left behind by a
                // connection whose backend changed would).
                let entries = f.nat_entries();
                let (key, entry) = *entries
                    .iter()
                    .find(|(k, _)| {
                        k.peer_port == np.to_be() && k.backend == f.backend_entry(b).addr
                    })
                    .unwrap();
                assert_eq!(
                    (entry.client, entry.client_port),
                    (addr::words(&c), p.to_be())
                );
                // A port of the range no connection on this backend holds.
                let other = (FIRST..)
                    .find(|&o| {
                        !entries
                            .iter()
                            .any(|(k, _)| k.backend == key.backend && k.peer_port == o.to_be())
                    })
                    .unwrap();
                let key = NatKey {
                    peer_port: other.to_be(),
                    ..key
                };
                f.nat.insert(&key, &entry, 0).unwrap();
                reply(f, b, (c, p), other, FIN_ACK, 0, None)
            },
        ),
    ];
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            // One fixture for all cases: each has a client of its own, and what a case changes
            // in the backends is put back after it.
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            for (i, (what, only_snat, stale)) in cases.into_iter().enumerate() {
                if only_snat && !snat {
                    continue;
                }
                let what = format!("{family} snat {snat}: {what}");
                let client = client_of(family, 4 + i as u16);
                let backend = f.predicted(&table, client);
                f.run(&seg(client, 47000, SYN, 0, None));
                f.run(&seg(client, 47000, ACK, 0, None));
                let nat_port = u16::from_be(flow(&f, client, 47000).unwrap().nat_port);
                let saved = f.backend_entry(backend);
                let answer = stale(&mut f, backend, client, 47000, nat_port);
                let flow_before = flow(&f, client, 47000);
                let active = actives(&f);
                let before = counters(&f);
                assert_dropped_untouched(&what, &answer, &f.run(&answer));
                assert_eq!(
                    moved(&f, &before),
                    [(Counter::DropNatStaleReply, 1)],
                    "{what}"
                );
                assert_eq!(
                    flow(&f, client, 47000),
                    flow_before,
                    "{what}: nothing ended"
                );
                assert_eq!(actives(&f), active, "{what}");
                let id = f.backends[backend].0;
                f.dataplane.backends.set(id, &saved, 0).unwrap();
            }
            // And a reply from a port no connection has is not a reply: passed untouched.
            let client = client_of(family, 20);
            let backend = f.predicted(&table, client);
            f.run(&seg(client, 47000, SYN, 0, None));
            let nat_port = u16::from_be(flow(&f, client, 47000).unwrap().nat_port);
            let mut answer = reply(&f, backend, (client, 47000), nat_port, FIN_ACK, 0, None);
            let at = layout(&answer, ETH_LEN).l4;
            answer[at..at + 2].copy_from_slice(&8081u16.to_be_bytes());
            let before = counters(&f);
            assert_passed_untouched(&answer, f.run(&answer));
            assert_eq!(moved(&f, &before), [(Counter::PassNotService, 1)]);
            // The unchanged reply is still translated.
            let answer = reply(&f, backend, (client, 47000), nat_port, ACK, 0, None);
            let result = f.run(&answer);
            let expected = to_client(&f, &answer, (client, 47000), CLIENT_MAC);
            assert_sent("reply", &answer, &result, &expected);
        }
    }
}

#[test]
fn the_servers_fin_or_rst_closes_the_connection_and_uncounts_it() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            for close in [FIN_ACK, RST] {
                let what = format!("{family} snat {snat} close {close:#x}");
                let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
                let client = client_of(family, 2);
                let backend = f.predicted(&table, client);
                f.run(&seg(client, 48000, SYN, 0, None));
                f.run(&seg(client, 48000, ACK, 0, None));
                let nat_port = u16::from_be(flow(&f, client, 48000).unwrap().nat_port);
                let mut counted = [0; 3];
                counted[backend] = 1;
                assert_eq!(actives(&f), counted, "{what}");
                let input = reply(&f, backend, (client, 48000), nat_port, close, 0, None);
                let result = f.run(&input);
                let expected = to_client(&f, &input, (client, 48000), CLIENT_MAC);
                assert_sent(&what, &input, &result, &expected);
                let entry = flow(&f, client, 48000).unwrap();
                assert_eq!(entry.state, FlowState::Closing as u8, "{what}");
                assert_eq!(actives(&f), [0, 0, 0], "{what}: uncounted");
                // Once: the client's FIN and the server's second FIN uncount nothing more.
                let fin = seg(client, 48000, FIN_ACK, 0, None);
                let result = f.run(&fin);
                assert_sent(
                    &what,
                    &fin,
                    &result,
                    &to_backend(&f, &fin, backend, nat_port),
                );
                let result = f.run(&input);
                assert_sent(&what, &input, &result, &expected);
                assert_eq!(actives(&f), [0, 0, 0], "{what}: uncounted once");
                // The closing connection still carries both halves.
                let ack = seg(client, 48000, ACK, 0, None);
                let result = f.run(&ack);
                assert_sent(
                    &what,
                    &ack,
                    &result,
                    &to_backend(&f, &ack, backend, nat_port),
                );
            }
        }
    }
}

// --- Port reuse, expiry -------------------------------------------------------------------------

#[test]
fn a_syn_on_a_closing_connection_replaces_it_and_its_reply_entry() {
    const NEW_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x77];
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let what = format!("{family} snat {snat}");
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            let client = client_of(family, 6);
            let old = f.predicted(&table, client);
            let new = (old + 1) % 3;
            f.run(&seg(client, 49000, SYN, 0, None));
            f.run(&seg(client, 49000, ACK, 0, None));
            let old_port = u16::from_be(flow(&f, client, 49000).unwrap().nat_port);
            // A SYN on an open connection is a retransmission: same backend, same entry.
            let syn = seg(client, 49000, SYN, 0, None);
            let result = f.run(&syn);
            assert_sent(&what, &syn, &result, &to_backend(&f, &syn, old, old_port));
            assert_eq!(f.nat_entries().len(), 1);
            f.run(&seg(client, 49000, FIN_ACK, 0, None));
            assert_eq!(actives(&f), [0, 0, 0]);
            let (old_key, _) = f.nat_entries()[0];
            // The client's stick entry now names another backend (the operator moved it, say),
            // and its next connection reuses the port, from another MAC.
            f.set_stick(client, new, monotonic_ns());
            let mut frame = Frame::tcp_syn(client, vip_of(family), PORT);
            frame.src_port = 49000;
            frame.src_mac = NEW_MAC;
            let syn = frame.build();
            let result = f.run(&syn);
            let entry = flow(&f, client, 49000).unwrap();
            let new_port = u16::from_be(entry.nat_port);
            assert_sent(&what, &syn, &result, &to_backend(&f, &syn, new, new_port));
            assert_eq!(f.index_of(entry.backend), new, "{what}");
            assert_eq!(entry.state, FlowState::Opening as u8, "{what}");
            let mut counted = [0; 3];
            counted[new] = 1;
            assert_eq!(actives(&f), counted, "{what}: the new connection counts");
            let entries = f.nat_entries();
            assert_eq!(entries.len(), 1, "{what}: the old reply entry is gone");
            assert_ne!(entries[0].0, old_key);
            assert_eq!(entries[0].0.backend, f.backend_entry(new).addr);
            assert_eq!(entries[0].1.client_mac, NEW_MAC);
            assert_eq!(entries[0].1.backend, f.backends[new].0);
            // The old backend's late reply has nothing to be translated in: passed (no entry).
            let late = reply(&f, old, (client, 49000), old_port, FIN_ACK, 0, None);
            assert_passed_untouched(&late, f.run(&late));
            // The new backend's is translated, to the new MAC.
            let answer = reply(&f, new, (client, 49000), new_port, SYN_ACK, 0, None);
            let result = f.run(&answer);
            let expected = to_client(&f, &answer, (client, 49000), NEW_MAC);
            assert_sent(&what, &answer, &result, &expected);
        }
    }
}

#[test]
fn expiring_a_connection_ends_its_reply_entry() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let what = format!("{family} snat {snat}");
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            let expirer = f.dataplane.expirer().unwrap();
            let mut replies = Vec::new();
            for n in 1..=4 {
                let client = client_of(family, n);
                let backend = f.predicted(&table, client);
                f.run(&seg(client, 50000, SYN, 0, None));
                let nat_port = u16::from_be(flow(&f, client, 50000).unwrap().nat_port);
                replies.push(reply(&f, backend, (client, 50000), nat_port, ACK, 0, None));
            }
            // Client 2 closes; client 3 stays.
            f.run(&seg(client_of(family, 2), 50000, FIN_ACK, 0, None));
            assert_eq!(f.nat_entries().len(), 4);
            for (n, outcome) in [(1, ExpireOutcome::Uncounted), (2, ExpireOutcome::Deleted)] {
                let key = flow_key(&f, client_of(family, n), 50000);
                assert_eq!(expirer.expire(&key, later()).unwrap(), outcome, "{what}");
                assert_eq!(flow(&f, client_of(family, n), 50000), None);
            }
            let left: BTreeSet<_> = f.nat_entries().iter().map(|(_, e)| e.client).collect();
            // Plain NAT's entries go with their connections; full NAT's hold their ports for
            // the backends' TIME_WAIT (NAT_PORT_REUSE_NS), translating nothing, until the sweep
            // frees them.
            let mut orphans = NatOrphans::default();
            let now = monotonic_ns();
            let flows = f.flows_handle();
            let kept = if snat { 1..=4 } else { 3..=4 };
            let expected: BTreeSet<_> = kept.map(|n| addr::words(&client_of(family, n))).collect();
            assert_eq!(left, expected, "{what}: the reply entries left");
            if snat {
                for r in &replies[..2] {
                    let before = f.counter(Counter::DropNatStaleReply);
                    assert_dropped_untouched(&what, r, &f.run(r));
                    assert_eq!(f.counter(Counter::DropNatStaleReply), before + 1);
                }
                assert_eq!(
                    free_nat_ports(&mut f.nat, &flows, &mut orphans, now).unwrap(),
                    0
                );
                assert_eq!(
                    free_nat_ports(&mut f.nat, &flows, &mut orphans, now + NAT_PORT_REUSE_NS)
                        .unwrap(),
                    2,
                    "{what}: the ended connections' ports freed"
                );
                let left: BTreeSet<_> = f.nat_entries().iter().map(|(_, e)| e.client).collect();
                let open: BTreeSet<_> = [3, 4].map(|n| addr::words(&client_of(family, n))).into();
                assert_eq!(left, open, "{what}: the open connections' entries stay");
            }
            // Their replies are no longer ours; the others' still are.
            assert_passed_untouched(&replies[0], f.run(&replies[0]));
            assert_passed_untouched(&replies[1], f.run(&replies[1]));
            assert_eq!(f.run(&replies[2]).0, XDP_TX);
            assert_eq!(actives(&f).iter().sum::<i64>(), 2);
        }
    }
}

#[test]
fn a_connection_whose_backend_goes_down_ends_with_its_reply_entry() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let what = format!("{family} snat {snat}");
            let (mut f, table) = nat_fixture(family, params(family, snat, COUNT));
            let client = client_on(&f, &table, 0, 0);
            f.run(&seg(client, 54000, SYN, 0, None));
            f.run(&seg(client, 54000, ACK, 0, None));
            let nat_port = u16::from_be(flow(&f, client, 54000).unwrap().nat_port);
            let late = reply(&f, 0, (client, 54000), nat_port, ACK, 0, None);
            f.set_state(0, BackendState::Down);
            f.publish(&[1, 2]);
            // Its next segment cannot go on elsewhere (the new backend never saw the SYN):
            // the connection ends, uncounted, with its reply entry; the segment is dropped.
            let ack = seg(client, 54000, ACK, 0, None);
            let before = counters(&f);
            assert_dropped_untouched(&what, &ack, &f.run(&ack));
            assert_eq!(
                moved(&f, &before),
                [(Counter::DropNatUntracked, 1)],
                "{what}"
            );
            assert_eq!(flow(&f, client, 54000), None, "{what}");
            assert!(f.nat_entries().is_empty(), "{what}");
            assert_eq!(actives(&f), [0, 0, 0], "{what}");
            // The down backend's late reply is no longer translated.
            assert_passed_untouched(&late, f.run(&late));
            // The client's new connection goes to a backend that is up.
            let syn = seg(client, 54000, SYN, 0, None);
            let result = f.run(&syn);
            let entry = flow(&f, client, 54000).unwrap();
            let backend = f.index_of(entry.backend);
            assert_ne!(backend, 0);
            let expected = to_backend(&f, &syn, backend, u16::from_be(entry.nat_port));
            assert_sent(&what, &syn, &result, &expected);
        }
    }
}

// --- What cannot be translated ------------------------------------------------------------------

#[test]
fn a_segment_without_a_connection_is_dropped_and_records_nothing() {
    for family in [Family::Ipv4, Family::Ipv6] {
        for snat in [false, true] {
            let (mut f, _) = nat_fixture(family, params(family, snat, COUNT));
            let client = client_of(family, 7);
            for (what, flags) in [
                ("ACK", ACK),
                ("data", PSH_ACK),
                ("FIN", FIN_ACK),
                ("RST", RST),
                ("SYN-ACK", SYN_ACK),
            ] {
                let what = format!("{family} snat {snat}: {what}");
                for vlan in [None, Some(5)] {
                    let input = seg(client, 51000, flags, 9, vlan);
                    let before = counters(&f);
                    assert_dropped_untouched(&what, &input, &f.run(&input));
                    assert_eq!(
                        moved(&f, &before),
                        [(Counter::DropNatUntracked, 1)],
                        "{what}"
                    );
                }
            }
            assert!(f.flows.keys().next().is_none());
            assert!(f.nat_entries().is_empty());
            assert_eq!(f.stick_entry(client), None);
            assert_eq!(actives(&f), [0, 0, 0]);
        }
    }
}

/// `frame` with a hop-by-hop options header (PadN) before TCP.
fn with_hop_by_hop(mut frame: Frame) -> Vec<u8> {
    frame.ipv6_ext = vec![(0, vec![1, 4, 0, 0, 0, 0])];
    frame.build()
}

#[test]
fn ipv6_with_extension_headers_is_dropped_and_leaves_no_trace() {
    for snat in [false, true] {
        let (mut f, table) = nat_fixture(Family::Ipv6, params(Family::Ipv6, snat, COUNT));
        let client = client_of(Family::Ipv6, 8);
        let backend = f.predicted(&table, client);
        for (what, flags) in [("SYN", SYN), ("ACK", ACK)] {
            let what = format!("snat {snat}: {what} with hop-by-hop options");
            let mut frame = Frame::tcp_syn(client, VIP6, PORT);
            frame.src_port = 52000;
            frame.tcp_flags = flags;
            let input = with_hop_by_hop(frame);
            let before = counters(&f);
            let (verdict, _) = f.run(&input);
            assert_eq!(verdict, XDP_DROP, "{what}");
            assert_eq!(
                moved(&f, &before),
                [(Counter::DropNatExtHeaders, 1)],
                "{what}"
            );
            assert!(f.flows.keys().next().is_none(), "{what}: no connection");
            assert!(f.nat_entries().is_empty(), "{what}: no reply entry");
            assert_eq!(actives(&f), [0, 0, 0], "{what}: nothing counted");
        }
        // The client then opens without it: translated as usual.
        let syn = seg(client, 52000, SYN, 0, None);
        let result = f.run(&syn);
        let nat_port = u16::from_be(flow(&f, client, 52000).unwrap().nat_port);
        assert_sent(
            "SYN",
            &syn,
            &result,
            &to_backend(&f, &syn, backend, nat_port),
        );
        // On that open connection: a client segment and a server FIN with extension headers
        // are dropped, and the connection stays as it was.
        let mut frame = Frame::tcp_syn(client, VIP6, PORT);
        frame.src_port = 52000;
        frame.tcp_flags = FIN_ACK;
        let fin = with_hop_by_hop(frame);
        let (addr, backend_port) = backend_endpoint(&f, backend);
        let (peer, peer_port) = match snat {
            true => (snat_addr(Family::Ipv6), nat_port),
            false => (client, 52000),
        };
        let mut frame = Frame::tcp_syn(addr, peer, peer_port);
        frame.src_port = backend_port;
        frame.tcp_flags = FIN_ACK;
        let server_fin = with_hop_by_hop(frame);
        for (what, input) in [("client FIN", fin), ("server FIN", server_fin)] {
            let before = counters(&f);
            let flow_before = flow(&f, client, 52000);
            assert_eq!(f.run(&input).0, XDP_DROP, "{what}");
            assert_eq!(
                moved(&f, &before),
                [(Counter::DropNatExtHeaders, 1)],
                "{what}"
            );
            assert_eq!(flow(&f, client, 52000), flow_before, "{what}: not ended");
        }
        let mut counted = [0; 3];
        counted[backend] = 1;
        assert_eq!(actives(&f), counted);
    }
}

// --- Neighbours ---------------------------------------------------------------------------------

#[test]
fn dsr_and_tunnel_services_beside_a_nat_service_are_unchanged() {
    for family in [Family::Ipv4, Family::Ipv6] {
        let other_family = match family {
            Family::Ipv4 => Family::Ipv6,
            Family::Ipv6 => Family::Ipv4,
        };
        let (mut f, table) = nat_fixture(family, params(family, true, COUNT));
        let other = f
            .add_other_family(other_family.default_client_mask())
            .backends
            .clone();
        let mask = family.default_client_mask();
        let dsr = f.add_service(family, 81, 2, mask, None);
        let tunnel = match family {
            Family::Ipv4 => TunnelParams {
                source: Ipv4Addr::new(198, 19, 100, 0).into(),
                prefix: 24,
                mtu: 1500,
            },
            Family::Ipv6 => TunnelParams {
                source: Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0x5b, 0).into(),
                prefix: 112,
                mtu: 1500,
            },
        };
        let tunnelled = f.add_service(family, 82, 3, mask, Some(tunnel));
        let assert_dsr =
            |backends: &[(u32, String, [u8; 6])], input: &[u8], result: (u32, Vec<u8>)| {
                assert_eq!(result.0, XDP_TX);
                assert!(backends.iter().any(|b| result.1[0..6] == b.2));
                assert_eq!(result.1[6..12], OUR_MAC);
                assert_eq!(result.1[12..], input[12..], "DSR changes only the MACs");
            };
        for n in 1..=8u16 {
            for vlan in [None, Some(9)] {
                let client = client_of(family, n);
                for flags in [SYN, ACK, FIN_ACK] {
                    let input = seg(client, 53000, flags, 10, vlan);
                    let result = f.run(&input);
                    let backend = f.predicted(&table, client);
                    let nat_port = u16::from_be(flow(&f, client, 53000).unwrap().nat_port);
                    assert_sent(
                        "NAT",
                        &input,
                        &result,
                        &to_backend(&f, &input, backend, nat_port),
                    );
                    let input = tcp(client, 81, 53000, flags, 10, vlan);
                    assert_dsr(&dsr.backends, &input, f.run(&input));
                    let input = seg(client_of(other_family, n), 53000, flags, 10, vlan);
                    assert_dsr(&other, &input, f.run(&input));
                    let input = tcp(client, 82, 53000, flags, 10, vlan);
                    let (verdict, output) = f.run(&input);
                    assert_eq!(verdict, XDP_TX);
                    let backend = tunnelled
                        .backends
                        .iter()
                        .position(|b| output.starts_with(&b.2))
                        .expect("a tunnel backend");
                    let id = tunnelled.backends[backend].0;
                    let entry = f.dataplane.backends.get(&id, 0).unwrap();
                    let expected = tunnel::encapsulated(
                        &input,
                        l3_of(&input),
                        &tunnel,
                        tunnelled.backends[backend].2,
                        addr::from_words(family, entry.addr),
                    );
                    assert_eq!(hex(&output), hex(&expected), "tunnel");
                }
            }
        }
        // One reply entry per NAT connection, none for the others.
        assert_eq!(f.nat_entries().len(), 8);
        assert_eq!(f.counter(Counter::DropNatUntracked), 0);
        // A backend of the DSR service answering a client directly (as DSR backends do, from
        // the VIP) is not a NAT reply: passed untouched.
        let mut answer = Frame::tcp_syn(vip_of(family), client_of(family, 1), 53000);
        answer.src_port = 81;
        answer.tcp_flags = SYN_ACK;
        let answer = answer.build();
        assert_passed_untouched(&answer, f.run(&answer));
    }
}
