//! The balancers the end-to-end benchmark compares, each set up inside a rig's balancer
//! namespace and torn down completely before the next one starts: sticky-lb (native and generic
//! XDP DSR, native NAT and full NAT), nftables DNAT (with SNAT, and alone with the backends'
//! route back via the balancer), nftables netdev-ingress L2 DSR, HAProxy, and no balancer at all.
//!
//! The backends are the same for all, in the state each forwarding needs ([`BackendRole`]):
//! DSR ones hold the VIP on loopback; NAT ones are unmodified (no VIP), with a route back to the
//! clients via the balancer for plain NAT and none for full NAT. [`Backends::prepare`] switches
//! them between balancers.
//!
//! Every set-up lives in the rig's namespaces (nft tables, sysctls and the HAProxy process go
//! with the namespace at the latest); [`Running::stop`] removes each explicitly and checks that
//! it is gone, and `Drop` does the same on any error path.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::client::{probe_keepalive, probe_short};
use super::command::{check_ns, in_ns};
use crate::balancer::{Balancer, DataPathGuard, PeerXdp};
use crate::rig::Rig;

/// The service port.
pub const PORT: u16 = 80;
/// nft tables this module creates (and only these are ever deleted).
const NFT_DNAT_TABLE: &str = "slb_bench_dnat";
const NFT_NAT_TABLE: &str = "slb_bench_nat";
const NFT_DSR_TABLE: &str = "slb_bench_dsr";
/// How long a balancer may take to forward its first requests after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Per request during sanity checks.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A balancer set-up under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Clients talk straight to the backends: the ceiling of the rig.
    Direct,
    /// sticky-lb DSR (the default forwarding).
    StickyNative,
    StickyGeneric,
    /// sticky-lb `forwarding: nat`, native XDP.
    StickyNat,
    /// sticky-lb `forwarding: nat` with `source_nat: true`, native XDP.
    StickyFullNat,
    /// DNAT and SNAT to the balancer's address: nftables' full NAT.
    NftDnat,
    /// DNAT alone, the backends routing their answers back via the balancer: nftables' NAT.
    NftNat,
    NftL2Dsr,
    Haproxy,
}

/// What the backends need for a balancer (see [`Backends`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendRole {
    /// The VIP on loopback (as the rig builds them): direct server return.
    Dsr,
    /// Unmodified but for a route back to the clients via the balancer: plain NAT.
    Nat,
    /// Unmodified: full NAT (they answer the balancer's own address).
    FullNat,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Direct,
        Kind::StickyNative,
        Kind::StickyGeneric,
        Kind::StickyNat,
        Kind::StickyFullNat,
        Kind::NftDnat,
        Kind::NftNat,
        Kind::NftL2Dsr,
        Kind::Haproxy,
    ];

    /// Row label in the report.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "none (direct to backends)",
            Kind::StickyNative => "sticky-lb, native XDP",
            Kind::StickyGeneric => "sticky-lb, generic XDP",
            Kind::StickyNat => "sticky-lb NAT, native XDP",
            Kind::StickyFullNat => "sticky-lb full NAT, native XDP",
            Kind::NftDnat => "nftables DNAT + SNAT (jhash saddr)",
            Kind::NftNat => "nftables DNAT, route back via the balancer (jhash saddr)",
            Kind::NftL2Dsr => "nftables netdev L2 DSR (jhash saddr, fwd)",
            Kind::Haproxy => "HAProxy mode tcp, balance source",
        }
    }

    /// Key in the JSON output and scratch sub-directory name.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Direct => "none",
            Kind::StickyNative => "sticky-lb-native",
            Kind::StickyGeneric => "sticky-lb-generic",
            Kind::StickyNat => "sticky-lb-nat",
            Kind::StickyFullNat => "sticky-lb-fullnat",
            Kind::NftDnat => "nft-dnat",
            Kind::NftNat => "nft-nat",
            Kind::NftL2Dsr => "nft-l2dsr",
            Kind::Haproxy => "haproxy",
        }
    }

    /// The kind whose key is `key`.
    pub fn from_key(key: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.key() == key)
    }

    /// The state the backends must be in for this balancer. Balancers that reach the backends
    /// at their own addresses and get the answers back by themselves (no balancer, HAProxy)
    /// keep the rig's.
    pub fn backend_role(self) -> BackendRole {
        match self {
            Kind::StickyNat | Kind::NftNat => BackendRole::Nat,
            Kind::StickyFullNat | Kind::NftDnat => BackendRole::FullNat,
            Kind::Direct
            | Kind::StickyNative
            | Kind::StickyGeneric
            | Kind::NftL2Dsr
            | Kind::Haproxy => BackendRole::Dsr,
        }
    }

    /// The nftables set-up measured against this one, if any: the same translation done by
    /// the kernel's NAT.
    pub fn nft_peer(self) -> Option<Kind> {
        match self {
            Kind::StickyNat => Some(Kind::NftNat),
            Kind::StickyFullNat => Some(Kind::NftDnat),
            _ => None,
        }
    }

    /// Where load thread `thread` connects: the VIP, or without a balancer one backend per
    /// thread, round-robin.
    pub fn target(self, rig: &Rig, thread: usize) -> SocketAddr {
        match self {
            Kind::Direct => SocketAddr::new(
                rig.backend_addr(thread % rig.backend_count() + 1).into(),
                PORT,
            ),
            _ => SocketAddr::new(rig.vip().into(), PORT),
        }
    }
}

/// The rig's backends and the role they are in now.
pub struct Backends {
    role: BackendRole,
}

impl Backends {
    /// The backends as the rig built them (DSR).
    pub fn new() -> Backends {
        Backends {
            role: BackendRole::Dsr,
        }
    }

    pub fn role(&self) -> BackendRole {
        self.role
    }

    /// Puts every backend of `rig` in `role` (through DSR, the rig's own state). A failure
    /// leaves the role unknown, which the caller must treat as fatal.
    pub fn prepare(&mut self, rig: &Rig, role: BackendRole) -> Result<()> {
        if self.role == role {
            return Ok(());
        }
        for k in 1..=rig.backend_count() {
            match self.role {
                BackendRole::Dsr => {}
                BackendRole::Nat => rig.restore_dsr_backend(k, true)?,
                BackendRole::FullNat => rig.restore_dsr_backend(k, false)?,
            }
        }
        self.role = BackendRole::Dsr;
        for k in 1..=rig.backend_count() {
            match role {
                BackendRole::Dsr => {}
                BackendRole::Nat => rig.make_nat_backend(k, true)?,
                BackendRole::FullNat => rig.make_nat_backend(k, false)?,
            }
        }
        self.role = role;
        Ok(())
    }
}

impl Default for Backends {
    fn default() -> Backends {
        Backends::new()
    }
}

/// A started balancer. [`Running::stop`] tears it down and checks; dropping it tears it down
/// without checking.
pub struct Running {
    kind: Kind,
    lb_ns: String,
    // Field order is drop order: the controller stops before its pins go, and the peer's XDP
    // program stays until the balancer's data path is gone.
    sticky: Option<Balancer>,
    pins: Option<DataPathGuard>,
    peer_xdp: Option<PeerXdp>,
    nft_tables: Vec<(&'static str, &'static str)>,
    /// sysctls changed in the balancer namespace, with the values to put back.
    sysctls: Vec<(String, String)>,
    haproxy: Option<Child>,
}

impl Running {
    /// Nothing set up yet; dropping it removes whatever gets set up later.
    fn new(kind: Kind, rig: &Rig) -> Running {
        Running {
            kind,
            lb_ns: rig.lb_ns().to_owned(),
            sticky: None,
            pins: None,
            peer_xdp: None,
            nft_tables: Vec::new(),
            sysctls: Vec::new(),
            haproxy: None,
        }
    }
}

/// Starts `kind` in `rig` (scratch files under `scratch`) and waits until it forwards.
pub fn start(kind: Kind, rig: &Rig, scratch: &Path) -> Result<Running> {
    let mut running = Running::new(kind, rig);
    // On any error below, dropping `running` removes whatever was already set up.
    match kind {
        Kind::Direct => {}
        Kind::StickyNative | Kind::StickyGeneric | Kind::StickyNat | Kind::StickyFullNat => {
            start_sticky(
                &mut running,
                rig,
                scratch,
                kind != Kind::StickyGeneric,
                &[PORT],
            )?
        }
        Kind::NftDnat => start_nft_dnat(&mut running, rig)?,
        Kind::NftNat => start_nft_nat(&mut running, rig)?,
        Kind::NftL2Dsr => start_nft_dsr(&mut running, rig)?,
        Kind::Haproxy => start_haproxy(&mut running, rig, scratch)?,
    }
    Ok(running)
}

/// Starts sticky-lb alone with one service per port in `ports` (the first is the benchmark's);
/// used by the packet-rate run, which adds a port nothing listens on.
pub fn start_sticky_with_ports(
    rig: &Rig,
    scratch: &Path,
    native: bool,
    ports: &[u16],
) -> Result<Running> {
    let kind = if native {
        Kind::StickyNative
    } else {
        Kind::StickyGeneric
    };
    let mut running = Running::new(kind, rig);
    start_sticky(&mut running, rig, scratch, native, ports)?;
    Ok(running)
}

impl Running {
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Detaches the XDP_PASS program from the balancer's bridge port (native sticky-lb only),
    /// so the caller can put its own program there for a while.
    pub fn detach_peer_xdp(&mut self) {
        self.peer_xdp.take();
    }

    /// Stops everything this set-up started and checks that nothing of it is left: no XDP
    /// program or pins on the balancer's interface, no nft tables of ours, no HAProxy.
    pub fn stop(mut self) -> Result<()> {
        let mut problems = self.teardown();
        if let Err(err) = self.check_gone() {
            problems.push(format!("{err:#}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("stopping {}: {}", self.kind.key(), problems.join("; "))
        }
    }

    /// Best effort removal of everything, in dependency order; returns what went wrong.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut balancer) = self.sticky.take() {
            match balancer.stop() {
                Some(0) => {}
                code => problems.push(format!("sticky-lb exited with {code:?}")),
            }
        }
        // Dropping the guard removes the pins and state file whatever the controller did.
        self.pins.take();
        self.peer_xdp.take();
        for (family, table) in std::mem::take(&mut self.nft_tables) {
            if let Err(err) = in_ns(
                &self.lb_ns,
                &["nft", "delete", "table", family, table],
                None,
            ) {
                problems.push(format!("{err:#}"));
            }
        }
        for (key, value) in std::mem::take(&mut self.sysctls) {
            if let Err(err) = in_ns(
                &self.lb_ns,
                &["sysctl", "-q", "-w", &format!("{key}={value}")],
                None,
            ) {
                problems.push(format!("{err:#}"));
            }
        }
        if let Some(child) = self.haproxy.take()
            && let Err(err) = stop_child(child)
        {
            problems.push(format!("{err:#}"));
        }
        problems
    }

    /// Checks the balancer namespace is back to its plain state.
    fn check_gone(&self) -> Result<()> {
        let link = in_ns(
            &self.lb_ns,
            &["ip", "-j", "link", "show", "dev", "lb0"],
            None,
        )?;
        let link: serde_json::Value = serde_json::from_str(&link).context("ip -j link")?;
        if link[0].get("xdp").is_some() {
            bail!(
                "an XDP program is still attached to lb0: {}",
                link[0]["xdp"]
            );
        }
        let tables = in_ns(&self.lb_ns, &["nft", "list", "tables"], None)?;
        if [NFT_DNAT_TABLE, NFT_NAT_TABLE, NFT_DSR_TABLE]
            .iter()
            .any(|table| tables.contains(table))
        {
            bail!("nft tables left: {}", tables.trim());
        }
        let listeners = in_ns(
            &self.lb_ns,
            &["ss", "-Hltn", &format!("sport = :{PORT}")],
            None,
        )?;
        if !listeners.trim().is_empty() {
            bail!(
                "something still listens on port {PORT}: {}",
                listeners.trim()
            );
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let problems = self.teardown();
        if !problems.is_empty() {
            eprintln!(
                "slb-bench-e2e: cleaning up {}: {}",
                self.kind.key(),
                problems.join("; ")
            );
        }
    }
}

/// A sticky-lb config for `rig`: one service per port on the VIP with every backend, no health
/// checks (no extra traffic that other balancers would not see), forwarded as `kind` says.
fn sticky_config(rig: &Rig, kind: Kind, native: bool, ports: &[u16]) -> String {
    let mode = if native { "native" } else { "generic" };
    let forwarding = match kind {
        Kind::StickyNat => "    forwarding: nat\n",
        Kind::StickyFullNat => "    forwarding: nat\n    source_nat: true\n",
        _ => "",
    };
    // Detach on exit: stopping checks that sticky-lb itself leaves nothing attached.
    let mut yaml = format!(
        "interface: {}\nxdp_mode: {mode}\non_exit: detach\nservices:\n",
        rig.lb_dev()
    );
    for port in ports {
        yaml += &format!(
            "  - name: web-{port}\n    vip: {}\n    port: {port}\n{forwarding}    health_check:\n      type: none\n    backends:\n",
            rig.vip()
        );
        for k in 1..=rig.backend_count() {
            yaml += &format!(
                "      - name: b{k}\n        address: {}\n",
                rig.backend_addr(k)
            );
        }
    }
    yaml
}

fn start_sticky(
    running: &mut Running,
    rig: &Rig,
    scratch: &Path,
    native: bool,
    ports: &[u16],
) -> Result<()> {
    running.pins = Some(DataPathGuard::new(rig.lb_ns(), rig.lb_dev()));
    if native {
        // Native XDP_TX on a veth only delivers to a peer that runs XDP itself.
        let (ns, dev) = rig.bridge_peer_of_lb();
        running.peer_xdp = Some(PeerXdp::attach(ns, dev)?);
    }
    let dir = scratch.join(running.kind.key());
    running.sticky = Some(Balancer::start(
        rig.lb_ns(),
        rig.lb_dev(),
        &dir,
        &sticky_config(rig, running.kind, native, ports),
    )?);
    // The mode asked for must be the mode the kernel reports (iproute2: 1 driver, 2 generic).
    let link = in_ns(
        rig.lb_ns(),
        &["ip", "-j", "link", "show", "dev", rig.lb_dev()],
        None,
    )?;
    let link: serde_json::Value = serde_json::from_str(&link).context("ip -j link")?;
    let mode = link[0]["xdp"]["mode"].as_u64();
    let expected = if native { 1 } else { 2 };
    if mode != Some(expected) {
        bail!(
            "sticky-lb started, but lb0 reports XDP {} instead of mode {expected}",
            link[0]["xdp"]
        );
    }
    Ok(())
}

/// Sets a sysctl in the balancer namespace, remembering the old value for the teardown.
fn set_sysctl(running: &mut Running, key: &str, value: &str) -> Result<()> {
    let old = in_ns(&running.lb_ns, &["sysctl", "-n", key], None)?
        .trim()
        .to_owned();
    running.sysctls.push((key.to_owned(), old));
    in_ns(
        &running.lb_ns,
        &["sysctl", "-q", "-w", &format!("{key}={value}")],
        None,
    )?;
    Ok(())
}

fn backend_map<T: std::fmt::Display>(rig: &Rig, value: impl Fn(usize) -> T) -> String {
    (1..=rig.backend_count())
        .map(|k| format!("{} : {}", k - 1, value(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// DNAT to `jhash ip saddr mod N`, with SNAT to the balancer's address so that the backends'
/// answers come back through it (they would otherwise answer the on-link client directly, from
/// an address the client never talked to).
fn start_nft_dnat(running: &mut Running, rig: &Rig) -> Result<()> {
    set_sysctl(running, "net.ipv4.ip_forward", "1")?;
    // Packets leave through the interface they came in on: no ICMP redirects for that.
    set_sysctl(running, "net.ipv4.conf.all.send_redirects", "0")?;
    set_sysctl(
        running,
        &format!("net.ipv4.conf.{}.send_redirects", rig.lb_dev()),
        "0",
    )?;
    let n = rig.backend_count();
    let addrs: Vec<String> = (1..=n).map(|k| rig.backend_addr(k).to_string()).collect();
    let script = format!(
        "table ip {NFT_DNAT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {vip} tcp dport {PORT} dnat to jhash ip saddr mod {n} map {{ {map} }}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip daddr {{ {addrs} }} tcp dport {PORT} snat to {lb}\n\
         \t}}\n\
         }}\n",
        vip = rig.vip(),
        map = backend_map(rig, |k| rig.backend_addr(k)),
        addrs = addrs.join(", "),
        lb = rig.lb_addr(),
    );
    // Registered before it exists, so a partly failed `nft -f` is cleaned up too.
    running.nft_tables.push(("ip", NFT_DNAT_TABLE));
    in_ns(&running.lb_ns, &["nft", "-f", "-"], Some(&script)).context("loading the DNAT table")?;
    Ok(())
}

/// Plain NAT, as IPVS `-m` does it: DNAT to `jhash ip saddr mod N`, nothing else. The
/// backends route their answers to the clients via the balancer ([`BackendRole::Nat`]), where
/// conntrack translates them back and forwards them to the client.
fn start_nft_nat(running: &mut Running, rig: &Rig) -> Result<()> {
    set_sysctl(running, "net.ipv4.ip_forward", "1")?;
    // Packets leave through the interface they came in on: no ICMP redirects for that.
    set_sysctl(running, "net.ipv4.conf.all.send_redirects", "0")?;
    set_sysctl(
        running,
        &format!("net.ipv4.conf.{}.send_redirects", rig.lb_dev()),
        "0",
    )?;
    let n = rig.backend_count();
    let script = format!(
        "table ip {NFT_NAT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {vip} tcp dport {PORT} dnat to jhash ip saddr mod {n} map {{ {map} }}\n\
         \t}}\n\
         }}\n",
        vip = rig.vip(),
        map = backend_map(rig, |k| rig.backend_addr(k)),
    );
    running.nft_tables.push(("ip", NFT_NAT_TABLE));
    in_ns(&running.lb_ns, &["nft", "-f", "-"], Some(&script)).context("loading the NAT table")?;
    Ok(())
}

/// The strongest in-kernel path: at netdev ingress of the balancer's interface, rewrite the MACs
/// to `jhash ip saddr mod N`'s backend and send the frame straight back out (`fwd`); backends
/// answer clients directly, as with sticky-lb.
fn start_nft_dsr(running: &mut Running, rig: &Rig) -> Result<()> {
    let n = rig.backend_count();
    let dev = rig.lb_dev();
    let script = format!(
        "table netdev {NFT_DSR_TABLE} {{\n\
         \tchain ingress {{\n\
         \t\ttype filter hook ingress device \"{dev}\" priority 0; policy accept;\n\
         \t\tip daddr {vip} tcp dport {PORT} ether saddr set {lb_mac} ether daddr set jhash ip saddr mod {n} map {{ {map} }} fwd to \"{dev}\"\n\
         \t}}\n\
         }}\n",
        vip = rig.vip(),
        lb_mac = format_mac(rig.lb_mac()),
        map = backend_map(rig, |k| format_mac(rig.backend_mac(k))),
    );
    running.nft_tables.push(("netdev", NFT_DSR_TABLE));
    in_ns(&running.lb_ns, &["nft", "-f", "-"], Some(&script)).context("loading the DSR table")?;
    Ok(())
}

/// HAProxy in the balancer namespace as our own child (`-db`: foreground, no daemon), with a
/// config in the scratch directory; never the host's service or /etc/haproxy.
fn start_haproxy(running: &mut Running, rig: &Rig, scratch: &Path) -> Result<()> {
    // Far above the client concurrency, and within the usual 20k descriptor limit (HAProxy
    // needs two descriptors per connection and refuses to start otherwise).
    const MAXCONN: u32 = 8000;
    let dir = scratch.join(running.kind.key());
    std::fs::create_dir_all(&dir)?;
    let mut config = format!(
        "global\n\
         \tnbthread 2\n\
         \tmaxconn {MAXCONN}\n\
         defaults\n\
         \tmode tcp\n\
         \ttimeout connect 2s\n\
         \ttimeout client 30s\n\
         \ttimeout server 30s\n\
         frontend web\n\
         \tbind {vip}:{PORT}\n\
         \tmaxconn {MAXCONN}\n\
         \tdefault_backend pool\n\
         backend pool\n\
         \tbalance source\n",
        vip = rig.vip()
    );
    for k in 1..=rig.backend_count() {
        config += &format!("\tserver b{k} {}:{PORT}\n", rig.backend_addr(k));
    }
    let config_path = dir.join("haproxy.cfg");
    std::fs::write(&config_path, &config)?;
    let log_path = dir.join("haproxy.log");
    let mut args: Vec<&OsStr> = ["haproxy", "-db", "-f"].map(OsStr::new).to_vec();
    args.push(config_path.as_os_str());
    running.haproxy = Some(spawn_logged(&running.lb_ns, &args, &log_path)?);
    let vip = SocketAddr::new(rig.vip().into(), PORT);
    wait_listening(
        "haproxy",
        &mut running.haproxy,
        &running.lb_ns,
        vip,
        &log_path,
        READY_TIMEOUT,
    )
}

/// Starts `ip netns exec NS ARGS...` as our child, output (stdout and stderr) to `log_path`,
/// so a server in the namespace (HAProxy, nginx) runs in the foreground under our control; never
/// a host service.
pub(crate) fn spawn_logged(ns: &str, args: &[&OsStr], log_path: &Path) -> Result<Child> {
    check_ns(ns)?;
    let log = std::fs::File::create(log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // If this process dies without unwinding (SIGKILL), the kernel kills the server too: `ip
    // netns exec` execs it in place, so the death signal set here survives into it.
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = args.first().map_or("?".into(), |p| p.to_string_lossy());
    command
        .spawn()
        .with_context(|| format!("starting {program} in {ns}"))
}

/// Waits until something listens on `addr` in `ns` (TCP), or fails when `child` (called `what`
/// in errors) exits first (then `child` is cleared and its log is in the error) or `within`
/// passes.
pub(crate) fn wait_listening(
    what: &str,
    child: &mut Option<Child>,
    ns: &str,
    addr: SocketAddr,
    log_path: &Path,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let Some(process) = child.as_mut() else {
            bail!("{what} was already stopped");
        };
        if let Some(status) = process.try_wait()? {
            *child = None;
            bail!("{what} exited with {status}: {}", read_log(log_path).trim());
        }
        let listening = in_ns(ns, &["ss", "-Hltn", &format!("src {addr}")], None)?;
        if !listening.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} does not listen on {addr} after {within:?}: {}",
                read_log(log_path).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// SIGTERM (HAProxy and nginx stop at once on it), SIGKILL after 5 s; always reaps the child.
pub(crate) fn stop_child(mut child: Child) -> Result<()> {
    // SAFETY: signalling our own, not yet reaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?;
    child.wait()?;
    bail!("pid {} ignored SIGTERM and was killed", child.id())
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the sanity check saw: answers per backend name.
pub type Spread = BTreeMap<String, usize>;

/// Checks the set-up end to end before it is measured: short requests from `probes` different
/// client addresses all succeed and reach more than one backend, and one kept-alive connection
/// answers several requests from a single backend. Retries until [`READY_TIMEOUT`], since a
/// freshly started balancer may need a moment (ARP, listeners).
pub fn sanity(kind: Kind, rig: &Rig, probes: usize) -> Result<Spread> {
    let clients = rig.client_addrs();
    let requests: Vec<(IpAddr, SocketAddr)> = (0..probes)
        .map(|i| {
            // Spread over the whole client range, so hashing has something to spread.
            let source = clients[i * clients.len() / probes].into();
            (source, kind.target(rig, i))
        })
        .collect();
    let deadline = Instant::now() + READY_TIMEOUT;
    let spread = loop {
        let answers = probe_short(rig.client_ns(), &requests, PROBE_TIMEOUT);
        match answers.into_iter().collect::<Result<Vec<String>>>() {
            Ok(names) => {
                let mut spread = Spread::new();
                for name in names {
                    *spread.entry(name).or_default() += 1;
                }
                break spread;
            }
            Err(err) if Instant::now() > deadline => {
                return Err(err.context(format!("{} does not answer", kind.key())));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    if spread.len() < 2 {
        bail!(
            "{}: {probes} clients all reached one backend: {spread:?}",
            kind.key()
        );
    }
    if spread.keys().any(|name| !name.starts_with('b')) {
        bail!("{}: unexpected answers {spread:?}", kind.key());
    }
    let names = probe_keepalive(
        rig.client_ns(),
        clients[0].into(),
        kind.target(rig, 0),
        3,
        PROBE_TIMEOUT,
    )?;
    if names.iter().any(|n| n != &names[0]) {
        bail!(
            "{}: one kept-alive connection reached {names:?}",
            kind.key()
        );
    }
    Ok(spread)
}
