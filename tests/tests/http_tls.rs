//! `http.tls` end to end in the netns rig: sticky-lb terminates TLS on VIP:443 with a
//! self-signed certificate for the VIP's address (an IP subject alternative name), speaks
//! HTTP/1.1 or HTTP/2 by ALPN, inserts the Secure cookie and routes by it; a reload serves a
//! renewed certificate to new connections and refuses a broken one, which changes nothing;
//! `check-config` names a missing certificate file. Clients are curl with `--cacert` (the test
//! certificate is its own trust anchor). Needs root (except the `check-config` test).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};
use sticky_lb_tests::{
    balancer::{ScratchDir, binary, cli},
    certs::TestCertificate,
    netns::unique_tag,
    scenario::{Mode, Setup},
    web::{
        WebBackend, WebClient, curl_backend, http_config_on, metric, start_backends, test_secret,
        write_keys,
    },
};

const COOKIE: &str = "SLBID";

/// The rig with `backends` web backends and a least-conn balancer terminating TLS on VIP:443
/// with a new certificate (serial 1) in `vip.crt`/`vip.key`, cookie `SLBID` with `cookie`
/// lines. Also returns that certificate.
fn start(tag: &str, backends: usize, cookie: &str) -> (Setup, Vec<WebBackend>, TestCertificate) {
    let mut s = Setup::new(tag, Mode::Generic, backends, 2);
    let web = start_backends(&s);
    let cert = TestCertificate::new(s.rig.vip_in(s.family), 1);
    let (cert_path, key_path) = cert.write(s.scratch.path(), "vip");
    let keys = write_keys(s.scratch.path(), "keys.yaml", &[(1, &test_secret(1))]);
    let config = http_config_on(
        &s,
        443,
        &format!("cookie_keys: {}\n", keys.display()),
        &format!(
            "    policy: least-conn\n    http:\n      tls:\n        certificate: {}\n        key: {}\n    stick:\n      cookie:\n        name: {COOKIE}\n{cookie}",
            cert_path.display(),
            key_path.display()
        ),
    );
    s.start(&config);
    for k in 1..=backends {
        s.wait_state(&format!("b{k}"), "up", Duration::from_secs(10));
    }
    (s, web, cert)
}

/// What curl got over HTTPS.
struct Fetched {
    /// curl's exit status: 0, or e.g. 60 (the server's certificate did not verify).
    code: i32,
    /// Response headers and body (`-i`), then the server's certificate as curl's `%{certs}`
    /// prints it (OpenSSL's text: `Subject:`, `Serial Number:` ...).
    out: String,
}

/// `curl -s -i --cacert CA ARGS https://VIP/` from the first client, in the client namespace,
/// on a new connection.
fn https(s: &Setup, ca: &Path, args: &[&str]) -> Fetched {
    let source = s.clients()[0].to_string();
    let url = format!("https://{}/", s.rig.vip_in(s.family));
    let out = Command::new("ip")
        .args(["netns", "exec", s.rig.client_ns(), "curl", "-s", "-i"])
        .args(["--max-time", "5", "--interface", &source, "--cacert"])
        .arg(ca)
        .args(["-w", "%{certs}"])
        .args(args)
        .arg(&url)
        .output()
        .expect("running curl");
    Fetched {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// A file holding `cert`'s PEM only: a client's trust anchor.
fn anchor(dir: &Path, cert: &TestCertificate) -> PathBuf {
    let path = dir.join(format!("ca-{}.pem", cert.serial));
    std::fs::write(&path, &cert.cert_pem).unwrap();
    path
}

/// The `Set-Cookie` line of a response, if any.
fn set_cookie(out: &str) -> Option<&str> {
    out.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
}

/// Over HTTP/1.1 and HTTP/2 (chosen by ALPN): 200 from a backend, the cookie with Secure
/// (and HttpOnly, SameSite=None as configured), `X-Forwarded-Proto: https` and
/// `Forwarded: ...;proto=https` at the backend, and the cookie jar routes five more requests
/// (each a new TLS connection) to the same backend without a new cookie.
#[test]
fn https_over_http1_and_http2_sets_the_secure_cookie_and_routes_by_it() {
    let (s, _web, cert) = start(
        "htls-alpn",
        3,
        "        secure: true\n        samesite: None\n",
    );
    let ca = anchor(s.scratch.path(), &cert);
    let client = s.clients()[0].to_string();
    for (flag, status) in [("--http1.1", "HTTP/1.1 200"), ("--http2", "HTTP/2 200")] {
        let jar = s.scratch.path().join(format!("jar{flag}"));
        let jar = jar.to_str().unwrap();
        let first = https(&s, &ca, &[flag, "-c", jar, "-b", jar]);
        assert_eq!(first.code, 0, "{flag}: {}", first.out);
        assert!(first.out.starts_with(status), "{flag}: {}", first.out);
        let backend = curl_backend(&first.out).expect("a backend answered");
        let line = set_cookie(&first.out).unwrap_or_else(|| panic!("no cookie: {}", first.out));
        eprintln!("{flag}: {status} from {backend}; {line}");
        for attribute in ["Secure", "HttpOnly", "SameSite=None", "Path=/"] {
            assert!(line.contains(attribute), "{attribute}: {line}");
        }
        assert!(
            first.out.contains("\nx-forwarded-proto: https\n"),
            "{}",
            first.out
        );
        assert!(
            first
                .out
                .contains(&format!("\nforwarded: for={client};proto=https\n")),
            "{}",
            first.out
        );
        for i in 0..5 {
            let again = https(&s, &ca, &[flag, "-c", jar, "-b", jar]);
            assert!(again.out.starts_with(status), "{flag} {i}: {}", again.out);
            assert_eq!(
                curl_backend(&again.out).as_deref(),
                Some(backend.as_str()),
                "{flag} {i}"
            );
            assert_eq!(set_cookie(&again.out), None, "{flag} {i}: {}", again.out);
        }
    }
    assert_eq!(
        metric(
            &s,
            "sticky_lb_http_responses_total{service=\"web\",class=\"2xx\"}"
        ),
        12.0
    );
    // Without the anchor the client refuses the certificate: the test's trust is what works.
    let untrusted = https(&s, Path::new("/dev/null"), &[]);
    assert_ne!(untrusted.code, 0, "{}", untrusted.out);
}

/// Certificate renewal: new files take effect at `reload` (not before), for new connections;
/// a certificate file that does not parse, or a key that does not match, refuses the reload
/// (exit 1, one line naming the service, the field and the file) and the certificate in
/// service stays; a good one after that is taken again.
#[test]
fn a_reload_serves_a_renewed_certificate_and_refuses_a_broken_one() {
    let (s, _web, first) = start("htls-renew", 2, "");
    let dir = s.scratch.path();
    let vip = s.rig.vip_in(s.family);
    let ca1 = anchor(dir, &first);
    let served = |ca: &Path, cert: &TestCertificate| {
        let got = https(&s, ca, &[]);
        assert_eq!(got.code, 0, "{}", got.out);
        assert!(got.out.starts_with("HTTP/"), "{}", got.out);
        assert!(
            got.out.contains(&format!("CN = {}", cert.common_name))
                || got.out.contains(&format!("CN={}", cert.common_name)),
            "{} expected:\n{}",
            cert.common_name,
            got.out
        );
        // OpenSSL prints a serial that fits in a byte as two hex digits.
        assert!(
            got.out
                .contains(&format!("\nSerial Number:{:02X}\n", cert.serial)),
            "serial {}:\n{}",
            cert.serial,
            got.out
        );
        got
    };
    let shown = served(&ca1, &first);
    eprintln!(
        "serving: {}",
        shown
            .out
            .lines()
            .filter(|l| l.starts_with("Subject:") || l.starts_with("Serial Number:"))
            .collect::<Vec<_>>()
            .join("; ")
    );

    // Renewal: the files change; the balancer reads them at reload only.
    let second = TestCertificate::new(vip, 2);
    let ca2 = anchor(dir, &second);
    second.write(dir, "vip");
    served(&ca1, &first);
    s.cli_ok(&["reload"]);
    let shown = served(&ca2, &second);
    eprintln!(
        "after reload: {}",
        shown
            .out
            .lines()
            .filter(|l| l.starts_with("Subject:") || l.starts_with("Serial Number:"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let old = https(&s, &ca1, &[]);
    assert_eq!(
        old.code, 60,
        "the old certificate is no longer served: {}",
        old.out
    );

    // Broken files: refused, nothing changes.
    let cert_path = dir.join("vip.crt");
    let key_path = dir.join("vip.key");
    let third = TestCertificate::new(vip, 3);
    let cases = [
        (
            "not a certificate".to_string(),
            second.key_pem.clone(),
            format!("{}: no certificate found", cert_path.display()),
        ),
        (
            third.cert_pem.clone(),
            second.key_pem.clone(),
            format!(
                "{}: the key does not match the certificate",
                key_path.display()
            ),
        ),
    ];
    for (cert_text, key_text, expected) in cases {
        std::fs::write(&cert_path, cert_text).unwrap();
        std::fs::write(&key_path, key_text).unwrap();
        let (code, out, err) = cli(s.rig.lb_ns(), &["reload"]);
        eprintln!("refused: {}", err.trim_end());
        assert_eq!(code, 1, "the reload must be refused: {out}{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.contains("reload refused, nothing changed"), "{err}");
        assert!(err.contains("service web: http.tls: "), "{err}");
        assert!(err.contains(&expected), "expected {expected:?} in {err}");
        served(&ca2, &second);
    }
    third.write(dir, "vip");
    s.cli_ok(&["reload"]);
    served(&anchor(dir, &third), &third);
}

/// A reload that turns TLS on for a listener changes new connections only: a cleartext
/// keep-alive connection opened before goes on being served, and its requests reach the
/// backend marked `X-Forwarded-Proto: http` (as they came), while new connections speak TLS
/// and are marked `https`.
#[test]
fn a_reload_turning_tls_on_marks_only_new_connections_https() {
    let mut s = Setup::new("htls-turn", Mode::Generic, 1, 2);
    let _web = start_backends(&s);
    let vip = s.rig.vip_in(s.family);
    let cert = TestCertificate::new(vip, 1);
    let (cert_path, key_path) = cert.write(s.scratch.path(), "vip");
    s.start(&http_config_on(&s, 443, "", ""));
    s.wait_state("b1", "up", Duration::from_secs(10));
    let mut open = WebClient::connect(
        s.rig.client_ns(),
        s.clients()[1],
        SocketAddr::new(vip, 443),
        false,
    )
    .unwrap();
    let before = open.get("/", &[]).unwrap();
    assert_eq!(
        before.received("x-forwarded-proto").as_deref(),
        Some("http")
    );

    let tls = format!(
        "    http:\n      tls:\n        certificate: {}\n        key: {}\n",
        cert_path.display(),
        key_path.display()
    );
    std::fs::write(
        s.scratch.path().join("config.yaml"),
        http_config_on(&s, 443, "", &tls),
    )
    .unwrap();
    s.cli_ok(&["reload"]);
    let new = https(&s, &anchor(s.scratch.path(), &cert), &[]);
    assert_eq!(new.code, 0, "{}", new.out);
    assert!(
        new.out.contains("\nx-forwarded-proto: https\n"),
        "{}",
        new.out
    );
    let after = open.get("/", &[]).unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(
        after.received("x-forwarded-proto").as_deref(),
        Some("http"),
        "a cleartext request is not https: {}",
        after.body
    );
    assert_eq!(
        after.received("forwarded"),
        Some(format!("for={};proto=http", s.clients()[1]))
    );
}

/// `check-config` refuses a `mode: http` service whose certificate or key file is missing:
/// exit 2, one line naming the field and its line; with both files present the config passes.
#[test]
fn check_config_names_a_missing_certificate_file_by_field_and_line() {
    let dir = ScratchDir::new(&unique_tag("htls-check"));
    let cert = TestCertificate::new("198.18.0.100".parse().unwrap(), 1);
    let (cert_path, key_path) = cert.write(dir.path(), "vip");
    let config = |cert: &Path, key: &Path| {
        format!(
            "interface: lo
services:
  - name: web
    mode: http
    vip: 198.18.0.100
    port: 443
    http:
      tls:
        certificate: {}
        key: {}
    backends:
      - name: b1
        address: 198.18.0.11
        port: 8080
",
            cert.display(),
            key.display()
        )
    };
    let check = |text: String| {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(binary())
            .args(["check-config", path.to_str().unwrap()])
            .output()
            .expect("running sticky-lb");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(config(&cert_path, &key_path));
    assert_eq!(code, 0, "{err}");
    let missing = dir.path().join("absent.pem");
    for (text, field) in [
        (
            config(&missing, &key_path),
            "services[0].http.tls.certificate (line 9)",
        ),
        (
            config(&cert_path, &missing),
            "services[0].http.tls.key (line 10)",
        ),
    ] {
        let (code, err) = check(text);
        eprintln!("{}", err.trim_end());
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.contains(field), "expected {field:?} in {err:?}");
        assert!(
            err.contains(&format!("cannot read {}", missing.display())),
            "{err}"
        );
    }
}
