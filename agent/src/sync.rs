//! The agent's side of the sync: one TLS gRPC stream to a control-plane
//! replica. It says who it is, sends its full local state once, then a
//! delta the moment anything changes, subscribes to the services this host
//! uses, and applies what comes back to the [`FleetCache`]. When the
//! stream drops it tries the other addresses with jittered exponential
//! back-off, keeping the last view meanwhile: the configured addresses
//! from a random one on (so that a fleet spreads over the replicas), and
//! every address a name resolves to, shuffled.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::Rng;
use signpost_core::config::ControlPlaneClientConfig;
use signpost_proto::sync_client::SyncClient;
use signpost_proto::{
    Ack, AckStatus, AgentMessage, Check, CommandsApplied, ControlMessage, Delta, FullState, Hello,
    Instance, ProbeRequest, ProbeResult, Subscribe, Unsubscribe, agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::agent::Agent;
use crate::fleet::{AckRequest, FleetCache};
use crate::state::{CheckRole, Inner};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A peer probe must be answered within this: peers are on the same
/// network, and the control plane waits for the verdict to fail a host.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// An HTTP/2 ping goes out after this long without hearing from the
/// control plane...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and a control plane that does not answer it within this is gone (a
/// dead host or a cut link sends no reset): the agent fails over.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often what the proxy has in flight to draining instances is
/// looked at (and told the control plane when it changed).
const IN_FLIGHT_REPORT: Duration = Duration::from_millis(200);
/// How often the agent tells the control plane what its proxy sent each
/// service (the console's live figures).
const TRAFFIC_REPORT: Duration = Duration::from_secs(5);

/// What the sync needs besides the agent.
pub(crate) struct Settings {
    pub(crate) config: ControlPlaneClientConfig,
    /// Where peers probe this host (the liveness listener).
    pub(crate) probe_address: std::net::SocketAddr,
    /// Resolves tokens on the connection, and sends its refusals.
    pub(crate) acl: Arc<crate::acl::AgentAcl>,
    /// The client certificate's file ([`crate::identity`]).
    pub(crate) identity: std::path::PathBuf,
    /// The mesh on this host (`None`: `mesh.enabled` is off).
    pub(crate) mesh: Option<Arc<crate::mesh::Mesh>>,
}

/// A client of the control plane's agent endpoint.
pub(crate) type Client = SyncClient<InterceptedService<Channel, Bearer>>;

/// While a session is up, tokens are resolved on its connection.
struct Resolving<'a>(&'a crate::acl::AgentAcl);

impl Drop for Resolving<'_> {
    fn drop(&mut self) {
        self.0.set_client(None);
    }
}

/// How long after a failed renewal of the client certificate it is
/// asked for again.
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// The shortest time between two renewals of the client certificate.
const RENEW_MIN: Duration = Duration::from_secs(1);

/// The local state as the control plane sees it.
struct Local {
    instances: BTreeMap<String, Instance>,
    node_checks: Vec<Check>,
}

fn local(inner: &Inner) -> Local {
    let check = |c: &crate::state::CheckEntry| {
        let mut check = Check {
            id: c.id.to_string(),
            name: c.name.clone(),
            output: c.output.clone(),
            notes: c.notes.clone(),
            r#type: c.type_name().to_string(),
            ..Check::default()
        };
        check.set_health(c.status);
        check
    };
    let instances = inner
        .services
        .values()
        .map(|s| {
            let d = &s.def;
            let mut instance = Instance {
                id: d.id.to_string(),
                name: d.name.to_string(),
                address: d.address.clone(),
                port: u32::from(d.port),
                tags: d.tags.clone(),
                meta: d.meta.clone().into_iter().collect(),
                zone: d.zone.clone().unwrap_or_else(|| inner.node.zone.clone()),
                weight_passing: d.weights.passing,
                weight_warning: d.weights.warning,
                enable_tag_override: d.enable_tag_override,
                checks: inner.checks_of(&d.id).map(check).collect(),
                connect: inner.node.meshed(d),
                ..Instance::default()
            };
            instance.set_proxy_protocol(d.protocol);
            (instance.id.clone(), instance)
        })
        .collect();
    // The control plane owns the node's liveness; maintenance is ours.
    let node_checks = inner
        .node_checks()
        .filter(|c| !matches!(c.role, CheckRole::NodeHealth))
        .map(check)
        .collect();
    Local {
        instances,
        node_checks,
    }
}

fn hello(
    agent: &Agent,
    probe_address: std::net::SocketAddr,
    inbound: Option<std::net::SocketAddr>,
) -> Hello {
    agent.state.read(|inner| Hello {
        node: inner.node.name.clone(),
        node_id: inner.node.id.clone(),
        address: inner.node.address.clone(),
        zone: inner.node.zone.clone(),
        datacenter: inner.node.datacenter.clone(),
        meta: inner.node.meta.clone().into_iter().collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        probe_address: probe_address.to_string(),
        external: false,
        inbound_address: inbound.map(|a| a.to_string()).unwrap_or_default(),
    })
}

/// Answers a control plane's question: can this host reach that one? The
/// peer's agent must answer on its liveness listener, as the node asked
/// about: a hung or dying agent whose kernel still accepts is not alive,
/// and another host that took over its address does not count.
async fn probe(request: ProbeRequest) -> ProbeResult {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        crate::tls::install_crypto_provider();
        reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())
    });
    let outcome = match client {
        Ok(client) => ask(client, &request).await,
        Err(e) => Err(e.clone()),
    };
    let (reachable, error) = match outcome {
        Ok(()) => (true, String::new()),
        Err(e) => (false, e),
    };
    tracing::debug!(node = %request.node, address = %request.address, reachable, "probed a peer for the control plane");
    ProbeResult {
        probe_id: request.probe_id,
        reachable,
        error,
    }
}

/// One probe of a peer's liveness listener.
async fn ask(client: &reqwest::Client, request: &ProbeRequest) -> Result<(), String> {
    let url = format!("http://{}{}", request.address, crate::liveness::PATH);
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| signpost_core::error_chain(&e))?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let answer: serde_json::Value = response
        .json()
        .await
        .map_err(|e| format!("unreadable answer: {e}"))?;
    match answer["Node"].as_str() {
        Some(node) if node == request.node => Ok(()),
        other => Err(format!(
            "answered as node {other:?}, not {:?}",
            request.node
        )),
    }
}

/// The control plane's CA (PEM), which must hold a certificate.
fn read_ca(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let ca = std::fs::read(path)
        .with_context(|| format!("cannot read control_plane.ca_file {}", path.display()))?;
    if !String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!(
            "control_plane.ca_file {}: no PEM certificate in it (give the ca.pem `signpost-control-plane init-tls` wrote)",
            path.display()
        );
    }
    Ok(ca)
}

fn message(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

/// Keeps a session to the control plane until `shutdown`. Fails when the
/// CA cannot be read at first (it is read again when started again),
/// meanwhile the agent serves its last view; after that the CA is read
/// again before every attempt, so that a rotated CA is taken up.
pub(crate) async fn run(
    agent: Arc<Agent>,
    fleet: Arc<FleetCache>,
    settings: Arc<Settings>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = &settings.config;
    let mut ca = read_ca(&config.ca_file)?;
    let mut ack_queries = fleet.ack_queries();
    let mut backoff = BACKOFF_MIN;
    let mut skip_certificate = false;
    let mut targets = std::collections::VecDeque::new();
    loop {
        if targets.is_empty() {
            targets = round(&config.addresses).await.into();
        }
        let Some(target) = targets.pop_front() else {
            anyhow::bail!("control_plane.addresses is empty");
        };
        let address = &target.address;
        // Read again each time: a CA being rotated is added to the file
        // without restarting agents.
        match read_ca(&config.ca_file) {
            Ok(fresh) => ca = fresh,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "cannot read control_plane.ca_file again: using the CA read before"
            ),
        }
        let mut attempt = Attempt {
            certificate: !skip_certificate,
            welcomed: false,
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = session(&agent, &fleet, &mut ack_queries, &settings, &ca, &target, &mut attempt) => r,
        };
        // A certificate the control plane no longer takes (its CA
        // changed) must not lock the host out: the next attempt joins
        // with the token alone and asks for a new one.
        skip_certificate = attempt.certificate && !attempt.welcomed && result.is_err();
        if skip_certificate {
            tracing::warn!(address = %address, "the session with a client certificate failed: trying with the token alone");
        }
        fleet.set_connected(false);
        agent.metrics.sync_connected(false);
        match result {
            // The session ran and ended: start over quickly.
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => tracing::warn!(
                address = %address,
                error = format!("{e:#}"),
                "control plane unreachable: serving the last known view"
            ),
        }
        let jitter = rand::rng().random_range(0.5..1.0);
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One control-plane address to try.
struct Target {
    /// What to connect to (a resolved address, or as configured).
    address: String,
    /// The configured address's host: the name its certificate carries.
    host: String,
}

/// The addresses of one round of attempts: the configured ones from a
/// random one on, each name's addresses (resolved now) shuffled.
async fn round(addresses: &[String]) -> Vec<Target> {
    let start = rand::rng().random_range(0..addresses.len().max(1));
    let mut round = Vec::new();
    for configured in addresses.iter().cycle().skip(start).take(addresses.len()) {
        let host = configured
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']))
            .unwrap_or(configured)
            .to_string();
        let mut resolved: Vec<String> = match tokio::net::lookup_host(configured.as_str()).await {
            Ok(all) => all.map(|a| a.to_string()).collect(),
            Err(e) => {
                tracing::debug!(address = %configured, error = %e, "cannot resolve the control plane's address");
                Vec::new()
            }
        };
        if resolved.is_empty() {
            // Connecting says why.
            resolved.push(configured.clone());
        }
        rand::seq::SliceRandom::shuffle(resolved.as_mut_slice(), &mut rand::rng());
        round.extend(resolved.into_iter().map(|address| Target {
            address,
            host: host.clone(),
        }));
    }
    round
}

/// How one session attempt went, for the next.
struct Attempt {
    /// Whether it may present the client certificate (set to whether it
    /// did).
    certificate: bool,
    /// Whether the control plane welcomed it.
    welcomed: bool,
}

async fn session(
    agent: &Agent,
    fleet: &FleetCache,
    ack_queries: &mut mpsc::UnboundedReceiver<AckRequest>,
    settings: &Settings,
    ca: &[u8],
    target: &Target,
    attempt: &mut Attempt,
) -> anyhow::Result<()> {
    let config = &settings.config;
    let address = target.address.as_str();
    let mut client = connect(settings, ca, target, &mut attempt.certificate).await?;
    let (tx, rx) = mpsc::channel::<AgentMessage>(256);
    let mut changes = agent.state.subscribe();
    let mut sent = agent.state.read(local);
    tx.send(message(agent_message::Body::Hello(hello(
        agent,
        settings.probe_address,
        settings.mesh.as_ref().map(|m| m.inbound),
    ))))
    .await?;
    tx.send(message(agent_message::Body::FullState(FullState {
        instances: sent.instances.values().cloned().collect(),
        node_checks: sent.node_checks.clone(),
    })))
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|status| {
            anyhow::anyhow!("control plane refused the session: {}", status.message())
        })?
        .into_inner();
    // Subscribe once the Welcome said which epoch our indexes are from.
    match inbound
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("control plane refused the session: {}", s.message()))?
    {
        Some(ControlMessage {
            body: Some(control_message::Body::Welcome(welcome)),
        }) => fleet.welcome(&welcome.epoch),
        _ => anyhow::bail!("the control plane did not start with Welcome"),
    }
    attempt.welcomed = true;
    tx.send(message(agent_message::Body::Subscribe(Subscribe {
        services: fleet.subscriptions(),
    })))
    .await?;
    fleet.set_connected(true);
    agent.metrics.sync_connected(true);
    tracing::info!(address = %address, "connected to the control plane");
    settings.acl.set_client(Some(client.clone()));
    let _resolving = Resolving(&settings.acl);
    let node = agent.state.read(|inner| inner.node.name.clone());
    // Ask for a certificate now if this session presented none (there is
    // none, it expired or was refused) or it is past two thirds of its
    // life, else when it will be.
    let presented = attempt
        .certificate
        .then(|| crate::identity::load(&settings.identity))
        .flatten();
    let mut renew_at: Option<tokio::time::Instant> = Some(renewal(
        presented.map_or_else(std::time::SystemTime::now, |held| held.renew_at()),
    ));
    let mut pending: HashMap<u64, tokio::sync::oneshot::Sender<AckStatus>> = HashMap::new();
    // The services' mesh certificates: looked at now, and whenever the
    // local services or the mesh's roots change.
    let mut mesh_at = settings.mesh.as_ref().map(|_| tokio::time::Instant::now());
    // The local API's refusals go to the audit log in batches.
    let mut report_refusals = tokio::time::interval(Duration::from_secs(1));
    let mut idle_check = tokio::time::interval(
        (config.subscription_idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30)),
    );
    // What this host's proxy has in flight to draining instances, told
    // the control plane as it changes (for `signpost drain` elsewhere).
    let mut in_flight_check = tokio::time::interval(IN_FLIGHT_REPORT);
    in_flight_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What the proxy sent each service, for the console's live figures.
    // Counted from now: what was sent before this session is not told.
    fleet.traffic_since_last();
    let mut traffic_since = tokio::time::Instant::now();
    let mut traffic_report =
        tokio::time::interval_at(traffic_since + TRAFFIC_REPORT, TRAFFIC_REPORT);
    traffic_report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = traffic_report.tick() => {
                let services = fleet.traffic_since_last();
                let window = traffic_since.elapsed();
                traffic_since = tokio::time::Instant::now();
                if !services.is_empty() {
                    let window_ms = u32::try_from(window.as_millis()).unwrap_or(u32::MAX).max(1);
                    let traffic = signpost_proto::Traffic { window_ms, services };
                    tx.send(message(agent_message::Body::Traffic(traffic))).await?;
                }
            }
            _ = in_flight_check.tick() => {
                let changes = fleet.in_flight_changes();
                if !changes.is_empty() {
                    let indexes = fleet.subscriptions();
                    for (service, in_flight) in changes {
                        let index = indexes.get(&service).copied().unwrap_or(0);
                        let ack = Ack { service, index, in_flight };
                        tx.send(message(agent_message::Body::Ack(ack))).await?;
                    }
                }
            }
            _ = idle_check.tick() => {
                let expired = fleet.expire_idle(config.subscription_idle, &agent.live.config().upstreams);
                if !expired.is_empty() {
                    tracing::info!(services = ?expired, "unsubscribing from services unused for subscription_idle");
                    tx.send(message(agent_message::Body::Unsubscribe(Unsubscribe { services: expired }))).await?;
                }
            }
            Some(request) = ack_queries.recv() => {
                // Local changes first, so the question is about them too.
                let now = agent.state.read(local);
                if let Some(delta) = diff(&sent, &now) {
                    tx.send(message(agent_message::Body::Delta(delta))).await?;
                }
                sent = now;
                pending.insert(request.query.query_id, request.reply);
                tx.send(message(agent_message::Body::AckQuery(request.query))).await?;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = agent.state.read(local);
                if let Some(delta) = diff(&sent, &now) {
                    tx.send(message(agent_message::Body::Delta(delta))).await?;
                }
                sent = now;
                if settings.mesh.is_some() {
                    mesh_at = Some(tokio::time::Instant::now());
                }
            }
            () = sleep_until_some(mesh_at) => {
                if let Some(mesh) = &settings.mesh {
                    mesh_at = mesh_round(mesh, agent, &mut client, &node).await;
                }
            }
            _ = fleet.subscribe.notified() => {
                tx.send(message(agent_message::Body::Subscribe(Subscribe {
                    services: fleet.subscriptions(),
                })))
                .await?;
            }
            _ = report_refusals.tick() => {
                for refusal in settings.acl.take_refusals() {
                    tx.send(message(agent_message::Body::Refusal(refusal))).await?;
                }
            }
            () = sleep_until_some(renew_at) => {
                renew_at = match crate::identity::renew(&mut client, &node, None, &settings.identity).await {
                    Ok(held) => {
                        tracing::info!(node = %node, valid_until = ?held.not_after, "client certificate renewed: the next connections present it");
                        // Never again at once, whatever its validity says.
                        Some(renewal(held.renew_at()).max(tokio::time::Instant::now() + RENEW_MIN))
                    }
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        tracing::info!(reason = %status.message(), "the control plane issues no client certificates");
                        None
                    }
                    Err(status) => {
                        tracing::warn!(error = %status.message(), retry_in = ?RENEW_RETRY, "cannot renew the client certificate");
                        Some(tokio::time::Instant::now() + RENEW_RETRY)
                    }
                };
            }
            received = inbound.message() => {
                let Some(received) = received.map_err(|s| anyhow::anyhow!("stream failed: {}", s.message()))? else {
                    return Ok(());
                };
                let mesh = settings.mesh.as_deref();
                if on_control(received.body, agent, fleet, mesh, &tx, &mut pending).await? {
                    // The roots may have rotated: certificates to renew.
                    mesh_at = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

/// Asks for the mesh certificates that are due; when to look again.
async fn mesh_round(
    mesh: &crate::mesh::Mesh,
    agent: &Agent,
    client: &mut Client,
    node: &str,
) -> Option<tokio::time::Instant> {
    let services: Vec<String> = agent.state.read(|inner| {
        let names: std::collections::BTreeSet<String> = inner
            .services
            .values()
            .map(|s| s.def.name.to_string())
            .collect();
        names.into_iter().collect()
    });
    match mesh.due(&services, std::time::SystemTime::now()) {
        crate::mesh::Due::Now(list) => {
            for service in list {
                mesh.renew(client, node, &service).await;
            }
            Some(tokio::time::Instant::now())
        }
        crate::mesh::Due::At(at) => Some(renewal(at)),
        crate::mesh::Due::Never => None,
    }
}

/// The instant of `at` on tokio's clock (now if it has passed).
fn renewal(at: std::time::SystemTime) -> tokio::time::Instant {
    let wait = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::Instant::now() + wait
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A client of the control plane at `address`, over TLS, presenting the
/// agent's token on every call, and (if `certificate` allows) its client
/// certificate while it has a valid one; `certificate` is set to whether
/// it did.
async fn connect(
    settings: &Settings,
    ca: &[u8],
    target: &Target,
    certificate: &mut bool,
) -> anyhow::Result<Client> {
    let config = &settings.config;
    let address = target.address.as_str();
    let mut tls = ClientTlsConfig::new();
    let held =
        crate::identity::load(&settings.identity).filter(|held| *certificate && held.valid_now());
    *certificate = held.is_some();
    if let Some(held) = held {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            held.cert_pem,
            held.key_pem,
        ));
    }
    let tls = tls.ca_certificate(Certificate::from_pem(ca)).domain_name(
        config
            .server_name
            .clone()
            .unwrap_or_else(|| target.host.clone()),
    );
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .with_context(|| format!("invalid control-plane address {address:?}"))?
        .tls_config(tls)
        .context("TLS configuration")?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the control plane at {address}"))?;
    let token = format!("Bearer {}", config.token)
        .parse()
        .context("control_plane.token is not a valid header value")?;
    Ok(SyncClient::with_interceptor(channel, Bearer(token)))
}

/// Puts the agent's token on every call.
#[derive(Clone)]
pub(crate) struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Applies one message from the control plane; what it asks for goes
/// back on `tx`. Whether it was the mesh's state.
async fn on_control(
    body: Option<control_message::Body>,
    agent: &Agent,
    fleet: &FleetCache,
    mesh: Option<&crate::mesh::Mesh>,
    tx: &mpsc::Sender<AgentMessage>,
    pending: &mut HashMap<u64, tokio::sync::oneshot::Sender<AckStatus>>,
) -> anyhow::Result<bool> {
    match body {
        Some(control_message::Body::Mesh(state)) => {
            return Ok(match mesh {
                Some(mesh) => {
                    mesh.apply(state);
                    true
                }
                None => false,
            });
        }
        Some(control_message::Body::Update(update)) => {
            let in_flight = fleet.in_flight_of(&update.service);
            let ack = Ack {
                service: update.service.clone(),
                index: update.index,
                in_flight,
            };
            let refused = fleet.apply_update(update);
            agent.metrics.sync_update(refused);
            tx.send(message(agent_message::Body::Ack(ack))).await?;
        }
        Some(control_message::Body::AckStatus(status)) => {
            if let Some(reply) = pending.remove(&status.query_id)
                && reply.send(status).is_err()
            {
                tracing::debug!("acknowledgement status arrived after its asker gave up");
            }
        }
        Some(control_message::Body::Names(names)) => fleet.apply_names(names),
        Some(control_message::Body::Commands(set)) => {
            let ids = fleet.set_commands(&set.commands);
            tracing::info!(commands = ids.len(), "operator commands received");
            let applied = CommandsApplied { ids };
            tx.send(message(agent_message::Body::CommandsApplied(applied)))
                .await?;
        }
        Some(control_message::Body::Probe(request)) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = probe(request).await;
                // The session may have ended meanwhile.
                if tx
                    .send(message(agent_message::Body::ProbeResult(result)))
                    .await
                    .is_err()
                {
                    tracing::debug!("probe result not sent: session closed");
                }
            });
        }
        Some(control_message::Body::Welcome(welcome)) => fleet.welcome(&welcome.epoch),
        None => fleet.contact(),
    }
    Ok(false)
}

/// What changed between two local states, if anything.
fn diff(before: &Local, after: &Local) -> Option<Delta> {
    let upserts: Vec<Instance> = after
        .instances
        .iter()
        .filter(|(id, i)| before.instances.get(*id) != Some(*i))
        .map(|(_, i)| i.clone())
        .collect();
    let removed: Vec<String> = before
        .instances
        .keys()
        .filter(|id| !after.instances.contains_key(*id))
        .cloned()
        .collect();
    let node_checks_changed = before.node_checks != after.node_checks;
    if upserts.is_empty() && removed.is_empty() && !node_checks_changed {
        return None;
    }
    Some(Delta {
        upserts,
        removed,
        node_checks_changed,
        node_checks: if node_checks_changed {
            after.node_checks.clone()
        } else {
            Vec::new()
        },
    })
}
