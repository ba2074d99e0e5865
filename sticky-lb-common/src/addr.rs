//! Addresses as the maps hold them: 16 bytes in network order, read as four native-endian
//! `u32` words (the way the XDP program loads them from the packet). An IPv4 address sits in
//! word 0 with words 1..4 zero; an IPv6 address fills all four. The family is never inferred
//! from the words (an IPv6 address may have three zero words too): a service records its
//! family, and every key that holds an address belongs to one service.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Address family of a service ([`crate::Service::family`]) and of the packets it takes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
}

impl Family {
    /// The family of `addr`.
    pub const fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub const fn from_u8(v: u8) -> Family {
        match v {
            1 => Family::Ipv6,
            _ => Family::Ipv4,
        }
    }

    /// Bits in an address of this family (32 or 128): the longest prefix.
    pub const fn bits(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }

    /// The default `client_mask` prefix length: 32 for IPv4 (each client address its own
    /// entry), 64 for IPv6, because temporary "privacy" addresses (RFC 8981) change inside one
    /// /64 every few hours and a /128 key would lose the client's session each time (HAProxy's
    /// `ipmask(32,64)` makes the same choice).
    pub const fn default_client_mask(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 64,
        }
    }
}

/// `IPv4` or `IPv6`, as messages for people write it.
impl core::fmt::Display for Family {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// The map words of `addr` (network-order bytes in native-endian words).
pub const fn words(addr: &IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        IpAddr::V6(a) => words_of_bytes(a.octets()),
    }
}

/// The map words of 16 address bytes (network order).
pub const fn words_of_bytes(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The address of `family` that map words `w` hold (for IPv4 only word 0 counts).
pub const fn from_words(family: Family, w: [u32; 4]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::from_octets(w[0].to_ne_bytes())),
        Family::Ipv6 => {
            let (a, b, c, d) = (
                w[0].to_ne_bytes(),
                w[1].to_ne_bytes(),
                w[2].to_ne_bytes(),
                w[3].to_ne_bytes(),
            );
            IpAddr::V6(Ipv6Addr::from_octets([
                a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
                d[2], d[3],
            ]))
        }
    }
}

/// The mask of a prefix of `bits` bits in `family`, as map words (apply it word by word with
/// `&`). `bits` beyond the family's length count as the whole address; an IPv4 mask leaves
/// words 1..4 zero.
pub const fn prefix_mask(family: Family, bits: u8) -> [u32; 4] {
    let total = family.bits() as u32;
    let bits = if (bits as u32) > total {
        total
    } else {
        bits as u32
    };
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let start = i as u32 * 32;
        let word_bits = if bits <= start {
            0
        } else if bits >= start + 32 {
            32
        } else {
            bits - start
        };
        // The most significant `word_bits` bits set, in network byte order like the address.
        let host: u32 = if word_bits == 0 {
            0
        } else {
            u32::MAX << (32 - word_bits)
        };
        out[i] = u32::from_ne_bytes(host.to_be_bytes());
        i += 1;
    }
    out
}

/// `words` with `mask` applied word by word (the data path does exactly this to a client).
pub const fn masked(words: [u32; 4], mask: [u32; 4]) -> [u32; 4] {
    [
        words[0] & mask[0],
        words[1] & mask[1],
        words[2] & mask[2],
        words[3] & mask[3],
    ]
}

/// The number of leading one bits of a mask from [`prefix_mask`] (its prefix length).
pub const fn prefix_len(mask: [u32; 4]) -> u8 {
    let mut n = 0u32;
    let mut i = 0;
    while i < 4 {
        n += u32::from_be_bytes(mask[i].to_ne_bytes()).leading_ones();
        i += 1;
    }
    n as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(text: &str) -> IpAddr {
        IpAddr::V6(text.parse().unwrap())
    }

    #[test]
    fn words_round_trip_both_families() {
        let a = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(words(&a), [u32::from_ne_bytes([198, 18, 0, 1]), 0, 0, 0]);
        assert_eq!(from_words(Family::Ipv4, words(&a)), a);
        let b = v6("2001:db8:1:2::7");
        assert_eq!(words(&b)[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(words(&b)[3].to_ne_bytes(), [0, 0, 0, 7]);
        assert_eq!(from_words(Family::Ipv6, words(&b)), b);
    }

    #[test]
    fn prefix_masks_cover_the_leading_bits() {
        let addr = words(&v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd"));
        assert_eq!(
            from_words(Family::Ipv6, masked(addr, prefix_mask(Family::Ipv6, 64))),
            v6("2001:db8:1:2::")
        );
        assert_eq!(
            from_words(Family::Ipv6, masked(addr, prefix_mask(Family::Ipv6, 56))),
            v6("2001:db8:1::")
        );
        assert_eq!(prefix_mask(Family::Ipv6, 0), [0; 4]);
        assert_eq!(prefix_mask(Family::Ipv6, 128), [u32::MAX; 4]);
        assert_eq!(prefix_mask(Family::Ipv4, 32), [u32::MAX, 0, 0, 0]);
        assert_eq!(prefix_mask(Family::Ipv4, 200), [u32::MAX, 0, 0, 0]);
        assert_eq!(
            prefix_mask(Family::Ipv4, 24)[0].to_ne_bytes(),
            [255, 255, 255, 0]
        );
        for bits in 0..=128 {
            assert_eq!(prefix_len(prefix_mask(Family::Ipv6, bits)), bits);
        }
        for bits in 0..=32 {
            assert_eq!(prefix_len(prefix_mask(Family::Ipv4, bits)), bits);
        }
    }
}
