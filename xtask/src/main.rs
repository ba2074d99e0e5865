//! `cargo xtask` (or `./x`, which first installs the pinned stable toolchain): set-up, build,
//! test and demo for sticky-lb. Every step a fresh machine needs is here; a second run skips what
//! is already in place.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Nightly for the XDP program (-Z build-std=core; its LLVM 23 matches bpf-linker's).
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-01";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the rig and the tests use: `ip` (netns, veth, bridge), `ethtool`, `curl`
/// (the metrics test scrapes with a real HTTP client), `bpftool` (the maps test dumps the
/// stick table the way an operator would, with field names from the maps' BTF) and
/// `redis-server` (the shared stick table's store in the multi-balancer rig; it brings
/// `redis-cli`). The tests start their own `redis-server` processes inside the rig's
/// namespaces and never use the package's own service (on 127.0.0.1:6379 of the host, if the
/// package manager started it at all). `chromium` is the cookie tests' real browser (headless,
/// in the client namespace: browsers are the users of cookies, and only one shows what its
/// jar does with Max-Age, HttpOnly, SameSite and Secure); `sqlite3` reads that jar (Chromium
/// keeps it in an SQLite database) for the attributes the browser stored.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("curl", "curl"),
    ("bpftool", "bpftool"),
    ("redis-server", "redis-server"),
    ("chromium", "chromium"),
    ("sqlite3", "sqlite3"),
];
/// What the benchmarks compare sticky-lb with: nftables and HAProxy (end to end, layer 4),
/// HAProxy and nginx (HTTP with cookie persistence). The HTTP benchmark runs its own nginx in
/// the foreground with a config of its own inside a rig namespace; it never uses the package's
/// service or /etc/nginx (on a machine that starts services on install, that service listens
/// on the host's port 80 and is left as the package set it up).
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    ("nginx", "nginx"),
];

#[derive(Parser)]
#[command(about = "Set-up, build, test and demo for sticky-lb")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the XDP toolchain, bpf-linker (cached), Debian packages; mount bpffs.
    Setup,
    /// Build the XDP programs (the balancer's and the backends' decapsulation program), then the
    /// controller, which embeds both.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run every test (unit, BPF_PROG_TEST_RUN, netns end to end). Needs root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the demo in a sandbox of network namespaces. Needs root.
    Demo,
    /// Set up, build (release), and run the benchmarks. Needs root.
    Bench,
    /// Build a release and write what a host install needs to target/dist: the binary, the
    /// systemd unit, the example config, the man page and shell completions.
    Dist,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build { release } => build(release),
        Cmd::Test { args } => {
            require_root("./x test")?;
            setup()?;
            build(false)?;
            test(&args)
        }
        Cmd::Bench => {
            require_root("./x bench")?;
            setup()?;
            ensure_debian_packages(BENCH_PACKAGES)?;
            build(true)?;
            bench()
        }
        Cmd::Dist => {
            setup()?;
            build(true)?;
            dist()
        }
        Cmd::Demo => {
            require_root("./x demo")?;
            setup()?;
            build(true)?;
            let mut demo = cargo_user();
            demo.args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "sticky-lb-tests",
                "--bin",
                "slb-demo",
            ])
            .env(
                "STICKY_LB_BIN",
                workspace().join("target/release/sticky-lb"),
            );
            run(&mut demo)
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn require_root(command: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "this needs root: it creates network namespaces and attaches XDP programs. \
             Run `sudo {command}` (nothing was changed)"
        );
    }
    Ok(())
}

/// A command with the environment of this cargo invocation removed, so a nested cargo picks its
/// toolchain from the directory it runs in (rust-toolchain.toml), not from ours.
fn clean(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// cargo for the user-side crates (the workspace's pinned stable).
fn cargo_user() -> Command {
    let mut cmd = clean("cargo");
    cmd.current_dir(workspace());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup() -> Result<()> {
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_bpffs()?;
    Ok(())
}

fn ensure_ebpf_toolchain() -> Result<()> {
    let installed = output(clean("rustup").args(["toolchain", "list"]))?;
    let has_toolchain = installed.lines().any(|l| l.starts_with(EBPF_TOOLCHAIN));
    let has_src = has_toolchain
        && output(clean("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            EBPF_TOOLCHAIN,
        ]))?
        .lines()
        .any(|l| l.starts_with("rust-src"));
    if has_toolchain && has_src {
        return Ok(());
    }
    eprintln!("xtask: installing {EBPF_TOOLCHAIN} with rust-src (for the XDP program)");
    run(clean("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

/// Where bpf-linker is cached, per version and nightly (its LLVM must match the nightly's).
fn bpf_linker_prefix() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    cache
        .join("sticky-lb")
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}-{EBPF_TOOLCHAIN}"))
}

fn ensure_bpf_linker() -> Result<()> {
    let prefix = bpf_linker_prefix();
    let binary = prefix.join("bin/bpf-linker");
    if binary.exists()
        && clean(binary.to_str().unwrap())
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {EBPF_TOOLCHAIN}'s LLVM (once; cached in {})",
        prefix.display()
    );
    // bpf-linker needs a shared libLLVM of the same major version as the nightly that emits the
    // bitcode; the nightly ships exactly that library.
    let sysroot =
        output(clean("rustc").args([&format!("+{EBPF_TOOLCHAIN}"), "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for link in [
        prefix_lib.join(llvm.file_name().unwrap()),
        prefix_lib.join("libLLVM.so"),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    run(cargo_user()
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--root",
        ])
        .arg(&prefix)
        .env("LLVM_PREFIX", &prefix))
}

fn ensure_debian_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(binary, _)| {
            !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(binary).exists())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    let install = |cmd: &mut Command| -> Result<()> {
        run(cmd
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install(&mut Command::new("apt-get")).is_err() {
        run(Command::new("apt-get").arg("update"))?;
        install(&mut Command::new("apt-get"))?;
    }
    Ok(())
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("xtask: bpffs is not mounted on /sys/fs/bpf (root mounts it)");
        return Ok(());
    }
    eprintln!("xtask: mounting bpffs on /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn build(release: bool) -> Result<()> {
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()?;
    let root = workspace();
    let linker_bin = bpf_linker_prefix().join("bin");
    let path = format!(
        "{}:{}",
        linker_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The XDP programs are always built optimised: the verifier and the per-packet cost want it.
    // Every binary of sticky-lb-ebpf is built: the balancer's object (`sticky-lb`) and the
    // decapsulation program's (`sticky-lb-decap`); sticky-lb's build.rs embeds both.
    run(clean("cargo")
        .current_dir(root.join("sticky-lb-ebpf"))
        .args([
            &format!("+{EBPF_TOOLCHAIN}"),
            "build",
            "--release",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf"))
        .env("PATH", path))?;
    let mut cmd = cargo_user();
    cmd.args(["build", "-p", "sticky-lb"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn test(args: &[String]) -> Result<()> {
    let root = workspace();
    run(cargo_user()
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(args)
        .env("STICKY_LB_BIN", root.join("target/debug/sticky-lb")))
}

fn dist() -> Result<()> {
    let root = workspace();
    let dist = root.join("target/dist");
    std::fs::create_dir_all(dist.join("completions"))?;
    let binary = root.join("target/release/sticky-lb");
    std::fs::copy(&binary, dist.join("sticky-lb"))?;
    std::fs::copy(
        root.join("packaging/sticky-lb.service"),
        dist.join("sticky-lb.service"),
    )?;
    std::fs::copy(
        root.join("config/sticky-lb.yaml"),
        dist.join("sticky-lb.yaml"),
    )?;
    let generate = |args: &[&str], path: PathBuf| -> Result<()> {
        let out = Command::new(&binary).args(args).output()?;
        if !out.status.success() {
            bail!("sticky-lb {args:?} failed");
        }
        std::fs::write(path, out.stdout)?;
        Ok(())
    };
    generate(&["man"], dist.join("sticky-lb.1"))?;
    for (shell, file) in [
        ("bash", "sticky-lb.bash"),
        ("zsh", "_sticky-lb"),
        ("fish", "sticky-lb.fish"),
    ] {
        generate(&["completions", shell], dist.join("completions").join(file))?;
    }
    eprintln!("xtask: wrote {}", dist.display());
    Ok(())
}

/// Runs the per-packet/control-plane benchmark, the end-to-end one, the shared table's and the
/// HTTP one (HAProxy, nginx and sticky-lb with cookie persistence); each prints a markdown report
/// (also saved under target/bench/ next to its JSON). Then the packet fuzzer at a million frames,
/// whose summary is saved as target/bench/fuzz.md.
fn bench() -> Result<()> {
    let root = workspace();
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    run(cargo_user().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "sticky-lb-tests",
        "--bins",
    ]))?;
    for (binary, report) in [
        ("slb-bench", "datapath.md"),
        ("slb-bench-e2e", "e2e.md"),
        ("slb-bench-shared", "shared.md"),
        ("slb-bench-http", "http.md"),
    ] {
        eprintln!("xtask: running {binary}");
        let out = Command::new(root.join("target/release").join(binary))
            .env("STICKY_LB_BIN", root.join("target/release/sticky-lb"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {binary}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        std::fs::write(out_dir.join(report), text.as_bytes())?;
        if !out.status.success() {
            bail!("{binary} failed with {}", out.status);
        }
    }
    // Ten times the test suite's frames, in a release build: rarer malformations get their turn.
    bench_test(&out_dir, "fuzz", ("SLB_FUZZ_FRAMES", "1000000"), "fuzz.md")?;
    // The flood figure: 5,000,000 SYNs from random sources while a backend is added.
    bench_test(&out_dir, "flood", ("SLB_FLOOD_SYNS", "5000000"), "flood.md")?;
    eprintln!("xtask: reports in {}", out_dir.display());
    Ok(())
}

/// Runs integration test `test` (release build) with one variable set, prints the lines of its
/// output that start with the test's name (its figures) and saves them to `report`.
fn bench_test(out_dir: &Path, test: &str, var: (&str, &str), report: &str) -> Result<()> {
    eprintln!("xtask: running the {test} test with {}={}", var.0, var.1);
    let out = cargo_user()
        .args([
            "test",
            "--release",
            "--quiet",
            "-p",
            "sticky-lb-tests",
            "--test",
            test,
            "--",
            "--nocapture",
        ])
        .env(var.0, var.1)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running the {test} test"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: String = text
        .lines()
        .filter(|line| line.starts_with(test))
        .map(|line| format!("{line}\n"))
        .collect();
    print!("{figures}");
    std::fs::write(out_dir.join(report), figures.as_bytes())?;
    if !out.status.success() {
        print!("{text}");
        bail!("the {test} test failed with {}", out.status);
    }
    Ok(())
}
