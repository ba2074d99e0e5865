//! The connection table as the controller sees it: finding the connections that are over and
//! ending them.
//!
//! A connection stops counting on its backend by a compare-and-exchange of its state, so it is
//! uncounted exactly once whoever ends it (its FIN or RST in the data path, or this sweep). User
//! space has no compare-and-exchange on a hash-map value, so the sweep ends each connection by
//! running the `expire_flow` program in the same object (BPF_PROG_TEST_RUN): the same code, the
//! same atomics. Nothing here writes a count.

use crate::{
    dataplane::monotonic_ns,
    prog_run::{self, TestRunAttr},
};
use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::ProgramFd,
};
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::size_of,
    os::fd::AsFd,
};
use sticky_lb_common::{
    BackendId, ExpireOutcome, ExpireRequest, FlowEntry, FlowKey, FlowState, NAT_PORT_REUSE_NS,
    NatEntry, NatKey, ServiceId, idle_ns,
};

/// Runs the data path's `expire_flow` program on one connection at a time.
pub struct Expirer(ProgramFd);

impl Expirer {
    pub fn new(program: ProgramFd) -> Expirer {
        Expirer(program)
    }

    /// Ends connection `key` unless its client was seen at or after `seen_before_ns`.
    pub fn expire(&self, key: &FlowKey, seen_before_ns: u64) -> io::Result<ExpireOutcome> {
        let request = ExpireRequest {
            key: *key,
            seen_before_ns,
        };
        // The program reads the request as packet data; XDP test runs want at least an
        // Ethernet header's worth (the request is 32 bytes) and room to copy it back.
        let mut out = [0u8; size_of::<ExpireRequest>()];
        // SAFETY: ExpireRequest is plain old data with no padding (checked in -common).
        let input = unsafe {
            std::slice::from_raw_parts(
                &request as *const ExpireRequest as *const u8,
                size_of::<ExpireRequest>(),
            )
        };
        let mut attr = TestRunAttr::new(self.0.as_fd(), input, &mut out);
        // SAFETY: the buffers `attr` points at live across the call, sized as it says.
        unsafe { prog_run::test_run(&mut attr) }?;
        Ok(match attr.retval {
            2 => ExpireOutcome::Uncounted,
            1 => ExpireOutcome::Deleted,
            _ => ExpireOutcome::Kept,
        })
    }
}

/// Which connections are over: the idle timeouts (ns) by state, and which services and backends
/// still take connections.
#[derive(Clone, Debug)]
pub struct Expiry {
    pub opening_timeout_ns: u64,
    pub idle_timeout_ns: u64,
    pub closing_timeout_ns: u64,
    /// Services that exist; connections of others are over.
    pub services: BTreeSet<ServiceId>,
    /// Backends whose connections continue (up or draining). A connection on any other backend
    /// (down, disabled, removed) is over: its backend may have rebooted, and least-connections
    /// would otherwise starve it until the connection idled out.
    pub serving: BTreeSet<BackendId>,
}

impl Expiry {
    /// If connection `key` is over at `now`, the last-seen time before which it may be ended
    /// (so a packet that arrives between this scan and the end keeps it).
    fn over(&self, key: &FlowKey, flow: &FlowEntry, now: u64) -> Option<u64> {
        if !self.services.contains(&key.service) || !self.serving.contains(&flow.backend) {
            return Some(u64::MAX);
        }
        let timeout = match flow.state {
            s if s == FlowState::Opening as u8 => self.opening_timeout_ns,
            s if s == FlowState::Established as u8 => self.idle_timeout_ns,
            _ => self.closing_timeout_ns,
        };
        (idle_ns(now, flow.last_seen_ns) >= timeout).then(|| now.saturating_sub(timeout) + 1)
    }
}

/// What one pass over the connection table saw and did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub scanned: u64,
    /// Connections ended and deleted.
    pub expired: u64,
    /// Of those, the ones still counted until this sweep ended them (no FIN seen).
    pub uncounted: u64,
    /// Connections that looked over at the scan but were kept: used again since, or their backend
    /// serves again.
    pub kept: u64,
    /// Connections left per backend, closing ones included (they still reach it).
    pub open_by_backend: BTreeMap<BackendId, u64>,
}

/// One pass: ends the connections that are over.
pub fn sweep(
    flows: &HashMap<MapData, FlowKey, FlowEntry>,
    expirer: &Expirer,
    expiry: &Expiry,
) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let now = monotonic_ns();
    for (key, flow) in crate::batch::lookup_all(flows, 8192)? {
        report.scanned += 1;
        let Some(seen_before) = expiry.over(&key, &flow, now) else {
            *report.open_by_backend.entry(flow.backend).or_default() += 1;
            continue;
        };
        match expirer
            .expire(&key, seen_before)
            .context("running expire_flow")?
        {
            ExpireOutcome::Kept => {
                report.kept += 1;
                *report.open_by_backend.entry(flow.backend).or_default() += 1;
            }
            ExpireOutcome::Deleted => report.expired += 1,
            ExpireOutcome::Uncounted => {
                report.expired += 1;
                report.uncounted += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expiry() -> Expiry {
        Expiry {
            opening_timeout_ns: 10,
            idle_timeout_ns: 100,
            closing_timeout_ns: 20,
            services: [1].into(),
            serving: [5].into(),
        }
    }

    fn flow(state: FlowState, backend: BackendId, last_seen_ns: u64) -> FlowEntry {
        FlowEntry::new(&FlowKey::default(), backend, state, last_seen_ns)
    }

    #[test]
    fn each_state_has_its_own_timeout() {
        let key = FlowKey {
            service: 1,
            ..Default::default()
        };
        let e = expiry();
        // Ended only if not seen again since the moment it became over.
        assert_eq!(
            e.over(&key, &flow(FlowState::Opening, 5, 1000), 1010),
            Some(1001)
        );
        assert_eq!(
            e.over(&key, &flow(FlowState::Established, 5, 1000), 1010),
            None
        );
        assert_eq!(
            e.over(&key, &flow(FlowState::Established, 5, 1000), 1100),
            Some(1001)
        );
        assert_eq!(e.over(&key, &flow(FlowState::Closing, 5, 1000), 1015), None);
        assert_eq!(
            e.over(&key, &flow(FlowState::Closing, 5, 1000), 1020),
            Some(1001)
        );
        // A last-seen time ahead of now is idle 0.
        assert_eq!(e.over(&key, &flow(FlowState::Opening, 5, 2000), 1000), None);
    }

    #[test]
    fn connections_of_gone_services_and_backends_that_stopped_serving_are_over() {
        let e = expiry();
        let other_service = FlowKey {
            service: 2,
            ..Default::default()
        };
        assert_eq!(
            e.over(&other_service, &flow(FlowState::Established, 5, 0), 0),
            Some(u64::MAX)
        );
        let key = FlowKey {
            service: 1,
            ..Default::default()
        };
        assert_eq!(
            e.over(&key, &flow(FlowState::Established, 6, 0), 0),
            Some(u64::MAX)
        );
    }
}

/// Source-NAT reply-table entries whose connection is over, by when a sweep first found them
/// so (ns, the sweep's clock): an entry holds its port until it has been over for
/// [`NAT_PORT_REUSE_NS`] (the backend's TIME_WAIT), then the sweep deletes it.
#[derive(Debug, Default)]
pub struct NatOrphans(std::collections::HashMap<NatKey, u64>);

/// One pass over the NAT reply table: frees the source-NAT ports of connections over for
/// [`NAT_PORT_REUSE_NS`]. Returns how many were freed.
///
/// Only source-NAT entries are freed here. Their key holds the port, which the data path takes
/// only for a key no entry holds (BPF_NOEXIST), so an entry found over stays over until it is
/// deleted: no new connection can be in it. Plain NAT's entries are deleted by the data path
/// when their connection ends (a client's next connection from the same port would take the
/// same key); one left behind by a backend removed meanwhile ages out of the LRU.
pub fn free_nat_ports(
    nat: &mut HashMap<MapData, NatKey, NatEntry>,
    flows: &HashMap<MapData, FlowKey, FlowEntry>,
    orphans: &mut NatOrphans,
    now: u64,
) -> Result<u64> {
    let mut freed = 0;
    let mut seen = std::collections::HashSet::new();
    for (key, entry) in crate::batch::lookup_all(nat, 8192)? {
        let source_nat = key.peer != entry.client || key.peer_port != entry.client_port;
        if !source_nat {
            continue;
        }
        let flow_key = FlowKey {
            service: entry.service,
            client: entry.client,
            client_port: entry.client_port,
            _pad: 0,
        };
        let open = flows
            .get(&flow_key, 0)
            .is_ok_and(|f| f.backend == entry.backend && f.nat_port == key.peer_port);
        if open {
            continue;
        }
        seen.insert(key);
        let since = *orphans.0.entry(key).or_insert(now);
        if idle_ns(now, since) >= NAT_PORT_REUSE_NS {
            match nat.remove(&key) {
                Ok(()) => freed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("deleting a NAT reply entry"),
            }
            seen.remove(&key);
        }
    }
    // Entries gone meanwhile (evicted, or freed above) are forgotten.
    orphans.0.retain(|key, _| seen.contains(key));
    Ok(freed)
}
