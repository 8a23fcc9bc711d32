//! The Signpost control plane: it aggregates what every agent reports and
//! pushes catalog changes to the agents that use each service.
//!
//! Layout:
//! - [`sync`]: the agents' gRPC endpoint (TLS, token-authenticated), one
//!   bidirectional `Session` stream per agent.
//! - [`catalog`]: the fleet's instances, subscriptions and the fan-out of
//!   per-service deltas to subscribers only.
//! - [`http`]: nodes with liveness, catalog and health in Consul's shapes,
//!   `/metrics`.
//! - [`tls`]: `init-tls`, the private CA and server certificate.
//! - [`store`]: the last catalog snapshot, kept under `data_dir`; or,
//!   with `store: etcd` (the `etcd` feature), `etcd`: replicas that share
//!   an etcd cluster, each following it with one watch.
//! - [`commands`]: operator commands, stored and sent to every agent.
//! - [`kv`]: Consul's KV store and sessions, in the same store.
//! - [`acl`]: tokens with roles (hashed, bootstrap admin token on first
//!   start); [`audit`]: the audit log, bounded and rotated.
//!
//! The agents are the source of truth for their hosts; the kept snapshot
//! only bridges a restart: a restarted control plane serves every known
//! instance (nodes `unreachable`) until their agents reconnect and resend
//! their state, so nothing vanishes on the way.

pub mod acl;
pub mod audit;
pub mod catalog;
pub mod commands;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod http;
pub mod kv;
pub mod mesh;
pub mod metrics;
pub mod store;
pub mod sync;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use signpost_core::control_plane_config::{ControlPlaneConfig, StoreKind};
use signpost_proto::sync_server::SyncServer;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::catalog::Catalog;

/// How often node liveness moves on (probe deadlines, re-probes, reaping).
const LIVENESS_TICK: Duration = Duration::from_millis(250);
/// An HTTP/2 ping goes to an agent heard nothing from for this long...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and an agent that does not answer it within this is gone: a host
/// that lost power or its link sends no reset, and without the ping its
/// stream would look open for as long as TCP keeps trying (minutes).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The addresses the control plane listens on, once it does.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// What runs until shutdown: a name for the log and how it ended. One
/// that ends before the shutdown takes the control plane down loudly
/// (systemd starts it again) rather than leaving it half working.
type Running = tokio::task::JoinSet<(&'static str, Result<(), String>)>;

/// Runs until `shutdown`; `ready` receives the bound addresses.
pub async fn run(
    config: ControlPlaneConfig,
    ready: Option<tokio::sync::oneshot::Sender<Listening>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (cert_file, key_file) = config.tls_files();
    let cert = std::fs::read(&cert_file).with_context(|| {
        format!(
            "cannot read the server certificate {} (create one with `signpost-control-plane init-tls`)",
            cert_file.display()
        )
    })?;
    let key = std::fs::read(&key_file)
        .with_context(|| format!("cannot read the server key {}", key_file.display()))?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert.clone(), key.clone()));
    let (ca_file, ca_key_file) = config.ca_files();
    let issuer = match std::fs::read(&ca_file) {
        Ok(ca) => {
            // Agents with a certificate are checked against the CA; the
            // others still join with their token (and ask for one).
            tls = tls
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(true);
            if ca_key_file.exists() {
                Some(Arc::new(tls::Issuer::load(
                    &ca_file,
                    &ca_key_file,
                    config.grpc.client_cert_ttl,
                )?))
            } else {
                tracing::info!(key = %ca_key_file.display(), "no CA key: agents' client certificates are checked, none are issued");
                None
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(ca = %ca_file.display(), "no CA: agents connect with their token only, without client certificates");
            None
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the CA {}", ca_file.display()));
        }
    };

    if config.data_dir.is_dir() {
        signpost_daemon::fs::clean_up(&config.data_dir);
    }
    let mut running = Running::new();
    let state = match config.store {
        StoreKind::File => open_files(&config, &mut running, &shutdown).await?,
        #[cfg(feature = "etcd")]
        StoreKind::Etcd => open_etcd(&config, &mut running, &shutdown).await?,
        #[cfg(not(feature = "etcd"))]
        StoreKind::Etcd => anyhow::bail!(
            "store: etcd, but this build has no etcd store (build with `--features etcd`; the packages have it)"
        ),
    };
    let Opened {
        catalog,
        acl,
        commands,
        kv,
        nodes,
        epoch,
        reporting,
        quorum,
    } = state;
    keep_audit(&acl, &catalog, &mut running, &shutdown);
    {
        let (kv, catalog, stop) = (kv.clone(), catalog.clone(), shutdown.clone());
        running.spawn(async move {
            kv::sessions::run(kv, catalog, stop).await;
            ("KV sessions", Ok(()))
        });
    }
    {
        // service-defaults protocols, as the store has them, in the
        // catalog that agents are sent.
        let (mirror, catalog, stop) = (kv.mirror().clone(), catalog.clone(), shutdown.clone());
        running.spawn(async move {
            let mut changes = mirror.config_changes();
            loop {
                let protocols = mirror
                    .configs()
                    .into_iter()
                    .filter_map(|(name, (_, _, entry))| {
                        let p: signpost_core::model::Protocol = entry.protocol.parse().ok()?;
                        Some((name, signpost_proto::Protocol::from(p).into()))
                    })
                    .collect();
                catalog.set_protocols(protocols);
                tokio::select! {
                    _ = stop.cancelled() => return ("service-defaults", Ok(())),
                    changed = changes.changed() => if changed.is_err() {
                        return ("service-defaults", Err("the KV store's mirror is gone".to_string()));
                    },
                }
            }
        });
    }
    {
        let (kv, mesh, stop) = (kv.clone(), config.mesh.clone(), shutdown.clone());
        running.spawn(async move {
            mesh::keep_ca(kv, mesh, stop).await;
            ("mesh CA", Ok(()))
        });
    }
    let tokens = Arc::new(config.agent_tokens.clone());
    let service = sync::SyncService {
        catalog: catalog.clone(),
        tokens: tokens.clone(),
        epoch,
        commands: commands.clone(),
        acl: acl.clone(),
        reporting,
        issuer,
        kv: kv.clone(),
        mesh: config.mesh.clone(),
        mesh_states: Arc::default(),
        datacenter: config.datacenter.clone(),
    };

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc.listen)
        .await
        .with_context(|| format!("cannot listen on grpc.listen {}", config.grpc.listen))?;
    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    let listening = Listening {
        grpc: grpc_listener.local_addr()?,
        http: http_listener.local_addr()?,
    };
    tracing::info!(grpc = %listening.grpc, http = %listening.http, "control plane listening");

    let grpc_shutdown = shutdown.clone();
    let grpc = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tls_config(tls)
        .context("invalid TLS certificate or key")?
        .add_service(tonic::service::interceptor::InterceptedService::new(
            SyncServer::new(service).max_decoding_message_size(sync::MAX_AGENT_MESSAGE),
            sync::check_token(tokens, acl.clone()),
        ))
        .serve_with_incoming_shutdown(
            // Small writes (a delta, a ping's answer) go out at once:
            // tonic sets TCP_NODELAY only on listeners it binds itself.
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            async move { grpc_shutdown.cancelled().await },
        );
    running.spawn(async move { ("gRPC server", grpc.await.map_err(|e| e.to_string())) });
    let certificates = metrics::Certificates {
        files: vec![
            ("http", config.http_tls_files().0),
            ("grpc", config.tls_files().0),
            ("ca", config.ca_files().0),
        ],
    };
    let metrics = Arc::new(metrics::Metrics::new(&catalog, acl.denials(), certificates));
    let server_metrics = metrics.http_server.clone();
    let router = http::router(http::HttpState {
        catalog,
        acl,
        commands,
        kv,
        nodes,
        metrics,
        datacenter: config.datacenter.clone(),
        data_dir: config.data_dir.clone(),
        quorum,
        mesh: config.mesh.clone(),
        shutdown: shutdown.clone(),
    });
    let http_tls = if config.http.plaintext {
        tracing::warn!(listen = %listening.http, "the HTTP API is plain HTTP (http.plaintext): tokens cross it in the clear on this host");
        None
    } else {
        Some(tls::http_server_config(&config.http_tls_files())?)
    };
    let (http_shutdown, limits) = (shutdown.clone(), config.http.limits.clone());
    running.spawn(async move {
        signpost_daemon::http_server::serve(
            http_listener,
            router,
            &limits,
            server_metrics,
            http_tls,
            http_shutdown,
        )
        .await;
        ("HTTP server", Ok(()))
    });
    if let Some(ready) = ready
        && ready.send(listening).is_err()
    {
        tracing::debug!("nobody waits for the ready signal");
    }
    if let Some(why) = until_done(running, &shutdown).await {
        anyhow::bail!("{why}");
    }
    tracing::info!("control plane stopped");
    Ok(())
}

/// What the store gives the rest of the control plane.
struct Opened {
    catalog: Arc<Catalog>,
    acl: Arc<acl::Acl>,
    commands: Arc<commands::Commands>,
    kv: Arc<kv::Kv>,
    /// Where external nodes are written (a shared store), if not straight
    /// into the catalog.
    nodes: Option<Arc<dyn store::Shared>>,
    /// What the catalog's indexes belong to (`Welcome.epoch`).
    epoch: String,
    reporting: sync::Reporting,
    quorum: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// One replica on files under `data_dir`.
async fn open_files(
    config: &ControlPlaneConfig,
    running: &mut Running,
    shutdown: &CancellationToken,
) -> anyhow::Result<Opened> {
    let catalog = open_catalog(config, running, shutdown).await;
    let acl = Arc::new(
        acl::Acl::open(
            &config.data_dir,
            config.audit.clone(),
            config.acl.default_policy,
        )
        .with_context(|| {
            format!(
                "cannot open the ACL tokens in {}",
                config.data_dir.display()
            )
        })?,
    );
    let commands =
        Arc::new(commands::Commands::open(&config.data_dir).with_context(|| {
            format!("cannot open the commands in {}", config.data_dir.display())
        })?);
    let store = kv::file::FileBackend::open(&config.data_dir)
        .with_context(|| format!("cannot open the KV store in {}", config.data_dir.display()))?;
    let kv = Arc::new(kv::Kv::new(store.mirror(), Arc::new(store)));
    Ok(Opened {
        catalog,
        acl,
        commands,
        kv,
        nodes: None,
        // Indexes start again with every start of the one replica.
        epoch: format!("{:016x}", rand::random::<u64>()),
        reporting: sync::Reporting::Local,
        quorum: Arc::new(|| true),
    })
}

/// One of several equal replicas on etcd: everything read from it before
/// agents are served, then followed with one watch; the leader's work
/// and this replica's lease kept up in the background.
#[cfg(feature = "etcd")]
async fn open_etcd(
    config: &ControlPlaneConfig,
    running: &mut Running,
    shutdown: &CancellationToken,
) -> anyhow::Result<Opened> {
    let etcd = etcd::Etcd::connect(&config.etcd).await?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    let catalog = Arc::new(Catalog::shared());
    catalog.set_replica(&etcd.replica);
    let acl = Arc::new(
        acl::Acl::for_store(
            &config.data_dir,
            config.audit.clone(),
            config.acl.default_policy,
        )
        .with_context(|| format!("cannot open the audit log in {}", config.data_dir.display()))?,
    );
    acl.share(etcd.clone(), &config.data_dir)
        .await
        .context("cannot set up the ACL tokens in etcd")?;
    let commands = Arc::new(commands::Commands::for_store(etcd.clone()));
    let followers = etcd::follow::Followers {
        catalog: catalog.clone(),
        commands: commands.clone(),
        acl: acl.clone(),
        leader_gone: Arc::new(tokio::sync::Notify::new()),
        kv: Arc::new(kv::Mirror::new(0)),
    };
    let kv = Arc::new(kv::Kv::new(
        followers.kv.clone(),
        Arc::new(etcd::kv::EtcdKv { etcd: etcd.clone() }),
    ));
    let (revision, cluster) = etcd::follow::load(&etcd, &followers)
        .await
        .context("cannot read the fleet from etcd")?;
    tracing::info!(
        nodes = catalog.read(|i| i.nodes.len()),
        revision,
        replica = %etcd.replica,
        "following etcd"
    );
    {
        let (etcd, followers, stop) = (etcd.clone(), followers.clone(), shutdown.clone());
        running.spawn(async move {
            etcd::follow::follow(etcd, followers, revision, stop).await;
            ("etcd watch", Ok(()))
        });
    }
    {
        let (etcd, stop) = (etcd.clone(), shutdown.clone());
        running.spawn(async move {
            etcd.keep_lease(stop).await;
            ("etcd lease", Ok(()))
        });
    }
    {
        let (etcd, catalog, stop) = (etcd.clone(), catalog.clone(), shutdown.clone());
        running.spawn(async move {
            etcd::drains::run(etcd, catalog, stop).await;
            ("drain answers", Ok(()))
        });
    }
    {
        let (etcd, catalog, commands) = (etcd.clone(), catalog.clone(), commands.clone());
        let (gone, stop, after) = (
            followers.leader_gone.clone(),
            shutdown.clone(),
            config.node_reap_after,
        );
        running.spawn(async move {
            etcd::leader::run(etcd, catalog, commands, after, gone, stop).await;
            ("leader election", Ok(()))
        });
    }
    let quorum = {
        let etcd = etcd.clone();
        Arc::new(move || etcd.has_quorum())
    };
    Ok(Opened {
        catalog,
        acl,
        commands,
        kv,
        nodes: Some(etcd.clone() as Arc<dyn store::Shared>),
        // The same on every replica of the cluster and prefix: an agent
        // that moves keeps its indexes.
        epoch: format!("etcd-{cluster:016x}{}", config.etcd.prefix),
        reporting: sync::Reporting::Etcd(etcd, shutdown.clone()),
        quorum,
    })
}

/// The catalog as the last snapshot left it (or warming up without one),
/// kept in the store after every change, and its nodes' liveness moved
/// on every tick (probe rounds time out, unreachable nodes are probed
/// again and failed ones reaped after `node_reap_after`).
async fn open_catalog(
    config: &ControlPlaneConfig,
    running: &mut Running,
    shutdown: &CancellationToken,
) -> Arc<Catalog> {
    let catalog = Arc::new(Catalog::default());
    let store: Arc<dyn store::Store> = Arc::new(store::FileStore::new(&config.data_dir));
    match store.load().await {
        Ok(Some(snapshot)) => {
            tracing::info!(
                nodes = snapshot.nodes.len(),
                grace = ?config.restore_grace,
                "catalog restored from the last snapshot: nodes whose agents do not reconnect within the grace period are probed"
            );
            catalog.restore(snapshot, config.restore_grace);
        }
        // A snapshot is only a bridge: start empty rather than not at all,
        // and let agents report before telling anyone a service is gone.
        Ok(None) => {
            tracing::info!(window = ?config.restore_grace, "no catalog kept: warming up while agents report");
            catalog.warm_up(config.restore_grace);
        }
        Err(e) => {
            tracing::error!(error = %e, window = ?config.restore_grace, "cannot load the catalog snapshot; starting empty and warming up while agents report");
            catalog.warm_up(config.restore_grace);
        }
    }
    {
        let (catalog, stop) = (catalog.clone(), shutdown.clone());
        running.spawn(async move {
            store::keep(catalog, store, stop).await;
            ("catalog store", Ok(()))
        });
    }
    let (ticked, stop, after) = (catalog.clone(), shutdown.clone(), config.node_reap_after);
    running.spawn(async move {
        let mut every = tokio::time::interval(LIVENESS_TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return ("node liveness", Ok(())),
                _ = every.tick() => {}
            }
            ticked.tick(after);
        }
    });
    catalog
}

/// The audit log's periodic work (aggregated refusals written, rotation),
/// off the runtime's threads; and expired tokens deleted (by the leader,
/// when replicas share a store).
fn keep_audit(
    acl: &Arc<acl::Acl>,
    catalog: &Arc<Catalog>,
    running: &mut Running,
    shutdown: &CancellationToken,
) {
    let (acl, catalog, stop) = (acl.clone(), catalog.clone(), shutdown.clone());
    running.spawn(async move {
        let mut every = tokio::time::interval(audit::DENIED_PERIOD / 5);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return ("audit log", Ok(())),
                _ = every.tick() => {}
            }
            if catalog.is_leader() {
                acl.purge_expired().await;
            }
            let acl = acl.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || acl.audit_tick()).await {
                return ("audit log", Err(e.to_string()));
            }
        }
    });
}

/// Waits until everything has ended; the first that ended before the
/// shutdown ends the rest. Returns why, if one did.
async fn until_done(mut running: Running, shutdown: &CancellationToken) -> Option<String> {
    let mut failure = None;
    while let Some(ended) = running.join_next().await {
        let why = match ended {
            Ok((what, Err(e))) => Some(format!("{what} failed: {e}")),
            Ok((what, Ok(()))) if !shutdown.is_cancelled() => Some(format!("{what} stopped")),
            Ok(_) => None,
            Err(e) => Some(format!("a control-plane task failed: {e}")),
        };
        if let Some(why) = why {
            tracing::error!(error = %why, "the control plane cannot work without it: stopping");
            shutdown.cancel();
            failure.get_or_insert(why);
        }
    }
    failure
}
