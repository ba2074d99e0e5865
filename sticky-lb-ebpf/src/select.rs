//! Choosing a backend: the stick table first, the service's policy on a miss.

use crate::{
    maps::{BACKENDS, MAGLEV, STICK},
    stats::count_service,
};
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use sticky_lb_common::{
    Backend, BackendId, BackendState, NO_BACKEND, STICK_REFRESH_NS, Service, StickEntry, StickKey,
    hash::client_hash,
};

/// Why no backend could be chosen.
pub enum NoBackend {
    /// The Maglev table holds no backend (none eligible).
    Empty,
    /// The table names an id with no backend entry.
    BadId,
}

/// Returns the backend for `client` (already masked) of `service`, recording new choices.
#[inline(always)]
pub fn backend_for(
    service: &Service,
    client: u32,
) -> Result<(BackendId, &'static Backend), NoBackend> {
    let key = StickKey {
        service: service.id,
        client: [client, 0, 0, 0],
    };
    // The coarse clock (jiffies resolution) is plenty for second-granular refreshes and
    // timeouts, and far cheaper than the precise one, which reads the clock source.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(entry) = STICK.get_ptr_mut(&key) {
        // SAFETY: the LRU map hands out a pointer to the live value; concurrent writers only
        // store whole aligned words (backend id, timestamps).
        let entry = unsafe { &mut *entry };
        let idle = now.wrapping_sub(entry.last_seen_ns);
        // An entry idle past the timeout is as good as absent even before the sweep removes it,
        // so persistence never outlives the configured timeout.
        if idle < service.stick_timeout_ns {
            if let Some(backend) = BACKENDS.get(entry.backend)
                && backend.service == service.id
                && BackendState::from_u8(backend.state).keeps_stuck_clients()
            {
                if idle >= STICK_REFRESH_NS {
                    entry.last_seen_ns = now;
                }
                count_service(service.id, |c| &mut c.stick_hits);
                return Ok((entry.backend, backend));
            }
            // The stuck backend is down, disabled or gone: move the client once, to the backend
            // the consistent hash gives now, and keep it there.
            let (id, backend) = maglev_pick(service, client)?;
            entry.backend = id;
            entry.last_seen_ns = now;
            entry.created_ns = now;
            count_service(service.id, |c| &mut c.redispatches);
            return Ok((id, backend));
        }
    }
    count_service(service.id, |c| &mut c.stick_misses);
    let (id, backend) = maglev_pick(service, client)?;
    let entry = StickEntry {
        backend: id,
        _pad: 0,
        last_seen_ns: now,
        created_ns: now,
    };
    if STICK.insert(&key, &entry, 0).is_ok() {
        count_service(service.id, |c| &mut c.stick_inserts);
    } else {
        count_service(service.id, |c| &mut c.insert_failures);
    }
    Ok((id, backend))
}

/// Maglev lookup: one hash, one array read.
#[inline(always)]
fn maglev_pick(service: &Service, client: u32) -> Result<(BackendId, &'static Backend), NoBackend> {
    if service.ring_size == 0 {
        return Err(NoBackend::Empty);
    }
    let slot = client_hash(&[client, 0, 0, 0], service.id) % service.ring_size;
    let id = match MAGLEV.get(service.ring_base + slot) {
        Some(&id) if id != NO_BACKEND => id,
        _ => return Err(NoBackend::Empty),
    };
    match BACKENDS.get(id) {
        Some(backend) if backend.service == service.id => Ok((id, backend)),
        _ => Err(NoBackend::BadId),
    }
}
