//! The real `sticky-lb decap` run as a child process in a namespace (a backend of a tunnel-mode
//! service), stopped on drop, also when a test fails.

use crate::balancer::binary;
use anyhow::{Context, Result, bail};
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What `sticky-lb decap` logs once attached starts with this.
pub const ATTACHED: &str = "decapsulating on ";
/// How long it may take to load and attach (it takes milliseconds).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to detach and print its counters after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `sticky-lb decap`.
pub struct DecapProcess {
    child: Option<Child>,
    /// Its stderr (the log), as read so far.
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

/// How a stopped `sticky-lb decap` ended: its exit code (`None` if it had to be killed) and
/// the counters it printed, by name.
#[derive(Debug)]
pub struct Stopped {
    pub code: Option<i32>,
    pub counters: BTreeMap<String, u64>,
    pub stdout: String,
}

impl DecapProcess {
    /// Starts `sticky-lb --netns NETNS decap --interface INTERFACE ARGS...` and waits until it
    /// has attached (its log says what it decapsulates); returns it and that log line. Fails if
    /// it exits first or does not attach within 10 s.
    pub fn start(netns: &str, interface: &str, args: &[&str]) -> Result<(DecapProcess, String)> {
        let mut child = Command::new(binary())
            .args(["--netns", netns, "decap", "--interface", interface])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning sticky-lb decap")?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut process = DecapProcess {
            child: Some(child),
            log,
            reader: Some(reader),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(line) = process.log().lines().find(|l| l.contains(ATTACHED)) {
                return Ok((process, line.to_owned()));
            }
            if let Some(status) = process.child.as_mut().unwrap().try_wait()? {
                let _ = process.reader.take().map(JoinHandle::join);
                bail!(
                    "sticky-lb decap exited with {status} before attaching:\n{}",
                    process.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "sticky-lb decap did not attach within {START_TIMEOUT:?}:\n{}",
                    process.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SIGTERM, then waits up to 10 s for it to detach and exit (SIGKILL after that).
    pub fn stop(&mut self) -> Result<Stopped> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped");
        };
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        let code = loop {
            if let Some(status) = child.try_wait()? {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut stdout = String::new();
        if let Some(mut pipe) = child.stdout.take() {
            pipe.read_to_string(&mut stdout)?;
        }
        let counters = stdout
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Ok(Stopped {
            code,
            counters,
            stdout,
        })
    }
}

impl Drop for DecapProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        if std::thread::panicking() {
            eprintln!("--- sticky-lb decap log ---\n{}", self.log());
        }
    }
}
