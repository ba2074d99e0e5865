//! Keys, counters and map names of the decapsulation program (`sticky-lb decap`), which a
//! backend of a `forwarding: tunnel` service runs instead of the balancer's program. Its maps are
//! its own: nothing here is part of the balancer's pinned layout ([`crate::LAYOUT_VERSION`]).

use crate::addr::Family;

/// A tunnel address of this host, the key of the tunnel-address map: packets whose outer
/// destination is one of these are decapsulated. `addr` holds the address bytes in network order
/// as native-endian words (see [`crate::addr`]: IPv4 in word 0, words 1..4 zero), so an IPv6
/// address whose words equal an IPv4 one's is told apart by `family`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TunnelAddr {
    pub addr: [u32; 4],
    /// A [`Family`] value, in a whole word: the key has no padding bytes that the program would
    /// have to zero (the whole key is hashed).
    pub family: u32,
}

impl TunnelAddr {
    pub const fn new(family: Family, addr: [u32; 4]) -> TunnelAddr {
        TunnelAddr {
            addr,
            family: family as u32,
        }
    }
}

/// Tunnel addresses one decap program holds at most (a host has a handful; the map is a hash, so
/// the number does not change a lookup's cost).
pub const MAX_TUNNEL_ADDRS: u32 = 64;

/// Indexes of the decap program's per-CPU counters (`slbd_stats`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Decapsulated, the inner packet IPv4 (from IPv4-in-IPv4 or IPv4-in-IPv6), passed to the
    /// kernel.
    DecapIpv4 = 0,
    /// Decapsulated, the inner packet IPv6 (from IPv6-in-IPv4 or IPv6-in-IPv6).
    DecapIpv6 = 1,
    /// Passed untouched: not a tunnel packet (not IPv4 or IPv6, another protocol than 4 or 41,
    /// an outer IPv4 fragment, an outer header that is cut short or not well formed).
    PassNotTunnel = 2,
    /// Passed untouched: a tunnel packet whose outer destination is not a tunnel address of
    /// this host.
    PassNotOurs = 3,
    /// Dropped: a tunnel packet to us whose inner packet is not of the family its protocol
    /// number says, has a bad header, or does not fit the outer packet.
    DropBadInner = 4,
    /// Aborted: removing the outer header failed after the Ethernet header was moved (cannot
    /// happen with a well-formed frame; XDP_ABORTED also fires the xdp_exception tracepoint).
    Aborted = 5,
}

/// Number of [`DecapCounter`]s, the size of the counters map.
pub const DECAP_COUNTER_COUNT: u32 = 6;

impl DecapCounter {
    pub const ALL: [DecapCounter; DECAP_COUNTER_COUNT as usize] = [
        DecapCounter::DecapIpv4,
        DecapCounter::DecapIpv6,
        DecapCounter::PassNotTunnel,
        DecapCounter::PassNotOurs,
        DecapCounter::DropBadInner,
        DecapCounter::Aborted,
    ];

    /// The counter's name as `sticky-lb decap` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            DecapCounter::DecapIpv4 => "decapsulated_ipv4",
            DecapCounter::DecapIpv6 => "decapsulated_ipv6",
            DecapCounter::PassNotTunnel => "pass_not_tunnel",
            DecapCounter::PassNotOurs => "pass_not_ours",
            DecapCounter::DropBadInner => "drop_bad_inner",
            DecapCounter::Aborted => "aborted",
        }
    }
}

/// Map names (at most 15 characters, like the balancer's).
pub mod map_names {
    pub const ADDRS: &str = "slbd_addrs";
    pub const STATS: &str = "slbd_stats";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<TunnelAddr>(), 20);
    }

    #[test]
    fn counters_are_listed_in_index_order() {
        for (i, c) in DecapCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
