//! The `sticky-lb` command: the controller (`run`) and the operator's commands.

use clap::{CommandFactory, Parser, Subcommand};
use std::{net::IpAddr, path::PathBuf, process::ExitCode};
use sticky_lb::{
    config::{Config, ConfigError, XdpMode},
    control::{self, BackendAction, Reply, Request},
    controller, decap, netns,
    view::{self, Target},
};

/// sticky-lb: a Layer-4 TCP load balancer with session persistence, its data path in XDP.
///
/// A client keeps reaching the same backend while its stick-table entry lives (refreshed while it
/// comes back), and each open connection keeps its backend for its whole life, while backends are
/// added, drained, fail and come back; only a failed or disabled backend loses its clients.
#[derive(Parser)]
#[command(name = "sticky-lb", version, propagate_version = true)]
struct Cli {
    /// Run in this network namespace (as created by `ip netns add`).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    /// The interface sticky-lb runs on (needed only if it runs on several); for `decap`, the
    /// interface tunnel packets arrive on (required).
    #[arg(long, short, global = true, value_name = "IF")]
    interface: Option<String>,
    /// Log line format on stderr: `logfmt` (key=value, one line per event; keys ts, level,
    /// message) or `json` (one object per line; keys timestamp, level, message). Backend events
    /// add service, backend and reason. The level filter is RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Logfmt)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Logfmt,
    Json,
}

/// Log events go to stderr as logfmt or JSON lines; `log` records (the XDP program's own lines
/// through aya-log) are forwarded into the same stream.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Logfmt => registry
            .with(
                tracing_logfmt::builder()
                    .with_target(false)
                    .with_span_name(false)
                    .with_span_path(false)
                    .layer()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_target(false)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}

#[derive(Subcommand)]
enum Command {
    /// Attach the data path from a config and keep it fed until SIGINT/SIGTERM (SIGHUP reloads).
    Run {
        /// The YAML config (see config/sticky-lb.yaml).
        #[arg(long, short)]
        config: PathBuf,
        /// Restart or upgrade without refusing a connection: the controller running on the
        /// interface hands over the listening sockets of its mode: http services and stops
        /// (its requests in flight finish); this one serves the same sockets and adopts the
        /// data path. Without a running controller, an ordinary start.
        #[arg(long)]
        take_over: bool,
    },
    /// Validate a config without touching the kernel; exit status 2 if it is invalid.
    CheckConfig {
        /// The YAML config.
        file: PathBuf,
    },
    /// Interface, mode, services, backends and counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The stick table: show, get, set, delete, flush. Naming a `mode: http` service with
    /// `stick.token` (`--service`), the same commands list, get, delete and flush its tokens in
    /// the shared store.
    Table {
        #[command(subcommand)]
        command: TableCommand,
    },
    /// Backends of the running controller: list, add, remove, drain, enable, disable, weight.
    Backend {
        /// Apply the change on every balancer node sharing the stick table (`shared_table`),
        /// not only this one.
        #[arg(long, global = true)]
        all_nodes: bool,
        #[command(subcommand)]
        command: BackendCommand,
    },
    /// Data-path counters: passes and drops by reason, stick hits and misses, traffic per backend.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the running controller's config and apply the difference (as SIGHUP does).
    Reload,
    /// Detach the data path and remove its pinned state (the stick and connection tables with it).
    Detach,
    /// On a backend of a `forwarding: tunnel` service: remove the outer header of IPv4-in-IPv4
    /// (IPIP), IPv6-in-IPv4, IPv4-in-IPv6 and IPv6-in-IPv6 packets addressed to one of the tunnel
    /// addresses and pass the inner packet to the kernel; everything else passes untouched. Runs
    /// in the foreground until SIGINT/SIGTERM, then detaches (nothing is pinned) and prints its
    /// counters.
    Decap {
        /// A tunnel address (repeat for more); default: every IPv4 and IPv6 address of the
        /// interface.
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<String>,
        /// `native`, `generic`, or `auto` (native, falling back to generic with a log line), as
        /// `xdp_mode`.
        #[arg(long, value_enum, default_value_t = XdpMode::Auto, hide_possible_values = true)]
        mode: XdpMode,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
enum TableCommand {
    /// List stick entries: service, client, backend, idle time, age. A client shows as the
    /// prefix its service keys (`198.18.1.0/24`, `2001:db8:1:2::/64`), or as an address when the
    /// service keys whole addresses. With --service naming a token service: its tokens
    /// (service, token, backend, time to live, age, the node that placed it), at most 100000.
    Show {
        /// Only this service's entries (or tokens).
        #[arg(long)]
        service: Option<String>,
        /// Only the entry this client address (IPv4 or IPv6) falls in.
        #[arg(long, value_name = "ADDRESS")]
        client: Option<IpAddr>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The entries of one client address: the entry of the prefix it falls in, in each service
    /// of its family. With --service naming a token service: that token.
    Get {
        /// An IPv4 or IPv6 client address, or a token of the --service (a token may start
        /// with '-').
        #[arg(value_name = "CLIENT|TOKEN", allow_hyphen_values = true)]
        key: String,
        #[arg(long)]
        service: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stick a client to a backend: its whole prefix (the service's client_mask) goes there. On
    /// every node, for a service shared through `shared_table`.
    Set {
        /// An IPv4 or IPv6 client address, of the service's family.
        client: IpAddr,
        /// SERVICE/BACKEND, as named in the config.
        backend: String,
    },
    /// Forget a client (its whole prefix): its next connection is placed anew. On every node,
    /// for a shared service. With --service naming a token service: forget that token (on
    /// every node: the store is shared).
    Delete {
        /// An IPv4 or IPv6 client address, or a token of the --service (a token may start
        /// with '-').
        #[arg(value_name = "CLIENT|TOKEN", allow_hyphen_values = true)]
        key: String,
        #[arg(long)]
        service: Option<String>,
    },
    /// Forget every client (of one service with --service). On every node, for shared services.
    /// Without --service the tokens of every token service go too.
    Flush {
        #[arg(long)]
        service: Option<String>,
        /// Evacuate a backend: forget only the tokens placed on it (needs --service naming a
        /// token service); their next requests are placed anew.
        #[arg(long, value_name = "BACKEND")]
        backend: Option<String>,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Backends with state, weight, traffic, stuck clients and active connections.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a backend to a service.
    Add {
        /// SERVICE/BACKEND: the service and the new backend's name.
        backend: String,
        /// The backend's IPv4 or IPv6 address, of the service's family.
        address: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Destination MAC (the backend's, or its next hop's with tunnel and NAT); otherwise
        /// from the neighbour table.
        #[arg(long)]
        mac: Option<String>,
        /// NAT and mode: http: the port the backend listens on (default the service's).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Remove a backend (drained first unless the config says `backend_removal: immediate`).
    Remove {
        /// SERVICE/BACKEND
        backend: String,
    },
    /// No new clients; clients already stuck to it stay until their entries expire, and open
    /// connections until they close.
    Drain {
        /// SERVICE/BACKEND
        backend: String,
    },
    /// Back in service (up once its health checks pass).
    Enable {
        /// SERVICE/BACKEND
        backend: String,
    },
    /// Out of service: its stuck clients and open connections move to another backend (the
    /// connections are reset there; `drain` lets them finish), checks notwithstanding.
    Disable {
        /// SERVICE/BACKEND
        backend: String,
    },
    /// Set the relative share of new clients (0 drains).
    Weight {
        /// SERVICE/BACKEND
        backend: String,
        weight: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // `sticky-lb status | head`: a closed pipe ends a listing quietly, as for other tools.
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if matches!(cli.command, Command::Run { .. }) {
        // A SIGHUP (a reload asked for by systemd right after start) must never take the
        // default action and end the process: it stays pending until the controller's handler
        // exists, then reloads.
        controller::hold_sighup();
    }
    init_logging(cli.log_format);
    // Join the namespace before tokio starts its threads: they inherit it.
    if let Some(name) = &cli.netns
        && let Err(e) = netns::enter(name)
    {
        return fail(&e);
    }
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// One line on stderr; status 2 for an invalid config (nothing was changed), 1 otherwise.
fn fail(e: &anyhow::Error) -> ExitCode {
    if let Some(config_error) = e.downcast_ref::<ConfigError>() {
        eprintln!("sticky-lb: config error: {config_error}");
        return ExitCode::from(2);
    }
    let text = format!("{e:#}").replace('\n', "; ");
    eprintln!("sticky-lb: error: {text}");
    ExitCode::from(1)
}

/// SERVICE/BACKEND split in two.
fn service_backend(name: &str) -> anyhow::Result<(String, String)> {
    match name.split_once('/') {
        Some((s, b)) if !s.is_empty() && !b.is_empty() => Ok((s.into(), b.into())),
        _ => anyhow::bail!("'{name}' is not SERVICE/BACKEND"),
    }
}

/// Sends a request to the running controller; an error reply becomes an error.
fn call(target: &Target, request: Request) -> anyhow::Result<Reply> {
    let socket = control::socket_path(target.netns.as_deref(), &target.interface);
    let reply = control::call(&socket, &request)?;
    if !reply.ok {
        anyhow::bail!("{}", reply.message);
    }
    Ok(reply)
}

/// Prints a reply: its data as JSON with `--json`, its message otherwise.
fn print_reply(reply: &Reply, json: bool) -> anyhow::Result<()> {
    match (&reply.data, json) {
        (Some(data), true) => println!("{}", serde_json::to_string_pretty(data)?),
        _ => println!("{}", reply.message),
    }
    Ok(())
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let target = || Target::pick(cli.netns.clone(), cli.interface.clone());
    match cli.command {
        Command::Run { config, take_over } => {
            let parsed = Config::load(&config, true)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(parsed.worker_threads())
                .enable_all()
                .build()?;
            runtime.block_on(controller::run(parsed, &config, cli.netns, take_over))
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file, true)?;
            let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
            println!(
                "{}: ok ({} service(s), {} backend(s), interface {})",
                file.display(),
                config.services.len(),
                backends,
                config.interface
            );
            Ok(())
        }
        Command::Status { json } => {
            let status = view::status(&target()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                view::print_status(&status);
            }
            Ok(())
        }
        Command::Table { command } => {
            let target = target()?;
            // A table command naming a `mode: http` service is about its tokens.
            let http = |service: &Option<String>| -> anyhow::Result<bool> {
                match service {
                    Some(name) => view::is_http_service(&target, name),
                    None => Ok(false),
                }
            };
            match command {
                TableCommand::Show {
                    service: Some(service),
                    client,
                    json,
                } if view::is_http_service(&target, &service)? => {
                    if client.is_some() {
                        anyhow::bail!(
                            "--client selects stick entries; service {service} is mode: http (its tokens: `table get TOKEN --service {service}`)"
                        );
                    }
                    let limit = control::TOKEN_LIST_LIMIT;
                    print_reply(&call(&target, Request::TokenList { service, limit })?, json)
                }
                TableCommand::Show {
                    service,
                    client,
                    json,
                } => {
                    let rows = view::stick_rows(&target, service.as_deref(), client)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&rows)?);
                    } else {
                        view::print_table(&rows);
                    }
                    Ok(())
                }
                TableCommand::Get { key, service, json } => {
                    let http = http(&service)?;
                    let request = control::keyed_request(&key, service, http, false)
                        .map_err(anyhow::Error::msg)?;
                    print_reply(&call(&target, request)?, json)
                }
                TableCommand::Set { client, backend } => {
                    let (service, backend) = service_backend(&backend)?;
                    print_reply(
                        &call(
                            &target,
                            Request::TableSet {
                                client,
                                service,
                                backend,
                            },
                        )?,
                        false,
                    )
                }
                TableCommand::Delete { key, service } => {
                    let http = http(&service)?;
                    let request = control::keyed_request(&key, service, http, true)
                        .map_err(anyhow::Error::msg)?;
                    print_reply(&call(&target, request)?, false)
                }
                TableCommand::Flush { service, backend } => {
                    let http = http(&service)?;
                    let request = control::flush_request(service, backend, http)
                        .map_err(anyhow::Error::msg)?;
                    print_reply(&call(&target, request)?, false)
                }
            }
        }
        Command::Backend { all_nodes, command } => {
            let target = target()?;
            // With --all-nodes, the change goes to every node through this node's controller.
            let scope = |request: Request| {
                if all_nodes {
                    Request::AllNodes {
                        request: Box::new(request),
                    }
                } else {
                    request
                }
            };
            let (name, action) = match command {
                BackendCommand::List { .. } if all_nodes => {
                    anyhow::bail!("--all-nodes applies to changes; `backend list` shows this node")
                }
                BackendCommand::List { json } => {
                    let status = view::status(&target)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status.services)?);
                    } else {
                        view::print_backends(&status);
                    }
                    return Ok(());
                }
                BackendCommand::Add {
                    backend,
                    address,
                    weight,
                    mac,
                    port,
                } => {
                    let (service, backend) = service_backend(&backend)?;
                    let request = Request::BackendAdd {
                        service,
                        backend,
                        address,
                        weight,
                        mac,
                        port,
                    };
                    return print_reply(&call(&target, scope(request))?, false);
                }
                BackendCommand::Remove { backend } => {
                    let (service, backend) = service_backend(&backend)?;
                    return print_reply(
                        &call(&target, scope(Request::BackendRemove { service, backend }))?,
                        false,
                    );
                }
                BackendCommand::Drain { backend } => (backend, BackendAction::Drain),
                BackendCommand::Enable { backend } => (backend, BackendAction::Enable),
                BackendCommand::Disable { backend } => (backend, BackendAction::Disable),
                BackendCommand::Weight { backend, weight } => {
                    (backend, BackendAction::Weight(weight))
                }
            };
            let (service, backend) = service_backend(&name)?;
            print_reply(
                &call(
                    &target,
                    scope(Request::Backend {
                        service,
                        backend,
                        action,
                    }),
                )?,
                false,
            )
        }
        Command::Stats { json } => print_reply(&call(&target()?, Request::Stats)?, json),
        Command::Reload => print_reply(&call(&target()?, Request::Reload)?, false),
        Command::Detach => {
            let target = target()?;
            let socket = control::socket_path(target.netns.as_deref(), &target.interface);
            if socket.exists() {
                // A running controller detaches itself (and stops), so it does not fight us.
                if let Ok(reply) = control::call(&socket, &Request::Detach) {
                    if !reply.ok {
                        anyhow::bail!("{}", reply.message);
                    }
                    // Wait (bounded) for it to finish removing the pins.
                    let pins = sticky_lb::dataplane::PinDir::new(
                        target.netns.as_deref(),
                        &target.interface,
                    );
                    for _ in 0..100 {
                        if !pins.path().exists() {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    println!("{}", reply.message);
                    return Ok(());
                }
            }
            controller::detach(target.netns.as_deref(), &target.interface)?;
            println!("detached from {}", target.interface);
            Ok(())
        }
        Command::Decap { addresses, mode } => {
            let Some(interface) = cli.interface else {
                anyhow::bail!(
                    "decap needs --interface IF (the interface tunnel packets arrive on)"
                );
            };
            decap::run(&decap::Options {
                interface,
                addresses,
                mode,
            })
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sticky-lb",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
    }
}
