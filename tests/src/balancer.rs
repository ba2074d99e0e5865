//! The real `sticky-lb` binary run as a child process inside a rig's balancer namespace, with a
//! guard that stops it and removes its pins and state file, also when a test fails.

use anyhow::{Context, Result, bail};
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};
use sticky_lb::{dataplane::PinDir, state};

/// The `sticky-lb` binary: `$STICKY_LB_BIN`, else next to the test executable's target dir.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STICKY_LB_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/sticky-lb
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("sticky-lb")
}

/// For a bench binary (in `target/<profile>/`, where [`binary`], made for tests in
/// `target/<profile>/deps/`, does not look): the sticky-lb binary beside it, which then is
/// what [`binary`] returns too. Call it at start-up, before any other thread exists.
///
/// Errors: no sticky-lb there and no `$STICKY_LB_BIN`.
pub fn locate_from_bench() -> anyhow::Result<PathBuf> {
    let mut path = binary();
    if !path.exists() && std::env::var_os("STICKY_LB_BIN").is_none() {
        let beside = std::env::current_exe()?.with_file_name("sticky-lb");
        if beside.exists() {
            // SAFETY: the caller runs this before it starts any other thread.
            unsafe { std::env::set_var("STICKY_LB_BIN", &beside) };
            path = beside;
        }
    }
    if !path.exists() {
        bail!(
            "sticky-lb binary not found at {} (build it with `cargo build --release -p sticky-lb` or set STICKY_LB_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `sticky-lb --netns NS ARGS...` to completion; returns (status code, stdout, stderr).
pub fn cli(netns: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("--netns")
        .arg(netns)
        .args(args)
        .output()
        .expect("running sticky-lb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `sticky-lb run`.
pub struct Balancer {
    child: Option<Child>,
    netns: String,
    interface: String,
    log: PathBuf,
    /// The pid in the state file before this controller started (a previous controller's).
    previous_pid: Option<u32>,
}

impl Balancer {
    /// Writes `config_yaml` to `dir/config.yaml`, starts the controller in `netns` and waits until
    /// it has attached (its state file appears) or gives up after 20 s.
    pub fn start(netns: &str, interface: &str, dir: &Path, config_yaml: &str) -> Result<Balancer> {
        let mut balancer = Balancer::spawn(netns, interface, dir, config_yaml, &[])?;
        balancer.wait_up(Duration::from_secs(20))?;
        Ok(balancer)
    }

    /// Writes `config_yaml` to `dir/config.yaml` and starts the controller in `netns` with the
    /// extra environment `env`, without waiting for it (see [`Balancer::wait_up`]).
    pub fn spawn(
        netns: &str,
        interface: &str,
        dir: &Path,
        config_yaml: &str,
        env: &[(&str, &OsStr)],
    ) -> Result<Balancer> {
        Balancer::spawn_with(netns, interface, dir, config_yaml, env, &[])
    }

    /// `sticky-lb run --take-over`: a second controller that takes the running one's listening
    /// sockets and lock; waits until it serves (see [`Balancer::wait_up`]).
    pub fn take_over(
        netns: &str,
        interface: &str,
        dir: &Path,
        config_yaml: &str,
    ) -> Result<Balancer> {
        let mut balancer =
            Balancer::spawn_with(netns, interface, dir, config_yaml, &[], &["--take-over"])?;
        balancer.wait_up(Duration::from_secs(30))?;
        Ok(balancer)
    }

    /// [`Balancer::spawn`] with `run_args` after `run --config FILE`.
    fn spawn_with(
        netns: &str,
        interface: &str,
        dir: &Path,
        config_yaml: &str,
        env: &[(&str, &OsStr)],
        run_args: &[&str],
    ) -> Result<Balancer> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("config.yaml");
        std::fs::write(&config, config_yaml)?;
        let log = dir.join(format!("sticky-lb-{}.log", std::process::id()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let state_path = state::path(Some(netns), interface);
        let previous_pid = state::RuntimeState::read(&state_path).ok().map(|s| s.pid);
        let child = Command::new(binary())
            .arg("--netns")
            .arg(netns)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(run_args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("spawning sticky-lb")?;
        Ok(Balancer {
            child: Some(child),
            netns: netns.into(),
            interface: interface.into(),
            log,
            previous_pid,
        })
    }

    /// Waits until this controller has attached and serves (its state file names its pid), or
    /// fails if it exits first or `within` passes.
    pub fn wait_up(&mut self, within: Duration) -> Result<()> {
        let state_path = state::path(Some(&self.netns), &self.interface);
        let deadline = Instant::now() + within;
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("sticky-lb was stopped");
            };
            if let Some(status) = child.try_wait()? {
                bail!(
                    "sticky-lb exited with {status} before attaching:\n{}",
                    self.log_text()
                );
            }
            let ready = state::RuntimeState::read(&state_path)
                .is_ok_and(|s| Some(s.pid) != self.previous_pid && s.pid == self.pid());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "sticky-lb did not attach within {within:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Some(status)` once the process has exited (it is reaped then); `None` while it runs, or
    /// once [`Balancer::stop`] or [`Balancer::kill`] took it.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the controller dies without any clean-up (a crash, an OOM kill).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (SIGHUP to reload) without waiting.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM, then wait up to 10 s (SIGKILL after that). Returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- sticky-lb log ({} {}) ---\n{}",
                self.netns,
                self.interface,
                self.log_text()
            );
        }
    }
}

/// Removes a data path's pins and state file on drop, whatever the controllers did: declare it
/// before the [`Balancer`]s of a test (after the rig) so it outlives them.
pub struct DataPathGuard {
    netns: String,
    interface: String,
}

impl DataPathGuard {
    pub fn new(netns: &str, interface: &str) -> DataPathGuard {
        DataPathGuard {
            netns: netns.into(),
            interface: interface.into(),
        }
    }

    pub fn pins(&self) -> PinDir {
        PinDir::new(Some(&self.netns), &self.interface)
    }
}

impl Drop for DataPathGuard {
    fn drop(&mut self) {
        let pins = self.pins();
        let _ = pins.remove();
        // The per-namespace directories above them, if now empty.
        let _ = std::fs::remove_dir(pins.path().parent().unwrap());
        let state = state::path(Some(&self.netns), &self.interface);
        let _ = std::fs::remove_file(&state);
        // The instance lock, the control socket of a controller that was killed, and a
        // temporary state file a failed write left behind.
        for leftover in ["lock", "sock", "json.tmp"] {
            let _ = std::fs::remove_file(state.with_extension(leftover));
        }
        let _ = std::fs::remove_dir(state.parent().unwrap());
    }
}

/// A scratch directory for a test's config and logs, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        let path = std::env::temp_dir().join(format!("slb-{tag}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        ScratchDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An XDP_PASS program attached in native mode to the balancer's peer on the bridge. Native-mode
/// XDP_TX on a veth only delivers frames to a peer that runs an XDP program itself (see
/// ../shared/XDP-NOTES.md); a real NIC needs nothing of the kind. Detached on drop.
pub struct PeerXdp {
    _ebpf: aya::Ebpf,
}

impl PeerXdp {
    pub fn attach(netns: &str, interface: &str) -> Result<PeerXdp> {
        use sticky_lb::dataplane::{EBPF_OBJECT, PASS_PROGRAM};
        use sticky_lb_common::map_names;
        let mut ebpf = aya::EbpfLoader::new()
            // This copy of the object only needs its pass program: keep its maps tiny.
            .map_max_entries(map_names::STICK, 16)
            .map_max_entries(map_names::MAGLEV, 16)
            .load(EBPF_OBJECT)?;
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(PASS_PROGRAM)
            .context("xdp_pass missing")?
            .try_into()?;
        program.load()?;
        let name = std::ffi::CString::new(interface)?;
        crate::netns::in_netns(netns, || {
            program.attach(name.as_c_str(), aya::programs::XdpMode::Driver)
        })
        .with_context(|| format!("attaching xdp_pass to {interface} in {netns}"))?;
        Ok(PeerXdp { _ebpf: ebpf })
    }
}
