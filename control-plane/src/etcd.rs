//! The etcd store (`store: etcd`): replicas that share it are equal and
//! keep nothing of their own.
//!
//! Keys under the configured prefix (`/signpost/`):
//! - `nodes/<node>`: the node's Hello, instances and node checks
//!   (`NodeSnapshot`, protobuf), written by the replica its agent's stream
//!   is on;
//! - `presence/<node>`: which replica holds the agent's stream, attached
//!   to that replica's lease: when a replica dies its agents stay present
//!   for `lease_ttl`, time enough to reconnect elsewhere;
//! - `failed/<node>`: when no peer reached the node (Unix ms), written by
//!   the leader;
//! - `commands/<id>`, `acks/<id>/<node>`, `acl/<accessor>`,
//!   `acl-bootstrap`, `audit/<time>-<replica>-<n>`;
//! - `kv/e/<key>`, `kv/s/<session>`, `kv/d/<key>`: the KV store ([`kv`]);
//! - `drains/<service>`, `drain-acks/<service>/<replica>`: a drain asked
//!   through one replica and every replica's answer ([`drains`]);
//! - `leader`: the replica that probes, fails and reaps, on its lease.
//!
//! [`follow`] keeps one watch per replica on the whole prefix and applies
//! every change to the catalog, the commands and the tokens; the catalog
//! publishes each change at its etcd revision, so an index means the same
//! on every replica. [`report`] writes an agent's reports; [`leader`] is
//! the election and the leader's work.

pub mod drains;
pub mod follow;
pub mod kv;
pub mod leader;
pub mod migrate;
pub mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp,
};
use signpost_core::control_plane_config::EtcdConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::{Shared, StoreError};

/// etcd's own limit on a request (`--max-request-bytes`, 1.5 MiB): a
/// node record larger than this cannot be written.
pub const MAX_RECORD: usize = 1_400_000;
/// Between two attempts of a write.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Keys read per request when loading everything.
const PAGE: i64 = 500;

pub struct Etcd {
    client: Client,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    /// This process, in presence and leader keys.
    pub replica: String,
    /// The lease this replica's presence keys hang on (it changes when
    /// one expires while etcd was out of reach).
    lease: AtomicI64,
    leases: watch::Sender<i64>,
    /// Whether etcd took the last request: false while it has no quorum.
    quorum: AtomicBool,
}

impl Etcd {
    /// Connects to the cluster and takes this replica's lease.
    pub async fn connect(config: &EtcdConfig) -> anyhow::Result<Arc<Etcd>> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            // etcd refuses pings more often than every 5 s; a member
            // that went silent is dropped 2 s after one goes unanswered.
            .with_keep_alive(
                Duration::from_secs(5),
                config.timeout.min(Duration::from_secs(2)),
            )
            // A member cut off from the others answers at once that it
            // has no leader, rather than after etcd's own timeout.
            .with_require_leader(true);
        if let (Some(user), Some(file)) = (&config.username, &config.password_file) {
            let password = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read etcd.password_file {}", file.display()))?;
            options = options.with_user(user.clone(), password.trim_end().to_string());
        }
        if config.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cannot read etcd.ca_file {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("cannot read etcd.cert_file {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("cannot read etcd.key_file {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        let client = tokio::time::timeout(
            config.timeout,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer within etcd.timeout"))
        .and_then(|c| c.map_err(anyhow::Error::from))
        .with_context(|| format!("cannot connect to etcd at {}", config.endpoints.join(", ")))?;
        let etcd = Etcd {
            client,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
            lease_ttl: config.lease_ttl,
            replica: format!("{:016x}", rand::random::<u64>()),
            lease: AtomicI64::new(0),
            leases: watch::Sender::new(0),
            quorum: AtomicBool::new(true),
        };
        let lease = etcd.grant().await.context("cannot take a lease in etcd")?;
        etcd.lease.store(lease, Ordering::SeqCst);
        etcd.leases.send_replace(lease);
        Ok(Arc::new(etcd))
    }

    /// The full key of `key`.
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// `key` without the prefix, if it is one of ours.
    pub fn relative<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)
    }

    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// Changes of this replica's lease.
    pub fn leases(&self) -> watch::Receiver<i64> {
        self.leases.subscribe()
    }

    /// Whether etcd took the last request.
    pub fn has_quorum(&self) -> bool {
        self.quorum.load(Ordering::Relaxed)
    }

    /// A client for one request (clones share the connection).
    fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one request within the timeout, noting whether etcd answered.
    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let outcome = match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(StoreError::Unavailable {
                reason: e.to_string(),
            }),
            Err(_) => Err(StoreError::Unavailable {
                reason: format!("etcd did not answer within {:?}", self.timeout),
            }),
        };
        self.noted(outcome)
    }

    /// Notes whether etcd answered (logged when that changes).
    fn noted<T>(&self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        let answered = outcome.is_ok();
        if self.quorum.swap(answered, Ordering::Relaxed) != answered {
            if answered {
                tracing::info!("etcd answers again: writes resume");
            } else if let Err(e) = &outcome {
                tracing::error!(error = %e, "etcd does not answer: refusing writes, serving from memory");
            }
        }
        outcome
    }

    /// A write, tried again on another member while `timeout` lasts: a
    /// member that just died fails the requests the client still sends
    /// it (at once, or after half the time for one that hangs), and that
    /// must not show while the others have a quorum.
    async fn write<T, F, Fut>(&self, request: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = std::time::Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = (self.timeout / 2).min(left);
            match tokio::time::timeout(attempt, request(self.client())).await {
                Ok(Ok(answer)) => {
                    let outcome = Ok(answer);
                    crate::store::stats().wrote("etcd_write", started, &outcome);
                    return self.noted(outcome);
                }
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(_) => last = Some(format!("etcd did not answer within {attempt:?}")),
            }
            tokio::time::sleep(RETRY_PAUSE.min(left)).await;
        }
        let reason = last.unwrap_or_else(|| "no time left".to_string());
        let outcome = Err(StoreError::Unavailable { reason });
        crate::store::stats().wrote("etcd_write", started, &outcome);
        self.noted(outcome)
    }

    async fn grant(&self) -> Result<i64, StoreError> {
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let mut client = self.client();
        Ok(self.call(client.lease_grant(ttl, None)).await?.id())
    }

    /// Runs a transaction; whether its comparisons held.
    pub async fn txn(&self, txn: Txn) -> Result<bool, StoreError> {
        Ok(self.txn_answer(txn).await?.succeeded())
    }

    /// Runs a transaction; etcd's answer (whether its comparisons held,
    /// at which revision).
    pub async fn txn_answer(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.write(|mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// The store's revision now (a linearizable read of `key`).
    pub async fn revision(&self, key: String, options: GetOptions) -> Result<i64, StoreError> {
        let mut client = self.client();
        let answer = self.call(client.get(key, Some(options))).await?;
        Ok(answer.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Every key under `prefix` (relative) at one revision, paged; the
    /// revision and the cluster's id.
    pub async fn load(
        &self,
        prefix: &str,
    ) -> Result<(Vec<etcd_client::KeyValue>, i64, u64), StoreError> {
        let start = self.key(prefix);
        let end = prefix_end(&start);
        let mut from = start.into_bytes();
        let mut all = Vec::new();
        let mut at = None;
        let mut cluster = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if let Some(revision) = at {
                options = options.with_revision(revision);
            }
            let mut client = self.client();
            let mut answer = self.call(client.get(from.clone(), Some(options))).await?;
            if let Some(header) = answer.header() {
                at.get_or_insert(header.revision());
                cluster = header.cluster_id();
            }
            let more = answer.more();
            let kvs = answer.take_kvs();
            if let Some(last) = kvs.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            all.extend(kvs);
            if !more {
                return Ok((all, at.unwrap_or(0), cluster));
            }
        }
    }

    /// Keeps this replica's lease alive until `shutdown`; a lease that
    /// expired anyway (etcd out of reach for longer than its TTL) is
    /// replaced by a new one, and what hung on it is written again by its
    /// owners ([`Etcd::leases`]). Not revoked at shutdown: the agents here
    /// stay present while they move to another replica, and the lease
    /// ends by itself.
    pub async fn keep_lease(self: Arc<Self>, shutdown: CancellationToken) {
        let period = self.lease_ttl / 3;
        loop {
            let lease = self.lease();
            let kept = tokio::select! {
                _ = shutdown.cancelled() => return,
                kept = self.keep_alive(lease, period) => kept,
            };
            if kept {
                continue;
            }
            tracing::warn!(lease, "the replica's lease expired: taking a new one");
            loop {
                match self.grant().await {
                    Ok(new) => {
                        self.lease.store(new, Ordering::SeqCst);
                        self.leases.send_replace(new);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot take a new lease yet");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(period) => {}
                        }
                    }
                }
            }
        }
    }

    /// Refreshes `lease` every `period` until it is gone (false) or a
    /// stream breaks (true: try again with the same lease).
    async fn keep_alive(&self, lease: i64, period: Duration) -> bool {
        let mut client = self.client();
        let (mut keeper, mut answers) = match self.call(client.lease_keep_alive(lease)).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the replica's lease");
                tokio::time::sleep(period).await;
                return true;
            }
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                return true;
            }
            match self.call(answers.message()).await {
                Ok(Some(answer)) if answer.ttl() <= 0 => return false,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return true,
            }
            tokio::time::sleep(period).await;
        }
    }
}

#[tonic::async_trait]
impl Shared for Etcd {
    async fn put(&self, key: String, value: Vec<u8>) -> Result<(), StoreError> {
        let key = self.key(&key);
        self.write(|mut client| {
            let (key, value) = (key.clone(), value.clone());
            async move { client.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    async fn delete(&self, key: String) -> Result<(), StoreError> {
        let key = self.key(&key);
        self.write(|mut client| {
            let key = key.clone();
            async move { client.delete(key, None).await }
        })
        .await?;
        Ok(())
    }

    async fn create(&self, key: String, value: Vec<u8>) -> Result<bool, StoreError> {
        let key = self.key(&key);
        self.txn(
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, None)]),
        )
        .await
    }
}

/// Puts on this replica's lease.
pub fn on_lease(lease: i64) -> Option<PutOptions> {
    Some(PutOptions::new().with_lease(lease))
}

/// The end of the key range of every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
