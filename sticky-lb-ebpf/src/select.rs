//! Choosing a backend: the stick table first, the service's policy on a miss.

use crate::{
    conntrack,
    maps::{BACKENDS, MAGLEV, STICK},
    stats::count_service,
};
use sticky_lb_common::{
    Backend, BackendId, BackendState, MAX_LEAST_CONN_BACKENDS, NO_BACKEND, Policy,
    STICK_REFRESH_NS, Service, StickEntry, StickKey, hash::client_hash,
};

/// Why no backend could be chosen.
pub enum NoBackend {
    /// The service's table holds no eligible backend.
    Empty,
    /// The table names an id with no backend entry.
    BadId,
}

/// Returns the backend for `client` (already masked) of `service`, recording new choices.
#[inline(always)]
pub fn backend_for(
    service: &Service,
    client: u32,
    now: u64,
) -> Result<(BackendId, &'static Backend), NoBackend> {
    let key = StickKey {
        service: service.id,
        client: [client, 0, 0, 0],
    };
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
            // the policy gives now, and keep it there.
            let (id, backend) = pick(service, client)?;
            entry.backend = id;
            entry.last_seen_ns = now;
            entry.created_ns = now;
            count_service(service.id, |c| &mut c.redispatches);
            return Ok((id, backend));
        }
    }
    count_service(service.id, |c| &mut c.stick_misses);
    let (id, backend) = pick(service, client)?;
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

/// A backend for a client the stick table does not place, by the service's policy.
#[inline(always)]
fn pick(service: &Service, client: u32) -> Result<(BackendId, &'static Backend), NoBackend> {
    if service.ring_size == 0 {
        return Err(NoBackend::Empty);
    }
    match Policy::from_u8(service.policy) {
        Policy::IpHash => maglev_pick(service, client),
        Policy::LeastConn => least_conn_pick(service, client),
    }
}

/// Maglev lookup: one hash, one array read.
#[inline(always)]
fn maglev_pick(service: &Service, client: u32) -> Result<(BackendId, &'static Backend), NoBackend> {
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

/// The up backend with the fewest active connections per unit of weight. The controller lists
/// the service's up backends where its Maglev table would be; the scan starts at a slot chosen
/// by the client hash so that ties do not all go to the first backend.
///
/// Inlined like everything else: a separate BPF function cannot return this `Result` (the
/// calling convention has one return register).
#[inline(always)]
fn least_conn_pick(
    service: &Service,
    client: u32,
) -> Result<(BackendId, &'static Backend), NoBackend> {
    let count = if service.ring_size < MAX_LEAST_CONN_BACKENDS {
        service.ring_size
    } else {
        MAX_LEAST_CONN_BACKENDS
    };
    if count == 0 {
        return Err(NoBackend::Empty);
    }
    let start = client_hash(&[client, 0, 0, 0], service.id) % count;
    let mut best: Option<(BackendId, &'static Backend, i64)> = None;
    let mut i = 0;
    while i < MAX_LEAST_CONN_BACKENDS {
        if i >= count {
            break;
        }
        let mut slot = start + i;
        if slot >= count {
            slot -= count;
        }
        i += 1;
        let Some(&id) = MAGLEV.get(service.ring_base + slot) else {
            continue;
        };
        let Some(backend) = BACKENDS.get(id) else {
            continue;
        };
        if backend.service != service.id
            || backend.state != BackendState::Up as u8
            || backend.weight == 0
        {
            continue;
        }
        let active = conntrack::active(id);
        // active / weight < best_active / best_weight, without division.
        let better = match best {
            None => true,
            Some((_, b, b_active)) => {
                (active as u64) * (b.weight as u64) < (b_active as u64) * (backend.weight as u64)
            }
        };
        if better {
            best = Some((id, backend, active));
        }
    }
    match best {
        Some((id, backend, _)) => Ok((id, backend)),
        None => Err(NoBackend::Empty),
    }
}
