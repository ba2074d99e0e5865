//! External commands (`ip`, `nft`, `sysctl`) run inside a rig namespace with a deadline.
//!
//! The runner itself is the rig's (crate-private to `netns`, which also feeds the stdin scripts
//! the nft set-ups need); this adds the namespace check and a deadline of its own.

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::netns::{NS_PREFIX, run_command_within};

/// Upper bound for one command; they normally take milliseconds.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `ip netns exec NS args...` (stdin fed from `stdin` if given) and returns its stdout.
/// Refuses namespaces outside the rig's prefix, so a bug cannot reach the host's.
pub fn in_ns(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    check_ns(ns)?;
    run(
        Command::new("ip").args(["netns", "exec", ns]).args(args),
        stdin,
    )
}

/// Rejects a namespace name the rig would not have made.
pub fn check_ns(ns: &str) -> Result<()> {
    if !ns.starts_with(NS_PREFIX) || ns.contains('/') {
        bail!("refusing namespace {ns:?}: not a rig namespace ({NS_PREFIX}...)");
    }
    Ok(())
}

/// Runs a command to completion within [`COMMAND_TIMEOUT`] (killed after that); the error carries
/// the command line, the status and stderr.
pub fn run(command: &mut Command, stdin: Option<&str>) -> Result<String> {
    run_command_within(command, stdin, COMMAND_TIMEOUT)
}
