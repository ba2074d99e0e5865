//! The batched map operations the controller uses for sweeps, listings and table swaps, against
//! real kernel maps (the program loaded unpinned, not attached).

use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap, MapData, PerCpuArray},
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use sticky_lb::{
    batch,
    dataplane::{Dataplane, LoadOptions},
};
use sticky_lb_common::{
    BackendCounters, FlowEntry, FlowKey, InsertBudget, NatEntry, NatKey, ServiceCounters,
    StickEntry, StickKey, map_names,
};
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

/// The kernel's id of a loaded map.
fn map_id<K: Pod, V>(map: &impl IterableMap<K, V>) -> u32 {
    map.map().info().expect("map info").id()
}

/// `bpftool --json ARGS`, parsed.
fn bpftool(args: &[&str]) -> Value {
    let out = std::process::Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .expect("running bpftool (Debian package bpftool; `./x setup` installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool's JSON")
}

/// Every map is created with BTF for its key and value (BTF map definitions in the object), so
/// an operator's `bpftool map dump pinned .../slb_stick` prints each entry's fields by name, as
/// for Katran's and Cilium's maps; a map created without BTF dumps as raw bytes.
#[test]
fn every_map_carries_btf_and_bpftool_prints_field_names() {
    let mut dp = dataplane(1024);
    let mut stick: HashMap<MapData, StickKey, StickEntry> = dp.take_map(map_names::STICK).unwrap();
    let flows: HashMap<MapData, FlowKey, FlowEntry> = dp.take_map(map_names::FLOWS).unwrap();
    let stats: PerCpuArray<MapData, u64> = dp.take_map(map_names::STATS).unwrap();
    let backend_stats: PerCpuArray<MapData, BackendCounters> =
        dp.take_map(map_names::BACKEND_STATS).unwrap();
    let service_stats: PerCpuArray<MapData, ServiceCounters> =
        dp.take_map(map_names::SERVICE_STATS).unwrap();
    let budget: PerCpuArray<MapData, InsertBudget> = dp.take_map(map_names::INSERT_BUDGET).unwrap();
    let active: Array<MapData, i64> = dp.take_map(map_names::ACTIVE).unwrap();
    let meta: Array<MapData, u32> = dp.take_map(map_names::META).unwrap();
    let nat: HashMap<MapData, NatKey, NatEntry> = dp.take_map(map_names::NAT).unwrap();
    let features: Array<MapData, u32> = dp.take_map(map_names::FEATURES).unwrap();
    // The ring buffer is not an iterable map: its id comes from the program's list of maps.
    let events_id = dp
        .program()
        .info()
        .unwrap()
        .map_ids()
        .unwrap()
        .unwrap_or_default()
        .into_iter()
        .find(|&id| {
            aya::maps::MapInfo::from_id(id)
                .is_ok_and(|info| info.name_as_str() == Some(map_names::EVENTS))
        })
        .expect("the program uses the event ring");
    let ids = [
        (map_names::SERVICE_INDEX, map_id(&dp.service_index)),
        (map_names::SERVICES, map_id(&dp.services)),
        (map_names::BACKENDS, map_id(&dp.backends)),
        (map_names::MAGLEV, map_id(&dp.maglev)),
        (map_names::STICK, map_id(&stick)),
        (map_names::STATS, map_id(&stats)),
        (map_names::BACKEND_STATS, map_id(&backend_stats)),
        (map_names::SERVICE_STATS, map_id(&service_stats)),
        (map_names::FLOWS, map_id(&flows)),
        (map_names::ACTIVE, map_id(&active)),
        (map_names::META, map_id(&meta)),
        (map_names::INSERT_BUDGET, map_id(&budget)),
        (map_names::NAT, map_id(&nat)),
        (map_names::FEATURES, map_id(&features)),
        (map_names::EVENTS, events_id),
    ];
    assert_eq!(ids.len(), map_names::ALL.len());
    for (name, id) in ids {
        let show = bpftool(&["map", "show", "id", &id.to_string()]);
        assert_eq!(show["name"], name);
        // A ring buffer has no key or value for BTF to describe.
        assert!(
            show["btf_id"].as_u64().is_some_and(|btf| btf != 0) || show["type"] == "ringbuf",
            "map {name} was created without BTF: {show}"
        );
        // The sizes the controller sets at load time win over the definitions' defaults.
        let sized = match name {
            map_names::STICK => Some(1024),
            // The NAT reply table is sized like the connection table.
            map_names::FLOWS | map_names::NAT => Some(64),
            map_names::MAGLEV => Some(2 * 65537),
            // A ring buffer's size is in bytes.
            map_names::EVENTS => Some(sticky_lb_common::EVENT_RING_BYTES),
            _ => None,
        };
        if let Some(max_entries) = sized {
            assert_eq!(show["max_entries"], max_entries, "{show}");
        }
    }

    let key = StickKey {
        service: 2,
        client: [0x0100_000a, 0, 0, 0],
    };
    let entry = StickEntry {
        backend: 7,
        version: 4,
        last_seen_ns: 123_456_789,
        created_ns: 42,
    };
    stick.insert(&key, &entry, 0).unwrap();
    let dump = bpftool(&["map", "dump", "id", &map_id(&stick).to_string()]);
    let formatted = &dump[0]["formatted"];
    assert_eq!(formatted["key"]["service"], 2, "{dump}");
    assert_eq!(formatted["key"]["client"][0], 0x0100_000a, "{dump}");
    assert_eq!(formatted["value"]["backend"], 7, "{dump}");
    assert_eq!(formatted["value"]["version"], 4, "{dump}");
    assert_eq!(formatted["value"]["last_seen_ns"], 123_456_789, "{dump}");
    assert_eq!(formatted["value"]["created_ns"], 42, "{dump}");
}
