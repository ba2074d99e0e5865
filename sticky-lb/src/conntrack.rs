//! The connection table as the controller sees it: expiring connections, and the per-backend
//! active counts least-connections compares.
//!
//! The counts change only by atomic adds, from the data path and from here, through a shared
//! mapping of the `slb_active` array (BPF_F_MMAPABLE): a connection is uncounted by whoever's
//! delete removed it, so the counts are exact at every moment, with no recount that could
//! overwrite a concurrent change. The controller deletes with BPF_MAP_LOOKUP_AND_DELETE_ELEM,
//! which hands back exactly the value it removed.

use crate::dataplane::{PinDir, monotonic_ns};
use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, MapData};
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicI64, Ordering},
};
use sticky_lb_common::{
    BackendId, FlowEntry, FlowKey, FlowState, MAX_BACKENDS, ServiceId, idle_ns, map_names,
};

/// The `slb_active` array mapped into this process: one i64 per backend id.
pub struct ActiveCounts {
    base: *mut AtomicI64,
    len: usize,
    /// Keeps the map open while it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for ActiveCounts {}
unsafe impl Sync for ActiveCounts {}

impl ActiveCounts {
    /// Maps the pinned `slb_active` array of a data path.
    pub fn open(pins: &PinDir) -> Result<ActiveCounts> {
        let path = pins.map(map_names::ACTIVE);
        let map =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        ActiveCounts::new(map).with_context(|| format!("mapping {}", path.display()))
    }

    /// Maps an `slb_active` array.
    pub fn new(map: MapData) -> Result<ActiveCounts> {
        let len = MAX_BACKENDS as usize;
        let bytes = (len * size_of::<i64>()).next_multiple_of(page_size());
        // SAFETY: mapping a BPF array created with BPF_F_MMAPABLE; the kernel checks the length
        // against the array's size and the fd stays open while the mapping lives.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "{} (maps from before layout 3 are not mappable: `sticky-lb detach`)",
                io::Error::last_os_error()
            );
        }
        Ok(ActiveCounts {
            base: base as *mut AtomicI64,
            len,
            _map: map,
        })
    }

    fn slot(&self, backend: BackendId) -> Option<&AtomicI64> {
        // SAFETY: in bounds of the mapping, aligned (the kernel maps the array's values from a
        // page boundary, 8 bytes each).
        ((backend as usize) < self.len).then(|| unsafe { &*self.base.add(backend as usize) })
    }

    /// Adds `delta` to a backend's count, atomically with the data path's own adds.
    pub fn add(&self, backend: BackendId, delta: i64) {
        if let Some(slot) = self.slot(backend) {
            slot.fetch_add(delta, Ordering::SeqCst);
        }
    }

    /// A backend's open connections now.
    pub fn get(&self, backend: BackendId) -> i64 {
        self.slot(backend)
            .map_or(0, |slot| slot.load(Ordering::SeqCst))
    }
}

impl Drop for ActiveCounts {
    fn drop(&mut self) {
        let bytes = (self.len * size_of::<i64>()).next_multiple_of(page_size());
        // SAFETY: unmapping exactly what `open` mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, bytes) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Which connections are over: the idle timeouts (ns) by state, and which services and backends
/// still take connections.
#[derive(Clone, Debug)]
pub struct Expiry {
    pub opening_timeout_ns: u64,
    pub idle_timeout_ns: u64,
    /// Services that exist; connections of others are over.
    pub services: BTreeSet<ServiceId>,
    /// Backends whose connections continue (up or draining). A connection on any other backend
    /// (down, disabled, removed) is over: its backend may have rebooted, and least-connections
    /// would otherwise starve it until the connection idled out.
    pub serving: BTreeSet<BackendId>,
}

impl Expiry {
    fn is_over(&self, key: &FlowKey, flow: &FlowEntry, now: u64) -> bool {
        let timeout = if flow.state == FlowState::Opening as u8 {
            self.opening_timeout_ns
        } else {
            self.idle_timeout_ns
        };
        !self.services.contains(&key.service)
            || !self.serving.contains(&flow.backend)
            || idle_ns(now, flow.last_seen_ns) >= timeout
    }
}

/// What one pass over the connection table saw and did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    pub scanned: u64,
    pub expired: u64,
    /// Connections that looked over but were used again before they were deleted.
    pub refreshed: u64,
    /// Open connections left per backend.
    pub open_by_backend: BTreeMap<BackendId, u64>,
}

/// One pass: deletes the connections that are over and uncounts each on its backend.
pub fn sweep(
    flows: &mut HashMap<MapData, FlowKey, FlowEntry>,
    active: &ActiveCounts,
    expiry: &Expiry,
) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let now = monotonic_ns();
    let mut over = Vec::new();
    for (key, flow) in crate::batch::lookup_all(flows, 8192)? {
        report.scanned += 1;
        if expiry.is_over(&key, &flow, now) {
            over.push(key);
        } else {
            *report.open_by_backend.entry(flow.backend).or_default() += 1;
        }
    }
    let fd = aya::maps::IterableMap::map(&*flows)
        .fd()
        .as_fd()
        .as_raw_fd();
    for key in over {
        // The value handed back is exactly what was deleted; nobody else can delete it now.
        let Some(flow) = lookup_and_delete(fd, &key)? else {
            continue; // the data path closed it first (and uncounted it)
        };
        if !expiry.is_over(&key, &flow, monotonic_ns()) {
            // Used again since the scan: put it back. If a new connection took the key in the
            // meantime (only a SYN inserts), that one counted itself and this one is over.
            if flows.insert(&key, &flow, BPF_NOEXIST).is_ok() {
                report.refreshed += 1;
                *report.open_by_backend.entry(flow.backend).or_default() += 1;
                continue;
            }
        }
        active.add(flow.backend, -1);
        report.expired += 1;
    }
    Ok(report)
}

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr`'s element member (linux/bpf.h).
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes `key` and returns the value it held, or `None` if it was not there (kernel 5.14+ for
/// hash maps).
fn lookup_and_delete(fd: i32, key: &FlowKey) -> io::Result<Option<FlowEntry>> {
    let mut value = FlowEntry::default();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as *const FlowKey as u64,
        value: &mut value as *mut FlowEntry as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command; key and value point at
    // buffers of the map's key and value sizes that live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if rc == 0 {
        return Ok(Some(value));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expiry() -> Expiry {
        Expiry {
            opening_timeout_ns: 10,
            idle_timeout_ns: 100,
            services: [1].into(),
            serving: [5].into(),
        }
    }

    fn flow(state: FlowState, backend: BackendId, last_seen_ns: u64) -> FlowEntry {
        FlowEntry {
            backend,
            state: state as u8,
            _pad: [0; 3],
            last_seen_ns,
        }
    }

    #[test]
    fn each_state_has_its_own_timeout() {
        let key = FlowKey {
            service: 1,
            ..Default::default()
        };
        let e = expiry();
        assert!(e.is_over(&key, &flow(FlowState::Opening, 5, 1000), 1010));
        assert!(!e.is_over(&key, &flow(FlowState::Established, 5, 1000), 1010));
        assert!(e.is_over(&key, &flow(FlowState::Established, 5, 1000), 1100));
        // A last-seen time ahead of now is idle 0.
        assert!(!e.is_over(&key, &flow(FlowState::Opening, 5, 2000), 1000));
    }

    #[test]
    fn connections_of_gone_services_and_backends_that_stopped_serving_are_over() {
        let e = expiry();
        let other_service = FlowKey {
            service: 2,
            ..Default::default()
        };
        assert!(e.is_over(&other_service, &flow(FlowState::Established, 5, 0), 0));
        let key = FlowKey {
            service: 1,
            ..Default::default()
        };
        assert!(e.is_over(&key, &flow(FlowState::Established, 6, 0), 0));
    }
}
