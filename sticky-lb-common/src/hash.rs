//! The client hash the data path uses to index a Maglev table.
//!
//! It lives here, not in the XDP program, so the controller and the tests compute exactly the same
//! value as the kernel: a test can predict which backend a client gets without sending a packet.

/// Hash of a masked client address, salted with the service id so two services with the same
/// backends do not map every client to the same relative slot.
///
/// Murmur3-style mixing of the four address words and a murmur3 finaliser: about twenty ALU
/// instructions, no loads, no loops the verifier has to unroll beyond four steps.
#[inline(always)]
pub fn client_hash(client: &[u32; 4], service: u32) -> u32 {
    let mut h = service ^ 0x9e37_79b9;
    let mut i = 0;
    while i < 4 {
        let mut k = client[i];
        k = k.wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15);
        k = k.wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13);
        h = h.wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    fmix32(h)
}

/// Home slot of a service (VIP as map words, port as its raw network-order value) in the
/// service index of `slots` entries (a power of two).
///
/// The address words are folded by XOR before the finaliser: VIPs are chosen by the operator,
/// not by traffic, and the index compares the whole address, so the fold only has to spread a
/// few dozen VIPs; for IPv4 (words 1..4 zero) it is the word itself.
#[inline(always)]
pub fn service_slot(vip: &[u32; 4], port: u16, slots: u32) -> u32 {
    let folded = vip[0] ^ vip[1] ^ vip[2] ^ vip[3];
    fmix32(folded ^ ((port as u32) << 16) ^ 0x5bd1_e995) & (slots - 1)
}

/// Murmur3's 32-bit finaliser: every input bit affects every output bit.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differs_per_service_and_client() {
        let a = client_hash(&[0x0100_12c6, 0, 0, 0], 0);
        assert_ne!(a, client_hash(&[0x0200_12c6, 0, 0, 0], 0));
        assert_ne!(a, client_hash(&[0x0100_12c6, 0, 0, 0], 1));
        assert_eq!(a, client_hash(&[0x0100_12c6, 0, 0, 0], 0));
    }
}
