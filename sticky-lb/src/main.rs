//! The `sticky-lb` command: the controller (`run`) and the operator's read commands.

use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode};
use sticky_lb::{
    config::{Config, ConfigError},
    control::{self, BackendAction, Request},
    controller, netns,
    view::{self, Target},
};

/// sticky-lb: a Layer-4 TCP load balancer with session persistence, its data path in XDP.
///
/// A client keeps reaching the same backend for as long as its stick-table entry lives, while
/// backends are added, drained, fail and come back.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Run in this network namespace (as created by `ip netns add`).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the data path from a config and keep it fed until SIGINT/SIGTERM.
    Run {
        /// The YAML config (see config/sticky-lb.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config without touching the kernel; exit status 2 if it is invalid.
    CheckConfig {
        /// The YAML config.
        file: PathBuf,
    },
    /// The stick table.
    Table {
        #[command(subcommand)]
        command: TableCommand,
    },
    /// Change a backend of the running controller: drain, enable, disable, weight; or list them.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
        /// The interface sticky-lb runs on (needed only if it runs on several).
        #[arg(long, short, global = true)]
        interface: Option<String>,
    },
    /// Interface, mode, services, backends and counters.
    Status {
        /// The interface sticky-lb runs on (needed only if it runs on several).
        #[arg(long, short)]
        interface: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a data path left running (`on_exit: keep-running`) and its stick table.
    Detach {
        /// The interface sticky-lb runs on (needed only if it runs on several).
        #[arg(long, short)]
        interface: Option<String>,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Backends with state, weight, active connections and stuck clients.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// No new clients; clients already stuck to it stay until their entries expire.
    Drain {
        /// SERVICE/BACKEND, as named in the config.
        backend: String,
    },
    /// Back in service (up once its health checks pass).
    Enable {
        /// SERVICE/BACKEND
        backend: String,
    },
    /// Out of service: its stuck clients move to another backend, checks notwithstanding.
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

#[derive(Subcommand)]
enum TableCommand {
    /// List stick entries: service, client, backend, idle time, age.
    Show {
        /// The interface sticky-lb runs on (needed only if it runs on several).
        #[arg(long, short)]
        interface: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
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
    eprintln!("sticky-lb: error: {e:#}");
    ExitCode::from(1)
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let parsed = Config::load(&config, true)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(controller::run(parsed, &config, cli.netns))
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
        Command::Table {
            command: TableCommand::Show { interface, json },
        } => {
            let rows = view::stick_rows(&Target::pick(cli.netns, interface)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                view::print_table(&rows);
            }
            Ok(())
        }
        Command::Backend { command, interface } => {
            let target = Target::pick(cli.netns, interface)?;
            let (name, action) = match command {
                BackendCommand::List { json } => {
                    let status = view::status(&target)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status.services)?);
                    } else {
                        view::print_backends(&status);
                    }
                    return Ok(());
                }
                BackendCommand::Drain { backend } => (backend, BackendAction::Drain),
                BackendCommand::Enable { backend } => (backend, BackendAction::Enable),
                BackendCommand::Disable { backend } => (backend, BackendAction::Disable),
                BackendCommand::Weight { backend, weight } => {
                    (backend, BackendAction::Weight(weight))
                }
            };
            let Some((service, backend)) = name.split_once('/') else {
                anyhow::bail!("'{name}' is not SERVICE/BACKEND");
            };
            let socket = control::socket_path(target.netns.as_deref(), &target.interface);
            let request = Request::Backend {
                service: service.into(),
                backend: backend.into(),
                action,
            };
            let reply = control::call(&socket, &request)?;
            if !reply.ok {
                anyhow::bail!("{}", reply.message);
            }
            println!("{}", reply.message);
            Ok(())
        }
        Command::Status { interface, json } => {
            let status = view::status(&Target::pick(cli.netns, interface)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                view::print_status(&status);
            }
            Ok(())
        }
        Command::Detach { interface } => {
            let target = Target::pick(cli.netns, interface)?;
            controller::detach(target.netns.as_deref(), &target.interface)?;
            println!("detached from {}", target.interface);
            Ok(())
        }
    }
}
