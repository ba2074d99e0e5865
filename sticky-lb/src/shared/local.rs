//! This node's side of the shared table: which services are shared and what their names and
//! ids are here ([`Directory`]), and the writes a learned placement makes in the pinned stick
//! table ([`LocalTable`]).

use crate::dataplane::{PinDir, monotonic_ns, open_pinned};
use anyhow::Result;
use aya::maps::{HashMap, MapData};
use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};
use sticky_lb_common::{
    BackendId, Family, ServiceId, StickEntry, StickEvent, StickKey, addr, map_names,
};

/// A shared service as this node has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub id: ServiceId,
    pub name: String,
    pub family: Family,
    /// The client mask, network order words (as `Service::client_mask`).
    pub client_mask: [u32; 4],
    /// The stick timeout (ns): Redis keys live this long after their last refresh.
    pub timeout_ns: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    pub id: BackendId,
    pub name: String,
    /// Up or draining: it keeps the clients stuck to it (the data path honours an entry naming
    /// it).
    pub serves: bool,
}

/// Names and ids of the shared services, as the controller's last applied state has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    pub services: Vec<ServiceView>,
}

impl Directory {
    pub fn by_id(&self, id: ServiceId) -> Option<&ServiceView> {
        self.services.iter().find(|s| s.id == id)
    }

    pub fn by_name(&self, name: &str) -> Option<&ServiceView> {
        self.services.iter().find(|s| s.name == name)
    }
}

impl ServiceView {
    pub fn backend_name(&self, id: BackendId) -> Option<&str> {
        self.backends
            .iter()
            .find(|b| b.id == id)
            .map(|b| b.name.as_str())
    }

    pub fn backend_named(&self, name: &str) -> Option<&BackendView> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// The stick key of `client` (masked here, whatever the sender masked); `None` for a client
    /// of the other family.
    pub fn key(&self, client: IpAddr) -> Option<StickKey> {
        let client = client.to_canonical();
        (Family::of(&client) == self.family).then(|| StickKey {
            service: self.id,
            client: addr::masked(addr::words(&client), self.client_mask),
        })
    }

    /// The client of a stick key as the Redis key names it: the masked address.
    pub fn client(&self, key: &StickKey) -> IpAddr {
        addr::from_words(self.family, key.client)
    }

    pub fn timeout_ms(&self) -> u64 {
        (self.timeout_ns / 1_000_000).max(1)
    }
}

/// Wall-clock time in Unix ms.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The Unix time (ms) of a CLOCK_MONOTONIC_COARSE reading (ns).
pub fn unix_ms_of(monotonic: u64) -> u64 {
    unix_ms().saturating_sub(monotonic_ns().saturating_sub(monotonic) / 1_000_000)
}

/// What a stick event says, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub service: String,
    pub client: IpAddr,
    pub backend: String,
    /// The backend the client was moved off (a redispatch).
    pub previous: Option<String>,
    pub created_ms: u64,
    pub ttl_ms: u64,
}

/// A data-path event by name; `None` when its service is not shared (any more) or its backend
/// has no name here (removed since).
pub fn placed(directory: &Directory, event: &StickEvent) -> Option<Placed> {
    let service = directory.by_id(event.service)?;
    Some(Placed {
        service: service.name.clone(),
        client: addr::from_words(service.family, event.client),
        backend: service.backend_name(event.backend)?.to_string(),
        previous: service.backend_name(event.previous).map(str::to_string),
        created_ms: unix_ms_of(event.created_ns),
        ttl_ms: service.timeout_ms(),
    })
}

/// What writing a learned placement did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learned {
    /// Written (absent before, or naming another backend: the cluster's choice replaces it).
    Written,
    /// The entry already named that backend; its last-seen time was left alone.
    Same,
    /// Not written: the service is not shared here, the client is of the other family, or the
    /// backend is unknown here or does not take stuck clients here (down or disabled on this
    /// node); the local choice stands.
    Ignored,
}

/// The pinned stick table, for the shared table's writes.
pub struct LocalTable {
    pub stick: HashMap<MapData, StickKey, StickEntry>,
}

impl LocalTable {
    pub fn open(pins: &PinDir) -> Result<LocalTable> {
        Ok(LocalTable {
            stick: open_pinned(pins, map_names::STICK)?,
        })
    }

    /// Writes what the cluster decided for `client` of `service`: on `backend`, placed at
    /// `created_ms`, its Redis key living `ttl_ms` more. The entry's last-seen time is set so it
    /// expires here when the key expires in Redis. A connection already open on another backend
    /// stays there: the connection table, not the stick table, keeps a connection's backend.
    pub fn learn(
        &mut self,
        directory: &Directory,
        service: &str,
        client: IpAddr,
        backend: &str,
        created_ms: u64,
        ttl_ms: u64,
    ) -> Learned {
        let Some(view) = directory.by_name(service) else {
            return Learned::Ignored;
        };
        let Some(key) = view.key(client) else {
            return Learned::Ignored;
        };
        let Some(target) = view.backend_named(backend).filter(|b| b.serves) else {
            return Learned::Ignored;
        };
        let current = self.stick.get(&key, 0).ok();
        if current.is_some_and(|c| c.backend == target.id) {
            return Learned::Same;
        }
        let now = monotonic_ns();
        let idle_ns = view
            .timeout_ns
            .saturating_sub(ttl_ms.saturating_mul(1_000_000))
            .min(view.timeout_ns.saturating_sub(1));
        let age_ns = unix_ms()
            .saturating_sub(created_ms)
            .saturating_mul(1_000_000);
        let entry = StickEntry {
            backend: target.id,
            // Even, and not the version a CPU may still hold for the entry it replaces.
            version: current.map_or(0, |c| c.version.wrapping_add(2) & !1),
            last_seen_ns: now.saturating_sub(idle_ns),
            created_ns: now.saturating_sub(age_ns),
        };
        match self.stick.insert(&key, &entry, 0) {
            Ok(()) => Learned::Written,
            Err(_) => Learned::Ignored,
        }
    }

    /// Another node uses `client`'s placement on `backend` and renewed its key for `ttl_ms`:
    /// this node's entry, if it names the same backend, lives as long (its last-seen time moves
    /// forward, never back); an absent entry is written as learned. An entry naming another
    /// backend is left alone (the claims settle that). Returns whether the table changed.
    pub fn keep_alive(
        &mut self,
        directory: &Directory,
        service: &str,
        client: IpAddr,
        backend: &str,
        created_ms: u64,
        ttl_ms: u64,
    ) -> bool {
        let Some(view) = directory.by_name(service) else {
            return false;
        };
        let (Some(key), Some(target)) = (view.key(client), view.backend_named(backend)) else {
            return false;
        };
        match self.stick.get(&key, 0) {
            Ok(current) if current.backend == target.id => {
                let idle_ns = view
                    .timeout_ns
                    .saturating_sub(ttl_ms.saturating_mul(1_000_000));
                let last_seen = monotonic_ns().saturating_sub(idle_ns);
                if last_seen <= current.last_seen_ns {
                    return false;
                }
                let entry = StickEntry {
                    last_seen_ns: last_seen,
                    ..current
                };
                self.stick.insert(&key, &entry, 0).is_ok()
            }
            Ok(_) => false,
            Err(_) => {
                self.learn(directory, service, client, backend, created_ms, ttl_ms)
                    == Learned::Written
            }
        }
    }

    /// Deletes `client`'s entry of `service`; whether there was one.
    pub fn forget(&mut self, directory: &Directory, service: &str, client: IpAddr) -> bool {
        directory
            .by_name(service)
            .and_then(|view| view.key(client))
            .is_some_and(|key| self.stick.remove(&key).is_ok())
    }

    /// Deletes every entry of `service`; how many.
    pub fn flush(&mut self, directory: &Directory, service: &str) -> Result<u64> {
        let Some(view) = directory.by_name(service) else {
            return Ok(0);
        };
        let keys: Vec<StickKey> = crate::batch::lookup_all(&self.stick, 8192)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.service == view.id)
            .collect();
        Ok(keys.iter().filter(|k| self.stick.remove(k).is_ok()).count() as u64)
    }

    /// The live entries of the shared services, with how long each has left (ms) before it
    /// expires here: what a resync pushes.
    pub fn live(&self, directory: &Directory) -> Result<Vec<(StickKey, StickEntry, u64)>> {
        let now = monotonic_ns();
        Ok(crate::batch::lookup_all(&self.stick, 8192)?
            .into_iter()
            .filter_map(|(key, entry)| {
                let view = directory.by_id(key.service)?;
                let idle = now.saturating_sub(entry.last_seen_ns);
                (idle < view.timeout_ns).then(|| (key, entry, (view.timeout_ns - idle) / 1_000_000))
            })
            .collect())
    }
}
