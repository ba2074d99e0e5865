//! `mode: http` with `stick.cookie` seen by a real browser: headless Chromium in the rig's
//! client namespace, one browser process per page load on one profile, so every load sends
//! what the browser's own cookie jar kept on disk (`Max-Age`) from the loads before. The
//! backends' `/page` names the backend, shows what a page script reads from
//! `document.cookie` and echoes the request's headers (see `sticky_lb_tests::web::page`).
//! Needs root and Debian's `chromium` and `sqlite3`.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use sticky_lb_tests::{
    browser::{Browser, Page, SameSite},
    certs::TestCertificate,
    scenario::{Mode, Setup},
    web::{
        BACKEND_PORT, WebBackend, http_config_on, metric, start_backends, test_secret, write_keys,
    },
};

const COOKIE: &str = "SLBID";
const ISSUED: &str = "sticky_lb_http_cookies_issued_total{service=\"web\"}";

/// The rig with three web backends, and a least-conn balancer serving VIP:`port` with the
/// cookie `SLBID` (plus `cookie` lines) and `service` lines.
fn start(tag: &str, port: u16, cookie: &str, service: &str) -> (Setup, Vec<WebBackend>) {
    let mut s = Setup::new(tag, Mode::Generic, 3, 1);
    let web = start_backends(&s);
    serve(&mut s, port, cookie, service);
    (s, web)
}

/// Starts the balancer of [`start`] in the rig.
fn serve(s: &mut Setup, port: u16, cookie: &str, service: &str) {
    let keys = write_keys(s.scratch.path(), "keys.yaml", &[(1, &test_secret(1))]);
    let config = http_config_on(
        s,
        port,
        &format!("cookie_keys: {}\n", keys.display()),
        &format!(
            "    policy: least-conn\n    stick:\n      cookie:\n        name: {COOKIE}\n{cookie}{service}"
        ),
    );
    s.start(&config);
    for k in 1..=3 {
        s.wait_state(&format!("b{k}"), "up", Duration::from_secs(10));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A browser profile in the client namespace that may reach the VIP and the backends' own
/// addresses (another site than the VIP's), nothing else.
fn browser(s: &Setup, name: &str) -> Browser {
    let mut hosts: Vec<IpAddr> = vec![s.rig.vip_in(s.family)];
    hosts.extend((1..=s.rig.backend_count()).map(|k| s.backend_addr(k)));
    Browser::new(s.rig.client_ns(), &s.scratch.path().join(name), &hosts)
}

/// Loads `url` (a backend's `/page`, through the balancer or not) and reads the page.
fn load(browser: &mut Browser, url: &str) -> Page {
    let dom = browser.load(url).unwrap_or_else(|e| panic!("{e:#}"));
    Page::parse(&dom).unwrap_or_else(|| panic!("not a backend's page:\n{dom}"))
}

/// Ten page loads (ten browser runs) stay on one backend: the first gets the cookie, the nine
/// after send it back from the jar on disk, and one Set-Cookie was all it took. The jar holds
/// it as configured (persistent for 1h, HttpOnly, SameSite=Strict, not Secure) and a page
/// script cannot read it, while it reads the application's own cookie. The backend fails: the
/// next load moves once (a new cookie) and the browser stays on its new backend, also once the
/// old one is back. Last, a link followed from another site (a backend's own address) to the
/// VIP: the browser withholds the Strict cookie and sends the application's (SameSite unset,
/// so Lax) one.
#[test]
fn ten_page_loads_stay_on_one_backend_and_a_failure_moves_the_browser_once() {
    let (s, mut web) = start(
        "hbr-stay",
        80,
        "        max_age: 1h\n        samesite: Strict\n",
        "",
    );
    let vip = s.rig.vip_in(s.family);
    let url = format!("http://{vip}/page");
    let mut browser = browser(&s, "profile");

    let set_after = unix_now();
    let first = load(&mut browser, &url);
    let set_before = unix_now();
    assert_eq!(first.sent(COOKIE), None, "a new profile has no cookie");
    let home = first.backend.clone();
    let mut loads = vec![home.clone()];
    let mut value = None;
    for i in 2..=10 {
        let page = load(&mut browser, &url);
        loads.push(page.backend.clone());
        assert_eq!(page.backend, home, "load {i} ({loads:?})");
        let sent = page.sent(COOKIE).unwrap_or_else(|| {
            panic!(
                "load {i}: the jar sent no {COOKIE}: {:?}",
                page.sent_cookies
            )
        });
        assert_eq!(
            *value.get_or_insert(sent.clone()),
            sent,
            "load {i}: the same cookie"
        );
        // HttpOnly: the script sees cookies, but not this one.
        assert_eq!(
            page.script_saw("visit").as_deref(),
            Some(home.as_str()),
            "load {i}: {:?}",
            page.script_cookies
        );
        assert_eq!(
            page.script_saw(COOKIE),
            None,
            "HttpOnly: {:?}",
            page.script_cookies
        );
    }
    eprintln!("ten loads: {loads:?}");
    assert_eq!(metric(&s, ISSUED), 1.0, "one Set-Cookie for ten loads");

    let stored = browser.cookie(COOKIE).expect("the jar holds the cookie");
    eprintln!("stored: {stored:?}, expires in {} s", stored.expires_in());
    assert_eq!(stored.host, vip.to_string());
    assert_eq!(stored.path, "/");
    assert!(stored.http_only, "{stored:?}");
    assert_eq!(stored.same_site, SameSite::Strict, "{stored:?}");
    assert!(!stored.secure, "{stored:?}");
    assert!(
        stored.persistent,
        "Max-Age makes it outlive the browser: {stored:?}"
    );
    // Max-Age=3600 from the moment the first load got it (whole seconds: one either side).
    assert!(
        (set_after + 3600 - 1..=set_before + 3600 + 1).contains(&stored.expires),
        "Max-Age=3600 from {set_after}..={set_before}: {stored:?}"
    );

    // The backend fails.
    let k: usize = home[1..].parse().unwrap();
    web[k - 1].stop();
    s.wait_state(&home, "down", Duration::from_secs(10));
    let moved = load(&mut browser, &url);
    assert_ne!(moved.backend, home, "a failed backend's visitor moves");
    assert_eq!(moved.sent(COOKIE), value, "it came with the old cookie");
    assert_eq!(metric(&s, ISSUED), 2.0, "and got a new one");
    let new_home = moved.backend.clone();
    let mut after = vec![new_home.clone()];
    let mut new_value = None;
    for round in 0..8 {
        if round == 4 {
            web[k - 1] = WebBackend::start(
                s.rig.backend_ns(k),
                std::net::SocketAddr::new(s.backend_addr(k), BACKEND_PORT),
                &home,
            )
            .unwrap();
            s.wait_state(&home, "up", Duration::from_secs(10));
            after.push(format!("({home} up)"));
        }
        let page = load(&mut browser, &url);
        after.push(page.backend.clone());
        assert_eq!(page.backend, new_home, "stays where it moved: {after:?}");
        let sent = page.sent(COOKIE).expect("the new cookie is in the jar");
        assert_ne!(Some(&sent), value.as_ref());
        assert_eq!(*new_value.get_or_insert(sent.clone()), sent);
    }
    eprintln!("after {home} failed: {after:?}");
    assert_eq!(metric(&s, ISSUED), 2.0, "moved once");

    // SameSite=Strict: a link from another site. The page there is served by a backend
    // directly, on its own address.
    let other_site = s.backend_addr(new_home[1..].parse().unwrap());
    let via = load(
        &mut browser,
        &format!("http://{other_site}:{BACKEND_PORT}/go?to={url}"),
    );
    eprintln!(
        "followed from http://{other_site}:{BACKEND_PORT}/: sent {:?}",
        via.sent_cookies
    );
    assert_eq!(
        via.received("host").as_deref(),
        Some(vip.to_string().as_str()),
        "the link led to the VIP: {}",
        via.request
    );
    assert!(
        via.sent("visit").is_some(),
        "a cross-site navigation carries Lax cookies: {:?}",
        via.sent_cookies
    );
    assert_eq!(
        via.sent(COOKIE),
        None,
        "SameSite=Strict: {:?}",
        via.sent_cookies
    );
}

/// HTTPS (TLS termination on VIP:443, the browser trusting the test certificate's key): the
/// Secure cookie is stored as Secure (and SameSite=Lax as configured) and sent back, so the
/// browser stays on its backend; the backend sees `X-Forwarded-Proto: https`.
#[test]
fn over_https_the_browser_stores_the_secure_cookie_and_stays() {
    let mut s = Setup::new("hbr-https", Mode::Generic, 3, 1);
    let _web = start_backends(&s);
    let cert = TestCertificate::new(s.rig.vip_in(s.family), 1);
    let (cert_path, key_path) = cert.write(s.scratch.path(), "vip");
    serve(
        &mut s,
        443,
        "        max_age: 1h\n        secure: true\n        samesite: Lax\n",
        &format!(
            "    http:\n      tls:\n        certificate: {}\n        key: {}\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let vip = s.rig.vip_in(s.family);
    let url = format!("https://{vip}/page");
    let mut browser = browser(&s, "profile").trust_spki(&cert.spki_sha256);
    let first = load(&mut browser, &url);
    assert_eq!(
        first.received("x-forwarded-proto").as_deref(),
        Some("https")
    );
    assert_eq!(first.sent(COOKIE), None);
    for i in 2..=4 {
        let page = load(&mut browser, &url);
        assert_eq!(page.backend, first.backend, "load {i}");
        assert!(
            page.sent(COOKIE).is_some(),
            "load {i}: {:?}",
            page.sent_cookies
        );
    }
    assert_eq!(metric(&s, ISSUED), 1.0);
    let stored = browser.cookie(COOKIE).expect("the jar holds the cookie");
    eprintln!("stored over https: {stored:?}");
    assert!(stored.secure, "{stored:?}");
    assert!(stored.http_only, "{stored:?}");
    assert_eq!(stored.same_site, SameSite::Lax, "{stored:?}");
    assert!(stored.persistent, "{stored:?}");
}

/// `secure: true` on a plain-HTTP service: the browser does not store a Secure cookie it got
/// over plain HTTP, so every load comes without it and is placed anew (a new Set-Cookie each
/// time), while the application's own cookie is stored and sent.
#[test]
fn a_secure_cookie_over_plain_http_is_not_stored() {
    let (s, _web) = start(
        "hbr-insecure",
        80,
        "        max_age: 1h\n        secure: true\n",
        "",
    );
    let url = format!("http://{}/page", s.rig.vip_in(s.family));
    let mut browser = browser(&s, "profile");
    for i in 1..=3 {
        let page = load(&mut browser, &url);
        assert_eq!(page.sent(COOKIE), None, "load {i}: {:?}", page.sent_cookies);
        if i > 1 {
            assert!(
                page.sent("visit").is_some(),
                "load {i}: the jar works: {:?}",
                page.sent_cookies
            );
        }
        assert_eq!(metric(&s, ISSUED), i as f64, "load {i}: placed anew");
    }
    assert_eq!(browser.cookie(COOKIE), None, "not in the jar");
    assert!(browser.cookie("visit").is_some());
}
