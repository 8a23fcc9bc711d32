//! `signpost-control-plane`: the fleet's catalog and the agents' sync endpoint.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signpost_core::control_plane_config::ControlPlaneConfig;

/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "signpost-control-plane",
    version,
    about = "Signpost control plane: fleet catalog and agent sync"
)]
struct Cli {
    /// The control-plane configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/signpost/control-plane.yaml"
    )]
    config: PathBuf,
    /// Check the configuration, then exit.
    #[arg(long)]
    validate: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff).
    #[command(hide = true)]
    Man,
    /// Create a private CA and a server certificate for the agents' endpoint.
    InitTls {
        /// Where to write them (default: data_dir/tls).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Names and addresses agents use to reach the control plane.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Copy the fleet's state (nodes, commands, ACL tokens) between the
    /// file store under data_dir and etcd (the `etcd:` section); the
    /// destination must hold none. Stop the control plane first.
    Migrate {
        #[arg(long, value_enum)]
        from: StoreArg,
        #[arg(long, value_enum)]
        to: StoreArg,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreArg {
    File,
    Etcd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These need no configuration.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(
                *shell,
                &mut command,
                "signpost-control-plane",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            use clap::CommandFactory;
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("signpost-control-plane: cannot write the manual page: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let config = match std::fs::read_to_string(&cli.config)
        .map_err(|e| format!("{}: cannot read: {e}", cli.config.display()))
        .and_then(|text| {
            ControlPlaneConfig::from_yaml(&cli.config.display().to_string(), &text)
                .map_err(|e| e.to_string())
        }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::InitTls { dir, names }) = cli.command {
        let dir = dir.unwrap_or_else(|| config.data_dir.join("tls"));
        return match signpost_control_plane::tls::init(&dir, &names) {
            Ok(files) => {
                println!(
                    "wrote {}, {} (give it to agents as control_plane.ca_file), {} and {}",
                    files.ca_key.display(),
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("signpost-control-plane: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.validate {
        println!("{}: configuration is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("signpost-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    if let Some(Command::Migrate { from, to }) = cli.command {
        return migrate(&runtime, &config, from, to);
    }
    signpost_daemon::logging::init(&config.log);
    runtime.block_on(async move {
        let shutdown = signpost_daemon::signals::shutdown_on_signal("signpost-control-plane");
        match signpost_control_plane::run(config, None, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("signpost-control-plane: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(feature = "etcd")]
fn migrate(
    runtime: &tokio::runtime::Runtime,
    config: &ControlPlaneConfig,
    from: StoreArg,
    to: StoreArg,
) -> ExitCode {
    use signpost_control_plane::etcd::{Etcd, migrate};
    let copied = runtime.block_on(async {
        let etcd = Etcd::connect(&config.etcd).await?;
        match (from, to) {
            (StoreArg::File, StoreArg::Etcd) => {
                migrate::file_to_etcd(&config.data_dir, &etcd).await
            }
            (StoreArg::Etcd, StoreArg::File) => {
                migrate::etcd_to_file(&etcd, &config.data_dir).await
            }
            _ => anyhow::bail!("--from and --to must differ: file to etcd, or etcd to file"),
        }
    });
    match copied {
        Ok(copied) => {
            println!("copied {copied}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("signpost-control-plane: migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "etcd"))]
fn migrate(
    _: &tokio::runtime::Runtime,
    _: &ControlPlaneConfig,
    _: StoreArg,
    _: StoreArg,
) -> ExitCode {
    eprintln!(
        "signpost-control-plane: this build has no etcd store (build with `--features etcd`; the packages have it)"
    );
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the definitions.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
