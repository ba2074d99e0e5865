//! The data path's side of the shared stick table and of `stick: {mode: none}`, under
//! BPF_PROG_TEST_RUN: a shared service reports each stick entry it writes (a new client, a
//! redispatch) as one `StickEvent` in the event ring, never a packet that only reads its
//! entry; a full ring loses the event, counted, never the packet; a service that is not shared
//! reports nothing; a service with no stickiness writes no entry but still keeps each
//! connection on its backend.

use aya::maps::{MapData, RingBuf};
use std::net::Ipv4Addr;
use sticky_lb_common::{
    BackendState, Counter, EVENT_RING_BYTES, NO_BACKEND, Policy, SERVICE_NO_STICK, SERVICE_SHARED,
    StickEvent, addr, map_names,
};
use sticky_lb_tests::fixture::*;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// A fixture whose service (three backends, ip-hash) has `flags`, and its event ring.
fn fixture(flags: u8) -> (Fixture, RingBuf<MapData>) {
    let mut f = Fixture::new(32);
    f.service.flags = flags;
    f.publish(&[0, 1, 2]);
    let ring = f.dataplane.take_map(map_names::EVENTS).unwrap();
    (f, ring)
}

/// Every event in the ring now.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<StickEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<StickEvent>());
        // SAFETY: the data path writes whole StickEvents.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StickEvent>()) });
    }
    events
}

/// Runs one segment and returns the index of the backend it was forwarded to.
fn to(f: &mut Fixture, frame: &[u8]) -> usize {
    let out = f.run(frame);
    f.forwarded_to(&out)
}

fn client_words(client: Ipv4Addr) -> [u32; 4] {
    addr::words(&client.into())
}

#[test]
fn a_shared_service_reports_each_new_entry_once() {
    let (mut f, mut ring) = fixture(SERVICE_SHARED);
    let client = client(7);
    let out = f.run(&segment(client, 40000, SYN));
    let backend = f.backends[f.forwarded_to(&out)].0;
    let entry = f.stick_entry(client).expect("an entry");
    assert_eq!(
        drain(&mut ring),
        vec![StickEvent {
            service: f.service.id,
            backend,
            previous: NO_BACKEND,
            _pad: 0,
            client: client_words(client),
            created_ns: entry.created_ns,
        }]
    );
    // The rest of the connection, and the client's next connections, only read the entry.
    f.run(&segment(client, 40000, ACK));
    f.run(&segment(client, 40001, SYN));
    f.run(&segment(client, 40001, ACK));
    assert_eq!(drain(&mut ring), vec![]);
    assert_eq!(f.counter(Counter::StickEventsLost), 0);
}

#[test]
fn a_redispatch_reports_the_backend_the_client_left() {
    let (mut f, mut ring) = fixture(SERVICE_SHARED);
    let client = client(9);
    let first = to(&mut f, &segment(client, 40000, SYN));
    drain(&mut ring);
    // As the controller does: the backend is down and out of the table.
    f.set_state(first, BackendState::Down);
    let rest: Vec<usize> = (0..3).filter(|&b| b != first).collect();
    f.publish(&rest);
    let second = to(&mut f, &segment(client, 40001, SYN));
    assert_ne!(first, second);
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].backend, f.backends[second].0);
    assert_eq!(events[0].previous, f.backends[first].0);
    assert_eq!(events[0].client, client_words(client));
}

#[test]
fn an_expired_entry_placed_again_is_reported_as_new() {
    let (mut f, mut ring) = fixture(SERVICE_SHARED);
    let client = client(11);
    // An entry idle for longer than the timeout, on backend 0.
    f.set_stick(client, 0, 1);
    let to = to(&mut f, &segment(client, 40000, SYN));
    let events = drain(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].backend, f.backends[to].0);
    assert_eq!(events[0].previous, NO_BACKEND);
}

#[test]
fn a_service_that_is_not_shared_reports_nothing() {
    let (mut f, mut ring) = fixture(0);
    for n in 1..=20 {
        f.run(&segment(client(n), 40000, SYN));
    }
    assert_eq!(f.service_counters().stick_inserts, 20);
    assert_eq!(drain(&mut ring), vec![]);
}

#[test]
fn a_full_ring_loses_events_never_packets() {
    let (mut f, mut ring) = fixture(SERVICE_SHARED);
    // Each event takes its size plus the ring's 8-byte header, rounded up to 8 bytes.
    let fits = EVENT_RING_BYTES as usize / (size_of::<StickEvent>() + 8);
    let clients: Vec<Ipv4Addr> = (0..fits as u32 + 10)
        .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + n))
        .collect();
    for &c in &clients {
        let (verdict, _) = f.run(&segment(c, 40000, SYN));
        assert_eq!(verdict, XDP_TX, "client {c}");
    }
    // Every client got its entry; the ring kept what fit and counted the rest.
    assert_eq!(f.service_counters().stick_inserts, clients.len() as u64);
    let kept = drain(&mut ring).len() as u64;
    let lost = f.counter(Counter::StickEventsLost);
    assert_eq!(kept + lost, clients.len() as u64);
    assert!(lost >= 10, "only {lost} lost");
    // Once the controller has read them, events flow again.
    f.run(&segment(client(200), 40000, SYN));
    assert_eq!(drain(&mut ring).len(), 1);
}

#[test]
fn no_stickiness_writes_no_entry_and_keeps_each_connection_on_its_backend() {
    let (mut f, mut ring) = fixture(SERVICE_NO_STICK);
    let client = client(21);
    let out = f.run(&segment(client, 40000, SYN));
    let first = f.forwarded_to(&out);
    assert_eq!(f.stick_entry(client), None);
    assert_eq!(f.service_counters().stick_inserts, 0);
    assert!(f.active(first) >= 1, "the connection is counted");
    // The pool changes: the open connection stays where it is.
    let rest: Vec<usize> = (0..3).filter(|&b| b != first).collect();
    f.publish(&rest);
    assert_eq!(to(&mut f, &segment(client, 40000, ACK)), first);
    // A new connection of the same client goes where the policy says now.
    assert!(rest.contains(&to(&mut f, &segment(client, 40001, SYN))));
    assert_eq!(f.stick_entry(client), None);
    assert_eq!(drain(&mut ring), vec![]);
}

#[test]
fn no_stickiness_with_least_conn_places_each_connection_by_open_connections() {
    let (mut f, _ring) = fixture(SERVICE_NO_STICK);
    f.least_conn(&[0, 1, 2]);
    assert_eq!(f.service.policy, Policy::LeastConn as u8);
    // One client opening six connections: a sticky service would put them all on one
    // backend; without stickiness each goes to the least loaded.
    let client = client(30);
    let mut per_backend = [0; 3];
    for port in 0..6 {
        per_backend[to(&mut f, &segment(client, 41000 + port, SYN))] += 1;
    }
    assert_eq!(per_backend, [2, 2, 2]);
    assert_eq!(f.stick_entry(client), None);
}
