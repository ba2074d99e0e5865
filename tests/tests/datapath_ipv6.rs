//! IPv6 through the XDP program under BPF_PROG_TEST_RUN: a packet-in / verdict-and-packet-out
//! table for the IPv6 parser (extension headers, fragments, neighbour discovery, malformed
//! headers), then the persistence rules over 16-byte addresses (client masks, the connection
//! table, a redispatch) and the family check that keeps an IPv6 packet off an IPv4 service.
//!
//! The fixture (`sticky_lb_tests::fixture`) loads the program unpinned and unattached, with
//! small tables, one service [2001:db8::100]:80 and three backends.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};
use sticky_lb_common::{BackendState, Counter, FlowState, ServiceKey, addr, addr::Family};
use sticky_lb_tests::{
    fixture::*,
    packet::{ETH_LEN, Frame, IPV6_LEN},
};

/// IPv6 next-header numbers (IANA).
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;
const ICMPV6: u8 = 58;
const ESP: u8 = 50;
const UDP: u8 = 17;

/// What the program must do with a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    /// XDP_TX to the backend Maglev predicts for the client, only the MACs rewritten.
    Forward,
    /// XDP_PASS, untouched, counted under this reason.
    Pass(Counter),
}

fn syn6() -> Frame {
    Frame::tcp_syn(client6(1, 1), VIP6, PORT)
}

/// A frame built by `edit` from a SYN of client6(1, 1) to the VIP6.
fn frame(edit: impl FnOnce(&mut Frame)) -> Vec<u8> {
    let mut f = syn6();
    edit(&mut f);
    f.build()
}

/// An extension header of `kind` with `body` bytes after its first two.
fn ext(kind: u8, body: usize) -> (u8, Vec<u8>) {
    (kind, vec![0; body])
}

#[test]
fn ipv6_frames_in_verdicts_out() {
    use Verdict::*;
    let fragment_header = |offset_and_flags: u16| {
        let mut body = offset_and_flags.to_be_bytes().to_vec();
        body.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        (FRAGMENT, body)
    };
    let plain = syn6().build();
    let mut cases: Vec<(&str, Vec<u8>, Verdict)> = vec![
        ("SYN", plain.clone(), Forward),
        ("802.1Q-tagged SYN", frame(|f| f.vlan = Some(7)), Forward),
        (
            "ACK with payload",
            frame(|f| {
                f.tcp_flags = ACK;
                f.payload = vec![0xab; 100];
            }),
            Forward,
        ),
        (
            "hop-by-hop options",
            frame(|f| f.ipv6_ext = vec![ext(HOPOPTS, 6)]),
            Forward,
        ),
        (
            "hop-by-hop, routing, two destination options (4 headers, the most followed)",
            frame(|f| {
                f.ipv6_ext = vec![
                    ext(HOPOPTS, 6),
                    ext(ROUTING, 22),
                    ext(DSTOPTS, 14),
                    ext(DSTOPTS, 6),
                ]
            }),
            Forward,
        ),
        (
            "a 2 KB destination options header",
            frame(|f| f.ipv6_ext = vec![ext(DSTOPTS, 2040)]),
            Forward,
        ),
        (
            "5 extension headers",
            frame(|f| {
                f.ipv6_ext = vec![
                    ext(HOPOPTS, 6),
                    ext(DSTOPTS, 6),
                    ext(ROUTING, 6),
                    ext(DSTOPTS, 6),
                    ext(DSTOPTS, 6),
                ]
            }),
            Pass(Counter::PassIpv6ExtHeaders),
        ),
        (
            "first fragment (offset 0, M set): ports present but not for every fragment",
            frame(|f| f.ipv6_ext = vec![fragment_header(1)]),
            Pass(Counter::PassFragment),
        ),
        (
            "atomic fragment (offset 0, M clear)",
            frame(|f| f.ipv6_ext = vec![fragment_header(0)]),
            Pass(Counter::PassFragment),
        ),
        (
            "hop-by-hop, then a fragment header",
            frame(|f| f.ipv6_ext = vec![ext(HOPOPTS, 6), fragment_header(0x0008)]),
            Pass(Counter::PassFragment),
        ),
        (
            "ICMPv6 neighbour solicitation for the VIP",
            frame(|f| {
                f.protocol = ICMPV6;
                f.dst = "ff02::1:ff00:100".parse().unwrap();
            }),
            Pass(Counter::PassNotService),
        ),
        (
            "ICMPv6 echo request to the VIP",
            frame(|f| f.protocol = ICMPV6),
            Pass(Counter::PassNotService),
        ),
        (
            "ICMPv6 behind a hop-by-hop header (MLD)",
            frame(|f| {
                f.protocol = ICMPV6;
                f.ipv6_ext = vec![ext(HOPOPTS, 6)];
            }),
            Pass(Counter::PassNotService),
        ),
        (
            "UDP to the VIP's port",
            frame(|f| f.protocol = UDP),
            Pass(Counter::PassNotService),
        ),
        (
            "ESP (not followed)",
            frame(|f| f.protocol = ESP),
            Pass(Counter::PassNotService),
        ),
        (
            "another port",
            frame(|f| f.dst_port = 8080),
            Pass(Counter::PassNotService),
        ),
        (
            "another address in the VIP's /64",
            frame(|f| f.dst = "2001:db8::101".parse().unwrap()),
            Pass(Counter::PassNotService),
        ),
        (
            "the IPv4 VIP's bytes in the IPv6 source where an IPv4 destination would sit",
            frame(|f| {
                let v4 = VIP.octets();
                f.src = Ipv6Addr::from([
                    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 1, v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 1,
                ])
                .into();
                f.dst = "2001:db8::200".parse().unwrap();
            }),
            Pass(Counter::PassNotService),
        ),
        (
            "payload length 0 (a jumbogram)",
            frame(|f| f.ipv6_payload_len = Some(0)),
            Pass(Counter::PassBadIpHeader),
        ),
        (
            "payload length past the frame",
            frame(|f| f.ipv6_payload_len = Some(21)),
            Pass(Counter::PassBadIpHeader),
        ),
        (
            "payload length shorter than the TCP header",
            frame(|f| f.ipv6_payload_len = Some(19)),
            Pass(Counter::PassBadIpHeader),
        ),
        (
            "payload length covering the extension header but not TCP",
            frame(|f| {
                f.ipv6_ext = vec![ext(DSTOPTS, 6)];
                f.ipv6_payload_len = Some(8 + 19);
            }),
            Pass(Counter::PassBadIpHeader),
        ),
        (
            "TCP data offset 4",
            {
                let mut b = plain.clone();
                b[ETH_LEN + IPV6_LEN + 12] = 4 << 4;
                b
            },
            Pass(Counter::PassBadTcpHeader),
        ),
        (
            "TCP data offset 6 in a 20-byte payload",
            {
                let mut b = plain.clone();
                b[ETH_LEN + IPV6_LEN + 12] = 6 << 4;
                b
            },
            Pass(Counter::PassBadTcpHeader),
        ),
        (
            "version 4 under the IPv6 EtherType",
            {
                let mut b = plain.clone();
                b[ETH_LEN] = 0x40;
                b
            },
            Pass(Counter::PassBadIpHeader),
        ),
        (
            "an extension header claiming more bytes than the frame has",
            {
                let mut b = frame(|f| f.ipv6_ext = vec![ext(HOPOPTS, 6), ext(DSTOPTS, 6)]);
                b[ETH_LEN + IPV6_LEN + 8 + 1] = 255;
                b
            },
            Pass(Counter::PassTruncated),
        ),
    ];
    // A frame cut at every length short of whole: never forwarded.
    for len in ETH_LEN..plain.len() {
        cases.push((
            "SYN cut short",
            plain[..len].to_vec(),
            Pass(Counter::PassTruncated),
        ));
    }
    let mut f = Fixture::new_v6(64);
    let table = f.publish(&[0, 1, 2]);
    let expected = f.predicted(&table, client6(1, 1));
    for (name, input, verdict) in cases {
        let before: Vec<u64> = Counter::ALL.iter().map(|c| f.counter(*c)).collect();
        let result = f.run(&input);
        match verdict {
            Forward => f.assert_forwarded(&input, result, expected),
            Pass(reason) => {
                assert_eq!(result.0, XDP_PASS, "{name}: expected XDP_PASS");
                assert_eq!(result.1, input, "{name}: a passed frame must be untouched");
                let after: Vec<u64> = Counter::ALL.iter().map(|c| f.counter(*c)).collect();
                let moved: Vec<Counter> = Counter::ALL
                    .iter()
                    .zip(before.iter().zip(&after))
                    .filter(|(_, (b, a))| a != b)
                    .map(|(c, _)| *c)
                    .collect();
                // A truncated frame may stop at whichever header it ends in; these cut ones
                // are counted as truncated or, when the cut falls past the IPv6 header, as a
                // payload length past the frame.
                if name == "SYN cut short" {
                    assert!(
                        moved == [Counter::PassTruncated] || moved == [Counter::PassBadIpHeader],
                        "{name} ({} bytes): counted as {moved:?}",
                        input.len()
                    );
                } else {
                    assert_eq!(moved, [reason], "{name}: counted as {moved:?}");
                }
            }
        }
    }
}

#[test]
fn mask_64_keeps_every_address_of_a_64_on_one_backend() {
    let mut f = Fixture::new_v6(64);
    let table = f.publish(&[0, 1, 2]);
    let mut per_net: BTreeMap<u16, BTreeSet<usize>> = BTreeMap::new();
    for net in 1..=12u16 {
        for n in 1..=16u16 {
            // Addresses as privacy extensions make them: random-looking interface identifiers.
            let client = Ipv6Addr::new(0x2001, 0xdb8, 1, net, 0xa5a5 ^ n, n * 77, 3, n);
            let frame = segment(client, 40000 + n, SYN);
            let result = f.run(&frame);
            let backend = f.forwarded_to(&result);
            assert_eq!(backend, f.predicted(&table, client), "Maglev over the /64");
            per_net.entry(net).or_default().insert(backend);
        }
    }
    for (net, backends) in &per_net {
        assert_eq!(
            backends.len(),
            1,
            "2001:db8:1:{net:x}::/64 split over {backends:?}"
        );
    }
    let used: BTreeSet<usize> = per_net.values().flatten().copied().collect();
    assert_eq!(used.len(), 3, "12 /64s spread over all three backends");
    // One entry per /64, keyed by the prefix itself.
    let keys: Vec<_> = f.stick.keys().map(|k| k.unwrap()).collect();
    assert_eq!(keys.len(), 12);
    for key in keys {
        let prefix = addr::from_words(Family::Ipv6, key.client);
        let IpAddr::V6(prefix) = prefix else {
            unreachable!()
        };
        assert_eq!(
            &prefix.segments()[4..],
            &[0, 0, 0, 0],
            "{prefix} is a /64 prefix"
        );
    }
    let c = f.service_counters();
    assert_eq!((c.stick_inserts, c.stick_hits), (12, 12 * 15));
}

#[test]
fn mask_128_sticks_each_address_on_its_own() {
    let mut f = Fixture::new_v6(128);
    let table = f.publish(&[0, 1, 2]);
    let mut used = BTreeSet::new();
    for n in 1..=32u16 {
        let client = client6(1, n);
        let frame = segment(client, 40000, SYN);
        let result = f.run(&frame);
        let backend = f.forwarded_to(&result);
        assert_eq!(backend, f.predicted(&table, client));
        assert_eq!(
            f.index_of(f.stick_entry(client).expect("an entry per address").backend),
            backend
        );
        used.insert(backend);
    }
    assert_eq!(
        used.len(),
        3,
        "32 addresses of one /64 spread over all backends"
    );
}

#[test]
fn ipv6_connections_keep_their_backend_and_follow_a_failure() {
    let mut f = Fixture::new_v6(64);
    let table = f.publish(&[0, 1, 2]);
    let client = client6(3, 9);
    let first = f.predicted(&table, client);
    let syn = segment(client, 41000, SYN);
    let result = f.run(&syn);
    f.assert_forwarded(&syn, result, first);
    // The connection table holds the full address and the port.
    let flows: Vec<_> = f.flows.iter().map(|r| r.unwrap()).collect();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0.client, addr::words(&client.into()));
    assert_eq!(flows[0].0.client_port, 41000u16.to_be());
    assert_eq!(f.active(first), 1);
    // Another address of the /64 shares the entry, so it goes to the same backend.
    let neighbour = client6(3, 0xbeef);
    let other = segment(neighbour, 41001, SYN);
    let result = f.run(&other);
    f.assert_forwarded(&other, result, first);
    // The stuck backend fails (and the controller republishes the table without it): the open
    // connection and the client move, once, to one backend.
    f.set_state(first, BackendState::Down);
    let rest: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    f.publish(&rest);
    let ack = segment(client, 41000, ACK);
    let result = f.run(&ack);
    let moved = f.forwarded_to(&result);
    assert_ne!(moved, first);
    let entry = f.stick_entry(client).unwrap();
    assert_eq!(f.index_of(entry.backend), moved);
    assert_eq!(f.service_counters().redispatches, 1);
    let result = f.run(&segment(neighbour, 41002, SYN));
    assert_eq!(f.forwarded_to(&result), moved, "the /64 moved as one");
    // A FIN closes the connection it belongs to.
    let result = f.run(&segment(neighbour, 41002, FIN_ACK));
    assert_eq!(f.forwarded_to(&result), moved);
    let key = sticky_lb_common::FlowKey {
        service: f.service.id,
        client: addr::words(&neighbour.into()),
        client_port: 41002u16.to_be(),
        _pad: 0,
    };
    assert_eq!(
        f.flows.get(&key, 0).unwrap().state,
        FlowState::Closing as u8
    );
}

#[test]
fn an_ipv6_packet_never_reaches_an_ipv4_service_and_back() {
    // Both families in one program: each frame reaches only its own family's service.
    let mut f = Fixture::new(32);
    f.add_other_family(64);
    let v6_macs: Vec<[u8; 6]> = f
        .other
        .as_ref()
        .unwrap()
        .backends
        .iter()
        .map(|b| b.2)
        .collect();
    let v4 = segment(client(1), 40000, SYN);
    let result = f.run(&v4);
    f.forwarded_to(&result);
    let v6 = segment(client6(1, 1), 40000, SYN);
    let (verdict, out) = f.run(&v6);
    assert_eq!(verdict, XDP_TX);
    assert!(
        v6_macs.iter().any(|m| out[0..6] == *m),
        "to an IPv6 backend"
    );

    // A service whose address words equal the IPv4 VIP's but which is IPv6: an IPv4 packet to
    // the VIP must not match it (the family is part of the match, not just the words).
    let mut g = Fixture::new_v6(64);
    let impostor = ServiceKey {
        vip: addr::words(&VIP.into()),
        ..g.key
    };
    let mut service = g.service;
    let slots = sticky_lb::maglev::Table::build(RING, &members(&g.backends));
    g.dataplane
        .publish_service(&impostor, &mut service, slots.slots())
        .unwrap();
    let v4 = segment(client(1), 40000, SYN);
    let result = g.run(&v4);
    assert_passed_untouched(&v4, result);
    assert!(
        g.stick.keys().next().is_none(),
        "no entry from the other family"
    );
    // Control: the same words as an IPv4 service (on port 81) take that packet.
    let control = ServiceKey {
        family: Family::Ipv4 as u8,
        port: 81u16.to_be(),
        ..impostor
    };
    let mut service = g.service;
    g.dataplane
        .publish_service(&control, &mut service, slots.slots())
        .unwrap();
    let mut to_81 = Frame::tcp_syn(client(1), VIP, 81);
    to_81.src_port = 40000;
    let to_81 = to_81.build();
    let result = g.run(&to_81);
    assert_eq!(
        result.0, XDP_TX,
        "the IPv4 service of the same words forwards"
    );
}
