//! Choosing a backend for a connection the connection table does not know: the stick table
//! first, the service's policy on a miss.
//!
//! Several CPUs may place the same client at once (a browser's parallel SYNs spread by RSS), so
//! every write that decides where a client goes is first-writer-wins: a new entry is inserted
//! with BPF_NOEXIST, an existing one is replaced by a compare-and-exchange of its placement word
//! (backend + version, see `StickEntry`); the loser reads the winner's choice and forwards there.

use crate::{
    atomic, conntrack,
    consts::{BPF_NOEXIST, EEXIST},
    events, guard,
    maps::{BACKENDS, MAGLEV, STICK},
    stats::count_service,
};
use aya_ebpf::helpers::bpf_get_prandom_u32;
use sticky_lb_common::{
    Backend, BackendId, BackendState, MAX_LEAST_CONN_BACKENDS, NO_BACKEND, Policy,
    SERVICE_NO_STICK, Service, StickEntry, StickKey, hash::client_hash, idle_ns,
};

/// Why no backend could be chosen.
pub enum NoBackend {
    /// The service's table holds no eligible backend.
    Empty,
    /// The table names a backend that is not up (an unused slot, or a state change the
    /// controller has not published a new table for yet).
    NotUp,
}

/// Where a connection goes, and whether its client's stick entry records that backend now (only
/// then is a new connection recorded in the connection table).
pub struct Choice {
    pub id: BackendId,
    pub backend: &'static Backend,
    pub recorded: bool,
}

/// The backend `id` if it belongs to `service` and still takes the clients stuck to it (up or
/// draining).
#[inline(always)]
pub fn usable(service: &Service, id: BackendId) -> Option<&'static Backend> {
    match BACKENDS.get(id) {
        Some(backend)
            if backend.service == service.id
                && BackendState::from_u8(backend.state).keeps_stuck_clients() =>
        {
            Some(backend)
        }
        _ => None,
    }
}

/// Returns the backend for `client` (already masked) of `service` at `now` (ns). Only a
/// connection's first segment (`opens`) creates or renews an entry; any segment moves a client
/// off a backend that is down.
#[inline(always)]
pub fn backend_for(
    service: &Service,
    client: &[u32; 4],
    now: u64,
    refresh_ns: u64,
    opens: bool,
) -> Result<Choice, NoBackend> {
    let key = StickKey {
        service: service.id,
        client: *client,
    };
    if let Some(entry) = STICK.get_ptr_mut(&key) {
        // Read the placement word, the last-seen time, and the word again: if the word changed
        // or is odd, another CPU is re-placing this client right now and its choice wins.
        let word = entry as *mut u64;
        // SAFETY: a live LRU value; the placement word is its aligned first 8 bytes.
        let seen = unsafe { atomic::load(word) };
        let last_seen = unsafe { core::ptr::read_volatile(&(*entry).last_seen_ns) };
        let again = unsafe { atomic::load(word) };
        if seen != again || StickEntry::placement_version(again) & 1 == 1 {
            count_service(service.id, |c| &mut c.races_lost);
            return winner(service, client, StickEntry::placement_backend(again));
        }
        let idle = idle_ns(now, last_seen);
        let live = idle < service.stick_timeout_ns;
        let stuck = StickEntry::placement_backend(seen);
        match usable(service, stuck) {
            Some(backend) if live => {
                if idle >= refresh_ns {
                    unsafe { (*entry).last_seen_ns = now };
                }
                count_service(service.id, |c| &mut c.stick_hits);
                return Ok(Choice {
                    id: stuck,
                    backend,
                    recorded: true,
                });
            }
            // Expired, but not by a new connection: a segment of a connection already open on
            // that backend (one the connection table lost) keeps going there.
            Some(backend) if !opens => {
                return Ok(Choice {
                    id: stuck,
                    backend,
                    recorded: false,
                });
            }
            _ => {}
        }
        // A new connection of an expired client, or any segment of a client whose backend is
        // down, disabled or gone: place it anew and replace the entry, first writer wins.
        let (id, backend) = pick(service, client)?;
        let claimed =
            StickEntry::placement_word(id, StickEntry::placement_version(seen).wrapping_add(1));
        // SAFETY: as above.
        match unsafe { atomic::compare_exchange(word, seen, claimed) } {
            Ok(()) => {
                unsafe {
                    (*entry).last_seen_ns = now;
                    (*entry).created_ns = now;
                    // Even again: the replacement is complete. Nobody else writes an odd word.
                    let _ = atomic::compare_exchange(
                        word,
                        claimed,
                        StickEntry::placement_word(
                            id,
                            StickEntry::placement_version(seen).wrapping_add(2),
                        ),
                    );
                }
                if live {
                    count_service(service.id, |c| &mut c.redispatches);
                    events::placed(service, client, id, stuck, now);
                } else {
                    count_service(service.id, |c| &mut c.stick_misses);
                    count_service(service.id, |c| &mut c.stick_inserts);
                    events::placed(service, client, id, NO_BACKEND, now);
                }
                return Ok(Choice {
                    id,
                    backend,
                    recorded: true,
                });
            }
            Err(current) => {
                count_service(service.id, |c| &mut c.races_lost);
                return winner(service, client, StickEntry::placement_backend(current));
            }
        }
    }
    count_service(service.id, |c| &mut c.stick_misses);
    // Only a SYN creates an entry, and only within the flood guard's rate; anything else goes
    // where the policy's stable hash says, unrecorded.
    if !opens {
        return unrecorded(service, client);
    }
    if !no_stick(service) && !guard::admits(service, now) {
        count_service(service.id, |c| &mut c.inserts_skipped);
        return unrecorded(service, client);
    }
    let (id, backend) = pick(service, client)?;
    if no_stick(service) {
        // `stick: {mode: none}`: the policy alone places a new connection, which the connection
        // table then keeps on its backend. (Nothing writes such a service's entries; the sweep
        // deletes any left from before it was configured so.)
        return Ok(Choice {
            id,
            backend,
            recorded: true,
        });
    }
    // A random even version: a CPU still holding a pointer to an entry deleted meanwhile (the
    // sweep) and reused for this one cannot mistake it for the one it read (ABA).
    let entry = StickEntry {
        version: unsafe { bpf_get_prandom_u32() } & !1,
        ..StickEntry::placed(id, now)
    };
    match STICK.insert(&key, &entry, BPF_NOEXIST) {
        Ok(()) => {
            count_service(service.id, |c| &mut c.stick_inserts);
            events::placed(service, client, id, NO_BACKEND, now);
            Ok(Choice {
                id,
                backend,
                recorded: true,
            })
        }
        Err(e) if e == -EEXIST => {
            // Another CPU inserted this client between our lookup and our insert: its choice.
            count_service(service.id, |c| &mut c.races_lost);
            match STICK.get_ptr_mut(&key) {
                // SAFETY: as above.
                Some(entry) => {
                    let word = unsafe { atomic::load(entry as *const u64) };
                    winner(service, client, StickEntry::placement_backend(word))
                }
                None => unrecorded(service, client),
            }
        }
        Err(_) => {
            count_service(service.id, |c| &mut c.insert_failures);
            Ok(Choice {
                id,
                backend,
                recorded: false,
            })
        }
    }
}

/// `stick: {mode: none}` ([`SERVICE_NO_STICK`]). Read from the service each time it is asked
/// (volatile), so the flag is not carried in a register across the policy's pick: the verifier
/// then finds the states after the pick equal whatever the flag was, and walks the pick once.
#[inline(always)]
fn no_stick(service: &Service) -> bool {
    // SAFETY: a reference to a live map value.
    unsafe { core::ptr::read_volatile(&service.flags) & SERVICE_NO_STICK != 0 }
}

/// Refreshes the last-seen time of `client`'s entry if it still places the client on `backend`:
/// a client whose open connection keeps sending keeps its entry, though it opens no new
/// connection. (An idle connection does not: its entry expires after the timeout.)
#[inline(always)]
pub fn refresh(service: &Service, client: &[u32; 4], backend: BackendId, now: u64) {
    let key = StickKey {
        service: service.id,
        client: *client,
    };
    if let Some(entry) = STICK.get_ptr_mut(&key) {
        // SAFETY: a live LRU value; the placement word is its aligned first 8 bytes.
        let word = unsafe { atomic::load(entry as *const u64) };
        if StickEntry::placement_backend(word) == backend
            && StickEntry::placement_version(word) & 1 == 0
        {
            unsafe { (*entry).last_seen_ns = now };
        }
    }
}

/// The choice another CPU recorded first, if its backend still takes clients; otherwise (it went
/// down in between) the stable choice, unrecorded.
#[inline(always)]
fn winner(service: &Service, client: &[u32; 4], id: BackendId) -> Result<Choice, NoBackend> {
    match usable(service, id) {
        Some(backend) => Ok(Choice {
            id,
            backend,
            recorded: true,
        }),
        None => unrecorded(service, client),
    }
}

/// A backend for a client that gets no entry: the same one for every segment as long as the pool
/// does not change.
#[inline(always)]
fn unrecorded(service: &Service, client: &[u32; 4]) -> Result<Choice, NoBackend> {
    let (id, backend) = match Policy::from_u8(service.policy) {
        Policy::IpHash => maglev_pick(service, client)?,
        Policy::LeastConn => least_conn_stable_pick(service, client)?,
    };
    Ok(Choice {
        id,
        backend,
        recorded: false,
    })
}

/// A backend for a client the stick table does not place, by the service's policy.
#[inline(always)]
fn pick(service: &Service, client: &[u32; 4]) -> Result<(BackendId, &'static Backend), NoBackend> {
    match Policy::from_u8(service.policy) {
        Policy::IpHash => maglev_pick(service, client),
        Policy::LeastConn => least_conn_pick(service, client),
    }
}

/// The backend at `slot` of the service's table, if it is up.
#[inline(always)]
fn up_backend(service: &Service, slot: u32) -> Result<(BackendId, &'static Backend), NoBackend> {
    let id = match MAGLEV.get(service.ring_base + slot) {
        Some(&id) if id != NO_BACKEND => id,
        _ => return Err(NoBackend::Empty),
    };
    match BACKENDS.get(id) {
        Some(backend)
            if backend.service == service.id && backend.state == BackendState::Up as u8 =>
        {
            Ok((id, backend))
        }
        _ => Err(NoBackend::NotUp),
    }
}

/// Maglev lookup: one hash, one array read.
#[inline(always)]
fn maglev_pick(
    service: &Service,
    client: &[u32; 4],
) -> Result<(BackendId, &'static Backend), NoBackend> {
    if service.ring_size == 0 {
        return Err(NoBackend::Empty);
    }
    let slot = client_hash(client, service.id) % service.ring_size;
    up_backend(service, slot)
}

/// Number of backends a least-connections service lists (bounded for the verifier).
#[inline(always)]
fn listed(service: &Service) -> u32 {
    if service.ring_size < MAX_LEAST_CONN_BACKENDS {
        service.ring_size
    } else {
        MAX_LEAST_CONN_BACKENDS
    }
}

/// Calls `visit` with each up backend a least-connections service lists, starting at a slot
/// chosen by the client hash (so ties do not all go to the first backend), until it returns true.
#[inline(always)]
fn scan_listed(
    service: &Service,
    client: &[u32; 4],
    mut visit: impl FnMut(BackendId, &'static Backend) -> bool,
) {
    let count = listed(service);
    if count == 0 {
        return;
    }
    let start = client_hash(client, service.id) % count;
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
        if let Ok((id, backend)) = up_backend(service, slot)
            && visit(id, backend)
        {
            return;
        }
    }
}

/// For a least-connections client that gets no entry: the first up backend of the list from a
/// slot chosen by the client hash, so every segment of that client goes to the same one.
#[inline(always)]
fn least_conn_stable_pick(
    service: &Service,
    client: &[u32; 4],
) -> Result<(BackendId, &'static Backend), NoBackend> {
    let mut found = None;
    scan_listed(service, client, |id, backend| {
        found = Some((id, backend));
        true
    });
    found.ok_or(NoBackend::Empty)
}

/// The up backend with the fewest active connections per unit of weight. The controller lists
/// the service's up backends where its Maglev table would be.
///
/// Inlined like everything else: a separate BPF function cannot return this `Result` (the
/// calling convention has one return register).
#[inline(always)]
fn least_conn_pick(
    service: &Service,
    client: &[u32; 4],
) -> Result<(BackendId, &'static Backend), NoBackend> {
    let mut best: Option<(BackendId, &'static Backend, i64)> = None;
    scan_listed(service, client, |id, backend| {
        if backend.weight == 0 {
            return false;
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
        false
    });
    match best {
        Some((id, backend, _)) => Ok((id, backend)),
        None => Err(NoBackend::Empty),
    }
}
