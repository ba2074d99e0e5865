//! Headless Chromium (Debian's `chromium`) as a client in a rig namespace, for the end-to-end
//! tests of cookies: browsers are the users of cookies, and only a browser shows what its
//! cookie jar does with `Max-Age`, `HttpOnly`, `SameSite` and `Secure`.
//!
//! Every [`Browser::load`] is one browser process (`--dump-dom URL`: it loads the page, runs
//! its scripts, prints the DOM and exits) on the same profile directory (`--user-data-dir`),
//! so what a load sends is what the browser's own jar kept, on disk, from the earlier loads:
//! a returning visitor who closed the browser in between. [`Browser::cookies`] reads that jar
//! (the profile's `Cookies` SQLite database) for the attributes the browser stored.
//!
//! The browser runs as root without its sandbox (`--no-sandbox`; the namespace is what
//! confines it) and is told to try nothing but the page: no background networking, component
//! updates, sync, extensions, proxy, and every host name resolves to nothing except the rig
//! addresses it is given (the rig has no route out anyway). Each run is bounded (Chromium's
//! own `--timeout`, then a kill) and killed with its whole process group if the test panics.
//! Everything it writes stays next to the profile (its HOME is there too), in the test's
//! scratch directory.

use anyhow::{Context, bail};
use std::{
    net::IpAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The longest one load may take before the browser is killed. Chromium stops loading at
/// [`PAGE_TIMEOUT`] and prints what it has; this is for a browser that hangs anyway.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// Chromium's own limit for one load (`--timeout`, milliseconds).
const PAGE_TIMEOUT: Duration = Duration::from_secs(20);

/// A headless browser profile used from a rig namespace.
pub struct Browser {
    ns: String,
    profile: PathBuf,
    /// HOME (and XDG config and cache) of the browser process: Chromium keeps crash-report
    /// settings and caches there whatever the profile, and they belong to the test too.
    home: PathBuf,
    flags: Vec<String>,
    runs: usize,
}

impl Browser {
    /// A browser in namespace `ns` keeping its profile (and cookie jar) in `profile`, which
    /// may reach `hosts` (IP addresses; URLs use them literally) and nothing else. Panics
    /// if `chromium` is not installed.
    pub fn new(ns: &str, profile: &Path, hosts: &[IpAddr]) -> Browser {
        assert!(
            Command::new("chromium")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "chromium is not installed (`cargo xtask setup` installs it)"
        );
        std::fs::create_dir_all(profile).expect("creating the browser profile directory");
        let home = profile.with_extension("home");
        std::fs::create_dir_all(&home).expect("creating the browser's home directory");
        // Host resolver rules apply to IP literals too: the rig addresses are excluded from
        // the catch-all, which makes every other name (update, safe-browsing and metrics
        // hosts) fail without a DNS query.
        let mut rules = String::from("MAP * ~NOTFOUND");
        for host in hosts {
            rules += &format!(", EXCLUDE {host}");
        }
        let flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--disable-breakpad",
            "--no-pings",
            "--no-proxy-server",
            "--metrics-recording-only",
            // No keyring over D-Bus: the jar is encrypted with the fixed fallback key.
            "--password-store=basic",
            "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
        ]
        .iter()
        .map(|f| f.to_string())
        .chain([
            format!("--host-resolver-rules={rules}"),
            format!("--user-data-dir={}", profile.display()),
            format!("--timeout={}", PAGE_TIMEOUT.as_millis()),
        ])
        .collect();
        Browser {
            ns: ns.to_string(),
            profile: profile.to_path_buf(),
            home,
            flags,
            runs: 0,
        }
    }

    /// Trusts the certificate whose SubjectPublicKeyInfo has SHA-256 `spki_sha256` (base64)
    /// for HTTPS, as if a CA had signed it; nothing else changes (other certificate errors
    /// still fail a load). Chromium honours the pin only with a `--user-data-dir`, which a
    /// [`Browser`] always has.
    pub fn trust_spki(mut self, spki_sha256: &str) -> Browser {
        self.flags.push(format!(
            "--ignore-certificate-errors-spki-list={spki_sha256}"
        ));
        self
    }

    /// Loads `url` in a new browser process on this profile and returns the DOM once the page
    /// loaded and its scripts ran (the last page, if a script navigated). Errors: the browser
    /// failed, printed nothing (the load failed: its log is in the error) or did not finish
    /// within [`RUN_LIMIT`].
    pub fn load(&mut self, url: &str) -> anyhow::Result<String> {
        self.runs += 1;
        let out = self.profile.with_extension(format!("run{}.out", self.runs));
        let err = self.profile.with_extension(format!("run{}.err", self.runs));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns, "chromium"])
            .args(&self.flags)
            .args(["--dump-dom", url])
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("XDG_CACHE_HOME", self.home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            // Its own process group, so a kill reaches the renderer and helper processes too.
            .process_group(0);
        let run = Run(Some(command.spawn().context("starting chromium")?));
        let status = run.wait(RUN_LIMIT);
        let log = || {
            let text = std::fs::read_to_string(&err).unwrap_or_default();
            // D-Bus complaints (there is no session bus here) say nothing about the page.
            text.lines()
                .filter(|l| !l.contains("dbus"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let status = match status {
            Some(status) => status,
            None => bail!(
                "chromium did not finish {url} within {RUN_LIMIT:?}:\n{}",
                log()
            ),
        };
        let dom = std::fs::read_to_string(&out)?;
        if !status.success() || dom.trim().is_empty() {
            bail!("chromium could not load {url} ({status}):\n{}", log());
        }
        Ok(dom)
    }

    /// The cookies the profile's jar holds (its `Cookies` database, written when the browser
    /// exits), read with `sqlite3`.
    pub fn cookies(&self) -> anyhow::Result<Vec<StoredCookie>> {
        let db = self.profile.join("Default").join("Cookies");
        if !db.exists() {
            return Ok(Vec::new());
        }
        let out = Command::new("sqlite3")
            .args(["-readonly", "-separator", "\t"])
            .arg(&db)
            .arg(
                "SELECT name, host_key, path, is_secure, is_httponly, samesite, is_persistent, \
                 expires_utc FROM cookies ORDER BY name",
            )
            .output()
            .context("running sqlite3 (`cargo xtask setup` installs it)")?;
        if !out.status.success() {
            bail!(
                "sqlite3 {}: {}",
                db.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(StoredCookie::parse)
            .collect()
    }

    /// The stored cookie `name`, if the jar has it.
    pub fn cookie(&self, name: &str) -> Option<StoredCookie> {
        self.cookies()
            .expect("reading the cookie jar")
            .into_iter()
            .find(|c| c.name == name)
    }
}

/// A browser process; killed with its process group when dropped before it exited.
struct Run(Option<Child>);

impl Run {
    /// Waits until the process exits (its status) or `limit` passed (None; it is killed).
    fn wait(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        let child = self.0.as_mut()?;
        while started.elapsed() < limit {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.0 = None;
                    return Some(status);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        None
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // The group's id is the child's pid (process_group(0)).
            let group = child.id() as libc::pid_t;
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is
            // involved.
            unsafe {
                libc::kill(-group, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// One row of Chromium's cookie jar: the attributes it stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCookie {
    pub name: String,
    /// The host it is sent to (a leading dot for a `Domain` cookie).
    pub host: String,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    pub same_site: SameSite,
    /// Kept across browser restarts (`Max-Age` or `Expires` given).
    pub persistent: bool,
    /// When it expires, seconds since the Unix epoch (0 for a session cookie).
    pub expires: u64,
}

/// The `samesite` column: Chromium's `CookieSameSite` (-1 unspecified, 0 none, 1 lax,
/// 2 strict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Unspecified,
    None,
    Lax,
    Strict,
}

/// Seconds from 1601-01-01 (Windows' epoch, which Chromium's times count from) to 1970-01-01.
const WINDOWS_TO_UNIX: u64 = 11_644_473_600;

impl StoredCookie {
    fn parse(line: &str) -> anyhow::Result<StoredCookie> {
        let fields: Vec<&str> = line.split('\t').collect();
        let [
            name,
            host,
            path,
            secure,
            http_only,
            same_site,
            persistent,
            expires,
        ] = fields[..]
        else {
            bail!("unexpected row from the cookie jar: {line:?}");
        };
        let flag = |v: &str| v == "1";
        let same_site = match same_site {
            "0" => SameSite::None,
            "1" => SameSite::Lax,
            "2" => SameSite::Strict,
            _ => SameSite::Unspecified,
        };
        // Microseconds since 1601; 0 for a session cookie.
        let expires: u64 = expires.parse().context("expires_utc")?;
        Ok(StoredCookie {
            name: name.to_string(),
            host: host.to_string(),
            path: path.to_string(),
            secure: flag(secure),
            http_only: flag(http_only),
            same_site,
            persistent: flag(persistent),
            expires: (expires / 1_000_000).saturating_sub(WINDOWS_TO_UNIX),
        })
    }

    /// Seconds from now until it expires (negative once expired).
    pub fn expires_in(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        self.expires as i64 - now as i64
    }
}

/// What the web backends' `/page` (see [`crate::web::page`]) showed in a browser's dumped DOM.
#[derive(Debug, Clone)]
pub struct Page {
    /// The backend that served it.
    pub backend: String,
    /// What the page's script read from `document.cookie`.
    pub script_cookies: String,
    /// The cookies the browser sent (its `Cookie` fields as the backend received them, joined
    /// with `; `; "" if none).
    pub sent_cookies: String,
    /// Every request header as the backend received it, `name: value` lines.
    pub request: String,
}

impl Page {
    /// Reads a dumped `/page`; None if `dom` is not one.
    pub fn parse(dom: &str) -> Option<Page> {
        let element = |id: &str| -> Option<String> {
            let open = format!("id=\"{id}\">");
            let start = dom.find(&open)? + open.len();
            let end = start + dom[start..].find('<')?;
            Some(unescape(&dom[start..end]))
        };
        let request = element("request")?;
        // HTTP/2 lets a client send its cookies in several fields (RFC 9113 8.2.3).
        let sent_cookies = request
            .lines()
            .filter_map(|l| l.strip_prefix("cookie: "))
            .collect::<Vec<_>>()
            .join("; ");
        Some(Page {
            backend: element("backend")?,
            script_cookies: element("script-cookies")?
                .strip_prefix("document.cookie: ")?
                .to_string(),
            sent_cookies,
            request,
        })
    }

    /// The value the browser sent for cookie `name`, if it sent one.
    pub fn sent(&self, name: &str) -> Option<String> {
        cookie_value(&self.sent_cookies, name)
    }

    /// The value a page script saw for cookie `name`, if it saw one.
    pub fn script_saw(&self, name: &str) -> Option<String> {
        cookie_value(&self.script_cookies, name)
    }

    /// The request header `name` as the backend received it.
    pub fn received(&self, name: &str) -> Option<String> {
        self.request.lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            (n == name).then(|| v.to_string())
        })
    }
}

/// The value of `name` in a `Cookie` header or `document.cookie` string (`a=1; b=2`).
fn cookie_value(list: &str, name: &str) -> Option<String> {
    list.split(';').find_map(|pair| {
        let (n, v) = pair.trim().split_once('=')?;
        (n == name).then(|| v.to_string())
    })
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}
