//! The agents' gRPC endpoint: one `Session` stream per agent, authenticated
//! by its token, feeding the [`Catalog`] and carrying its updates back.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use signpost_proto::sync_server::Sync;
use signpost_proto::{
    AgentMessage, CertifyReply, CertifyRequest, Check, ControlMessage, Delta, FullState, Instance,
    ResolveTokenReply, ResolveTokenRequest, Welcome, agent_message, control_message::Body,
};
use std::net::SocketAddr;

use signpost_proto::reported::{self, Garbage};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::acl::AuditEntry;
use crate::catalog::{Catalog, SESSION_QUEUE, SessionId};
use signpost_core::acl::{Access, Resource};

/// Largest message an agent may send (tonic's default, made explicit): a
/// full state of 10,000 instances with a check each is about 1.5 MB. A
/// larger one ends the stream.
pub const MAX_AGENT_MESSAGE: usize = 4 << 20;

/// An agent has this long to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SyncService {
    pub catalog: Arc<Catalog>,
    pub tokens: Arc<Vec<String>>,
    /// Identifies this catalog's indexes (see `Welcome.epoch`).
    pub epoch: String,
    pub commands: Arc<crate::commands::Commands>,
    /// Where a stream closed for garbage is audited.
    pub acl: Arc<crate::acl::Acl>,
    pub reporting: Reporting,
    /// Signs agents' client certificates; `None` without the CA's key.
    pub issuer: Option<Arc<crate::tls::Issuer>>,
    /// The store of the mesh's CA and intentions.
    pub kv: Arc<crate::kv::Kv>,
    pub mesh: signpost_core::control_plane_config::MeshCaConfig,
    /// The state sent to agents, shared by the sessions.
    pub mesh_states: Arc<MeshStates>,
    pub datacenter: String,
}

/// The node of the client certificate a call came with, if any.
fn certified_node<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    crate::tls::node_of(certs.first()?.as_ref())
}

/// Where agents' reports go.
#[derive(Clone)]
pub enum Reporting {
    /// Straight into this replica's catalog (the file store).
    Local,
    /// To etcd, from which every replica's catalog follows; until the
    /// replica's shutdown.
    #[cfg(feature = "etcd")]
    Etcd(Arc<crate::etcd::Etcd>, tokio_util::sync::CancellationToken),
}

/// One agent's session's reports.
enum Reports {
    Local,
    #[cfg(feature = "etcd")]
    Etcd(crate::etcd::report::Reports),
}

impl Reports {
    fn full_state(&self, catalog: &Catalog, session: SessionId, state: FullState) {
        match self {
            Reports::Local => catalog.full_state(session, state),
            #[cfg(feature = "etcd")]
            Reports::Etcd(reports) => reports.full_state(state),
        }
    }

    fn delta(&self, catalog: &Catalog, session: SessionId, delta: Delta) {
        match self {
            Reports::Local => catalog.delta(session, delta),
            #[cfg(feature = "etcd")]
            Reports::Etcd(reports) => reports.delta(delta),
        }
    }

    /// An agent's answer to a probe the leader asked through the store.
    #[cfg_attr(not(feature = "etcd"), allow(unused_variables))]
    fn relay_probe_result(&self, node: &str, result: &signpost_proto::ProbeResult) {
        match self {
            Reports::Local => {}
            #[cfg(feature = "etcd")]
            Reports::Etcd(reports) => reports.probe_result(node, result),
        }
    }

    /// The stream ended.
    fn close(self, catalog: &Catalog, session: SessionId) {
        match self {
            Reports::Local => catalog.disconnect(session),
            #[cfg(feature = "etcd")]
            Reports::Etcd(reports) => {
                catalog.detach(session);
                drop(reports);
            }
        }
    }
}

/// Sends the commands in force on the session now and after every
/// change, until the session ends. Split rate limits depend on how many
/// agents use each service, so the set is also recomputed every
/// [`SPLIT_REFRESH`] and sent again when it differs.
async fn send_commands(
    commands: Arc<crate::commands::Commands>,
    catalog: Arc<Catalog>,
    tx: mpsc::Sender<ControlMessage>,
) {
    let mut changes = commands.subscribe();
    let mut last: Option<Vec<String>> = None;
    loop {
        let set = catalog.read(|inner| commands.active_json(|s| inner.subscribers(s)));
        if last.as_ref() != Some(&set) {
            let message = ControlMessage {
                body: Some(Body::Commands(signpost_proto::CommandSet {
                    commands: set.clone(),
                })),
            };
            if tx.send(message).await.is_err() {
                return;
            }
            last = Some(set);
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(SPLIT_REFRESH) => {}
            () = tx.closed() => return,
        }
    }
}

/// How often split rate limits are recomputed.
const SPLIT_REFRESH: std::time::Duration = std::time::Duration::from_secs(2);

/// The bearer token of a call.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(signpost_daemon::token::bearer)
}

/// What the caller's token may do: one of `agent_tokens` (the built-in
/// agent policy: any node), or an ACL token's rules.
fn caller<T>(
    request: &Request<T>,
    tokens: &[String],
    acl: &crate::acl::Acl,
) -> Result<crate::acl::Resolved, Status> {
    let token = bearer(request).ok_or_else(|| {
        Status::unauthenticated(
            "missing agent token: set control_plane.token in the agent configuration",
        )
    })?;
    if tokens
        .iter()
        .any(|t| crate::acl::constant_time_eq(t.as_bytes(), token.as_bytes()))
    {
        let agent = crate::acl::policy::builtin(crate::acl::policy::AGENT);
        return Ok(crate::acl::Resolved {
            accessor: "agent_tokens".to_string(),
            record: None,
            authorizer: signpost_core::acl::Authorizer::new(
                agent
                    .map(crate::acl::policy::builtin_rules)
                    .unwrap_or_default(),
                signpost_core::acl::DefaultPolicy::Deny,
            ),
        });
    }
    match acl.resolve(Some(token)) {
        Ok(resolved) => Ok(resolved),
        Err(crate::acl::Denied::Expired { accessor }) => Err(Status::unauthenticated(format!(
            "the agent token {accessor} has expired: give control_plane.token a new one"
        ))),
        Err(_) => Err(Status::unauthenticated(
            "unknown agent token: check control_plane.token in the agent configuration",
        )),
    }
}

/// Refuses calls without a known token (`authorization: Bearer`): one of
/// `agent_tokens`, or a valid ACL token (what it may do is checked by
/// each call: a stream's node, a certificate's).
pub fn check_token(
    tokens: Arc<Vec<String>>,
    acl: Arc<crate::acl::Acl>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let refused = Arc::new(std::sync::Mutex::new(
        signpost_core::accept::Tally::default(),
    ));
    move |request: Request<()>| match caller(&request, &tokens, &acl) {
        Ok(_) => Ok(request),
        Err(status) => {
            if bearer(&request).is_some() {
                // Logged once a period: anyone can send these.
                let mut refused = refused
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(count) = refused.note() {
                    tracing::warn!(count, "agent calls refused: unknown or expired token");
                }
                acl.record_anonymous_refusal(AuditEntry::new(
                    "",
                    "agent.connect",
                    "",
                    "denied: unknown or expired token",
                    "",
                ));
            }
            Err(status)
        }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

impl SyncService {
    /// A mesh identity for `service` on `node`: the caller's token may
    /// write the node (and its client certificate, if any, is that
    /// node's), and the node runs an instance of the service, so that an
    /// agent only ever holds the identities of the services on its host.
    fn certify_service(
        &self,
        token: &crate::acl::Resolved,
        certified: Option<String>,
        node: &str,
        service: &str,
        csr_pem: &str,
    ) -> Result<CertifyReply, Status> {
        let refused = |why: String| {
            self.acl.record(AuditEntry::new(
                &token.accessor,
                "agent.certify_service",
                &format!("{node}/{service}"),
                &format!("denied: {why}"),
                "",
            ));
            Status::permission_denied(why)
        };
        if !token.authorizer.grants(Resource::Node(node), Access::Write) {
            return Err(refused(format!(
                "token {} may not write node {node:?}",
                token.accessor
            )));
        }
        if let Some(certified) = certified.filter(|c| c != node) {
            return Err(refused(format!(
                "the client certificate is node {certified:?}'s"
            )));
        }
        let runs = self.catalog.read(|inner| {
            inner
                .nodes
                .get(node)
                .is_some_and(|n| n.instances.values().any(|i| i.name == service))
        });
        if !runs {
            // Also right after registering: the registration may still
            // be on its way; the agent asks again.
            return Err(Status::failed_precondition(format!(
                "node {node:?} runs no instance of {service:?} (yet)"
            )));
        }
        let ca = match crate::mesh::load(&self.kv) {
            Ok(Some((ca, _))) => ca,
            Ok(None) => {
                return Err(Status::unavailable(
                    crate::mesh::MeshError::NoCa.to_string(),
                ));
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        let (cert_pem, not_after, root_id) = ca
            .sign_leaf(&self.datacenter, service, csr_pem, self.mesh.leaf_ttl)
            .map_err(|e| match e {
                crate::mesh::MeshError::Invalid(m) => Status::invalid_argument(m),
                other => Status::internal(other.to_string()),
            })?;
        tracing::info!(%node, %service, root = %root_id, not_after, "mesh certificate issued");
        Ok(CertifyReply {
            cert_pem,
            not_after,
            root_id,
        })
    }
}

/// The mesh's state as agents are sent it, made once per change of the
/// store's mesh records and shared by every session (rather than each
/// session reading every intention again).
#[derive(Default)]
pub struct MeshStates(std::sync::Mutex<Option<(u64, Option<Arc<signpost_proto::MeshState>>)>>);

impl MeshStates {
    /// The state as of the mesh records' `version` (or newer).
    fn get(
        &self,
        version: u64,
        kv: &crate::kv::Kv,
        config: &signpost_core::control_plane_config::MeshCaConfig,
    ) -> Option<Arc<signpost_proto::MeshState>> {
        let mut made = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, state)) = &*made
            && *at == version
        {
            return state.clone();
        }
        let state = crate::mesh::state(kv, config).map(Arc::new);
        *made = Some((version, state.clone()));
        state
    }
}

/// Sends the mesh's state on the session now and after every change of
/// the CA or the intentions, until the session ends.
async fn send_mesh(
    kv: Arc<crate::kv::Kv>,
    config: signpost_core::control_plane_config::MeshCaConfig,
    states: Arc<MeshStates>,
    tx: mpsc::Sender<ControlMessage>,
) {
    let mut changes = kv.mirror().mesh_changes();
    let mut last: Option<Arc<signpost_proto::MeshState>> = None;
    loop {
        let version = *changes.borrow_and_update();
        if let Some(state) = states.get(version, &kv, &config)
            && last.as_ref() != Some(&state)
        {
            let message = ControlMessage {
                body: Some(Body::Mesh(state.as_ref().clone())),
            };
            if tx.send(message).await.is_err() {
                return;
            }
            last = Some(state);
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

/// Longest token secret an agent may ask about.
const MAX_SECRET: usize = 512;

#[tonic::async_trait]
impl Sync for SyncService {
    type SessionStream = SessionStream;

    async fn resolve_token(
        &self,
        request: Request<ResolveTokenRequest>,
    ) -> Result<Response<ResolveTokenReply>, Status> {
        caller(&request, &self.tokens, &self.acl)?;
        let secret = &request.get_ref().secret;
        if secret.len() > MAX_SECRET {
            return Err(Status::invalid_argument(format!(
                "a token is at most {MAX_SECRET} bytes"
            )));
        }
        let reply = match self.acl.resolve(Some(secret)) {
            Ok(crate::acl::Resolved {
                record: Some(record),
                authorizer,
                ..
            }) => ResolveTokenReply {
                accessor: record.accessor,
                rules_json: serde_json::to_string(&authorizer.rules)
                    .map_err(|e| Status::internal(e.to_string()))?,
                expires_at: record.expires_at.unwrap_or(0),
            },
            // Unknown or expired: the agent refuses it.
            _ => ResolveTokenReply::default(),
        };
        Ok(Response::new(reply))
    }

    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyReply>, Status> {
        let token = caller(&request, &self.tokens, &self.acl)?;
        let certified = certified_node(&request);
        let CertifyRequest {
            node,
            csr_pem,
            service,
        } = request.into_inner();
        if !service.is_empty() {
            return self
                .certify_service(&token, certified, &node, &service, &csr_pem)
                .map(Response::new);
        }
        let Some(issuer) = &self.issuer else {
            return Err(Status::failed_precondition(
                "this control plane has no CA key (grpc.ca_key_file): agents connect with their token only",
            ));
        };
        let refused = |why: String| {
            self.acl.record(AuditEntry::new(
                &token.accessor,
                "agent.certify",
                &node,
                &format!("denied: {why}"),
                "",
            ));
            Status::permission_denied(why)
        };
        if !token
            .authorizer
            .grants(Resource::Node(&node), Access::Write)
        {
            return Err(refused(format!(
                "token {} may not write node {node:?}",
                token.accessor
            )));
        }
        if let Some(certified) = certified.filter(|c| *c != node) {
            return Err(refused(format!(
                "the client certificate is node {certified:?}'s"
            )));
        }
        let (cert_pem, not_after) = issuer
            .certify(&node, &csr_pem)
            .map_err(Status::invalid_argument)?;
        tracing::info!(node = %node, token = %token.accessor, not_after, "client certificate issued");
        Ok(Response::new(CertifyReply {
            cert_pem,
            not_after,
            root_id: String::new(),
        }))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let peer = request.remote_addr();
        let token = caller(&request, &self.tokens, &self.acl)?;
        let certified = certified_node(&request);
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(AgentMessage {
                body: Some(agent_message::Body::Hello(hello)),
            }))) => signpost_proto::Hello {
                // An agent runs there: never an external node.
                external: false,
                ..hello
            },
            Ok(Some(Err(status))) => return Err(status),
            Ok(_) => return Err(Status::invalid_argument("the first message must be Hello")),
            Err(_) => return Err(Status::deadline_exceeded("no Hello from the agent in time")),
        };
        if let Err(garbage) = reported::hello(&hello) {
            let node: String = hello.node.chars().take(64).collect();
            refuse_garbage(&self.acl, &node, peer, &garbage);
            return Err(Status::invalid_argument(garbage.to_string()));
        }
        let certified_session = certified.is_some();
        if let Some(certified) = certified.filter(|c| *c != hello.node) {
            tracing::warn!(node = %hello.node, certificate = %certified, peer = ?peer, "agent stream refused: its client certificate is another node's");
            self.acl.record(AuditEntry::new(
                &token.accessor,
                "agent.session",
                &hello.node,
                "denied: client certificate of another node",
                &format!("certificate for {certified:?}"),
            ));
            return Err(Status::permission_denied(format!(
                "the client certificate is node {certified:?}'s, not {:?}'s",
                hello.node
            )));
        }
        // A rule must grant it: the default policy never binds a node.
        if !token
            .authorizer
            .grants(Resource::Node(&hello.node), Access::Write)
        {
            let why = format!(
                "token {} may not register as node {:?}: it needs node write on it (give this host a token with a node identity for its name)",
                token.accessor, hello.node
            );
            tracing::warn!(node = %hello.node, token = %token.accessor, peer = ?peer, "agent stream refused: its token may not write this node");
            self.acl.record(AuditEntry::new(
                &token.accessor,
                "agent.session",
                &hello.node,
                "denied: needs node write",
                &format!("from {}", peer.map(|p| p.to_string()).unwrap_or_default()),
            ));
            return Err(Status::permission_denied(why));
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let welcome = ControlMessage {
            body: Some(Body::Welcome(Welcome {
                epoch: self.epoch.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })),
        };
        if tx.try_send(welcome).is_err() {
            return Err(Status::internal("cannot queue the welcome"));
        }
        let node = hello.node.clone();
        tokio::spawn(send_commands(
            self.commands.clone(),
            self.catalog.clone(),
            tx.clone(),
        ));
        tokio::spawn(send_mesh(
            self.kv.clone(),
            self.mesh.clone(),
            self.mesh_states.clone(),
            tx.clone(),
        ));
        let (session, reports) = match &self.reporting {
            Reporting::Local => (self.catalog.connect(hello, tx), Reports::Local),
            #[cfg(feature = "etcd")]
            Reporting::Etcd(etcd, shutdown) => {
                let session = self.catalog.attach(&node, tx);
                let reports = crate::etcd::report::Reports::open(
                    etcd.clone(),
                    &self.catalog,
                    hello,
                    session,
                    shutdown.clone(),
                );
                (session, Reports::Etcd(reports))
            }
        };
        tracing::info!(node = %node, session, peer = ?peer, client_cert = certified_session, "agent connected");
        let catalog = self.catalog.clone();
        let commands = self.commands.clone();
        let acl = self.acl.clone();
        // When the agent's side ends, ours does (with the reason, if it
        // broke the rules), rather than staying open for the commands task.
        let (end, ended) = mpsc::channel::<Option<Status>>(1);
        tokio::spawn(async move {
            let reason = loop {
                match inbound.next().await {
                    Some(Ok(message)) => {
                        let checked = match &message.body {
                            Some(body) => check(body, || catalog.subscription_count(session)),
                            None => Ok(()),
                        };
                        if let Err(garbage) = checked {
                            refuse_garbage(&acl, &node, peer, &garbage);
                            break Some(Status::invalid_argument(garbage.to_string()));
                        }
                        if let Some(body) = message.body {
                            dispatch(&catalog, &commands, &acl, &reports, session, &node, body);
                        } else {
                            // A kind this version does not know (a newer agent).
                            tracing::debug!(node = %node, "unknown message from agent ignored");
                        }
                    }
                    // Too large, or not a message at all: the agent's bytes.
                    Some(Err(status))
                        if status.code() == tonic::Code::OutOfRange
                            || status.message().contains("decode") =>
                    {
                        let garbage = Garbage {
                            what: "message".to_string(),
                            reason: status.message().to_string(),
                        };
                        refuse_garbage(&acl, &node, peer, &garbage);
                        break Some(status);
                    }
                    Some(Err(status)) => {
                        tracing::info!(node = %node, error = %status, "agent stream failed");
                        break None;
                    }
                    None => break None,
                }
            };
            tracing::info!(node = %node, session, "agent disconnected");
            reports.close(&catalog, session);
            let _ = end.try_send(reason);
        });
        let outbound = ReceiverStream::new(rx)
            .map(|message| Some(Ok(message)))
            .merge(ReceiverStream::new(ended).map(|reason| reason.map(Err)))
            .map_while(|item| item);
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Logs and audits a stream closed for breaking the rules.
fn refuse_garbage(acl: &crate::acl::Acl, node: &str, peer: Option<SocketAddr>, garbage: &Garbage) {
    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
    tracing::warn!(node = %node, %peer, error = %garbage, "agent stream closed: it sent what no agent may");
    acl.record(AuditEntry::new(
        node,
        "agent.session",
        node,
        &format!("closed: {garbage}"),
        &format!("from {peer}"),
    ));
}

/// Takes in a checked message from the agent of `session`.
fn dispatch(
    catalog: &Catalog,
    commands: &crate::commands::Commands,
    acl: &crate::acl::Acl,
    reports: &Reports,
    session: SessionId,
    node: &str,
    body: agent_message::Body,
) {
    match body {
        agent_message::Body::FullState(mut state) => {
            state.instances.iter_mut().for_each(Instance::normalize);
            state.node_checks.iter_mut().for_each(Check::normalize);
            reports.full_state(catalog, session, state);
        }
        agent_message::Body::Delta(mut delta) => {
            delta.upserts.iter_mut().for_each(Instance::normalize);
            delta.node_checks.iter_mut().for_each(Check::normalize);
            reports.delta(catalog, session, delta);
        }
        agent_message::Body::Subscribe(s) => catalog.subscribe(session, s.services),
        agent_message::Body::Unsubscribe(u) => catalog.unsubscribe(session, u.services),
        agent_message::Body::Ack(a) => catalog.ack(session, a),
        agent_message::Body::AckQuery(q) => catalog.ack_query(session, q),
        agent_message::Body::CommandsApplied(a) => commands.applied(node, &a.ids),
        agent_message::Body::Traffic(t) => catalog.traffic(node, t),
        agent_message::Body::Refusal(r) => acl.record(AuditEntry::new(
            &r.who,
            &r.action,
            &r.target,
            &format!("denied: {}", r.reason),
            &format!("by the agent of {node} ({} times)", r.count.max(1)),
        )),
        agent_message::Body::ProbeResult(r) => {
            if !r.reachable && !r.error.is_empty() {
                tracing::debug!(by = %node, error = %r.error, "peer probe failed");
            }
            if catalog.relayed(r.probe_id) {
                reports.relay_probe_result(node, &r);
            } else {
                let answer = crate::catalog::PeerAnswer {
                    peer: node.to_string(),
                    reachable: r.reachable,
                    error: r.error.chars().take(256).collect(),
                };
                catalog.probe_result(r.probe_id, answer);
            }
        }
        // Refused by [`check`].
        agent_message::Body::Hello(_) => {}
    }
}

/// Checks a message from an agent against [`reported`]'s rules;
/// `subscriptions` counts the session's subscriptions so far.
fn check(body: &agent_message::Body, subscriptions: impl FnOnce() -> usize) -> Result<(), Garbage> {
    match body {
        agent_message::Body::FullState(state) => {
            state.instances.iter().try_for_each(reported::instance)?;
            reported::checks("node", &state.node_checks)
        }
        agent_message::Body::Delta(delta) => {
            delta.upserts.iter().try_for_each(reported::instance)?;
            reported::checks("node", &delta.node_checks)
        }
        agent_message::Body::Subscribe(subscribe) => {
            if subscriptions().saturating_add(subscribe.services.len())
                > reported::MAX_SUBSCRIPTIONS
            {
                return Err(Garbage {
                    what: "Subscribe".to_string(),
                    reason: format!("more than {} services", reported::MAX_SUBSCRIPTIONS),
                });
            }
            subscribe
                .services
                .keys()
                .try_for_each(|s| reported::service_name(s))
        }
        agent_message::Body::Refusal(r) => reported::refusal(r),
        agent_message::Body::Traffic(t) => reported::traffic(t),
        agent_message::Body::Hello(_) => Err(Garbage {
            what: "Hello".to_string(),
            reason: "sent again on an open session".to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod fuzz;
