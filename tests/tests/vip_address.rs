//! An IPv6 VIP held as a preferred address on the balancer's interface, end to end in the netns
//! rig: the kernel picks it as the source of the health checks, each backend answers its own VIP
//! on loopback, and every check fails. The controller says so at attach; deprecating the VIP
//! (`preferred_lft 0`, what the README and the warning ask for) fixes the checks and a reload
//! no longer warns.

use std::time::Duration;
use sticky_lb::vip_address::preferred_vip_warning;
use sticky_lb_tests::{
    rig::Family,
    scenario::{Mode, Setup},
};

const CHECKS: &str = "    health_check:\n      interval: 200ms\n      timeout: 150ms\n      rise: 2\n      fall: 2\n";

/// `ip -6 addr change VIP6/128 dev lb0 nodad preferred_lft LIFETIME` in the balancer.
fn set_preferred_lft(s: &Setup, lifetime: &str) {
    let vip = format!("{}/128", s.rig.vip6());
    s.rig
        .ip(
            "lb",
            &[
                "-6",
                "addr",
                "change",
                &vip,
                "dev",
                s.rig.lb_dev(),
                "nodad",
                "preferred_lft",
                lifetime,
            ],
        )
        .expect("changing the VIP's preferred lifetime");
}

#[test]
fn a_preferred_ipv6_vip_is_warned_about_and_deprecating_it_brings_the_backends_up() {
    let mut s = Setup::new_in("vippref", Mode::Generic, Family::Ipv6, 1, 1);
    let dev = s.rig.lb_dev().to_string();
    let vip = s.rig.vip6();
    set_preferred_lft(&s, "forever");
    let warning = format!(
        "level=warn message=\"{}\"",
        preferred_vip_warning(&dev, vip)
    );

    let config = s.config_with("", CHECKS, &[String::new()]);
    s.start(&config);
    // The checks leave from the VIP and are answered by the backend to itself: b1 never comes up.
    s.wait_state("b1", "down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.backend_status("b1")["state"], "down");
    let log = s.balancer.as_ref().unwrap().log_text();
    assert_eq!(log.matches(&warning).count(), 1, "{log}");

    // Deprecated as asked: the next checks leave from the balancer's own address.
    set_preferred_lft(&s, "0");
    s.wait_state("b1", "up", Duration::from_secs(5));
    // A reload looks again and has nothing to say.
    s.cli_ok(&["reload"]);
    let after = s.balancer.as_ref().unwrap().log_text();
    assert!(after[log.len()..].contains("reload: "), "{after}");
    assert_eq!(after.matches(&warning).count(), 1, "{after}");
    // And the clients reach the backend through the VIP.
    let names = s.round(&s.clients());
    assert_eq!(names, vec!["b1".to_string()]);
}
