//! A connection an instance switched to another protocol (a WebSocket):
//! after the 101, bytes flow both ways between the client and the
//! instance until either closes.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Snapshot};

/// A connection an instance switched to another protocol (a WebSocket):
/// the client's side and the instance's, each handed over by hyper once
/// the 101 has gone through.
pub(crate) struct Tunnel {
    pub(super) client: OnUpgrade,
    pub(super) instance: OnUpgrade,
    /// The instance: `snapshot.members[member]`, counted in flight (as
    /// its requests are, for the balancer) while the tunnel lasts.
    pub(super) snapshot: Arc<Snapshot>,
    pub(super) member: usize,
}

/// Joins the two sides of a switched connection; bytes flow both ways
/// until either side closes it or `stop` fires, as on an L4 listener.
pub(super) async fn run_tunnel(
    backend: &Backend,
    client: SocketAddr,
    tunnel: Tunnel,
    stop: &CancellationToken,
) {
    let member = &tunnel.snapshot.members[tunnel.member];
    let _in_flight = member.stats.in_flight();
    let instance = &member.label;
    let sides = async { Ok::<_, hyper::Error>((tunnel.client.await?, tunnel.instance.await?)) };
    let joined = tokio::select! {
        sides = sides => sides,
        () = stop.cancelled() => return,
    };
    let (client_side, instance_side) = match joined {
        Ok(sides) => sides,
        Err(error) => {
            tracing::debug!(service = %backend.name, %client, %instance, %error, "a switched connection closed before it started");
            return;
        }
    };
    let (mut client_side, mut instance_side) =
        (TokioIo::new(client_side), TokioIo::new(instance_side));
    let copied = tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client_side, &mut instance_side) => Some(copied),
        () = stop.cancelled() => None,
    };
    match copied {
        Some(Ok((up, down))) => {
            tracing::debug!(service = %backend.name, %client, %instance, bytes_sent = up, bytes_received = down, "switched connection closed");
        }
        Some(Err(error)) => {
            tracing::debug!(service = %backend.name, %client, %instance, %error, "switched connection ended with an error");
        }
        None => {
            tracing::debug!(service = %backend.name, %client, %instance, "switched connection closed at shutdown");
        }
    }
}
