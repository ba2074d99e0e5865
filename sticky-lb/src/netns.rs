//! `--netns NAME`: run in a named network namespace (one made by `ip netns add`).
//!
//! The process joins it itself with setns(2) instead of running under `ip netns exec`, which
//! would also give it a private /sys mount: pins made there would be invisible to the host and to
//! the next controller.

use anyhow::{Context, Result, bail};
use std::os::fd::AsRawFd;

/// Moves the calling thread into /run/netns/NAME. Call it before any other thread starts: new
/// threads inherit the namespace of the thread that creates them.
pub fn enter(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("'{name}' is not a network namespace name");
    }
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path)
        .with_context(|| format!("no network namespace '{name}' ({path})"))?;
    // SAFETY: a valid namespace fd; CLONE_NEWNET checks it is a network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("joining network namespace '{name}'"));
    }
    Ok(())
}
