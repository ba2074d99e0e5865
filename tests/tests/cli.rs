//! The `sticky-lb` command as an operator meets it: exit statuses, one-line errors, and a bad
//! config that changes nothing.

use sticky_lb_tests::{
    balancer::{DataPathGuard, ScratchDir, binary, cli},
    netns::{require_root, unique_tag},
    rig::{Rig, RigOptions},
};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(binary())
        .args(args)
        .output()
        .expect("sticky-lb runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = "\
interface: lo
services:
  - name: web
    vip: 198.18.0.100
    port: 80
    backends:
      - name: web-1
        address: 198.18.0.11
";

/// [`VALID`] as an IPv6 service (same line numbers).
const VALID6: &str = "\
interface: lo
services:
  - name: web
    vip: 2001:db8::100
    port: 80
    backends:
      - name: web-1
        address: 2001:db8::11
";

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = ScratchDir::new(&unique_tag("cli-ok"));
    // IPv4, IPv6 (the default client_mask and an explicit /128), and one service of each
    // family on the same port.
    let both = format!(
        "{VALID}{}",
        VALID6
            .split_once("services:\n")
            .unwrap()
            .1
            .replace("name: web\n", "name: web6\n")
    );
    let cases = [
        (VALID.to_string(), "1 service(s), 1 backend(s)"),
        (VALID6.to_string(), "1 service(s), 1 backend(s)"),
        (
            VALID6.replace(
                "    port: 80\n",
                "    port: 80\n    stick:\n      client_mask: 128\n",
            ),
            "1 service(s), 1 backend(s)",
        ),
        (both, "2 service(s), 2 backend(s)"),
    ];
    for (i, (text, counts)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("ok{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = run(&["check-config", path.to_str().unwrap()]);
        assert_eq!(code, 0, "case {i}: {err}\n{text}");
        assert!(
            out.contains(&format!("ok ({counts}, interface lo)")),
            "case {i}: {out}"
        );
    }
}

#[test]
fn invalid_configs_exit_2_with_one_line_naming_the_field() {
    let dir = ScratchDir::new(&unique_tag("cli-bad"));
    let cases = [
        (
            VALID.replace("198.18.0.11", "198.18.0.256"),
            "services[0].backends[0].address (line 8)",
        ),
        (
            VALID.replace("    port: 80\n", "    port: 80\n    colour: blue\n"),
            "unknown field `colour`",
        ),
        (
            VALID.replace("interface: lo", "interface: slb-missing0"),
            "interface (line 1): no interface named",
        ),
        (
            VALID.replace(
                "    port: 80\n",
                "    port: 80\n    maglev_table_size: 1000\n",
            ),
            "services[0].maglev_table_size (line 6)",
        ),
        (
            format!("{VALID}        weight: 0\n"),
            "services[0].backends (line 6): all weights are zero",
        ),
        (
            format!("{VALID}      - name: web-1\n        address: 198.18.0.12\n"),
            "duplicate backend name 'web-1'",
        ),
        // IPv6: a service is one family, its client_mask is up to 128, and its VIP is routed.
        (
            VALID6.replace("2001:db8::11", "198.18.0.11"),
            "services[0].backends[0].address (line 8): 198.18.0.11 is IPv4 but the service's vip 2001:db8::100 is IPv6",
        ),
        (
            VALID.replace("198.18.0.11", "2001:db8::11"),
            "services[0].backends[0].address (line 8): 2001:db8::11 is IPv6 but the service's vip 198.18.0.100 is IPv4",
        ),
        (
            VALID6.replace(
                "    port: 80\n",
                "    port: 80\n    stick:\n      client_mask: 129\n",
            ),
            "services[0].stick.client_mask (line 7): must be a prefix length from 0 to 128",
        ),
        (
            VALID.replace(
                "    port: 80\n",
                "    port: 80\n    stick:\n      client_mask: 33\n",
            ),
            "services[0].stick.client_mask (line 7): must be a prefix length from 0 to 32",
        ),
        (
            VALID6.replace("vip: 2001:db8::100", "vip: fe80::100"),
            "services[0].vip (line 4): fe80::100 cannot be a VIP: a link-local address",
        ),
        (
            VALID6.replace("2001:db8::11", "fe80::11"),
            "services[0].backends[0].address (line 8): fe80::11 cannot be a backend: a link-local address",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        let (code, out, err) = run(&["check-config", path.to_str().unwrap()]);
        assert_eq!(code, 2, "case {i}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "case {i}: one line, got {err:?}");
        assert!(
            err.starts_with("sticky-lb: config error: "),
            "case {i}: {err}"
        );
        assert!(
            err.contains(expected),
            "case {i}: expected {expected:?} in {err:?}"
        );
    }
    let (code, _, err) = run(&["check-config", "/nonexistent/slb.yaml"]);
    assert_eq!((code, err.lines().count()), (2, 1), "{err}");
}

#[test]
fn run_with_a_bad_config_attaches_nothing() {
    require_root();
    let tag = unique_tag("cli-run");
    let rig = Rig::build(RigOptions::new(&tag).backends(1).clients(1)).unwrap();
    let guard = DataPathGuard::new(rig.lb_ns(), rig.lb_dev());
    let dir = ScratchDir::new(&tag);
    let path = dir.path().join("bad.yaml");
    // Valid YAML, valid interface, one bad field deep down.
    let text = VALID
        .replace("interface: lo", "interface: lb0")
        .replace("198.18.0.11", "198.18.0.11.5");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = cli(rig.lb_ns(), &["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("services[0].backends[0].address"), "{err}");
    let link = std::process::Command::new("ip")
        .args(["-n", rig.lb_ns(), "-d", "link", "show", "lb0"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("xdp"),
        "no XDP program may be attached:\n{link}"
    );
    assert!(!guard.pins().path().exists(), "nothing pinned");
}

#[test]
fn read_commands_without_a_data_path_fail_in_one_line() {
    require_root();
    let tag = unique_tag("cli-none");
    let rig = Rig::build(RigOptions::new(&tag).backends(1).clients(1)).unwrap();
    // A token may start with '-' (base64url): it is a value, not an unknown flag (status 1,
    // not clap's 2).
    for args in [
        &["table", "show"][..],
        &["status", "--json"],
        &["detach", "--interface", "lb0"],
        &["table", "get", "-8i0zwTW9RnZTarFwSRMig", "--service", "web"],
        &["table", "delete", "--service", "web", "-_x"],
    ] {
        let (code, out, err) = cli(rig.lb_ns(), args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{args:?}: {err:?}");
        assert!(err.starts_with("sticky-lb: error: "), "{err}");
    }
    let (code, _, _) = run(&["--netns", "slb-no-such-namespace", "status"]);
    assert_eq!(code, 1);
    let (code, _, _) = run(&["frobnicate"]);
    assert_eq!(code, 2, "clap reports usage errors with status 2");
}

#[test]
fn man_page_and_completions_come_from_the_cli_definitions() {
    let (code, man, _) = run(&["man"]);
    assert_eq!(code, 0);
    assert!(man.contains(".TH sticky-lb 1"), "{man}");
    for command in [
        "run",
        "check\\-config",
        "table",
        "backend",
        "stats",
        "reload",
        "detach",
    ] {
        assert!(man.contains(command), "man page lacks {command}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, _) = run(&["completions", shell]);
        assert_eq!(code, 0);
        assert!(
            script.contains("sticky-lb") && script.contains("drain"),
            "{shell}: {script}"
        );
    }
}

#[test]
fn the_systemd_unit_runs_the_documented_command() {
    let unit = include_str!("../../packaging/sticky-lb.service");
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/sticky-lb run --config /etc/sticky-lb/sticky-lb.yaml"
        )
    );
    // The controller tells systemd when it is ready (data path attached, control socket, metrics
    // and state file up), when a reload starts and ends, and when it stops (sd_notify).
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"Type=notify"),
        "the unit must be Type=notify:\n{unit}"
    );
    // Type=notify leaves reloads to ExecReload: the last step must send SIGHUP, which the
    // controller answers with RELOADING=1 and then READY=1.
    let reloads: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        reloads.last().map(|l| **l),
        Some("ExecReload=/bin/kill -HUP $MAINPID"),
        "ExecReload must end by sending SIGHUP:\n{unit}"
    );
    assert!(
        unit.contains("RuntimeDirectoryPreserve=yes"),
        "the state file must survive restarts"
    );
}
