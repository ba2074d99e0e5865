//! A real `redis-server` (Debian's `redis-server` package, 7.0 on bookworm) run as a child
//! process inside a rig namespace, for tests of balancers that share state through Redis, and
//! `redis-cli` for the tests' own look at what is stored.
//!
//! Each [`RedisServer`] is a process of its own, listening on one address and port inside one
//! namespace, with no persistence (`--save ''`, `--appendonly no`): killed and restarted it
//! comes back empty, as a store that lost its data does. The package's own service (on
//! 127.0.0.1:6379 of the host, if the package manager started it at all) is never used: the
//! rig's namespaces cannot even reach the host's loopback.
//!
//! Clean-up: dropping the handle kills the process (SIGKILL) and reaps it, also while a failing
//! test unwinds. If the test process itself dies without unwinding, the kernel kills the server
//! too: it is started with a parent-death signal (SIGKILL) tied to the thread that started (or
//! last restarted) it, so start it on the test's own thread, not on a short-lived helper
//! thread, or it dies with that thread.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::netns::{self, in_netns};

/// The server binary, from Debian's `redis-server` package (installed by `./x setup`).
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// The client, from `redis-tools` (a dependency of `redis-server`).
pub const REDIS_CLI: &str = "/usr/bin/redis-cli";
/// Redis's usual port.
pub const REDIS_PORT: u16 = 6379;
/// How long [`RedisServer::start`] and [`RedisServer::restart`] wait for the first PONG.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one `redis-cli` run of [`RedisServer::command`] may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a killed server may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt of the start-up PING: connect and answer each within this.
const PING_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(250);
/// Pause between start-up PINGs.
const PING_RETRY: Duration = Duration::from_millis(20);
/// The RESP encoding of `PING`.
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// A `redis-server` process inside a network namespace. Dropping it kills the process.
#[derive(Debug)]
pub struct RedisServer {
    ns: String,
    addr: IpAddr,
    port: u16,
    child: Option<Child>,
    /// Working directory (nothing is written there) and the server's log.
    dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` inside namespace `ns`, listening on `addr:port` only, without
    /// persistence or protected mode, and waits (at most [`START_TIMEOUT`]) until it answers
    /// PING on that address from inside `ns`. On failure the process is killed and the error
    /// carries its log.
    pub fn start(ns: &str, addr: impl Into<IpAddr>, port: u16) -> anyhow::Result<RedisServer> {
        if !std::path::Path::new(REDIS_SERVER).exists() {
            bail!("{REDIS_SERVER} is missing: install Debian's redis-server (`./x setup` does)");
        }
        let addr = addr.into();
        let dir = std::env::temp_dir().join(format!("{ns}-redis-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut server = RedisServer {
            ns: ns.to_owned(),
            addr,
            port,
            child: None,
            dir,
        };
        server.spawn_and_wait()?;
        Ok(server)
    }

    /// Kills the process (SIGKILL: no clean-up, as in a crash) and reaps it. Does nothing if it
    /// is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            reap(&mut child, REAP_TIMEOUT);
        }
    }

    /// Starts the server again with the same arguments, killing it first if it still runs, and
    /// waits for it as [`RedisServer::start`] does. It comes back empty (nothing is persisted).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait()
    }

    /// Whether the process is still running (it is reaped if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while it runs (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `redis://ADDR:PORT/` (e.g. `redis://198.18.0.250:6379/`), for a balancer's config.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr())
    }

    /// The address and port it listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// One PING from inside the server's own namespace, answered within `timeout`.
    pub fn ping(&self, timeout: Duration) -> anyhow::Result<()> {
        ping_from(&self.ns, self.addr(), timeout)
    }

    /// Runs `redis-cli -e -h ADDR -p PORT ARGS...` inside the server's namespace and returns its
    /// output without the final line end (raw format: `OK`, `v`, `0`; an empty string for a
    /// missing key; one line per element of an array). An error reply (`-e`), a server that
    /// cannot be reached or a run longer than 5 s is an error.
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let (addr, port) = (self.addr.to_string(), self.port.to_string());
        let output = in_netns(&self.ns, || {
            netns::run_command_within(
                Command::new(REDIS_CLI)
                    .args(["-e", "-h", &addr, "-p", &port])
                    .args(args),
                None,
                COMMAND_TIMEOUT,
            )
        })?;
        let output = output.strip_suffix('\n').unwrap_or(&output);
        Ok(output.to_owned())
    }

    /// The server's own log (stdout and stderr, every start of this handle).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Spawns the process inside the namespace and waits for its first PONG.
    fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        let log_err = log.try_clone()?;
        let mut command = Command::new(REDIS_SERVER);
        command
            .args(["--bind", &self.addr.to_string()])
            .args(["--port", &self.port.to_string()])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .args(["--daemonize", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // A child starts in the network namespace of the thread that forks it.
        let child = in_netns(&self.ns, || command.spawn())
            .with_context(|| format!("starting {REDIS_SERVER} in {}", self.ns))?;
        self.child = Some(child);
        if let Err(err) = self.wait_ready(START_TIMEOUT) {
            self.kill();
            return Err(err.context(format!(
                "redis-server on {} in {} did not come up; its log:\n{}",
                self.addr(),
                self.ns,
                self.log_text()
            )));
        }
        Ok(())
    }

    /// PINGs until PONG, the process exits, or `within` passes.
    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        // Bounded twice: by the deadline, and by the count (each round takes at least
        // PING_RETRY).
        let rounds = within.as_millis() / PING_RETRY.as_millis() + 1;
        let mut last = anyhow::anyhow!("never tried");
        for _ in 0..rounds {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server exited with {status}");
            }
            match self.ping(PING_ATTEMPT_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(err) => last = err,
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(PING_RETRY);
        }
        Err(last.context(format!("no PONG within {within:?}")))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server log ({} {}) ---\n{}",
                self.ns,
                self.addr(),
                self.log_text()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One PING to the Redis server at `server`, from inside namespace `ns` (e.g. a balancer's), in
/// plain RESP over a fresh TCP connection: connect, send, and read `+PONG` each within
/// `timeout`. Runs on the calling thread, moved into `ns` for the duration.
pub fn ping_from(ns: &str, server: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    in_netns(ns, || ping_here(server, timeout)).with_context(|| format!("PING {server} from {ns}"))
}

fn ping_here(server: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect_timeout(&server, timeout)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(PING)?;
    let mut answer = [0u8; 16];
    let mut len = 0;
    // At most `answer.len()` reads of at least one byte each.
    while len < answer.len() && !answer[..len].ends_with(b"\r\n") {
        match stream.read(&mut answer[len..])? {
            0 => break,
            n => len += n,
        }
    }
    if &answer[..len] != b"+PONG\r\n" {
        bail!(
            "answer to PING is {:?}, not +PONG",
            String::from_utf8_lossy(&answer[..len])
        );
    }
    Ok(())
}

/// Waits for a killed child, at most `within` (SIGKILL is not ignorable, so this normally
/// returns at once).
fn reap(child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    let rounds = within.as_millis() / 10 + 1;
    for _ in 0..rounds {
        if !matches!(child.try_wait(), Ok(None)) || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
