//! The XDP program under BPF_PROG_TEST_RUN: frames built here go in, the verdict, the bytes that
//! come out and the map contents are checked (the style of Katran's testing/fixtures).
//!
//! The fixture (`sticky_lb_tests::fixture`) loads the program unpinned and unattached, with
//! small tables, one service 198.18.0.100:80 and three backends.

use std::net::Ipv4Addr;
use sticky_lb::conntrack;
use sticky_lb::dataplane::monotonic_ns;
use sticky_lb_common::{
    Backend, BackendState, Counter, FlowEntry, FlowKey, FlowState, Service, ServiceKey, StickEntry,
};
use sticky_lb_tests::{
    fixture::*,
    packet::{ETH_LEN, Frame, TCP_LEN, VLAN_LEN},
};

#[test]
fn miss_chooses_by_maglev_and_records_the_choice() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let mut seen = std::collections::BTreeSet::new();
    for n in 1..=40 {
        let frame = Frame::tcp_syn(client(n), VIP, PORT).build();
        let expected = f.predicted(&table, client(n));
        let before = monotonic_ns();
        let result = f.run(&frame);
        f.assert_forwarded(&frame, result, expected);
        let entry = f
            .stick_entry(client(n))
            .expect("a stick entry after a miss");
        assert_eq!(f.index_of(entry.backend), expected);
        assert!(entry.created_ns >= before && entry.last_seen_ns == entry.created_ns);
        seen.insert(expected);
    }
    assert_eq!(seen.len(), 3, "40 clients over 3 backends use all of them");
    // New entries start at a random even version (a CPU holding a pointer to a deleted and
    // reused entry must not mistake it for the one it read).
    let versions: std::collections::BTreeSet<u32> = (1..=40)
        .map(|n| f.stick_entry(client(n)).unwrap().version)
        .collect();
    assert!(versions.iter().all(|v| v % 2 == 0), "{versions:?}");
    assert!(versions.len() > 30, "versions are random: {versions:?}");
    let c = f.service_counters();
    assert_eq!((c.stick_misses, c.stick_inserts, c.stick_hits), (40, 40, 0));
}

#[test]
fn hit_follows_the_stick_table_not_the_hash() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let predicted = f.predicted(&table, client(7));
    let stuck = (predicted + 1) % 3;
    f.set_stick(client(7), stuck, monotonic_ns());
    // Three new connections of the stuck client.
    for port in 1..=3 {
        let frame = segment(client(7), port, SYN);
        let result = f.run(&frame);
        f.assert_forwarded(&frame, result, stuck);
    }
    let c = f.service_counters();
    assert_eq!((c.stick_hits, c.stick_misses), (3, 0));
}

#[test]
fn hit_refreshes_last_seen_only_once_it_is_a_second_old() {
    let mut f = Fixture::new(32);
    // Fresh entry: a hit must not write it.
    let fresh = monotonic_ns();
    f.set_stick(client(9), 0, fresh);
    f.run(&segment(client(9), 1, SYN));
    assert_eq!(f.stick_entry(client(9)).unwrap().last_seen_ns, fresh);
    // Two seconds old: the hit refreshes it.
    let old = monotonic_ns() - 2_000_000_000;
    f.set_stick(client(9), 0, old);
    f.run(&segment(client(9), 2, SYN));
    let entry = f.stick_entry(client(9)).unwrap();
    assert!(entry.last_seen_ns > old + 1_000_000_000);
    assert_eq!(entry.created_ns, old, "a refresh keeps the creation time");
}

#[test]
fn expired_entry_is_a_miss() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let predicted = f.predicted(&table, client(3));
    let stale = (predicted + 1) % 3;
    f.set_stick(
        client(3),
        stale,
        monotonic_ns() - TIMEOUT_NS - 1_000_000_000,
    );
    let frame = Frame::tcp_syn(client(3), VIP, PORT).build();
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, predicted);
    assert_eq!(
        f.index_of(f.stick_entry(client(3)).unwrap().backend),
        predicted
    );
    assert_eq!(f.service_counters().stick_misses, 1);
}

#[test]
fn drained_backend_keeps_its_stuck_clients() {
    let mut f = Fixture::new(32);
    f.set_stick(client(4), 2, monotonic_ns());
    f.set_state(2, BackendState::Drain);
    f.publish(&[0, 1]);
    let frame = Frame::tcp_syn(client(4), VIP, PORT).build();
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, 2);
}

#[test]
fn down_backend_redispatches_once_and_the_new_choice_sticks() {
    let mut f = Fixture::new(32);
    f.set_stick(client(5), 1, monotonic_ns());
    f.set_state(1, BackendState::Down);
    let table = f.publish(&[0, 2]);
    let expected = f.predicted(&table, client(5));
    assert_ne!(expected, 1);
    let frame = segment(client(5), 1, SYN);
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, expected);
    assert_eq!(
        f.index_of(f.stick_entry(client(5)).unwrap().backend),
        expected
    );
    // The backend comes back: the moved client stays where it is now.
    f.set_state(1, BackendState::Up);
    f.publish(&[0, 1, 2]);
    let frame = segment(client(5), 2, SYN);
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, expected);
    let c = f.service_counters();
    assert_eq!((c.redispatches, c.stick_hits), (1, 1));
}

#[test]
fn client_mask_sticks_a_whole_prefix_together() {
    let mut f = Fixture::new(24);
    let first = Frame::tcp_syn(client(1), VIP, PORT).build();
    let (_, out) = f.run(&first);
    let backend = f.backends.iter().position(|b| b.2 == out[0..6]).unwrap();
    for n in [2, 77, 254] {
        let frame = Frame::tcp_syn(client(n), VIP, PORT).build();
        let result = f.run(&frame);
        f.assert_forwarded(&frame, result, backend);
    }
    let c = f.service_counters();
    assert_eq!((c.stick_inserts, c.stick_hits), (1, 3));
}

#[test]
fn vlan_tagged_frame_is_forwarded_with_its_tag() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let mut frame = Frame::tcp_syn(client(8), VIP, PORT);
    frame.vlan = Some(42);
    let bytes = frame.build();
    let result = f.run(&bytes);
    let expected = f.predicted(&table, client(8));
    f.assert_forwarded(&bytes, result, expected);
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    for option_words in 1..=10usize {
        let mut frame = Frame::tcp_syn(client(10 + option_words as u8), VIP, PORT);
        // NOPs; a parser that ignored IHL would read them as the ports and pass the frame.
        frame.ip_options = vec![1; option_words * 4];
        let bytes = frame.build();
        let result = f.run(&bytes);
        let expected = f.predicted(&table, client(10 + option_words as u8));
        f.assert_forwarded(&bytes, result, expected);
    }
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    let mut f = Fixture::new(32);
    let other_port = Frame::tcp_syn(client(1), VIP, 8080).build();
    let other_addr = Frame::tcp_syn(client(1), Ipv4Addr::new(198, 18, 0, 2), PORT).build();
    let mut udp = Frame::tcp_syn(client(1), VIP, PORT);
    udp.protocol = 17;
    let mut icmp = Frame::tcp_syn(client(1), VIP, PORT);
    icmp.protocol = 1;
    for frame in [other_port, other_addr, udp.build(), icmp.build()] {
        let result = f.run(&frame);
        assert_passed_untouched(&frame, result);
    }
    assert_eq!(f.counter(Counter::PassNotService), 4);
    let mut arp = Frame::tcp_syn(client(1), VIP, PORT);
    arp.ether_type = 0x0806;
    let mut lldp = arp.clone();
    lldp.ether_type = 0x88cc;
    for frame in [arp.build(), lldp.build()] {
        let result = f.run(&frame);
        assert_passed_untouched(&frame, result);
    }
    assert_eq!(f.counter(Counter::PassNotIp), 2);
    assert!(
        f.stick_entry(client(1)).is_none(),
        "no stick entry for non-service traffic"
    );
}

#[test]
fn fragments_are_never_forwarded() {
    let mut f = Fixture::new(32);
    // First fragment (MF set, offset 0) and a later one (offset 185 * 8 bytes) of a segment to
    // the service: a later fragment has no ports, so forwarding either would split the datagram.
    for frag in [0x2000u16, 0x00b9, 0x20b9] {
        let mut frame = Frame::tcp_syn(client(2), VIP, PORT);
        frame.frag = frag;
        let bytes = frame.build();
        let result = f.run(&bytes);
        assert_passed_untouched(&bytes, result);
    }
    assert_eq!(f.counter(Counter::PassFragment), 3);
    assert!(f.stick_entry(client(2)).is_none());
}

#[test]
fn truncated_frames_are_passed_untouched_at_every_length() {
    let mut f = Fixture::new(32);
    for vlan in [None, Some(7)] {
        let mut frame = Frame::tcp_syn(client(6), VIP, PORT);
        frame.vlan = vlan;
        frame.ip_options = vec![1; 8];
        let full = frame.build();
        let headers = ETH_LEN + vlan.map_or(0, |_| VLAN_LEN) + 28 + TCP_LEN;
        assert_eq!(full.len(), headers);
        // BPF_PROG_TEST_RUN needs at least an Ethernet header's worth of data.
        for len in ETH_LEN..headers {
            let cut = &full[..len];
            let result = f.run(cut);
            assert_passed_untouched(cut, result);
        }
    }
    assert!(f.counter(Counter::PassTruncated) > 0);
    assert!(
        f.stick_entry(client(6)).is_none(),
        "no entry from a truncated frame"
    );
}

#[test]
fn bad_ip_header_length_is_passed() {
    let mut f = Fixture::new(32);
    let mut bytes = Frame::tcp_syn(client(6), VIP, PORT).build();
    bytes[ETH_LEN] = 0x44; // IHL 4: shorter than the fixed header
    let result = f.run(&bytes);
    assert_passed_untouched(&bytes, result);
    bytes[ETH_LEN] = 0x65; // version 6 in an IPv4 EtherType
    let result = f.run(&bytes);
    assert_passed_untouched(&bytes, result);
}

#[test]
fn service_without_backends_drops() {
    let mut f = Fixture::new(32);
    for i in 0..3 {
        f.set_state(i, BackendState::Down);
    }
    f.publish(&[]);
    let frame = Frame::tcp_syn(client(1), VIP, PORT).build();
    let (verdict, _) = f.run(&frame);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(f.counter(Counter::DropNoBackend), 1);
    assert!(f.stick_entry(client(1)).is_none());
}

#[test]
fn least_conn_picks_the_backend_with_fewest_connections_per_weight() {
    let mut f = Fixture::new(32);
    f.least_conn(&[0, 1, 2]);
    f.set_active(0, 5);
    f.set_active(1, 2);
    f.set_active(2, 9);
    let result = f.run(&segment(client(1), 1000, SYN));
    assert_eq!(f.forwarded_to(&result), 1);
    assert_eq!(f.active(1), 3, "the SYN opened a counted connection");
    // Weighted: 9 connections on weight 4 (2.25 each) beat 3 on weight 1.
    f.set_weight(2, 4);
    let result = f.run(&segment(client(2), 1000, SYN));
    assert_eq!(f.forwarded_to(&result), 2);
    assert_eq!(f.active(2), 10);
}

#[test]
fn least_conn_spreads_new_clients_evenly_then_sticks() {
    let mut f = Fixture::new(32);
    f.least_conn(&[0, 1, 2]);
    let mut per_backend = [0usize; 3];
    for n in 1..=30 {
        let result = f.run(&segment(client(n), 2000, SYN));
        per_backend[f.forwarded_to(&result)] += 1;
    }
    assert_eq!(per_backend, [10, 10, 10]);
    assert_eq!((f.active(0), f.active(1), f.active(2)), (10, 10, 10));
    // A second connection of a stuck client follows the stick table, not the counts.
    f.set_active(0, 100);
    let first = f.stick_entry(client(1)).unwrap().backend;
    let result = f.run(&segment(client(1), 2001, SYN));
    assert_eq!(f.backends[f.forwarded_to(&result)].0, first);
}

#[test]
fn connection_closes_are_counted_once() {
    let mut f = Fixture::new(32);
    f.least_conn(&[0]);
    f.run(&segment(client(1), 3000, SYN));
    f.run(&segment(client(1), 3000, SYN)); // retransmitted SYN
    f.run(&segment(client(1), 3000, ACK));
    assert_eq!(f.active(0), 1);
    f.run(&segment(client(1), 3000, FIN_ACK));
    f.run(&segment(client(1), 3000, FIN_ACK)); // retransmitted FIN
    assert_eq!(f.active(0), 0);
    f.run(&segment(client(1), 3001, SYN));
    f.run(&segment(client(1), 3001, RST));
    assert_eq!(f.active(0), 0);
    // A mid-connection packet of a flow never seen opening is not counted.
    f.run(&segment(client(1), 3002, ACK));
    assert_eq!(f.active(0), 0);
    // Both stay, closing, until the controller deletes them after the closing timeout: the
    // client's last segments still reach the backend (and a made-up RST cannot end a
    // connection's pinning at once).
    let mut left: Vec<(FlowKey, FlowEntry)> = f.flows.iter().map(|r| r.unwrap()).collect();
    left.sort_by_key(|(k, _)| u16::from_be(k.client_port));
    let ports: Vec<u16> = left
        .iter()
        .map(|(k, _)| u16::from_be(k.client_port))
        .collect();
    assert_eq!(ports, [3000, 3001]);
    assert!(
        left.iter()
            .all(|(_, f)| f.state == FlowState::Closing as u8)
    );
}

#[test]
fn after_the_clients_fin_its_acks_still_reach_the_backend_that_is_sending() {
    // A half-close: the client sends its request and FIN, the server goes on sending, and the
    // client's ACKs come through the balancer. Its entry expires and a backend joins meanwhile:
    // the ACKs must still reach the first backend, or it is reset mid-response.
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1]);
    let n = (40..=250)
        .find(|&n| f.predicted(&maglev_members(&f, &[0, 1, 2]), client(n)) == 2)
        .expect("a client that backend 2 would take");
    let first = f.predicted(&table, client(n));
    f.run(&segment(client(n), 7100, SYN));
    f.run(&segment(client(n), 7100, ACK));
    f.run(&segment(client(n), 7100, FIN_ACK));
    assert_eq!(f.active(first), 0, "a closing connection no longer counts");
    f.remove_stick(client(n));
    f.publish(&[0, 1, 2]);
    let ack = segment(client(n), 7100, ACK);
    let result = f.run(&ack);
    f.assert_forwarded(&ack, result, first);
    // A new connection on the same port after TIME_WAIT is placed anew.
    let syn = segment(client(n), 7100, SYN);
    let result = f.run(&syn);
    f.assert_forwarded(&syn, result, 2);
    assert_eq!((f.active(first), f.active(2)), (0, 1));
}

#[test]
fn least_conn_skips_backends_that_are_not_up() {
    let mut f = Fixture::new(32);
    f.least_conn(&[0, 1, 2]);
    f.set_active(1, 50);
    f.set_active(2, 50);
    f.set_state(0, BackendState::Drain);
    let result = f.run(&segment(client(1), 4000, SYN));
    assert_ne!(
        f.forwarded_to(&result),
        0,
        "a draining backend takes no new client"
    );
    f.set_state(1, BackendState::Down);
    f.set_state(2, BackendState::Disabled);
    let (verdict, _) = f.run(&segment(client(2), 4000, SYN));
    assert_eq!(verdict, XDP_DROP, "nobody is up");
}

#[test]
fn every_service_tracks_and_counts_its_connections() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let backend = f.predicted(&table, client(1));
    f.run(&segment(client(1), 5000, SYN));
    let flows: Vec<FlowEntry> = f.flows.iter().map(|r| r.unwrap().1).collect();
    assert_eq!(flows.len(), 1);
    assert_eq!(f.index_of(flows[0].backend), backend);
    assert_eq!(flows[0].state, FlowState::Opening as u8);
    assert_eq!(f.active(backend), 1);
    // The handshake's ACK establishes it.
    f.run(&segment(client(1), 5000, ACK));
    let flow = f.flows.iter().next().unwrap().unwrap().1;
    assert_eq!(flow.state, FlowState::Established as u8);
}

#[test]
fn services_sharing_an_index_slot_are_told_apart_and_removal_keeps_the_other() {
    use sticky_lb_common::{SERVICE_INDEX_SLOTS, hash::service_slot};
    let mut f = Fixture::new(32);
    // A second service whose (VIP, port) hashes to the same index slot as the first.
    let home = service_slot(&f.key.vip, f.key.port, SERVICE_INDEX_SLOTS);
    let other_port = (1..u16::MAX)
        .find(|p| *p != PORT && service_slot(&f.key.vip, p.to_be(), SERVICE_INDEX_SLOTS) == home)
        .expect("a colliding port");
    let other_key = ServiceKey {
        port: other_port.to_be(),
        ..f.key
    };
    let mut other = Service {
        id: 0,
        stick_timeout_ns: TIMEOUT_NS,
        client_mask: [u32::MAX, 0, 0, 0],
        ..Default::default()
    };
    // It has one backend of its own (id 9).
    let backend = Backend {
        addr: [v4(Ipv4Addr::new(198, 18, 0, 99)), 0, 0, 0],
        mac: [0x02, 0xbe, 0, 0, 0, 0x99],
        state: BackendState::Up as u8,
        _pad: 0,
        service: 0,
        weight: 1,
        port: other_port.to_be(),
        _pad2: 0,
    };
    f.dataplane.backends.set(9, &backend, 0).unwrap();
    f.dataplane
        .publish_service(&other_key, &mut other, &[9; 251])
        .unwrap();
    let to_other = Frame::tcp_syn(client(1), VIP, other_port).build();
    let (verdict, out) = f.run(&to_other);
    assert_eq!(
        (verdict, &out[0..6]),
        (XDP_TX, &[0x02, 0xbe, 0, 0, 0, 0x99][..])
    );
    let to_first = Frame::tcp_syn(client(2), VIP, PORT).build();
    let result = f.run(&to_first);
    f.forwarded_to(&result); // asserts XDP_TX to one of the first service's backends
    // Remove the first: the second, probed past the tombstone, still works; the first passes.
    let first_key = f.key;
    f.dataplane.remove_service(&first_key).unwrap();
    let (verdict, _) = f.run(&to_other);
    assert_eq!(verdict, XDP_TX);
    let fresh = Frame::tcp_syn(client(3), VIP, PORT).build();
    let result = f.run(&fresh);
    assert_passed_untouched(&fresh, result);
    assert_eq!(f.dataplane.service_keys().unwrap(), vec![other_key]);
}

#[test]
fn a_corrupt_service_index_aborts_instead_of_guessing() {
    use sticky_lb_common::{SERVICE_INDEX_SLOTS, hash::service_slot};
    let mut f = Fixture::new(32);
    // Point the service's index slot past the end of the services array.
    let home = service_slot(&f.key.vip, f.key.port, SERVICE_INDEX_SLOTS);
    f.dataplane.service_index.set(home, &10_000, 0).unwrap();
    let frame = Frame::tcp_syn(client(1), VIP, PORT).build();
    let (verdict, _) = f.run(&frame);
    assert_eq!(verdict, 0, "XDP_ABORTED");
    assert_eq!(f.counter(Counter::Aborted), 1);
    assert!(f.stick_entry(client(1)).is_none());
}

// --- Malformed frames: passed untouched, counted by reason, never recorded ---------------------

/// A SYN to the service with its bytes changed by `mutate` (offsets from the IPv4 header).
fn mangled(n: u8, mutate: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = Frame::tcp_syn(client(n), VIP, PORT).build();
    mutate(&mut bytes);
    bytes
}

const IP: usize = ETH_LEN;
const TCP: usize = ETH_LEN + 20;

#[test]
fn malformed_segments_to_a_service_are_passed_and_counted_by_reason() {
    let mut f = Fixture::new(32);
    let cases: Vec<(&str, Vec<u8>, Counter)> = vec![
        (
            "TCP data offset 4",
            mangled(1, |b| b[TCP + 12] = 4 << 4),
            Counter::PassBadTcpHeader,
        ),
        (
            "TCP data offset 15 in a 40-byte IP packet",
            mangled(2, |b| b[TCP + 12] = 15 << 4),
            Counter::PassBadTcpHeader,
        ),
        (
            "IPv4 total length 1400 in a 74-byte frame",
            mangled(3, |b| {
                b.resize(74, 0);
                b[IP + 2..IP + 4].copy_from_slice(&1400u16.to_be_bytes());
            }),
            Counter::PassBadIpHeader,
        ),
        (
            "IPv4 total length 30, below IHL x 4 + 20",
            mangled(4, |b| {
                b[IP + 2..IP + 4].copy_from_slice(&30u16.to_be_bytes())
            }),
            Counter::PassBadIpHeader,
        ),
        (
            "frame cut 6 bytes into the TCP header",
            mangled(5, |b| b.truncate(TCP + 6)),
            Counter::PassTruncated,
        ),
    ];
    for (what, frame, reason) in cases {
        let before = f.counter(reason);
        let result = f.run(&frame);
        assert_eq!(result.0, XDP_PASS, "{what}");
        assert_passed_untouched(&frame, result);
        assert_eq!(
            f.counter(reason),
            before + 1,
            "{what} counted as {reason:?}"
        );
    }
    for n in 1..=5 {
        assert!(
            f.stick_entry(client(n)).is_none(),
            "no entry from a malformed frame"
        );
    }
    assert!(
        f.flows.keys().next().is_none(),
        "no connection from a malformed frame"
    );
}

#[test]
fn ethernet_padding_after_the_ip_packet_is_allowed() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    // A 54-byte SYN padded to the 60-byte Ethernet minimum: tot_len 40 < frame.
    let frame = mangled(6, |b| b.resize(60, 0));
    let result = f.run(&frame);
    let expected = f.predicted(&table, client(6));
    f.assert_forwarded(&frame, result, expected);
}

// --- First choice wins: racing CPUs never split a client ---------------------------------------

#[test]
fn a_replacement_in_progress_on_another_cpu_wins() {
    // Another CPU has claimed this expired entry for backend `claimed` (odd version) but not yet
    // stamped its times: a SYN here must follow the claim, not place the client itself.
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let predicted = f.predicted(&table, client(20));
    let claimed = (predicted + 1) % 3;
    let long_ago = monotonic_ns() - TIMEOUT_NS - 1_000_000_000;
    f.set_stick_entry(
        client(20),
        StickEntry {
            backend: f.backends[claimed].0,
            version: 7,
            last_seen_ns: long_ago,
            created_ns: long_ago,
        },
    );
    let frame = segment(client(20), 1, SYN);
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, claimed);
    let entry = f.stick_entry(client(20)).unwrap();
    assert_eq!(
        (entry.backend, entry.version),
        (f.backends[claimed].0, 7),
        "untouched"
    );
    assert_eq!(f.service_counters().races_lost, 1);
}

#[test]
fn a_replacement_makes_the_version_even_again() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let predicted = f.predicted(&table, client(21));
    let stale = (predicted + 1) % 3;
    let long_ago = monotonic_ns() - TIMEOUT_NS - 1_000_000_000;
    f.set_stick_entry(
        client(21),
        StickEntry {
            backend: f.backends[stale].0,
            version: 4,
            last_seen_ns: long_ago,
            created_ns: long_ago,
        },
    );
    let frame = segment(client(21), 1, SYN);
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, predicted);
    let entry = f.stick_entry(client(21)).unwrap();
    assert_eq!((f.index_of(entry.backend), entry.version), (predicted, 6));
    assert!(entry.last_seen_ns > long_ago && entry.created_ns == entry.last_seen_ns);
}

/// Pins the calling thread to one CPU, so two threads run the program on two CPUs at once.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn two_cpus_placing_the_same_new_clients_agree_on_every_one() {
    // Least-connections makes two CPUs' picks for one client differ whenever their counts do;
    // with last-writer-wins inserts, one CPU's connection would then go to a backend the entry no
    // longer names. Both CPUs open a connection (different ports) for each of the same clients in
    // lockstep; every client's two connections must reach one backend, the one its entry names.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let mut f = Fixture::new(32);
    f.least_conn(&[0, 1, 2]);
    const CLIENTS: u32 = 20_000;
    let client_of = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    let backend_macs: Vec<[u8; 6]> = f.backends.iter().map(|b| b.2).collect();
    let program = &*f.dataplane.program();
    let barrier = std::sync::Barrier::new(2);
    let picks: Vec<Vec<usize>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2u16)
            .map(|cpu| {
                let (barrier, macs) = (&barrier, &backend_macs);
                scope.spawn(move || {
                    pin_to_cpu(cpu as usize);
                    let mut picks = Vec::with_capacity(CLIENTS as usize);
                    for i in 0..CLIENTS {
                        let frame = segment(client_of(i), 1000 + cpu, SYN);
                        if i % 64 == 0 {
                            barrier.wait();
                        }
                        let (verdict, out) = run_on(program, &frame);
                        assert_eq!(verdict, XDP_TX);
                        picks.push(macs.iter().position(|m| *m == out[0..6]).unwrap());
                    }
                    picks
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut split = 0;
    for i in 0..CLIENTS {
        let entry = f.stick_entry(client_of(i)).expect("an entry per client");
        let recorded = f.index_of(entry.backend);
        if picks[0][i as usize] != recorded || picks[1][i as usize] != recorded {
            split += 1;
        }
    }
    let c = f.service_counters();
    eprintln!(
        "{CLIENTS} clients placed on two CPUs at once: {} inserts, {} races lost, {split} split",
        c.stick_inserts, c.races_lost
    );
    assert_eq!(split, 0, "clients whose connections went to two backends");
    assert_eq!(c.stick_inserts, CLIENTS as u64, "one insert per client");
}

// --- Clock edges and short timeouts -----------------------------------------------------------

#[test]
fn a_last_seen_just_ahead_of_now_is_a_hit() {
    // Another CPU refreshed the entry just after a clock tick this CPU has not seen yet.
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let stuck = (f.predicted(&table, client(30)) + 1) % 3;
    let ahead = monotonic_ns() + 4_000_000;
    f.set_stick(client(30), stuck, ahead);
    let frame = segment(client(30), 1, SYN);
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, stuck);
    assert_eq!(
        f.index_of(f.stick_entry(client(30)).unwrap().backend),
        stuck
    );
    assert_eq!(f.service_counters().stick_hits, 1);
}

#[test]
fn a_500ms_timeout_is_refreshed_before_it_expires() {
    let mut f = Fixture::new(32);
    f.service.stick_timeout_ns = 500_000_000;
    let table = f.publish(&[0, 1, 2]);
    let stuck = (f.predicted(&table, client(31)) + 1) % 3;
    // 300 ms idle: past half the timeout, so this hit must refresh it (a one-second refresh
    // threshold never would, and the entry would expire 200 ms later).
    let seen = monotonic_ns() - 300_000_000;
    f.set_stick(client(31), stuck, seen);
    let frame = segment(client(31), 1, SYN);
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, stuck);
    let entry = f.stick_entry(client(31)).unwrap();
    assert!(entry.last_seen_ns >= seen + 300_000_000, "refreshed");
    assert_eq!(entry.created_ns, seen);
}

// --- An open connection keeps its backend -------------------------------------------------------

#[test]
fn an_open_connection_keeps_its_backend_when_its_entry_is_gone_and_the_pool_changed() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1]);
    // A client whose slot the new backend (2) takes once it is added.
    let n = (40..=250)
        .find(|&n| {
            let with_2 = maglev_members(&f, &[0, 1, 2]);
            f.predicted(&with_2, client(n)) == 2
        })
        .expect("a client that backend 2 would take");
    let first = f.predicted(&table, client(n));
    let syn = segment(client(n), 7000, SYN);
    let result = f.run(&syn);
    f.assert_forwarded(&syn, result, first);
    f.run(&segment(client(n), 7000, ACK));
    // Its entry is swept (idle longer than the timeout) and a backend is added.
    f.remove_stick(client(n));
    f.publish(&[0, 1, 2]);
    let data = segment(client(n), 7000, ACK);
    let result = f.run(&data);
    f.assert_forwarded(&data, result, first);
    // A new connection of that client goes where the policy says now.
    let syn = segment(client(n), 7001, SYN);
    let result = f.run(&syn);
    f.assert_forwarded(&syn, result, 2);
}

#[test]
fn an_open_connection_on_a_backend_that_went_down_is_moved_and_uncounted() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let first = f.predicted(&table, client(41));
    f.run(&segment(client(41), 7000, SYN));
    f.run(&segment(client(41), 7000, ACK));
    assert_eq!(f.active(first), 1);
    f.set_state(first, BackendState::Down);
    let others: Vec<usize> = (0..3).filter(|&i| i != first).collect();
    let table = f.publish(&others);
    let data = segment(client(41), 7000, ACK);
    let result = f.run(&data);
    f.assert_forwarded(&data, result, f.predicted(&table, client(41)));
    assert_eq!(
        f.active(first),
        0,
        "the connection stopped counting on the down backend"
    );
    assert!(f.flows.keys().next().is_none());
}

#[test]
fn only_a_closing_connection_gives_its_port_to_a_new_one() {
    let mut f = Fixture::new(32);
    f.least_conn(&[0, 1, 2]);
    f.run(&segment(client(42), 7000, SYN));
    f.run(&segment(client(42), 7000, ACK));
    let first = f.index_of(f.stick_entry(client(42)).unwrap().backend);
    assert_eq!(f.active(first), 1);
    // A SYN on an open connection (retransmitted, or made up) changes nothing.
    let syn = segment(client(42), 7000, SYN);
    let result = f.run(&syn);
    f.assert_forwarded(&syn, result, first);
    let flow = f.flows.iter().next().unwrap().unwrap().1;
    assert_eq!(flow.state, FlowState::Established as u8);
    assert_eq!((0..3).map(|i| f.active(i)).sum::<i64>(), 1);
    // After the client's FIN, the port is free for a new connection once TIME_WAIT is over.
    f.run(&segment(client(42), 7000, FIN_ACK));
    assert_eq!((0..3).map(|i| f.active(i)).sum::<i64>(), 0);
    f.run(&segment(client(42), 7000, SYN));
    assert_eq!(
        (0..3).map(|i| f.active(i)).sum::<i64>(),
        1,
        "the new one counts"
    );
    let flow = f.flows.iter().next().unwrap().unwrap().1;
    assert_eq!(flow.state, FlowState::Opening as u8);
}

fn maglev_members(f: &Fixture, members: &[usize]) -> sticky_lb::maglev::Table {
    let members: Vec<sticky_lb::maglev::Member<'_>> = members
        .iter()
        .map(|&i| sticky_lb::maglev::Member {
            id: f.backends[i].0,
            name: &f.backends[i].1,
            weight: 1,
        })
        .collect();
    sticky_lb::maglev::Table::build(RING, &members)
}

// --- Flood guard --------------------------------------------------------------------------------

#[test]
fn the_flood_guard_caps_new_entries_and_places_the_rest_by_hash() {
    let mut f = Fixture::new(32);
    // One new entry a second per CPU: the burst is one second's worth, so however slowly this
    // machine runs the 60 frames (under a second), at most two get entries.
    f.service.insert_interval_ns = 1_000_000_000;
    let table = f.publish(&[0, 1, 2]);
    for n in 1..=60 {
        let frame = segment(client(n), 1, SYN);
        let result = f.run(&frame);
        f.assert_forwarded(&frame, result, f.predicted(&table, client(n)));
    }
    let recorded = (1..=60)
        .filter(|&n| f.stick_entry(client(n)).is_some())
        .count() as u64;
    let c = f.service_counters();
    assert!((1..=2).contains(&recorded), "{recorded} entries");
    assert_eq!(c.inserts_skipped, 60 - recorded);
    assert_eq!(c.stick_inserts, recorded);
}

#[test]
fn only_a_syn_creates_an_entry() {
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    for flags in [
        ACK, FIN_ACK, RST, 0x18, /* PSH ACK */
        0x12, /* SYN ACK */
    ] {
        let frame = segment(client(50), 1, flags);
        let result = f.run(&frame);
        f.assert_forwarded(&frame, result, f.predicted(&table, client(50)));
    }
    assert!(f.stick_entry(client(50)).is_none());
    assert!(f.flows.keys().next().is_none());
}

// --- Connection counts are exact ----------------------------------------------------------------

#[test]
fn counts_stay_exact_while_a_sweep_deletes_connections_the_data_path_closes() {
    // One thread opens 1,000 connections and closes a third of them (FIN or RST) while another
    // sweeps the connection table with the controller's code; backend 0 goes down a third of
    // the way through, and the sweep ends its connections as clients close them: each
    // connection is uncounted by exactly one of them.
    let mut f = Fixture::new(32);
    f.least_conn(&[0, 1, 2]);
    let expirer = f.dataplane.expirer().unwrap();
    let flows = f.flows_handle();
    let serving: std::collections::BTreeSet<u32> =
        [f.backends[1].0, f.backends[2].0].into_iter().collect();
    let expiry = conntrack::Expiry {
        opening_timeout_ns: 60_000_000_000,
        idle_timeout_ns: 60_000_000_000,
        closing_timeout_ns: 60_000_000_000,
        services: [f.service.id].into(),
        serving,
    };
    let ids: Vec<u32> = f.backends.iter().map(|b| b.0).collect();
    let active = f.active_handle();
    let mut backends = f.backends_handle();
    let program = &*f.dataplane.program();
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut open_now = std::collections::BTreeMap::<u16, ()>::new();
    let (sweeps, uncounted) = std::thread::scope(|scope| {
        let sweeper = scope.spawn(|| {
            let (mut sweeps, mut uncounted) = (0, 0);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                uncounted += conntrack::sweep(&flows, &expirer, &expiry)
                    .unwrap()
                    .uncounted;
                sweeps += 1;
            }
            (sweeps, uncounted)
        });
        for i in 0..1000u16 {
            let c = Ipv4Addr::new(198, 18, 2 + (i / 250) as u8, (i % 250) as u8 + 1);
            run_on(program, &segment(c, 9000 + i, SYN));
            run_on(program, &segment(c, 9000 + i, ACK));
            if i == 300 {
                // Backend 0 goes down: the sweep ends its connections while clients close them.
                let mut b0 = backends.get(&ids[0], 0).unwrap();
                b0.state = BackendState::Down as u8;
                backends.set(ids[0], &b0, 0).unwrap();
            }
            if i % 3 == 0 {
                let close = if i % 2 == 0 { FIN_ACK } else { RST };
                run_on(program, &segment(c, 9000 + i, close));
            } else {
                open_now.insert(i, ());
            }
            // No count ever goes below zero (a connection uncounted twice would).
            for &id in &ids {
                let count: i64 = active.get(&id, 0).unwrap();
                assert!(count >= 0, "backend {id} counted below zero");
            }
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        sweeper.join().unwrap()
    });
    conntrack::sweep(&flows, &expirer, &expiry).unwrap();
    // What is still counted: connections neither closed by the client nor ended by the sweep.
    let mut counted = std::collections::BTreeMap::<u32, i64>::new();
    for entry in f.flows.iter() {
        let flow = entry.unwrap().1;
        if flow.state != FlowState::Closing as u8 {
            *counted.entry(flow.backend).or_default() += 1;
        }
    }
    eprintln!(
        "{sweeps} sweeps ran beside 1,000 connections ({} left open by the client), uncounting {uncounted}; counted now {counted:?}",
        open_now.len()
    );
    for &id in &ids {
        assert_eq!(
            f.active_of(id),
            counted.get(&id).copied().unwrap_or(0),
            "backend {id}: the count equals its open connections"
        );
    }
    assert_eq!(
        counted.get(&ids[0]),
        None,
        "backend 0's connections were all ended"
    );
    assert!(sweeps > 0);
}

// --- Unused backend slots ----------------------------------------------------------------------

#[test]
fn a_table_naming_an_unused_or_down_slot_never_forwards_there() {
    let mut f = Fixture::new(32);
    // Backend 1's slot is cleared (removed) before a table without it is published.
    let id = f.backends[1].0;
    f.dataplane.backends.set(id, &Backend::UNUSED, 0).unwrap();
    for n in 1..=60 {
        let frame = segment(client(n), 1, SYN);
        let (verdict, out) = f.run(&frame);
        assert_ne!(&out[0..6], &[0u8; 6], "never to MAC 00:00:00:00:00:00");
        if verdict == XDP_TX {
            assert_ne!(f.forwarded_to(&(verdict, out)), 1);
        } else {
            assert_eq!(verdict, XDP_DROP);
        }
    }
    assert!(
        f.counter(Counter::DropBadBackend) > 0,
        "some clients hashed to the cleared slot"
    );
    // The same for a slot whose backend went down.
    f.set_state(2, BackendState::Down);
    let before = f.counter(Counter::DropBadBackend);
    for n in 61..=120 {
        let frame = segment(client(n), 1, SYN);
        let result = f.run(&frame);
        if result.0 == XDP_TX {
            assert_eq!(f.forwarded_to(&result), 0);
        }
    }
    assert!(f.counter(Counter::DropBadBackend) > before);
}

#[test]
fn the_sweep_keeps_a_connection_whose_backend_serves_again() {
    // The controller's sweep decided from a snapshot that backend 0 stopped serving; by the time
    // it ends the connection, backend 0 is up again: the connection stays, and stays counted.
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let n = (1..=60)
        .find(|&n| f.predicted(&table, client(n)) == 0)
        .expect("a client of backend 0");
    f.run(&segment(client(n), 6000, SYN));
    let key = f.flows.keys().next().unwrap().unwrap();
    let expirer = f.dataplane.expirer().unwrap();
    use sticky_lb_common::ExpireOutcome;
    assert_eq!(expirer.expire(&key, u64::MAX).unwrap(), ExpireOutcome::Kept);
    assert_eq!(f.active(0), 1);
    // Down for real: now it ends, uncounted once.
    f.set_state(0, BackendState::Down);
    assert_eq!(
        expirer.expire(&key, u64::MAX).unwrap(),
        ExpireOutcome::Uncounted
    );
    assert_eq!(f.active(0), 0);
    assert!(f.flows.keys().next().is_none());
}

#[test]
fn a_close_never_touches_an_entry_reused_for_another_connection() {
    // A CPU that read connection A's entry may find it deleted and reused for connection B (a
    // preallocated hash reuses entries at once). Simulated: A's key holds an entry tagged for
    // another key. A's FIN must neither close it nor uncount anything.
    let mut f = Fixture::new(32);
    let table = f.publish(&[0, 1, 2]);
    let backend = f.predicted(&table, client(70));
    f.run(&segment(client(70), 8000, SYN));
    assert_eq!(f.active(backend), 1);
    let (key, _) = f.flows.iter().next().unwrap().unwrap();
    let other = FlowKey {
        client_port: 8001u16.to_be(),
        ..key
    };
    let foreign = FlowEntry::new(
        &other,
        f.backends[backend].0,
        FlowState::Established,
        monotonic_ns(),
    );
    f.flows.insert(&key, &foreign, 0).unwrap();
    let fin = segment(client(70), 8000, FIN_ACK);
    let result = f.run(&fin);
    f.assert_forwarded(&fin, result, backend);
    assert_eq!(f.active(backend), 1, "not uncounted");
    assert_eq!(
        f.flows.get(&key, 0).unwrap().state,
        FlowState::Established as u8,
        "not closed"
    );
}
