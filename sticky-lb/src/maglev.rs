//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4), with weights.
//!
//! Each backend derives a permutation of the table's slots from its *name* (an offset and a skip,
//! both from hashes of the name), and backends take turns claiming their next preferred free slot
//! until the table is full. Because a backend's preferences depend only on its name, adding or
//! removing one of N backends moves about 1/N of the slots and leaves the rest where they were.
//! The data path indexes the table with a hash of the client address.
//!
//! Weights: in round r a backend claims a slot only while it has claimed fewer than
//! r * weight / max_weight slots, so shares follow weights (the approach Envoy and Cilium use).

use sticky_lb_common::{BackendId, NO_BACKEND};

/// A backend as Maglev sees it: its id (what the table stores), its name (what its permutation is
/// derived from, so ids can change without moving clients) and its weight.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    pub id: BackendId,
    pub name: &'a str,
    pub weight: u32,
}

/// A filled Maglev lookup table: slot -> backend id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    slots: Vec<BackendId>,
}

impl Table {
    /// Builds a table of `size` slots (must be prime, so every skip generates a full permutation)
    /// from the members with a non-zero weight. With no such member every slot is [`NO_BACKEND`].
    pub fn build(size: u32, members: &[Member<'_>]) -> Table {
        assert!(is_prime(size), "Maglev table size {size} is not prime");
        let m = size as u64;
        let mut members: Vec<&Member<'_>> = members.iter().filter(|b| b.weight > 0).collect();
        // The result must not depend on the order the caller lists backends in.
        members.sort_by(|a, b| a.name.cmp(b.name));
        let mut slots = vec![NO_BACKEND; size as usize];
        if members.is_empty() {
            return Table { slots };
        }
        let max_weight = members.iter().map(|b| b.weight as u64).max().unwrap_or(1);
        let perms: Vec<(u64, u64)> = members
            .iter()
            .map(|b| {
                let offset = name_hash(b.name, 0x5bd1_e995) % m;
                let skip = name_hash(b.name, 0x1b87_3593) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; members.len()];
        let mut claimed = vec![0u64; members.len()];
        let mut filled = 0u64;
        let mut round = 0u64;
        while filled < m {
            round += 1;
            for (i, member) in members.iter().enumerate() {
                // Weighted turn: a backend takes a slot this round only while it is behind its
                // share (claimed / weight < round / max_weight).
                if claimed[i] * max_weight >= round * member.weight as u64 {
                    continue;
                }
                let (offset, skip) = perms[i];
                // Walk this backend's permutation to its next free slot. The permutation covers
                // every slot exactly once, so this ends while any slot is free.
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if slots[slot] == NO_BACKEND {
                        slots[slot] = member.id;
                        claimed[i] += 1;
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    break;
                }
            }
        }
        Table { slots }
    }

    pub fn slots(&self) -> &[BackendId] {
        &self.slots
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The backend a client hash maps to, as the data path computes it.
    pub fn lookup(&self, hash: u32) -> BackendId {
        self.slots[(hash as usize) % self.slots.len()]
    }

    /// How many slots each backend holds.
    pub fn shares(&self) -> std::collections::HashMap<BackendId, usize> {
        let mut shares = std::collections::HashMap::new();
        for &id in &self.slots {
            *shares.entry(id).or_insert(0) += 1;
        }
        shares
    }
}

/// 64-bit FNV-1a of the name with a seed, finished with a murmur3 64-bit mix so short names that
/// differ in one character still land far apart. Fixed constants, no per-process key: every
/// node computes the same value.
pub fn name_hash(name: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in name.bytes() {
        h ^= byte as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// MurmurHash3's 64-bit finalizer (`fmix64`, Austin Appleby): every input bit flips each output
/// bit with probability about one half.
pub fn mix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Trial division; table sizes are at most a few million, so this is instant.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-{i}")).collect()
    }

    fn members(names: &[String], weights: impl Fn(usize) -> u32) -> Vec<Member<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| Member {
                id: i as BackendId,
                name,
                weight: weights(i),
            })
            .collect()
    }

    /// Fraction of slots whose backend differs between two tables.
    fn moved(a: &Table, b: &Table) -> f64 {
        let moved = a
            .slots()
            .iter()
            .zip(b.slots())
            .filter(|(x, y)| x != y)
            .count();
        moved as f64 / a.len() as f64
    }

    #[test]
    fn every_slot_is_filled() {
        let names = names(7);
        let table = Table::build(M, &members(&names, |_| 1));
        assert!(table.slots().iter().all(|&id| id < 7));
    }

    #[test]
    fn equal_weights_share_within_one_percent() {
        for n in [2, 3, 5, 10, 33] {
            let names = names(n);
            let table = Table::build(M, &members(&names, |_| 1));
            let shares = table.shares();
            let ideal = M as f64 / n as f64;
            for id in 0..n as BackendId {
                let share = shares[&id] as f64;
                assert!(
                    (share - ideal).abs() / (M as f64) < 0.01,
                    "n={n} backend {id}: {share} slots, ideal {ideal}"
                );
            }
        }
    }

    #[test]
    fn weighted_shares_within_one_percent() {
        let names = names(3);
        let table = Table::build(M, &members(&names, |i| i as u32 + 1));
        let shares = table.shares();
        for (id, weight) in [(0u32, 1.0), (1, 2.0), (2, 3.0)] {
            let ideal = M as f64 * weight / 6.0;
            let share = shares[&id] as f64;
            assert!(
                (share - ideal).abs() / (M as f64) < 0.01,
                "backend {id}: {share} slots, ideal {ideal}"
            );
        }
    }

    #[test]
    fn zero_weight_gets_nothing_and_empty_pool_is_empty() {
        let names = names(3);
        let table = Table::build(M, &members(&names, |i| if i == 1 { 0 } else { 1 }));
        assert!(!table.shares().contains_key(&1));
        let table = Table::build(M, &members(&names, |_| 0));
        assert!(table.slots().iter().all(|&id| id == NO_BACKEND));
    }

    #[test]
    fn adding_one_of_n_moves_at_most_one_nth_plus_one_percent() {
        for n in [3, 5, 10, 20] {
            let all = names(n);
            let before = Table::build(M, &members(&all[..n - 1], |_| 1));
            let after = Table::build(M, &members(&all, |_| 1));
            let moved = moved(&before, &after);
            assert!(
                moved <= 1.0 / n as f64 + 0.01,
                "n={n}: {moved:.4} of slots moved"
            );
            // Every moved slot went to the new backend: nobody else was reshuffled more than
            // Maglev's small tolerance allows.
            assert!(moved > 0.0);
        }
    }

    #[test]
    fn removing_one_of_n_moves_at_most_one_nth_plus_one_percent() {
        for n in [3, 5, 10, 20] {
            let all = names(n);
            let before = Table::build(M, &members(&all, |_| 1));
            // Remove a backend from the middle so order-dependence would show.
            let remaining: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != n / 2)
                .map(|(_, s)| s.clone())
                .collect();
            let rem_members: Vec<Member<'_>> = remaining
                .iter()
                .map(|name| Member {
                    id: all.iter().position(|a| a == name).unwrap() as BackendId,
                    name,
                    weight: 1,
                })
                .collect();
            let after = Table::build(M, &rem_members);
            let moved = moved(&before, &after);
            assert!(
                moved <= 1.0 / n as f64 + 0.01,
                "n={n}: {moved:.4} of slots moved"
            );
            // Slots that did not belong to the removed backend mostly stay.
            for (a, b) in before.slots().iter().zip(after.slots()) {
                if *a == (n / 2) as BackendId {
                    assert_ne!(*b, *a);
                }
            }
        }
    }

    #[test]
    fn order_of_members_does_not_matter() {
        let names = names(5);
        let forward = members(&names, |_| 1);
        let mut backward = forward.clone();
        backward.reverse();
        assert_eq!(Table::build(M, &forward), Table::build(M, &backward));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(2));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
        assert!(!is_prime(65535));
    }
}
