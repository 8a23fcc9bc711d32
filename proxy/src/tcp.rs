//! L4: a client connection is joined to a connection to one instance and
//! bytes flow both ways. A failed connect is tried on another instance
//! (nothing was sent yet); after that, the instance's close closes the
//! client's connection, and so does word that its host is gone.

use std::net::SocketAddr;
use std::sync::Arc;

use signpost_core::policy::Balancer;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::accept::ClientStream;
use crate::backend::Backend;
use crate::balance::hash_ip;
use crate::error::ProxyError;

/// Bytes read at once in each direction (tokio's default is 8 KiB): fewer
/// system calls on bulk transfers.
const COPY_BUFFER: usize = 64 * 1024;

/// Serves one client connection until either side closes it or `stop`
/// fires.
pub(crate) async fn serve(
    backend: Arc<Backend>,
    mut inbound: ClientStream,
    client: SocketAddr,
    stop: CancellationToken,
) {
    let _admitted = match backend.admit_connection() {
        Ok(guard) => guard,
        Err(error) => {
            tracing::warn!(service = %backend.name, %client, reason = error.reason(), %error, "connection refused");
            backend.shared.metrics.error(&backend.name, error.reason());
            return;
        }
    };
    let started = Instant::now();
    backend.used(started);
    let snapshot = backend.snapshot_full();
    let policy = &snapshot.policy;
    let key = (policy.balancer == Balancer::Hash).then(|| hash_ip(client.ip()));
    let mut tried = Vec::new();
    let mut last = ProxyError::NoInstance;
    let refused = if policy.degraded.is_some() {
        Some(ProxyError::Degraded)
    } else {
        backend
            .within_rate(policy, started)
            .and_then(|()| backend.through_circuit(policy, started))
            .err()
    };
    if let Some(error) = refused {
        tracing::warn!(service = %backend.name, %client, reason = error.reason(), "connection refused: {error}");
        backend.shared.metrics.error(&backend.name, error.reason());
        return;
    }
    for attempt in 0..=policy.retries {
        let Some(pick) = backend.pick(&snapshot, &tried, key, Instant::now()) else {
            break;
        };
        let member = &snapshot.members[pick.index];
        tried.push(member.endpoint.addr);
        if attempt > 0 {
            // Connect failures carry no load to the service: not charged
            // to the retry budget.
            backend.retries.inc();
        }
        let connect_started = Instant::now();
        let mut outbound = match crate::connect(
            member.endpoint.addr,
            policy.connect_timeout,
            backend.shared.liveness,
        )
        .await
        {
            Ok(stream) => stream,
            Err(reason) => {
                backend.failed(&snapshot, member, connect_started.elapsed());
                last = ProxyError::Connect {
                    addr: member.label.clone(),
                    reason,
                };
                tracing::debug!(service = %backend.name, instance = %member.label, error = %last, "connect failed");
                continue;
            }
        };
        let connected = Instant::now();
        backend.succeeded(member, connected - connect_started, connected);
        backend.circuit_outcome(policy, true, connected);
        let in_flight = member.stats.in_flight();
        let gone = member.stats.gone();
        let copied = tokio::select! {
            copied = tokio::io::copy_bidirectional_with_sizes(
                &mut inbound,
                &mut outbound,
                COPY_BUFFER,
                COPY_BUFFER,
            ) => Some(copied),
            () = stop.cancelled() => None,
            // Nothing will ever come back: the client may as well know now.
            () = gone.cancelled() => {
                tracing::debug!(service = %backend.name, %client, instance = %member.label, "instance's host is gone: connection closed");
                return;
            }
        };
        drop(in_flight);
        match copied {
            Some(Ok((up, down))) => {
                if backend.shared.access_log {
                    tracing::info!(
                        target: "signpost::access",
                        service = %backend.name,
                        %client,
                        instance = %member.label,
                        bytes_sent = up,
                        bytes_received = down,
                        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    );
                }
            }
            Some(Err(error)) => {
                tracing::debug!(service = %backend.name, %client, instance = %member.label, %error, "connection ended with an error");
            }
            None => {
                tracing::debug!(service = %backend.name, %client, "connection closed at shutdown");
            }
        }
        return;
    }
    backend.circuit_outcome(policy, false, Instant::now());
    tracing::warn!(service = %backend.name, %client, reason = last.reason(), error = %last, "no instance took the connection; closing it");
    backend.shared.metrics.error(&backend.name, last.reason());
}
