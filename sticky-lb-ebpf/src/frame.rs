//! Reading and writing packet bytes with the bounds checks the verifier demands: both XDP
//! programs (the balancer and `decap`) use these.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

/// Pointer to a `T` at `offset` bytes into the frame, if the frame holds all of it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The 16 address bytes at `bytes` (inside the packet) as map words.
#[inline(always)]
pub unsafe fn read_addr(bytes: *const u8) -> [u32; 4] {
    unsafe {
        [
            read_word(bytes),
            read_word(bytes.add(4)),
            read_word(bytes.add(8)),
            read_word(bytes.add(12)),
        ]
    }
}

/// The 4 packet bytes at `bytes` as one native-endian word, read with one 32-bit load.
///
/// `bytes` is not 4-byte aligned: after 14 bytes of Ethernet an address sits 2 bytes off a word
/// boundary. An unaligned read would be split by LLVM into four byte loads and the shifts to join
/// them (about 60 more instructions for an IPv6 packet's two addresses); the typed read gives one
/// load, which the verifier accepts because packet loads need alignment only when a program asks
/// for strict alignment or the architecture lacks efficient unaligned access (x86-64 and arm64,
/// the ones sticky-lb runs on, have it). Katran's `s6_addr32` copies do the same. Not done with
/// the `allows-misaligned-mem-access` target feature: that lets LLVM also merge stack stores
/// into misaligned wider ones, which the verifier always refuses.
#[inline(always)]
pub unsafe fn read_word(bytes: *const u8) -> u32 {
    unsafe { core::ptr::read_volatile(bytes as *const u32) }
}

/// Stores one native-endian word at `bytes` (inside the packet) with one 32-bit store; the
/// counterpart of [`read_word`], with the same reasoning about alignment.
#[inline(always)]
pub unsafe fn write_word(bytes: *mut u8, word: u32) {
    unsafe { core::ptr::write_volatile(bytes as *mut u32, word) }
}
