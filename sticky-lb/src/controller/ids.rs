//! Backend and service ids: which are in use, which were retired and when, and which a new
//! backend or service may take.
//!
//! Stick entries, connections and per-backend counters name a backend by its id. An id taken
//! from a removed backend and given to a new one would hand it the removed backend's clients
//! (IPVS avoids this by keeping a destination on its trash list while connections reference it).
//! So a retired id stays out of use, across restarts too (the book is in the state file), until
//! a sweep that started after its retirement saw no stick entry and no connection naming it.

use std::collections::{BTreeMap, BTreeSet};
use sticky_lb_common::{BackendId, MAX_BACKENDS, ServiceId};

/// Retired ids and when they were retired (CLOCK_MONOTONIC_COARSE, ns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct IdBook {
    pub backends: BTreeMap<BackendId, u64>,
    pub services: BTreeMap<ServiceId, u64>,
}

impl IdBook {
    /// The lowest backend id neither in `used` nor retired; `None` when all
    /// [`MAX_BACKENDS`] are taken (the plan refuses then: an id is never reused early).
    pub(super) fn free_backend(&self, used: &BTreeSet<BackendId>) -> Option<BackendId> {
        (0..MAX_BACKENDS).find(|id| !used.contains(id) && !self.backends.contains_key(id))
    }

    /// The lowest service id below `limit` not in `used`, preferring ids not retired. A retired
    /// service id may be reused when no other is left: the data path treats an entry whose
    /// backend belongs to another service as a miss, and the sweep deletes orphans.
    pub(super) fn free_service(&self, used: &BTreeSet<ServiceId>, limit: u32) -> Option<ServiceId> {
        let free = |avoid_retired: bool| {
            (0..limit)
                .find(|id| !used.contains(id) && !(avoid_retired && self.services.contains_key(id)))
        };
        free(true).or_else(|| free(false))
    }

    pub(super) fn retire_backend(&mut self, id: BackendId, now_ns: u64) {
        self.backends.entry(id).or_insert(now_ns);
    }

    pub(super) fn retire_service(&mut self, id: ServiceId, now_ns: u64) {
        self.services.entry(id).or_insert(now_ns);
    }

    /// An id back in use (a backend re-added under its old name keeps its old id).
    pub(super) fn reuse_backend(&mut self, id: BackendId) {
        self.backends.remove(&id);
    }

    pub(super) fn reuse_service(&mut self, id: ServiceId) {
        self.services.remove(&id);
    }

    /// After a sweep that started at `sweep_started_ns` and found `named` backend ids in stick
    /// entries or connections: releases the ids retired before it started that nothing names.
    /// Returns the released backend ids.
    /// A retired service id is released once a sweep that started after its retirement found
    /// no entry of it left (`orphaned_services`: services whose entries that sweep still saw).
    pub(super) fn release(
        &mut self,
        sweep_started_ns: u64,
        named: &BTreeSet<BackendId>,
        live_services: &BTreeSet<ServiceId>,
        orphaned_services: &BTreeSet<ServiceId>,
    ) -> Vec<BackendId> {
        let released: Vec<BackendId> = self
            .backends
            .iter()
            .filter(|(id, retired)| **retired < sweep_started_ns && !named.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in &released {
            self.backends.remove(id);
        }
        self.services.retain(|id, retired| {
            *retired >= sweep_started_ns
                || live_services.contains(id)
                || orphaned_services.contains(id)
        });
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_ids_are_not_handed_out_until_a_later_sweep_sees_none_naming_them() {
        let mut book = IdBook::default();
        let used: BTreeSet<BackendId> = [0, 2].into();
        book.retire_backend(1, 1_000);
        assert_eq!(book.free_backend(&used), Some(3));
        // A sweep that started before the retirement proves nothing.
        assert!(
            book.release(900, &BTreeSet::new(), &BTreeSet::new(), &BTreeSet::new())
                .is_empty()
        );
        assert_eq!(book.free_backend(&used), Some(3));
        // One that started after but still found an entry naming it keeps it retired.
        assert!(
            book.release(2_000, &[1].into(), &BTreeSet::new(), &BTreeSet::new())
                .is_empty()
        );
        assert_eq!(book.free_backend(&used), Some(3));
        assert_eq!(
            book.release(3_000, &BTreeSet::new(), &BTreeSet::new(), &BTreeSet::new()),
            vec![1]
        );
        assert_eq!(book.free_backend(&used), Some(1));
    }

    #[test]
    fn no_backend_id_when_every_id_is_used_or_retired() {
        let mut book = IdBook::default();
        let used: BTreeSet<BackendId> = (0..MAX_BACKENDS - 1).collect();
        book.retire_backend(MAX_BACKENDS - 1, 5);
        assert_eq!(book.free_backend(&used), None);
    }

    #[test]
    fn service_ids_prefer_never_retired_ones_but_fall_back() {
        let mut book = IdBook::default();
        book.retire_service(0, 5);
        assert_eq!(book.free_service(&[1].into(), 16), Some(2));
        assert_eq!(book.free_service(&[1].into(), 2), Some(0));
        assert_eq!(book.free_service(&[0, 1].into(), 2), None);
    }
}
