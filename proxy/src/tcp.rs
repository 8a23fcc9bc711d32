//! L4: a client connection is joined to a connection to one instance and
//! bytes flow both ways. A failed connect is tried on another instance
//! (nothing was sent yet); after that, the instance's close closes the
//! client's connection, and so does word that its host is gone, and with
//! the service's `idle_timeout`, a connection that carried nothing for
//! that long.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use signpost_core::policy::{Balancer, Degraded};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::balance::hash_ip;
use crate::error::ProxyError;
use crate::mesh::Upstream;

/// Bytes read at once in each direction (tokio's default is 8 KiB): fewer
/// system calls on bulk transfers.
const COPY_BUFFER: usize = 64 * 1024;

/// Serves one client connection until either side closes it or `stop`
/// fires. Longer than most functions here on purpose: it reads top to
/// bottom as the connection's life (admission, the connect attempts with
/// their retries, the copy both ways, the access log).
/// `source`: the caller's verified mesh identity (on the inbound
/// listener), for the access log.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    backend: Arc<Backend>,
    mut inbound: S,
    client: SocketAddr,
    stop: CancellationToken,
    source: Option<&str>,
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
    let refused = if policy.overlay.degraded != Degraded::No {
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
    for attempt in 0..=policy.retry.retries {
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
        let (timeout, liveness) = (policy.connect_timeout, backend.shared.liveness);
        let dialed = match &member.endpoint.mesh {
            None => crate::connect(member.endpoint.addr, timeout, liveness)
                .await
                .map(Upstream::Plain),
            Some(hop) => {
                let caller = backend.shared.mesh.load().caller(client.ip());
                let caller = match caller {
                    Ok(caller) => caller,
                    Err(reason) => {
                        let error = ProxyError::NoIdentity(reason);
                        tracing::warn!(service = %backend.name, %client, reason = error.reason(), "connection refused: {error}");
                        backend.shared.metrics.error(&backend.name, error.reason());
                        return;
                    }
                };
                let metrics = &backend.shared.metrics;
                crate::mesh::dial(hop, &caller, true, timeout, liveness, metrics)
                    .await
                    .map(|tls| Upstream::Mesh(Box::new(tls)))
            }
        };
        let mut outbound = match dialed {
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
            copied = join(&mut inbound, &mut outbound, policy.idle_timeout) => copied,
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
                        source_identity = source.unwrap_or(""),
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
                tracing::debug!(service = %backend.name, %client, "connection closed: shutdown, or idle for idle_timeout");
            }
        }
        return;
    }
    backend.circuit_outcome(policy, false, Instant::now());
    tracing::warn!(service = %backend.name, %client, reason = last.reason(), error = %last, "no instance took the connection; closing it");
    backend.shared.metrics.error(&backend.name, last.reason());
}

/// Copies both ways until either side closes; with `idle`, also until
/// nothing went either way for that long (then `None`, as at shutdown).
async fn join<A, B>(
    inbound: &mut A,
    outbound: &mut B,
    idle: Option<std::time::Duration>,
) -> Option<std::io::Result<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let Some(idle) = idle else {
        let copied =
            tokio::io::copy_bidirectional_with_sizes(inbound, outbound, COPY_BUFFER, COPY_BUFFER);
        return Some(copied.await);
    };
    let activity = Activity::new();
    let mut inbound = Tracked {
        io: inbound,
        activity: &activity,
    };
    let mut outbound = Tracked {
        io: outbound,
        activity: &activity,
    };
    let copied = tokio::io::copy_bidirectional_with_sizes(
        &mut inbound,
        &mut outbound,
        COPY_BUFFER,
        COPY_BUFFER,
    );
    tokio::select! {
        copied = copied => Some(copied),
        () = activity.idle_for(idle) => None,
    }
}

/// When a connection last carried a byte, either way.
struct Activity {
    started: Instant,
    /// Milliseconds since `started`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let last =
                self.started + std::time::Duration::from_millis(self.last.load(Ordering::Relaxed));
            let until = last + idle;
            if until <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }
}

/// A side of an L4 connection that notes its reads and writes.
struct Tracked<'a, S> {
    io: &'a mut S,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut *self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}
