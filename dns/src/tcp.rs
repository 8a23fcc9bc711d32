//! DNS over TCP (RFC 7766): our own accept loop and connections, in
//! front of the same [`Handler`] as UDP.
//!
//! hickory-server's TCP listener retries a failed accept at once (at the
//! file-descriptor limit one waiting connection spins a core) and takes
//! any number of connections. Here accepting backs off when it fails, a
//! serving thread holds at most [`MAX_CONNECTIONS`] (more are closed as
//! they arrive and counted), and a connection is closed when it is idle
//! for [`IDLE`] between queries, takes as long to send the rest of a
//! query, or does not read its answers. Queries on one connection are
//! answered concurrently (at most [`PIPELINED`] at a time), each answer
//! written whole as it is ready, as RFC 7766 asks.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::xfer::Protocol;
use signpost_core::accept::AcceptBackoff;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Catalog;
use crate::answer::Handler;
use crate::wire::{self, HEADER_LEN};

/// Open connections per serving thread.
const MAX_CONNECTIONS: usize = 256;

/// Longest a connection may wait between queries, take to send the rest
/// of one, or take to read an answer.
const IDLE: Duration = Duration::from_secs(10);

/// Queries of one connection answered at the same time; reading waits
/// while that many are.
const PIPELINED: usize = 16;

/// Accepts and serves connections on `listener` until `stop` completes,
/// then closes them once the queries in flight are answered.
pub(crate) async fn serve<C: Catalog>(
    handler: Arc<Handler<C>>,
    listener: TcpListener,
    stop: impl Future<Output = ()>,
) {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut failing = AcceptBackoff::default();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, src) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                let wait = failing.failed(addr, &error);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = &mut stop => break,
                }
            }
        };
        failing.recovered(addr);
        if connections.len() >= MAX_CONNECTIONS {
            handler.metrics().tcp_refused();
            drop(stream);
            continue;
        }
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %src, "cannot set TCP_NODELAY");
        }
        let (reader, writer) = stream.into_split();
        let (handler, closing) = (handler.clone(), closing.clone());
        connections.spawn(async move {
            tokio::select! {
                () = connection(handler, reader, writer, src) => {}
                () = closing.cancelled() => {}
            }
        });
    }
    drop(listener);
    connections.close();
    // Connections waiting for a query end now; those answering get a
    // moment to send what they have.
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(Duration::from_secs(1)) => closing.cancel(),
    }
    connections.wait().await;
}

/// One client connection: reads length-prefixed queries and answers each
/// on its own task, until the client closes, errs or idles.
async fn connection<C: Catalog>(
    handler: Arc<Handler<C>>,
    mut reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    src: SocketAddr,
) {
    let writer = Arc::new(Mutex::new(writer));
    let in_flight = Arc::new(Semaphore::new(PIPELINED));
    let answering = TaskTracker::new();
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let Some(query) = read_query(&mut reader, src).await else {
            break;
        };
        let (handler, writer) = (handler.clone(), writer.clone());
        answering.spawn(async move {
            let _permit = permit;
            let Some(answered) = wire::answer(&handler, query, src, Protocol::Tcp).await else {
                return;
            };
            let Ok(len) = u16::try_from(answered.bytes.len()) else {
                return;
            };
            let mut message = Vec::with_capacity(answered.bytes.len() + 2);
            message.extend_from_slice(&len.to_be_bytes());
            message.extend_from_slice(&answered.bytes);
            let mut writer = writer.lock().await;
            match tokio::time::timeout(IDLE, writer.write_all(&message)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::debug!(%error, %src, "cannot send a DNS answer"),
                Err(_) => {
                    tracing::debug!(%src, "a DNS client does not read its answers; closing");
                    let _ = writer.shutdown().await;
                }
            }
        });
    }
    answering.close();
    answering.wait().await;
    let _ = writer.lock().await.shutdown().await;
}

/// The next query of the connection; `None` when the client closed it,
/// idled, or sent something that is not a DNS message.
async fn read_query(reader: &mut OwnedReadHalf, src: SocketAddr) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    // A clean close between queries is the usual end.
    tokio::time::timeout(IDLE, reader.read_exact(&mut len))
        .await
        .ok()?
        .ok()?;
    let len = usize::from(u16::from_be_bytes(len));
    if len < HEADER_LEN {
        tracing::debug!(%src, len, "a DNS message shorter than its header; closing");
        return None;
    }
    let mut query = vec![0u8; len];
    match tokio::time::timeout(IDLE, reader.read_exact(&mut query)).await {
        Ok(Ok(_)) => Some(query),
        Ok(Err(error)) => {
            tracing::debug!(%error, %src, "a DNS query broke off");
            None
        }
        Err(_) => {
            tracing::debug!(%src, "a DNS query was not sent whole in time; closing");
            None
        }
    }
}
