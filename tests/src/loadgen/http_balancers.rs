//! The HTTP balancers the HTTP benchmark compares, each started inside a rig's balancer
//! namespace on VIP:80, in front of the same backends, with cookie persistence, and torn down
//! completely before the next one starts:
//!
//! - HAProxy `mode http`, `balance roundrobin`, `cookie SRV insert indirect nocache`;
//! - nginx (open source: it has no `sticky cookie`), `hash $key consistent` over the `SRV`
//!   cookie, and for a request without one over its `$request_id`, which it then sets as the
//!   client's `SRV` cookie: cookie insertion built from the stock modules (`map`, `add_header`);
//! - sticky-lb `mode: http`, `stick.cookie` (`SRV`, sealed, `indirect`, `nocache`).
//!
//! All three keep HTTP/1.1 connections to the backends alive and pooled, add
//! `X-Forwarded-For`, and log nothing per request. Each runs with one worker (HAProxy
//! `nbthread 1`, nginx `worker_processes 1`); sticky-lb's runtime has the worker threads it
//! has. [`RunningProxy::pin`] restricts a balancer (every thread of every process of it) to
//! given CPUs, so all get the same CPU however many threads they run.
//!
//! HAProxy and nginx run in the foreground as our children (never the host's service or its
//! /etc config), with their config, pid file, logs and temporary files in a scratch directory;
//! sticky-lb runs from the release binary through [`Balancer`].

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::balancers::{PORT, read_log, spawn_logged, stop_child, wait_listening};
use super::command::in_ns;
use super::cpu::{pin_process_tree, process_tree, process_tree_seconds};
use crate::balancer::{Balancer, DataPathGuard};
use crate::rig::Rig;

/// The persistence cookie, the same name for all three.
pub const COOKIE: &str = "SRV";
/// How long a balancer may take to listen after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A balancer under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpKind {
    Haproxy,
    Nginx,
    StickyLb,
}

impl HttpKind {
    pub const ALL: [HttpKind; 3] = [HttpKind::Haproxy, HttpKind::Nginx, HttpKind::StickyLb];

    /// Key in the JSON output, `SLB_BENCH_HTTP_KINDS` and scratch sub-directory name.
    pub fn key(self) -> &'static str {
        match self {
            HttpKind::Haproxy => "haproxy",
            HttpKind::Nginx => "nginx",
            HttpKind::StickyLb => "sticky-lb",
        }
    }

    /// Row label in the report.
    pub fn label(self) -> &'static str {
        match self {
            HttpKind::Haproxy => "HAProxy, cookie SRV insert indirect nocache",
            HttpKind::Nginx => "nginx, hash $cookie_SRV (or $request_id) consistent",
            HttpKind::StickyLb => "sticky-lb mode: http, stick.cookie (sealed)",
        }
    }

    pub fn from_key(key: &str) -> Option<HttpKind> {
        HttpKind::ALL.into_iter().find(|kind| kind.key() == key)
    }
}

/// A started balancer. [`RunningProxy::stop`] tears it down and checks; dropping it tears it
/// down without checking.
pub struct RunningProxy {
    kind: HttpKind,
    lb_ns: String,
    // Field order is drop order: the controller stops before its pins go.
    sticky: Option<Balancer>,
    pins: Option<DataPathGuard>,
    /// HAProxy or nginx (nginx's master; its workers are its children).
    child: Option<Child>,
    pid: u32,
}

/// Starts `kind` in `rig` (config and logs under `scratch/KEY`) and waits until it listens on
/// VIP:80. Whatever was set up is removed again if it fails.
pub fn start(kind: HttpKind, rig: &Rig, scratch: &Path) -> Result<RunningProxy> {
    let dir = scratch.join(kind.key());
    std::fs::create_dir_all(&dir)?;
    let mut running = RunningProxy {
        kind,
        lb_ns: rig.lb_ns().to_owned(),
        sticky: None,
        pins: None,
        child: None,
        pid: 0,
    };
    let vip = SocketAddr::new(rig.vip().into(), PORT);
    match kind {
        HttpKind::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, haproxy_config(rig))?;
            let log = dir.join("haproxy.log");
            let args = [OsStr::new("haproxy"), OsStr::new("-db"), OsStr::new("-f")];
            let args: Vec<&OsStr> = args.into_iter().chain([config.as_os_str()]).collect();
            running.child = Some(spawn_logged(rig.lb_ns(), &args, &log)?);
            wait_listening(
                "haproxy",
                &mut running.child,
                rig.lb_ns(),
                vip,
                &log,
                READY_TIMEOUT,
            )?;
        }
        HttpKind::Nginx => {
            let config = dir.join("nginx.conf");
            std::fs::write(&config, nginx_config(rig, &dir))?;
            let log = dir.join("nginx.out");
            let error_log = dir.join("error.log");
            // -p: relative paths resolve in the scratch directory; -e: the error log used before
            // the config is read (the built-in default is under /var/log/nginx).
            let args: Vec<&OsStr> = vec![
                OsStr::new("nginx"),
                OsStr::new("-p"),
                dir.as_os_str(),
                OsStr::new("-e"),
                error_log.as_os_str(),
                OsStr::new("-c"),
                config.as_os_str(),
                OsStr::new("-g"),
                OsStr::new("daemon off;"),
            ];
            running.child = Some(spawn_logged(rig.lb_ns(), &args, &log)?);
            wait_listening(
                "nginx",
                &mut running.child,
                rig.lb_ns(),
                vip,
                &log,
                READY_TIMEOUT,
            )
            .map_err(|err| err.context(read_log(&error_log)))?;
        }
        HttpKind::StickyLb => {
            let keys = dir.join("cookie-keys.yaml");
            std::fs::write(&keys, cookie_keys()?)?;
            running.pins = Some(DataPathGuard::new(rig.lb_ns(), rig.lb_dev()));
            let balancer = running.sticky.insert(Balancer::start(
                rig.lb_ns(),
                rig.lb_dev(),
                &dir,
                &sticky_config(rig, &keys),
            )?);
            // Attached is not yet serving: the HTTP listener may come a moment later.
            let deadline = std::time::Instant::now() + READY_TIMEOUT;
            loop {
                if let Some(status) = balancer.exited() {
                    bail!("sticky-lb exited with {status}:\n{}", balancer.log_text());
                }
                let listening = in_ns(rig.lb_ns(), &["ss", "-Hltn", &format!("src {vip}")], None)?;
                if !listening.trim().is_empty() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "sticky-lb runs but does not listen on {vip} after {READY_TIMEOUT:?} (no mode: http proxy in this build?); its log:\n{}",
                        last_lines(&balancer.log_text(), 5)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    running.pid = match (&running.child, &running.sticky) {
        (Some(child), _) => child.id(),
        (None, Some(balancer)) => balancer.pid(),
        (None, None) => bail!("{} started without a process", kind.key()),
    };
    Ok(running)
}

impl RunningProxy {
    pub fn kind(&self) -> HttpKind {
        self.kind
    }

    /// The balancer's (main) process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CPU-seconds (user + system) the balancer's processes have used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        process_tree_seconds(self.pid)
    }

    /// Restricts every thread of every process of the balancer to `cpus`.
    pub fn pin(&self, cpus: &[usize]) -> Result<()> {
        pin_process_tree(self.pid, cpus)
    }

    /// Its processes now (nginx: the master and its workers).
    pub fn processes(&self) -> Vec<u32> {
        process_tree(self.pid).unwrap_or_else(|_| vec![self.pid])
    }

    /// Stops the balancer and checks nothing of it is left listening on the port.
    pub fn stop(mut self) -> Result<()> {
        let mut problems = self.teardown();
        match in_ns(
            &self.lb_ns,
            &["ss", "-Hltn", &format!("sport = :{PORT}")],
            None,
        ) {
            Ok(listeners) if listeners.trim().is_empty() => {}
            Ok(listeners) => problems.push(format!(
                "something still listens on port {PORT}: {}",
                listeners.trim()
            )),
            Err(err) => problems.push(format!("{err:#}")),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("stopping {}: {}", self.kind.key(), problems.join("; "))
        }
    }

    /// Best effort removal of everything; returns what went wrong.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut balancer) = self.sticky.take() {
            match balancer.stop() {
                Some(0) => {}
                code => problems.push(format!("sticky-lb exited with {code:?}")),
            }
        }
        self.pins.take();
        if let Some(child) = self.child.take() {
            // nginx's workers are not our children: noted before the master goes, and killed
            // after it if they outlived it (they stop with it normally).
            let descendants: Vec<u32> = process_tree(child.id())
                .map(|tree| tree.into_iter().skip(1).collect())
                .unwrap_or_default();
            if let Err(err) = stop_child(child) {
                problems.push(format!("{err:#}"));
            }
            for pid in descendants {
                kill_if_still(pid, self.kind.key());
            }
        }
        problems
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        let problems = self.teardown();
        if !problems.is_empty() {
            eprintln!(
                "slb-bench-http: cleaning up {}: {}",
                self.kind.key(),
                problems.join("; ")
            );
        }
    }
}

/// SIGKILLs `pid` if it still exists and still runs `program` (not a process that got the
/// number since), giving it up to a second to go by itself first.
fn kill_if_still(pid: u32, program: &str) {
    let runs_it = || {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == program)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while runs_it() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if runs_it() {
        // SAFETY: a signal to a process we started (checked by name just above).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// HAProxy 2.6: `cookie SRV insert indirect nocache` (set for a client without a valid
/// cookie, removed from requests before the backend sees them, `Cache-Control: private` where
/// set), round robin for new clients, one thread, idle backend connections reused (`safe`).
fn haproxy_config(rig: &Rig) -> String {
    // Far above the client concurrency, within the usual descriptor limit (two per connection).
    const MAXCONN: u32 = 8000;
    let mut config = format!(
        "global\n\
         \tnbthread 1\n\
         \tmaxconn {MAXCONN}\n\
         defaults\n\
         \tmode http\n\
         \toption http-keep-alive\n\
         \toption forwardfor\n\
         \thttp-reuse safe\n\
         \ttimeout connect 2s\n\
         \ttimeout client 30s\n\
         \ttimeout server 30s\n\
         \ttimeout http-keep-alive 60s\n\
         frontend web\n\
         \tbind {vip}:{PORT}\n\
         \tmaxconn {MAXCONN}\n\
         \tdefault_backend pool\n\
         backend pool\n\
         \tbalance roundrobin\n\
         \tcookie {COOKIE} insert indirect nocache\n",
        vip = rig.vip()
    );
    for k in 1..=rig.backend_count() {
        config += &format!("\tserver b{k} {}:{PORT} cookie b{k}\n", rig.backend_addr(k));
    }
    config
}

/// nginx 1.22: one worker, a consistent hash (ketama) over the `SRV` cookie; a request
/// without one is hashed by its `$request_id` (128 random bits), which is then set as its
/// cookie, with `Cache-Control: no-cache="Set-Cookie"` like the others' `nocache`.
/// `add_header` leaves out a header whose value is empty, so both only go to new clients.
/// Keep-alive on both sides without a request limit (the defaults close a connection after
/// 1,000 requests, which the other two never do), every path inside `dir`.
fn nginx_config(rig: &Rig, dir: &Path) -> String {
    let mut servers = String::new();
    for k in 1..=rig.backend_count() {
        servers += &format!("        server {}:{PORT};\n", rig.backend_addr(k));
    }
    format!(
        "worker_processes 1;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{\n\
         \x20   worker_connections 8000;\n\
         }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {dir}/client_body;\n\
         \x20   proxy_temp_path {dir}/proxy;\n\
         \x20   fastcgi_temp_path {dir}/fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/uwsgi;\n\
         \x20   scgi_temp_path {dir}/scgi;\n\
         \x20   keepalive_requests 1000000000;\n\
         \x20   keepalive_timeout 60s;\n\
         \x20   map $cookie_{COOKIE} $slb_key {{\n\
         \x20       \"\" $request_id;\n\
         \x20       default $cookie_{COOKIE};\n\
         \x20   }}\n\
         \x20   map $cookie_{COOKIE} $slb_set_cookie {{\n\
         \x20       \"\" \"{COOKIE}=$request_id; Path=/; HttpOnly\";\n\
         \x20       default \"\";\n\
         \x20   }}\n\
         \x20   map $cookie_{COOKIE} $slb_cache_control {{\n\
         \x20       \"\" 'no-cache=\"Set-Cookie\"';\n\
         \x20       default \"\";\n\
         \x20   }}\n\
         \x20   upstream pool {{\n\
         \x20       hash $slb_key consistent;\n\
         {servers}\
         \x20       keepalive 64;\n\
         \x20       keepalive_requests 1000000000;\n\
         \x20       keepalive_timeout 60s;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {vip}:{PORT};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://pool;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         \x20           add_header Set-Cookie $slb_set_cookie;\n\
         \x20           add_header Cache-Control $slb_cache_control;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        dir = dir.display(),
        vip = rig.vip(),
    )
}

/// sticky-lb: one `mode: http` service on the VIP with every backend, placed by least open
/// requests when new, by the sealed cookie after that; no health checks (the others run none
/// either).
fn sticky_config(rig: &Rig, keys: &Path) -> String {
    let mut yaml = format!(
        "interface: {dev}\n\
         on_exit: detach\n\
         threads: 1\n\
         cookie_keys: {keys}\n\
         services:\n\
         \x20 - name: web\n\
         \x20   mode: http\n\
         \x20   vip: {vip}\n\
         \x20   port: {PORT}\n\
         \x20   policy: least-conn\n\
         \x20   health_check:\n\
         \x20     type: none\n\
         \x20   http:\n\
         \x20     forwarded: true\n\
         \x20     pool_idle: 64\n\
         \x20   stick:\n\
         \x20     cookie:\n\
         \x20       name: {COOKIE}\n\
         \x20       indirect: true\n\
         \x20       nocache: true\n\
         \x20   backends:\n",
        dev = rig.lb_dev(),
        keys = keys.display(),
        vip = rig.vip(),
    );
    for k in 1..=rig.backend_count() {
        yaml += &format!(
            "      - name: b{k}\n        address: {}\n        port: {PORT}\n",
            rig.backend_addr(k)
        );
    }
    yaml
}

/// A key file with one fresh random key (32 bytes from the kernel's CSPRNG, as hex).
fn cookie_keys() -> Result<String> {
    let mut secret = [0u8; 32];
    // SAFETY: a buffer of the length passed.
    let n = unsafe { libc::getrandom(secret.as_mut_ptr().cast(), secret.len(), 0) };
    if n != secret.len() as isize {
        return Err(std::io::Error::last_os_error()).context("getrandom");
    }
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("keys:\n  - id: 1\n    secret: {hex}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_hold_one_fresh_key() {
        let (a, b) = (cookie_keys().unwrap(), cookie_keys().unwrap());
        assert_ne!(a, b);
        let secret = a
            .lines()
            .last()
            .unwrap()
            .trim()
            .strip_prefix("secret: ")
            .unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
