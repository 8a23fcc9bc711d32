//! `signpost`: the host agent and the commands that talk to it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signpost_agent::cli::{self, Client};
use signpost_core::config::AgentConfig;

/// Exit code for a configuration that cannot be used (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "signpost",
    version,
    about = "Service discovery sidecar: local DNS, proxy and health checks for every host"
)]
struct Cli {
    /// The agent's local API, for the commands that talk to it.
    #[arg(
        long,
        global = true,
        env = "SIGNPOST_HTTP_ADDR",
        default_value = "127.0.0.1:8500"
    )]
    http_addr: String,
    /// The control plane's HTTP API (HTTPS; `http://host:port` for a
    /// plain one on loopback), for `acl`, `cmd`, `audit`, `intention`
    /// and `ca`.
    #[arg(
        long,
        global = true,
        env = "SIGNPOST_CONTROL_PLANE",
        default_value = "127.0.0.1:8700"
    )]
    control_plane: String,
    /// The CA that signed the control plane's certificate (its
    /// `data_dir/tls/ca.pem`); default: that file when it is on this
    /// host, else the system's roots.
    #[arg(long, global = true, env = "SIGNPOST_CACERT")]
    ca_file: Option<PathBuf>,
    /// An ACL token's secret (also `CONSUL_HTTP_TOKEN`).
    #[arg(long, global = true, env = "SIGNPOST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token (also `CONSUL_HTTP_TOKEN_FILE`).
    #[arg(long, global = true, env = "SIGNPOST_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Agent {
        /// The agent configuration file.
        #[arg(long, short, default_value = "/etc/signpost/agent.yaml")]
        config: PathBuf,
        /// Check the configuration and the service files, then exit.
        #[arg(long)]
        validate: bool,
    },
    /// Run an agent with a demo service in a temporary directory.
    Dev {
        /// Where the agent's DNS server listens (UDP and TCP).
        #[arg(long, default_value = "127.0.0.1:8600")]
        dns_addr: String,
    },
    /// List this host's services, their health and service-file errors.
    Services {
        #[arg(long)]
        json: bool,
    },
    /// This agent's state and how fresh its view of the fleet is.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List this host's checks.
    Checks {
        #[arg(long)]
        json: bool,
    },
    /// Register the services of a definition file (YAML as in services.d).
    Register { file: PathBuf },
    /// Put an instance in maintenance and wait until every agent using its
    /// service applied it (for ExecStop= before stopping a service).
    /// Exits non-zero, naming the agents that did not apply it, when the
    /// timeout comes first.
    /// `--self` (in a systemd unit's `ExecStop=`): the instances whose
    /// service file names that unit (`drain: {unit: …}`), each with its
    /// `drain.timeout`.
    Drain {
        #[arg(required_unless_present_any = ["own", "unit"])]
        id: Option<String>,
        /// The instances of the systemd unit this command runs in.
        #[arg(long = "self", conflicts_with_all = ["id", "unit"])]
        own: bool,
        /// The instances of this systemd unit.
        #[arg(long, conflicts_with = "id")]
        unit: Option<String>,
        /// 30s for an ID; for a unit's instances, their `drain.timeout`.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Once drained, deregister the instance.
        #[arg(long)]
        deregister: bool,
        /// Once drained, run this command (with `sh -c`); its exit status
        /// is the command's.
        #[arg(long, value_name = "CMD")]
        exec: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make the agent read its configuration file again (as SIGHUP
    /// does): what can change while it serves is applied, the rest is
    /// listed as needing a restart; a bad file is refused and changes
    /// nothing.
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Deregister a service registered through the API.
    Deregister { id: String },
    /// Restart the agent without dropping anything: a new process (the
    /// program installed now) takes over the listening sockets and the
    /// state; this one finishes its connections and exits.
    Restart,
    /// Operator commands applied by every agent's proxy (an operator
    /// token creates and revokes them).
    Cmd {
        #[command(subcommand)]
        command: CmdCommand,
    },
    /// Manage the control plane's ACL tokens (needs an admin token).
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// The mesh's intentions: which service may call which (writes need
    /// `intentions` write on the destination).
    Intention {
        #[command(subcommand)]
        command: IntentionCommand,
    },
    /// The mesh's CA: its roots, and a rotation (needs an operator token).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The control plane's audit log: token changes and refused requests
    /// (needs an operator token).
    Audit {
        /// The newest entries to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff).
    #[command(hide = true)]
    Man,
    /// Put a service (or, without ID, the whole node) in or out of maintenance.
    /// `--self` (in a systemd unit's `ExecStartPost=`, after a drain on
    /// stop): the instances whose service file names that unit.
    Maint {
        #[arg(conflicts_with_all = ["own", "unit"])]
        id: Option<String>,
        /// The instances of the systemd unit this command runs in.
        #[arg(long = "self", conflicts_with = "unit")]
        own: bool,
        /// The instances of this systemd unit.
        #[arg(long)]
        unit: Option<String>,
        #[arg(long, conflicts_with = "disable", required_unless_present = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// What every new command says.
#[derive(clap::Args)]
struct CommandArgs {
    /// Why (goes to the audit log).
    #[arg(long)]
    reason: String,
    /// How long it lasts (at most 168h).
    #[arg(long, value_parser = parse_duration)]
    ttl: std::time::Duration,
    /// Apply it only on hosts that run this service (repeatable).
    #[arg(long = "caller")]
    callers: Vec<String>,
    /// Only requests whose path starts with this (degrade, circuit,
    /// ratelimit of HTTP services).
    #[arg(long)]
    path: Option<String>,
    /// With --path: only requests with this method.
    #[arg(long, requires = "path")]
    method: Option<String>,

    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CmdCommand {
    /// An instance gets no new connections or requests.
    Block {
        service: String,
        /// The instance, as ip:port.
        instance: String,
        #[command(flatten)]
        args: CommandArgs,
    },
    /// Revoke the blocks of an instance.
    Unblock { service: String, instance: String },
    /// Answer for the service without calling it: with --status (and
    /// --body, --header), or fail fast with 503.
    Degrade {
        service: String,
        /// Only the requests this instance (ip:port) would get.
        #[arg(long)]
        instance: Option<String>,
        #[arg(long)]
        status: Option<u16>,
        #[arg(long, default_value = "")]
        body: String,
        /// `Name: value`, repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        args: CommandArgs,
    },
    /// Force the service's circuit open or closed.
    Circuit {
        service: String,
        /// Only this instance (ip:port): open blocks it.
        #[arg(long)]
        instance: Option<String>,
        #[arg(value_parser = ["open", "closed"])]
        state: String,
        #[command(flatten)]
        args: CommandArgs,
    },
    /// At most --per-second requests (connections for TCP services), with
    /// bursts of --burst, on each agent; --split makes it the fleet's rate,
    /// shared among the agents using the service.
    Ratelimit {
        service: String,
        /// Only the requests this instance (ip:port) would get.
        #[arg(long)]
        instance: Option<String>,
        #[arg(long)]
        per_second: f64,
        #[arg(long)]
        burst: u32,
        #[arg(long)]
        split: bool,
        #[command(flatten)]
        args: CommandArgs,
    },
    /// Traffic policy: the proxy.services fields as JSON, e.g.
    /// '{"retries": 0, "timeout": "2s"}'.
    Policy {
        service: String,
        policy: String,
        #[command(flatten)]
        args: CommandArgs,
    },
    /// List commands.
    List {
        #[arg(long)]
        service: Option<String>,
        /// active, expired or revoked.
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One command, with how many agents applied it.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// End a command before its expiry.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum AclCommand {
    /// Tokens: create, list, delete.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Policies (rules in Consul's HCL or JSON): create, list, delete.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is shown this once.
    Create {
        /// A policy by name or ID (repeat for more); built-in:
        /// global-management, builtin/global-read-only, builtin/operator,
        /// builtin/agent.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// A node this token may register as, and nothing else (an
        /// agent's token; repeat for more).
        #[arg(long = "node-identity")]
        node_identities: Vec<String>,
        /// A service this token may register (repeat for more).
        #[arg(long = "service-identity")]
        service_identities: Vec<String>,
        /// When the token stops working, e.g. 24h.
        #[arg(long)]
        ttl: Option<String>,
        /// A role from before policies: read, agent, operator or admin.
        #[arg(long)]
        role: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a token by its accessor.
    Delete { accessor: String },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Create a policy.
    Create {
        #[arg(long)]
        name: String,
        /// The rules (HCL or JSON), or @FILE.
        #[arg(long)]
        rules: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
    },
    /// List the policies, built-in ones first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a policy by its ID.
    Delete { id: String },
}

#[derive(Subcommand)]
enum IntentionCommand {
    /// Create an intention from SRC to DST (a service name or `*`);
    /// allow unless --deny, or HTTP permissions with --file.
    Create {
        source: String,
        destination: String,
        #[arg(long, conflicts_with_all = ["allow", "file"])]
        deny: bool,
        /// The default.
        #[arg(long)]
        allow: bool,
        /// A deny from it only logs and counts (to try it on live traffic).
        #[arg(long)]
        shadow: bool,
        #[arg(long, default_value = "")]
        description: String,
        /// A JSON file with Consul's Permissions array (L7 rules, tried in
        /// order), instead of an action.
        #[arg(long, conflicts_with = "allow")]
        file: Option<PathBuf>,
    },
    /// List the intentions, in the order they are tried.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete the intention from SRC to DST.
    Delete { source: String, destination: String },
    /// Whether a connection from SRC to DST is allowed: prints Allowed
    /// (exit 0) or Denied (exit 1); exit 2 when it cannot tell.
    Check { source: String, destination: String },
}

#[derive(Subcommand)]
enum CaCommand {
    /// The roots every agent trusts (two during a rotation).
    Roots {
        #[arg(long)]
        json: bool,
    },
    /// A new root, cross-signed by the old one; agents renew their
    /// certificates at once and trust both until the old one's last
    /// certificate has expired.
    Rotate,
}

/// The CA of the control plane's certificate when the CLI runs on a
/// control-plane host with the packaged layout.
const LOCAL_CA: &str = "/var/lib/signpost-control-plane/tls/ca.pem";

/// mimalloc rather than glibc's allocator: each new proxied connection
/// allocates a tokio task (128-byte aligned, which glibc serves through
/// its slow `memalign` path) and hyper's two 8 KiB buffers (beyond glibc's
/// per-thread cache), and frees them at its end. With mimalloc a request
/// on a new connection costs 8 % fewer instructions (1.4 % with
/// keep-alive), for 2 MiB more RSS (bench/RESULTS.md).
#[global_allocator]
static GLOBAL: signpost_agent::alloc::MiMalloc = signpost_agent::alloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("signpost: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let token = match cli::token(cli.token.clone(), cli.token_file.as_deref()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("signpost: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let client = Client::new(&cli.http_addr, token.clone());
        let ca_file = cli
            .ca_file
            .clone()
            .or_else(|| Some(PathBuf::from(LOCAL_CA)).filter(|p| p.exists()));
        let control_plane =
            || Client::control_plane(&cli.control_plane, token.clone(), ca_file.as_deref());
        let result = match cli.command {
            Command::Agent { config, validate } => return agent(config, validate).await,
            Command::Dev { dns_addr } => {
                signpost_agent::dev::run(
                    &cli.http_addr,
                    &dns_addr,
                    signpost_daemon::signals::shutdown_on_signal("signpost"),
                )
                .await
            }
            Command::Services { json } => cli::services(&client, json).await,
            Command::Checks { json } => cli::checks(&client, json).await,
            Command::Status { json } => cli::status(&client, json).await,
            Command::Register { file } => cli::register(&client, &file).await,
            Command::Deregister { id } => cli::deregister(&client, &id).await,
            Command::Reload { json } => cli::reload(&client, json).await,
            Command::Restart => cli::restart(&client).await,
            Command::Drain {
                id,
                own,
                unit,
                timeout,
                deregister,
                exec,
                json,
            } => {
                let then = cli::AfterDrain { deregister, exec };
                match (id, cli::which_unit(own, unit)) {
                    (Some(id), _) => {
                        let timeout = timeout.unwrap_or(std::time::Duration::from_secs(30));
                        cli::drain(&client, &id, timeout, &then, json).await
                    }
                    (None, unit) => cli::drain_unit(&client, unit, timeout, &then, json).await,
                }
            }
            Command::Maint {
                id,
                own,
                unit,
                enable,
                disable: _,
                reason,
            } => match (own || unit.is_some()).then(|| cli::which_unit(own, unit)) {
                Some(unit) => cli::maint_unit(&client, unit, enable, &reason).await,
                None => cli::maint(&client, id.as_deref(), enable, &reason).await,
            },
            Command::Acl {
                command: AclCommand::Token { command },
            } => match control_plane() {
                Ok(cp) => match command {
                    TokenCommand::Create {
                        policies,
                        node_identities,
                        service_identities,
                        ttl,
                        role,
                        description,
                        json,
                    } => {
                        let new = cli::NewToken {
                            description,
                            policies,
                            node_identities,
                            service_identities,
                            ttl,
                            role,
                        };
                        cli::token_create(&cp, new, json).await
                    }
                    TokenCommand::List { json } => cli::token_list(&cp, json).await,
                    TokenCommand::Delete { accessor } => cli::token_delete(&cp, &accessor).await,
                },
                Err(e) => Err(e),
            },
            Command::Acl {
                command: AclCommand::Policy { command },
            } => match control_plane() {
                Ok(cp) => match command {
                    PolicyCommand::Create {
                        name,
                        rules,
                        description,
                        json,
                    } => cli::policy_create(&cp, &name, &description, &rules, json).await,
                    PolicyCommand::List { json } => cli::policy_list(&cp, json).await,
                    PolicyCommand::Delete { id } => cli::policy_delete(&cp, &id).await,
                },
                Err(e) => Err(e),
            },
            Command::Cmd { command } => match control_plane() {
                Ok(cp) => operator_command(&cp, command).await,
                Err(e) => Err(e),
            },
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut command = Cli::command();
                clap_complete::generate(shell, &mut command, "signpost", &mut std::io::stdout());
                Ok(())
            }
            Command::Man => {
                use clap::CommandFactory;
                clap_mangen::Man::new(Cli::command())
                    .render(&mut std::io::stdout())
                    .map_err(anyhow::Error::from)
            }
            Command::Audit { limit, json } => match control_plane() {
                Ok(cp) => cli::audit(&cp, limit, json).await,
                Err(e) => Err(e),
            },
            Command::Intention {
                command:
                    IntentionCommand::Check {
                        source,
                        destination,
                    },
            } => {
                let checked = match control_plane() {
                    Ok(cp) => cli::intention::check(&cp, &source, &destination).await,
                    Err(e) => Err(e),
                };
                // Consul's codes: 1 is "denied", so failing to tell is 2.
                return match checked {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::from(cli::intention::EXIT_NOT_ALLOWED),
                    Err(e) => failed(&e, cli::intention::EXIT_CHECK_FAILED),
                };
            }
            Command::Intention { command } => match control_plane() {
                Ok(cp) => intention_command(&cp, command).await,
                Err(e) => Err(e),
            },
            Command::Ca { command } => match control_plane() {
                Ok(cp) => match command {
                    CaCommand::Roots { json } => cli::ca::roots(&cp, json).await,
                    CaCommand::Rotate => cli::ca::rotate(&cp).await,
                },
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => failed(&e, 1),
        }
    })
}

/// Prints why a command failed; its exit code: 77 for a refused token,
/// 65 for input the server refused, else `other`.
fn failed(e: &anyhow::Error, other: u8) -> ExitCode {
    eprintln!("signpost: {e:#}");
    if e.downcast_ref::<cli::Denied>().is_some() {
        ExitCode::from(cli::EXIT_DENIED)
    } else if e.downcast_ref::<cli::Invalid>().is_some() {
        ExitCode::from(cli::EXIT_INVALID)
    } else {
        ExitCode::from(other)
    }
}

async fn intention_command(cp: &Client, command: IntentionCommand) -> anyhow::Result<()> {
    match command {
        IntentionCommand::Create {
            source,
            destination,
            deny,
            allow: _,
            shadow,
            description,
            file,
        } => {
            let new = cli::intention::NewIntention {
                source: &source,
                destination: &destination,
                deny,
                shadow,
                description: &description,
                permissions: file.as_deref(),
            };
            cli::intention::create(cp, &new).await
        }
        IntentionCommand::List { json } => cli::intention::list(cp, json).await,
        IntentionCommand::Delete {
            source,
            destination,
        } => cli::intention::delete(cp, &source, &destination).await,
        // Answered in `main`, with its own exit codes; a denial here is
        // still printed.
        IntentionCommand::Check {
            source,
            destination,
        } => cli::intention::check(cp, &source, &destination)
            .await
            .map(drop),
    }
}

async fn agent(path: PathBuf, validate: bool) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if validate {
        if let Err(e) = signpost_agent::preflight(&config) {
            eprintln!("{}: {e:#}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
        return match cli::validate_service_files(&config.services_dir) {
            Ok(n) => {
                println!(
                    "{}: configuration is valid ({n} service files)",
                    path.display()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in errors {
                    eprintln!("{e}");
                }
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    // Before anything slow: until then SIGHUP would end the process.
    let reloading = signpost_agent::Reloading {
        signal: signpost_daemon::signals::reload_on_signal("signpost"),
        file: path,
    };
    signpost_daemon::logging::init(&config.log);
    match signpost_agent::run(
        config,
        Some(reloading),
        None,
        signpost_daemon::signals::shutdown_on_signal("signpost"),
    )
    .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            eprintln!("signpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn operator_command(cp: &Client, command: CmdCommand) -> anyhow::Result<()> {
    use cli::cmd::{Common, create};
    use serde_json::json;
    fn common<'a>(service: &'a str, args: &'a CommandArgs) -> Common<'a> {
        Common {
            service,
            callers: &args.callers,
            path: args.path.as_deref(),
            method: args.method.as_deref(),
            reason: &args.reason,
            ttl: args.ttl,
            json: args.json,
        }
    }
    match &command {
        CmdCommand::Block {
            service,
            instance,
            args,
        } => {
            create(
                cp,
                &common(service, args),
                json!({"kind": "block"}),
                Some(instance),
            )
            .await
        }
        CmdCommand::Unblock { service, instance } => cli::cmd::unblock(cp, service, instance).await,
        CmdCommand::Degrade {
            service,
            instance,
            status,
            body,
            headers,
            args,
        } => {
            let action = match status {
                Some(status) => {
                    let mut map = serde_json::Map::new();
                    for h in headers {
                        let (name, value) = h.split_once(':').ok_or_else(|| {
                            anyhow::anyhow!("--header {h:?}: expected `Name: value`")
                        })?;
                        map.insert(name.trim().to_string(), json!(value.trim()));
                    }
                    json!({"kind": "degrade", "fallback": {"status": status, "body": body, "headers": map}})
                }
                None => json!({"kind": "degrade"}),
            };
            create(cp, &common(service, args), action, instance.as_deref()).await
        }
        CmdCommand::Circuit {
            service,
            instance,
            state,
            args,
        } => {
            let action = json!({"kind": "circuit", "state": state});
            create(cp, &common(service, args), action, instance.as_deref()).await
        }
        CmdCommand::Ratelimit {
            service,
            instance,
            per_second,
            burst,
            split,
            args,
        } => {
            let action = json!({"kind": "rate_limit", "per_second": per_second, "burst": burst, "split": split});
            create(cp, &common(service, args), action, instance.as_deref()).await
        }
        CmdCommand::Policy {
            service,
            policy,
            args,
        } => {
            let policy: serde_json::Value = serde_json::from_str(policy)
                .map_err(|e| anyhow::anyhow!("the policy is not JSON: {e}"))?;
            let action = json!({"kind": "policy", "policy": policy});
            create(cp, &common(service, args), action, None).await
        }
        CmdCommand::List {
            service,
            state,
            json,
        } => cli::cmd::list(cp, service.as_deref(), state.as_deref(), *json).await,
        CmdCommand::Show { id, json } => cli::cmd::show(cp, id, *json).await,
        CmdCommand::Revoke { id } => cli::cmd::revoke(cp, id).await,
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    signpost_core::duration::parse(s).map_err(|e| e.to_string())
}

fn load_config(path: &std::path::Path) -> Result<AgentConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    AgentConfig::from_yaml(&path.display().to_string(), &text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the definitions (unique names, valid
    /// requirements), which otherwise fail only when a command runs.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
