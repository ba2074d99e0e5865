//! The batched map operations the controller uses for sweeps, listings and table swaps, against
//! real kernel maps (the program loaded unpinned, not attached).

use aya::maps::{HashMap, MapData};
use std::collections::{BTreeMap, BTreeSet};
use sticky_lb::{
    batch,
    dataplane::{Dataplane, LoadOptions},
};
use sticky_lb_common::{StickEntry, StickKey, map_names};
use sticky_lb_tests::netns::require_root;

fn dataplane(stick_table_size: u32) -> Dataplane {
    require_root();
    Dataplane::load(
        None,
        LoadOptions {
            stick_table_size,
            flow_table_size: 64,
            maglev_stride: 65537,
            maglev_services: 1,
            interface_mac: [2, 0, 0, 0, 0, 1],
            log_level: 0,
        },
    )
    .expect("load")
}

fn key(i: u32) -> StickKey {
    StickKey {
        service: i % 3,
        client: [i, 0, 0, 0],
    }
}

#[test]
fn lookup_all_returns_every_entry_across_chunks() {
    let mut dp = dataplane(50_000);
    let mut stick: HashMap<MapData, StickKey, StickEntry> = dp.take_map(map_names::STICK).unwrap();
    for i in 0..20_000u32 {
        let entry = StickEntry {
            backend: i % 7,
            version: 0,
            last_seen_ns: i as u64,
            created_ns: 0,
        };
        stick.insert(&key(i), &entry, 0).unwrap();
    }
    // A chunk size that does not divide the count exercises the cursor and the last partial chunk.
    let mut all = batch::lookup_all(&stick, 333).unwrap();
    assert_eq!(all.len(), 20_000);
    all.sort_by_key(|(k, _)| k.client[0]);
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(*k, key(i as u32));
        assert_eq!((v.backend, v.last_seen_ns), (i as u32 % 7, i as u64));
    }
    assert!(batch::lookup_all(&stick, 4096).unwrap().len() == 20_000);
}

#[test]
fn delete_skips_missing_keys_and_update_writes_an_array() {
    let mut dp = dataplane(1024);
    let mut stick: HashMap<MapData, StickKey, StickEntry> = dp.take_map(map_names::STICK).unwrap();
    for i in 0..100u32 {
        stick.insert(&key(i), &StickEntry::default(), 0).unwrap();
    }
    stick.remove(&key(50)).unwrap();
    let wanted: Vec<StickKey> = (40..60).map(key).collect();
    assert_eq!(
        batch::delete(&stick, &wanted).unwrap(),
        19,
        "19 present, 1 already gone"
    );
    assert_eq!(batch::lookup_all(&stick, 64).unwrap().len(), 80);

    // The Maglev array: one batched write of 65,537 slots.
    let indexes: Vec<u32> = (0..65_537).collect();
    let values: Vec<u32> = indexes.iter().map(|i| i * 7 % 1000).collect();
    batch::update(&dp.maglev, &indexes, &values).unwrap();
    for i in [0u32, 1, 12_345, 65_536] {
        assert_eq!(dp.maglev.get(&i, 0).unwrap(), i * 7 % 1000);
    }
}

/// Entries of a service the sweep's caller does not know are deleted only when the previous
/// sweep found that service orphaned too: a service added by a reload while a sweep copied the
/// service list keeps its entries.
#[test]
fn orphaned_entries_are_deleted_only_on_the_second_sweep_that_finds_them() {
    let mut dp = dataplane(1024);
    let mut stick: HashMap<MapData, StickKey, StickEntry> = dp.take_map(map_names::STICK).unwrap();
    let now = sticky_lb::dataplane::monotonic_ns();
    let entry = StickEntry::placed(3, now);
    for i in 0..10 {
        let live = StickKey {
            service: 1,
            client: [i, 0, 0, 0],
        };
        stick.insert(&live, &entry, 0).unwrap();
    }
    let young = StickKey {
        service: 7,
        client: [42, 0, 0, 0],
    };
    stick
        .insert(&young, &StickEntry::placed(9, now), 0)
        .unwrap();
    let live: BTreeMap<u32, u64> = [(1, 60_000_000_000)].into();
    // First sweep: service 7 is unknown to this caller, so it is only noted, with its backend.
    let first = sticky_lb::expiry::sweep(&mut stick, &live, &BTreeSet::new()).unwrap();
    assert_eq!(first.orphaned, 0);
    assert!(first.orphan_services.contains(&7));
    assert!(first.named_by_orphans.contains(&9));
    assert!(stick.get(&young, 0).is_ok(), "kept after one sweep");
    // The service appeared meanwhile (a reload): not confirmed, kept.
    let known: BTreeMap<u32, u64> = [(1, 60_000_000_000), (7, 60_000_000_000)].into();
    let confirmed: BTreeSet<u32> = first
        .orphan_services
        .iter()
        .filter(|s| !known.contains_key(s))
        .copied()
        .collect();
    let second = sticky_lb::expiry::sweep(&mut stick, &known, &confirmed).unwrap();
    assert_eq!(second.orphaned, 0);
    assert!(stick.get(&young, 0).is_ok());
    // Orphaned in two sweeps in a row: deleted.
    let third = sticky_lb::expiry::sweep(&mut stick, &live, &first.orphan_services).unwrap();
    assert_eq!(third.orphaned, 1);
    assert!(stick.get(&young, 0).is_err());
    assert_eq!(batch::lookup_all(&stick, 64).unwrap().len(), 10);
}
