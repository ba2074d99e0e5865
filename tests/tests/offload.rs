//! The interface's offloads as the controller reports them at attach, end to end in the netns
//! rig: a veth has rx VLAN offload on, like many NICs.

use sticky_lb::offload::rx_vlan_warning;
use sticky_lb_tests::scenario::{Mode, Setup};

/// `ethtool ARGS...` inside the balancer's namespace; its stdout.
fn ethtool(s: &Setup, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", s.rig.lb_ns(), "ethtool"])
        .args(args)
        .output()
        .expect("running ethtool");
    assert!(
        out.status.success(),
        "ethtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rx_vlan_offload_is_warned_about_until_it_is_off() {
    let mut s = Setup::new("rxvlan", Mode::Generic, 1, 1);
    let dev = s.rig.lb_dev().to_string();
    let warning = format!("level=warn message=\"{}\"", rx_vlan_warning(&dev));
    assert!(
        ethtool(&s, &["-k", &dev]).contains("rx-vlan-offload: on"),
        "a veth starts with rx VLAN offload on"
    );

    // The second controller attaches afresh rather than adopting the first one's data path.
    let config = s.config(1, "30m", "on_exit: detach\n");
    s.start(&config);
    let mut first = s.balancer.take().unwrap();
    assert_eq!(first.stop(), Some(0));
    let log = first.log_text();
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
    drop(first);

    // Off, and a fresh controller (the first one detached) says nothing.
    ethtool(&s, &["-K", &dev, "rxvlan", "off"]);
    assert!(ethtool(&s, &["-k", &dev]).contains("rx-vlan-offload: off"));
    s.start(&config);
    // Both controllers append to one log file: look at the second one's lines only.
    let all = s.balancer.as_ref().unwrap().log_text();
    let second = &all[log.len()..];
    assert!(second.contains("sticky-lb attached to"), "{second}");
    assert!(!second.contains("rx VLAN offload"), "{second}");
}
