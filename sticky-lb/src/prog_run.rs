//! BPF_PROG_TEST_RUN as a raw bpf(2) call, for a program known only by its descriptor: the data
//! path's `expire_flow` (run on the sweep's thread), or a running balancer's program found
//! through its pinned link (the benchmarks and the flood test). aya's `TestRun` needs the program
//! object it loaded itself.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Flag: run XDP in live-frames mode, really transmitting what the program returns XDP_TX for.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `union bpf_attr`'s `test` member (linux/bpf.h), up to `batch_size`.
#[repr(C)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    /// Explicit, so it is zero: the kernel refuses (EINVAL) an attr whose bytes past the last
    /// field it knows are not zero, and implicit padding may hold anything.
    _pad: u32,
}

impl TestRunAttr {
    /// One run of program `prog_fd` on `data_in`, its output into `data_out`; every other field
    /// zero (set them after).
    pub fn new(prog_fd: BorrowedFd<'_>, data_in: &[u8], data_out: &mut [u8]) -> TestRunAttr {
        TestRunAttr {
            prog_fd: prog_fd.as_raw_fd() as u32,
            retval: 0,
            data_size_in: data_in.len() as u32,
            data_size_out: data_out.len() as u32,
            data_in: data_in.as_ptr() as u64,
            data_out: data_out.as_mut_ptr() as u64,
            repeat: 1,
            duration: 0,
            ctx_size_in: 0,
            ctx_size_out: 0,
            ctx_in: 0,
            ctx_out: 0,
            flags: 0,
            cpu: 0,
            batch_size: 0,
            _pad: 0,
        }
    }
}

/// Runs BPF_PROG_TEST_RUN; the kernel writes `retval`, `duration` and the output sizes into
/// `attr`. Errors are the syscall's (EINVAL for a malformed attr or context).
///
/// # Safety
/// Every pointer in `attr` points at a live buffer of the size it gives, writable for the
/// output ones, for the duration of the call.
pub unsafe fn test_run(attr: &mut TestRunAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for this command (its padding is an explicit
    // zero field); the caller vouches for the buffers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr as *mut TestRunAttr,
            size_of::<TestRunAttr>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_matches_the_kernel_layout() {
        // Offsets from include/uapi/linux/bpf.h; a wrong layout would make every call EINVAL.
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(std::mem::offset_of!(TestRunAttr, repeat), 32);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
    }
}
