//! Packet-rate load from BPF_PROG_TEST_RUN's XDP live-frames mode: the kernel runs an XDP
//! program on a frame `repeat` times as if it had arrived on a chosen interface, and really
//! transmits what the program returns `XDP_TX` for. That drives the balancer's interface at
//! packet rates no socket client reaches, with no packet generator (the rig's kernel has neither
//! pktgen nor a spare NIC).
//!
//! aya 0.16 offers the flag (`TestRunAttrs::xdp_live_frames`), but its `test_run` needs an
//! `Xdp` it loaded itself; here the program is the one the running `sticky-lb` attached (found
//! through its pinned link) and a two-instruction `XDP_TX` program as the baseline, so both are
//! driven by the same raw `bpf(2)` calls. A two-instruction `XDP_DROP` program on the veth peer
//! then takes the transmitted frames off the wire at once, so the measured time is the sending
//! side's (program and transmit), not the rig's whole TCP stack answering every SYN.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sticky_lb::prog_run::{self, BPF_F_TEST_XDP_LIVE_FRAMES, TestRunAttr};

/// bpf(2) commands and constants (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// The kernel's upper bound for `batch_size` (TEST_XDP_MAX_BATCH).
pub const MAX_BATCH: u32 = 256;
pub const XDP_DROP: u32 = 1;
pub const XDP_TX: u32 = 3;

/// `union bpf_attr`, the BPF_PROG_LOAD member, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr`, the BPF_LINK_CREATE member; the tail (per link type) stays zero.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    tail: [u64; 4],
}

/// `struct xdp_md`, the context a test run may pass in.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr member of the size passed; the
    // pointers inside it point to live buffers of the lengths given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads `r0 = action; exit`: the cheapest XDP program returning `action` (`XDP_TX` is the
/// floor sticky-lb is compared with, `XDP_DROP` the sink on the peer).
pub fn load_xdp_action(action: u32, name: &str) -> Result<OwnedFd> {
    // struct bpf_insn: opcode, dst/src registers, offset, immediate (little-endian here).
    let imm = action.to_le_bytes();
    let insns: [[u8; 8]; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K: r0 = action
        [0xb7, 0x00, 0, 0, imm[0], imm[1], imm[2], imm[3]],
        // BPF_JMP | BPF_EXIT
        [0x95, 0x00, 0, 0, 0, 0, 0, 0],
    ];
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    let len = name.len().min(15);
    prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        // What libbpf sets for SEC("xdp"); needed to attach it through a link.
        expected_attach_type: BPF_XDP,
        ..ProgLoadAttr::default()
    };
    let fd =
        sys_bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("BPF_PROG_LOAD of {name}"))?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Attaches `program` in driver (native) mode to interface `ifindex` of the calling thread's
/// namespace through a bpf_link; closing the returned descriptor detaches it, so nothing
/// outlives this process.
pub fn attach_xdp_native(program: &impl AsFd, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
        ..LinkCreateAttr::default()
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)
        .with_context(|| format!("BPF_LINK_CREATE (XDP, native) on ifindex {ifindex}"))?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// The program attached through the link pinned at `link_pin` (a running `sticky-lb`'s).
pub fn program_of_pinned_link(link_pin: &Path) -> Result<aya::programs::ProgramFd> {
    use aya::programs::links::{FdLink, PinnedLink};
    let link = PinnedLink::from_pin(link_pin)
        .with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
    let id = FdLink::from(link).info()?.program_id();
    for program in aya::programs::loaded_programs() {
        let program = program?;
        if program.id() == id {
            return Ok(program.fd()?);
        }
    }
    bail!("program {id} of {} is not loaded", link_pin.display())
}

/// One live-frames call: what the kernel reports.
pub struct LiveRun {
    /// The program's return value for the last frame.
    pub retval: u32,
    /// Time per frame as the kernel measured it (program, transmit and the softirq work the
    /// transmits trigger on this CPU).
    pub per_frame: Duration,
}

/// Runs `program` on `frame` `repeat` times in live-frames mode as if received on interface
/// `ifindex` of the calling thread's network namespace (so call it from a thread inside the
/// balancer's namespace): `XDP_TX` really sends the frames out of that interface.
pub fn run_live(
    program: &impl AsFd,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
    batch_size: u32,
) -> Result<LiveRun> {
    if batch_size == 0 || batch_size > MAX_BATCH {
        bail!("batch size {batch_size} is not in 1..={MAX_BATCH}");
    }
    // The kernel wants the context to describe the frame exactly: no metadata, data at 0.
    let mut ctx = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..XdpMd::default()
    };
    let mut attr = TestRunAttr::new(program.as_fd(), frame, &mut []);
    // Live mode takes no output buffer.
    attr.data_out = 0;
    attr.repeat = repeat;
    attr.ctx_size_in = size_of::<XdpMd>() as u32;
    attr.ctx_in = (&mut ctx as *mut XdpMd) as u64;
    attr.flags = BPF_F_TEST_XDP_LIVE_FRAMES;
    attr.batch_size = batch_size;
    // SAFETY: frame and context live across the call.
    unsafe { prog_run::test_run(&mut attr) }.context("BPF_PROG_TEST_RUN (XDP live frames)")?;
    Ok(LiveRun {
        retval: attr.retval,
        per_frame: Duration::from_nanos(u64::from(attr.duration)),
    })
}

/// Runs `program` once on `frame` without live mode: the program and its maps do their work
/// (stick table, counters), but nothing is transmitted. Returns the verdict. Drives a flood of
/// frames that each differ (live mode repeats one frame) through a running balancer's program.
pub fn run_once(program: &impl AsFd, frame: &[u8]) -> Result<u32> {
    // Room for what the program hands back (it may grow the frame by a header or two).
    let mut out = [0u8; 512];
    let mut attr = TestRunAttr::new(program.as_fd(), frame, &mut out);
    // SAFETY: frame and output buffer live across the call.
    unsafe { prog_run::test_run(&mut attr) }
        .with_context(|| format!("BPF_PROG_TEST_RUN of a {}-byte frame", frame.len()))?;
    Ok(attr.retval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_match_the_kernel_layout() {
        // Offsets from include/uapi/linux/bpf.h; a wrong layout would make every call EINVAL.
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(size_of::<XdpMd>(), 24);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, flags), 12);
    }
}
