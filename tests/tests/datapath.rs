//! The XDP program under BPF_PROG_TEST_RUN: frames built here go in, the verdict, the bytes that
//! come out and the map contents are checked (the style of Katran's testing/fixtures).
//!
//! The fixture (`sticky_lb_tests::fixture`) loads the program unpinned and unattached, with
//! small tables, one service 198.18.0.100:80 and three backends.

use std::net::Ipv4Addr;
use sticky_lb::dataplane::monotonic_ns;
use sticky_lb_common::{
    Backend, BackendState, Counter, Service, ServiceKey,
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
    let frame = Frame::tcp_syn(client(7), VIP, PORT).build();
    for _ in 0..3 {
        let result = f.run(&frame);
        f.assert_forwarded(&frame, result, stuck);
    }
    let c = f.service_counters();
    assert_eq!((c.stick_hits, c.stick_misses), (3, 0));
}

#[test]
fn hit_refreshes_last_seen_only_once_it_is_a_second_old() {
    let mut f = Fixture::new(32);
    let frame = Frame::tcp_syn(client(9), VIP, PORT).build();
    // Fresh entry: a hit must not write it.
    let fresh = monotonic_ns();
    f.set_stick(client(9), 0, fresh);
    f.run(&frame);
    assert_eq!(f.stick_entry(client(9)).unwrap().last_seen_ns, fresh);
    // Two seconds old: the hit refreshes it.
    let old = monotonic_ns() - 2_000_000_000;
    f.set_stick(client(9), 0, old);
    f.run(&frame);
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
    let frame = Frame::tcp_syn(client(5), VIP, PORT).build();
    let result = f.run(&frame);
    f.assert_forwarded(&frame, result, expected);
    assert_eq!(
        f.index_of(f.stick_entry(client(5)).unwrap().backend),
        expected
    );
    // The backend comes back: the moved client stays where it is now.
    f.set_state(1, BackendState::Up);
    f.publish(&[0, 1, 2]);
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
    let mut ipv6 = arp.clone();
    ipv6.ether_type = 0x86dd;
    for frame in [arp.build(), ipv6.build()] {
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
    assert!(f.counter(Counter::PassMalformed) > 0);
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
    assert!(f.flows.keys().next().is_none(), "no flow left");
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
fn ip_hash_services_track_no_flows() {
    let mut f = Fixture::new(32);
    f.run(&segment(client(1), 5000, SYN));
    assert!(f.flows.keys().next().is_none());
}

#[test]
fn services_sharing_an_index_slot_are_told_apart_and_removal_keeps_the_other() {
    use sticky_lb_common::{SERVICE_INDEX_SLOTS, hash::service_slot};
    let mut f = Fixture::new(32);
    // A second service whose (VIP, port) hashes to the same index slot as the first.
    let home = service_slot(f.key.vip[0], f.key.port, SERVICE_INDEX_SLOTS);
    let other_port = (1..u16::MAX)
        .find(|p| *p != PORT && service_slot(f.key.vip[0], p.to_be(), SERVICE_INDEX_SLOTS) == home)
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
    let home = service_slot(f.key.vip[0], f.key.port, SERVICE_INDEX_SLOTS);
    f.dataplane.service_index.set(home, &10_000, 0).unwrap();
    let frame = Frame::tcp_syn(client(1), VIP, PORT).build();
    let (verdict, _) = f.run(&frame);
    assert_eq!(verdict, 0, "XDP_ABORTED");
    assert_eq!(f.counter(Counter::Aborted), 1);
    assert!(f.stick_entry(client(1)).is_none());
}
