//! Network-namespace plumbing for the test rig: owned namespaces that are
//! deleted on drop, running commands inside them, and moving a thread into one.
//!
//! Safety rails: every namespace this module creates or enters must be named
//! `slb-...` ([`NS_PREFIX`]), so a bug in a test can never reach into (or
//! delete) a namespace it did not create, and external commands are killed
//! if they exceed a deadline, so nothing here can hang a test run.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Every namespace the rig creates or enters starts with this prefix.
pub const NS_PREFIX: &str = "slb-";

/// Upper bound for any single external command (`ip`, `ethtool`, `sysctl`).
/// They normally finish in milliseconds; this only guards against a hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A named network namespace (`/run/netns/NAME`) owned by this value:
/// created by [`NetNs::new`], deleted when dropped (also while unwinding).
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `ip netns add NAME`.
    ///
    /// `name` must start with [`NS_PREFIX`] and be a plain file name.
    pub fn new(name: impl Into<String>) -> anyhow::Result<NetNs> {
        let name = name.into();
        check_ns_name(&name)?;
        run_command(Command::new("ip").args(["netns", "add", &name]), None)?;
        // Only now do we own it: a failed `ip netns add` (e.g. the name exists
        // already) must not make us delete someone else's namespace.
        Ok(NetNs { name })
    }

    /// The namespace name, as used by `ip -n NAME` / `ip netns exec NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip netns exec NAME args...` and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        run_command(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(args),
            None,
        )
    }

    /// Runs `ip -n NAME args...` (no fork into the namespace needed) and
    /// returns its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_command(Command::new("ip").args(["-n", &self.name]).args(args), None)
    }

    /// Runs `ip -n NAME -batch -` with `script` (one `ip` command per line)
    /// on stdin: one process for many commands, e.g. hundreds of addresses.
    pub fn ip_batch(&self, script: &str) -> anyhow::Result<String> {
        run_command(
            Command::new("ip").args(["-n", &self.name, "-batch", "-"]),
            Some(script),
        )
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also destroys the veths inside it (and thus
        // their peers elsewhere). Errors are ignored: there is nothing better
        // to do in a destructor, and panicking here could abort an unwind.
        let _ = run_command(Command::new("ip").args(["netns", "del", &self.name]), None);
    }
}

/// Rejects names outside the rig's prefix or that are not a plain file name
/// under /run/netns.
fn check_ns_name(name: &str) -> anyhow::Result<()> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !name.starts_with(NS_PREFIX) || name.len() <= NS_PREFIX.len() || !plain {
        bail!(
            "refusing namespace name {name:?}: rig namespaces must be `{NS_PREFIX}[A-Za-z0-9._-]+`"
        );
    }
    Ok(())
}

/// Runs a command within [`COMMAND_TIMEOUT`]; see [`run_command_within`].
pub(crate) fn run_command(command: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    run_command_within(command, stdin, COMMAND_TIMEOUT)
}

/// Runs a command to completion within `timeout` (killed after that) and
/// returns its stdout; the error carries the command line, exit status and
/// stderr. `stdin`, when given, is fed to the command's standard input.
pub(crate) fn run_command_within(
    command: &mut Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let command_line = format!("{command:?}");
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command_line}"))?;

    // Pipes are drained on helper threads so a chatty command (or a large
    // stdin script) cannot deadlock against us while we wait for it.
    let stdin_writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_owned();
            // A write error means the command exited early; its exit status
            // and stderr tell the real story, so the error is dropped here.
            Some(std::thread::spawn(move || {
                drop(pipe.write_all(text.as_bytes()))
            }))
        }
        _ => None,
    };
    let stdout_reader = drain_on_thread(child.stdout.take());
    let stderr_reader = drain_on_thread(child.stderr.take());

    // Bounded wait: poll with a growing sleep (fast commands return quickly,
    // slow ones do not spin), kill the child when the deadline passes.
    let deadline = Instant::now() + timeout;
    let mut nap = Duration::from_micros(500);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // `Child::kill` only signals our own, not yet reaped child.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };

    if let Some(writer) = stdin_writer {
        let _ = writer.join();
    }
    let stdout = stdout_reader.join().unwrap_or_default();
    let stderr = stderr_reader.join().unwrap_or_default();
    match status {
        None => bail!(
            "{command_line} did not finish within {timeout:?}; stderr: {}",
            stderr.trim()
        ),
        Some(status) if !status.success() => {
            bail!(
                "{command_line} failed ({status}); stderr: {}",
                stderr.trim()
            )
        }
        Some(_) => Ok(stdout),
    }
}

/// Reads a child's pipe to the end on a separate thread.
fn drain_on_thread(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Moves the calling thread into the named namespace. Only the network
/// namespace of this one thread changes; the rest of the process stays put.
pub(crate) fn enter_netns(name: &str) -> anyhow::Result<()> {
    check_ns_name(name)?;
    let path = format!("/run/netns/{name}");
    let target = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    setns_net(&target).with_context(|| format!("setns into {path}"))
}

fn setns_net(ns_file: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open namespace file descriptor.
    let rc = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts the thread back into its original namespace when dropped, so that
/// [`in_netns`] restores it even if the closure panics.
struct RestoreNetns {
    original: File,
}

impl Drop for RestoreNetns {
    fn drop(&mut self) {
        if let Err(err) = setns_net(&self.original) {
            // The thread would keep running inside a rig namespace, silently
            // sending later work to the wrong place; stopping is the only
            // safe option (a panic here could itself abort mid-unwind).
            eprintln!("sticky-lb tests: cannot restore the thread's network namespace: {err}");
            std::process::abort();
        }
    }
}

/// Runs `f` on the current thread inside network namespace `name`
/// (`/run/netns/NAME`), then moves the thread back where it was.
///
/// Sockets keep the namespace they were created in, so sockets created by
/// `f` stay usable afterwards. Panics if the namespace cannot be entered.
pub fn in_netns<T>(name: &str, f: impl FnOnce() -> T) -> T {
    // Opened before switching: it is the way back.
    let original = File::open("/proc/thread-self/ns/net")
        .expect("cannot open /proc/thread-self/ns/net (the current network namespace)");
    if let Err(err) = enter_netns(name) {
        panic!("cannot enter network namespace {name}: {err:#}");
    }
    let _restore = RestoreNetns { original };
    f()
}

/// Spawns a thread that first enters namespace `name` and then runs `f`.
/// The thread ends in that namespace, so nothing is restored. If the
/// namespace cannot be entered the thread panics (seen by `join`).
pub fn spawn_in_netns<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(format!("netns {name}"))
        .spawn(move || {
            if let Err(err) = enter_netns(&name) {
                panic!("cannot enter network namespace {name}: {err:#}");
            }
            f()
        })
        .expect("cannot spawn a thread")
}

/// Panics with a plain explanation unless running as root: namespaces, veths
/// and XDP all need it, and the raw EPERM failures would be confusing.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests need root (network namespaces, XDP): run them with the README's test command as root"
        );
    }
}

/// A short tag unique within this machine for the lifetime of the process:
/// up to 10 characters of the test name, the pid and a process-wide counter,
/// e.g. `failover-4242-3`. Rig namespaces are `slb-{tag}-{role}`.
pub fn unique_tag(test: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let counter = NEXT.fetch_add(1, Ordering::Relaxed);
    let short: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(10)
        .collect();
    let short = if short.is_empty() {
        "t".to_owned()
    } else {
        short
    };
    format!("{short}-{}-{counter}", std::process::id())
}

/// Namespaces currently listed by `ip netns list` whose name contains `needle` (tests use it to
/// prove their guards removed everything).
pub fn listed_namespaces(needle: &str) -> Vec<String> {
    let output = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.contains(needle))
        .map(str::to_owned)
        .collect()
}
