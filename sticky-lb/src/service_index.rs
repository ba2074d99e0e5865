//! The service index as the controller models it: which slot holds which service, probed exactly
//! as the data path probes (open addressing from the key's home slot, [`SERVICE_INDEX_PROBES`]
//! slots, an empty slot ends the chain, a tombstone does not). Plans are checked against a copy
//! of it before anything is written, so a service with no free slot refuses the change instead of
//! leaving half of it applied.

use sticky_lb_common::{SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS, ServiceKey, hash::service_slot};

/// What one slot of the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Empty,
    /// A removed service: probing continues past it.
    Tombstone,
    Service(ServiceKey),
}

/// Where a key is, or would go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Located {
    Found(u32),
    Free(u32),
}

/// A copy of the service index, [`SERVICE_INDEX_SLOTS`] slots.
#[derive(Clone, Debug)]
pub struct ServiceIndex {
    slots: Vec<Slot>,
}

/// The slots the data path probes for `key`, in order.
pub fn probe_sequence(key: &ServiceKey) -> impl Iterator<Item = u32> {
    let home = service_slot(&key.vip, key.port, SERVICE_INDEX_SLOTS);
    (0..SERVICE_INDEX_PROBES).map(move |probe| (home + probe) & (SERVICE_INDEX_SLOTS - 1))
}

impl ServiceIndex {
    pub fn empty() -> ServiceIndex {
        ServiceIndex {
            slots: vec![Slot::Empty; SERVICE_INDEX_SLOTS as usize],
        }
    }

    pub fn set(&mut self, slot: u32, value: Slot) {
        self.slots[slot as usize] = value;
    }

    /// Where `key` is, or the first free slot on its chain; `None` when the chain's
    /// [`SERVICE_INDEX_PROBES`] slots all hold other services.
    pub fn locate(&self, key: &ServiceKey) -> Option<Located> {
        let mut free = None;
        for slot in probe_sequence(key) {
            match self.slots[slot as usize] {
                Slot::Service(k) if k == *key => return Some(Located::Found(slot)),
                Slot::Service(_) => {}
                Slot::Tombstone => {
                    free.get_or_insert(slot);
                }
                Slot::Empty => {
                    // The data path stops probing here too.
                    return Some(Located::Free(free.unwrap_or(slot)));
                }
            }
        }
        free.map(Located::Free)
    }

    /// Puts `key` in (no-op if present). Errors: its chain is full.
    pub fn insert(&mut self, key: &ServiceKey) -> Result<u32, ChainFull> {
        match self.locate(key) {
            Some(Located::Found(slot)) => Ok(slot),
            Some(Located::Free(slot)) => {
                self.slots[slot as usize] = Slot::Service(*key);
                Ok(slot)
            }
            None => Err(ChainFull {
                home: probe_sequence(key).next().unwrap_or(0),
            }),
        }
    }

    pub fn remove(&mut self, key: &ServiceKey) {
        if let Some(Located::Found(slot)) = self.locate(key) {
            self.slots[slot as usize] = Slot::Tombstone;
        }
    }
}

/// Every slot a key may use is taken by other services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainFull {
    pub home: u32,
}

impl std::fmt::Display for ChainFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the service index has no free slot for it: the {SERVICE_INDEX_PROBES} slots from its home slot {} hold services whose VIP and port hash near it",
            self.home
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(vip: u32, port: u16) -> ServiceKey {
        ServiceKey {
            vip: [vip, 0, 0, 0],
            port,
            protocol: 6,
            family: 0,
        }
    }

    /// Keys sharing one home slot, found by search.
    pub(crate) fn colliding(n: usize) -> Vec<ServiceKey> {
        let home = probe_sequence(&key(1, 80)).next().unwrap();
        (1..)
            .map(|v| key(v, 80))
            .filter(|k| probe_sequence(k).next() == Some(home))
            .take(n)
            .collect()
    }

    #[test]
    fn a_full_chain_refuses_and_a_tombstone_frees_a_slot() {
        let keys = colliding(SERVICE_INDEX_PROBES as usize + 1);
        let mut index = ServiceIndex::empty();
        for k in &keys[..SERVICE_INDEX_PROBES as usize] {
            index.insert(k).unwrap();
        }
        assert!(index.insert(&keys[SERVICE_INDEX_PROBES as usize]).is_err());
        index.remove(&keys[1]);
        // The keys behind the tombstone are still found.
        for k in &keys[2..SERVICE_INDEX_PROBES as usize] {
            assert!(matches!(index.locate(k), Some(Located::Found(_))));
        }
        assert!(index.insert(&keys[SERVICE_INDEX_PROBES as usize]).is_ok());
    }
}
