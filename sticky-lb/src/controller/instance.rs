//! One controller per interface: `run` holds an exclusive lock on
//! `/run/sticky-lb/[<netns>/]<interface>.lock` (flock(2), released by the kernel when the process
//! ends, however it ends) with its pid inside. A second `run` refuses before touching anything.

use anyhow::{Context, Result, bail};
use std::{
    fs::File,
    io::{Read, Seek, Write},
    os::fd::AsRawFd,
    path::PathBuf,
};

/// The held lock; dropping it (or exiting) releases it.
pub(super) struct Lock {
    _file: File,
}

fn path(netns: Option<&str>, interface: &str) -> PathBuf {
    crate::state::path(netns, interface).with_extension("lock")
}

fn try_lock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl Lock {
    /// Takes the lock for `interface`. Errors: another controller holds it (naming its pid), or
    /// the run directory cannot be written.
    pub(super) fn acquire(netns: Option<&str>, interface: &str) -> Result<Lock> {
        let path = path(netns, interface);
        if let Some(dir) = path.parent() {
            crate::state::create_run_dir(dir)?;
        }
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !try_lock(&file).with_context(|| format!("locking {}", path.display()))? {
            match read_pid(&mut file) {
                Some(pid) => bail!(
                    "another sticky-lb controller (pid {pid}) runs on {interface}; nothing was changed"
                ),
                None => bail!(
                    "another sticky-lb controller runs on {interface} (it holds {}); nothing was changed",
                    path.display()
                ),
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Lock { _file: file })
    }
}

/// The pid of the controller running on `interface`, if one is.
pub(super) fn holder(netns: Option<&str>, interface: &str) -> Option<u32> {
    let mut file = File::options()
        .read(true)
        .write(true)
        .open(path(netns, interface))
        .ok()?;
    match try_lock(&file) {
        Ok(false) => read_pid(&mut file).or(Some(0)),
        // Free: the flock taken here is released when `file` is dropped.
        _ => None,
    }
}
