//! Atomic operations on map values shared by all CPUs. core's atomic types lack these on the BPF
//! target; the intrinsics lower to BPF's atomic instructions (BPF_ADD, BPF_CMPXCHG: the program
//! is built for BPF ISA v3, kernel 5.12 or later).

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

/// Adds `delta` to the i64 at `counter`.
///
/// # Safety
/// `counter` points at an aligned i64 in a map value.
#[inline(always)]
pub unsafe fn add(counter: *mut i64, delta: i64) {
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(counter, delta) };
}

/// Replaces the u64 at `word` with `new` if it still holds `expected`. Returns `Ok(())` if this
/// CPU made the change, or `Err(current)` with the value another CPU stored first.
///
/// # Safety
/// `word` points at an aligned u64 in a map value.
#[inline(always)]
pub unsafe fn compare_exchange(word: *mut u64, expected: u64, new: u64) -> Result<(), u64> {
    let (current, swapped) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word, expected, new,
        )
    };
    if swapped { Ok(()) } else { Err(current) }
}

/// Reads the u64 at `word` once (the compiler may neither repeat nor drop the load).
///
/// # Safety
/// `word` points at an aligned u64 in a map value.
#[inline(always)]
pub unsafe fn load(word: *const u64) -> u64 {
    unsafe { core::ptr::read_volatile(word) }
}
