//! Internet checksums (RFC 1071) for the headers the data path writes itself: the outer IPv4
//! header of a tunnelled packet and the ICMP messages it sends back.
//!
//! The one's-complement sum is independent of byte order (RFC 1071 section 2(B)): summing the
//! 16-bit halves of words as they sit in memory and storing the folded result the same way gives
//! the right bytes on the wire, so nothing here swaps bytes.

/// Adds the two 16-bit halves of `word` (as it sits in memory) to `sum`.
#[inline(always)]
pub fn add_word(sum: u64, word: u32) -> u64 {
    sum + (word & 0xffff) as u64 + (word >> 16) as u64
}

/// Folds a running sum to 16 bits and complements it: the value to store in a checksum field
/// (in memory order, like the words summed).
#[inline(always)]
pub fn finish(mut sum: u64) -> u16 {
    // Four folds take any 64-bit sum down to 16 bits; a loop the verifier unrolls.
    let mut i = 0;
    while i < 4 {
        sum = (sum & 0xffff) + (sum >> 16);
        i += 1;
    }
    !(sum as u16)
}

/// The running sum for an incremental update of checksum field `check` (RFC 1624 eqn. 3:
/// HC' = ~(~HC + ~m + m')): start from ~HC, add each changed field with [`replace_word`] or
/// [`replace_half`], store [`finish`].
#[inline(always)]
pub fn start(check: u16) -> u64 {
    (!check) as u64
}

/// Adds the change of a 32-bit field from `old` to `new` (both as they sit in memory).
#[inline(always)]
pub fn replace_word(sum: u64, old: u32, new: u32) -> u64 {
    add_word(add_word(sum, !old), new)
}

/// Adds the change of a 16-bit field from `old` to `new` (both as they sit in memory).
#[inline(always)]
pub fn replace_half(sum: u64, old: u16, new: u16) -> u64 {
    sum + (!old) as u64 + new as u64
}
