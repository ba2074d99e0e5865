//! External commands (`ip`, `nft`, `sysctl`) run inside a rig namespace with a deadline.
//!
//! The rig's own runner is crate-private to `netns`; this one adds nothing but the namespace
//! check and the stdin script the nft set-ups need.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NS_PREFIX;

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
    let line = format!("{command:?}");
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {line}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Scripts are a few hundred bytes, far below a pipe's buffer: this cannot block. A
        // failed write means the command died; its status and stderr say why.
        let _ = pipe.write_all(text.as_bytes());
    }
    // Drained on threads so a chatty command cannot fill its pipe and stall against us.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        None => bail!("{line} did not finish within {COMMAND_TIMEOUT:?}"),
        Some(status) if !status.success() => bail!("{line} failed ({status}): {}", stderr.trim()),
        Some(_) => Ok(stdout),
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}
