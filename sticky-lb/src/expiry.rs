//! The expiry sweep: deletes stick entries idle longer than their service's timeout.
//!
//! The data path already ignores such entries (it re-chooses and overwrites them), so the sweep
//! is garbage collection that keeps the table's occupancy honest and `table show` truthful. It
//! runs on a blocking thread with its own handle on the pinned map and never holds a lock the data
//! path could wait on: BPF hash maps are read and deleted element by element.

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use std::{collections::BTreeMap, time::Instant};
use sticky_lb_common::{BackendId, ServiceId, StickEntry, StickKey, idle_ns};

use crate::dataplane::monotonic_ns;

/// Pause between the sweep's batched reads.
const SWEEP_PAUSE: std::time::Duration = std::time::Duration::from_micros(500);

/// What one sweep saw and did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub scanned: u64,
    pub expired: u64,
    /// Expired entries per service.
    pub expired_by_service: BTreeMap<ServiceId, u64>,
    /// Live entries left per backend and per service (occupancy).
    pub live_by_backend: BTreeMap<BackendId, u64>,
    pub live_by_service: BTreeMap<ServiceId, u64>,
    /// Entries of services that no longer exist, deleted (their service was orphaned in the
    /// previous sweep too).
    pub orphaned: u64,
    /// Services not in `timeouts` that entries still name: orphans now, deleted by the next
    /// sweep if they still are then.
    pub orphan_services: std::collections::BTreeSet<ServiceId>,
    /// Backends that orphaned entries left in the table still name.
    pub named_by_orphans: std::collections::BTreeSet<BackendId>,
    /// Entries that looked expired but were refreshed before we deleted them.
    pub refreshed: u64,
    /// Live entries of the services in `used_since` (see [`sweep_noting_use`]) used since the
    /// time given for their service.
    pub used: Vec<(StickKey, StickEntry)>,
    pub duration_ms: u64,
}

/// Whether an entry last seen at `last_seen_ns` has been idle longer than `timeout_ns` at `now_ns`.
fn is_idle(entry: &StickEntry, now_ns: u64, timeout_ns: u64) -> bool {
    idle_ns(now_ns, entry.last_seen_ns) >= timeout_ns
}

/// One pass over the table. `timeouts` maps each live service id to its stick timeout. Entries
/// of other services are deleted only if their service is in `confirmed_orphans` (found
/// orphaned by the previous sweep as well): a service added while this sweep's caller copied
/// the service list is not mistaken for a removed one.
pub fn sweep(
    stick: &mut HashMap<MapData, StickKey, StickEntry>,
    timeouts: &BTreeMap<ServiceId, u64>,
    confirmed_orphans: &std::collections::BTreeSet<ServiceId>,
) -> Result<SweepReport> {
    sweep_noting_use(stick, timeouts, confirmed_orphans, &BTreeMap::new())
}

/// [`sweep`], also listing in [`SweepReport::used`] the live entries of each service in
/// `used_since` last seen at or after its time (CLOCK_MONOTONIC_COARSE, ns): the shared
/// table refreshes their keys in Redis from the same walk.
pub fn sweep_noting_use(
    stick: &mut HashMap<MapData, StickKey, StickEntry>,
    timeouts: &BTreeMap<ServiceId, u64>,
    confirmed_orphans: &std::collections::BTreeSet<ServiceId>,
    used_since: &BTreeMap<ServiceId, u64>,
) -> Result<SweepReport> {
    let started = Instant::now();
    let mut report = SweepReport::default();
    // Collect first, delete after: deleting while walking with get_next_key can restart the walk.
    let now = monotonic_ns();
    let mut candidates = Vec::new();
    // One syscall per 4096 entries, then a breath: a million-entry table is read in well under
    // a second while packets on other CPUs keep most of the memory bandwidth.
    for (key, entry) in crate::batch::lookup_all_paced(stick, 4096, SWEEP_PAUSE)? {
        report.scanned += 1;
        match timeouts.get(&key.service) {
            Some(&timeout) if !is_idle(&entry, now, timeout) => {
                *report.live_by_backend.entry(entry.backend).or_default() += 1;
                *report.live_by_service.entry(key.service).or_default() += 1;
                if used_since
                    .get(&key.service)
                    .is_some_and(|&since| entry.last_seen_ns >= since)
                {
                    report.used.push((key, entry));
                }
            }
            Some(_) => candidates.push((key, false)),
            None => {
                report.orphan_services.insert(key.service);
                if confirmed_orphans.contains(&key.service) {
                    candidates.push((key, true));
                } else {
                    report.named_by_orphans.insert(entry.backend);
                }
            }
        }
    }
    for (key, orphan) in candidates {
        if !orphan {
            // Check again right before deleting: a packet may have refreshed the entry since the
            // scan. What remains is a window of one syscall; a packet that lands in it finds no
            // entry and re-chooses, which the consistent hash makes the same backend unless the
            // pool changed.
            let Ok(entry) = stick.get(&key, 0) else {
                continue;
            };
            let timeout = timeouts[&key.service];
            if !is_idle(&entry, monotonic_ns(), timeout) {
                report.refreshed += 1;
                continue;
            }
        }
        if stick.remove(&key).is_ok() {
            if orphan {
                report.orphaned += 1;
            } else {
                report.expired += 1;
            }
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_measured_from_last_seen() {
        let entry = StickEntry {
            last_seen_ns: 1_000,
            ..Default::default()
        };
        assert!(!is_idle(&entry, 1_500, 1_000));
        assert!(is_idle(&entry, 2_000, 1_000));
        // A refresh that lands after `now` was taken must not count as idle.
        assert!(!is_idle(&entry, 500, 1_000));
    }
}
