//! The VIP listeners: which (VIP, port) serves which backend, and the
//! accept loops. A listener is opened when its service first needs it and
//! closed when the service no longer does; closing one only stops
//! accepting, so connections already made carry on. A listener whose
//! backend changes keeps its socket and serves the new backend from the
//! next connection.

use std::collections::BTreeSet;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use arc_swap::ArcSwap;
use signpost_core::accept::AcceptBackoff;
use signpost_core::model::Protocol;
use signpost_core::sockets::{Sockets, vip_name};
use socket2::{Domain, Socket, Type};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ServiceSpec;
use crate::accept::{Acks, Listener};
use crate::backend::Backend;
use crate::endpoint::Endpoint;
use crate::workers::Workers;

/// A backend's identity: the VIP name, and the one instance port it is
/// limited to when a service's instances serve different ports.
pub(crate) type BackendKey = (String, Option<u16>);

/// What one service asks for: backends and the listeners that serve them.
pub(crate) struct Plan {
    pub(crate) backends: Vec<(BackendKey, Vec<Endpoint>)>,
    pub(crate) listeners: Vec<(SocketAddr, BackendKey)>,
}

/// A listener on every port the instances serve, plus `http_port` for an
/// HTTP service. When all instances serve one port, every listener shares
/// one backend; otherwise each instance port has its own backend (its
/// instances only) and `http_port` balances over all of them.
pub(crate) fn plan(spec: &ServiceSpec, protocol: Protocol, http_port: u16) -> Plan {
    let ports: BTreeSet<u16> = spec.endpoints.iter().map(|e| e.addr.port()).collect();
    let all: BackendKey = (spec.name.clone(), None);
    let mut backends = vec![(all.clone(), spec.endpoints.clone())];
    let mut listeners = Vec::new();
    let listen = |port| SocketAddr::V4(SocketAddrV4::new(spec.vip, port));
    if ports.len() <= 1 {
        listeners.extend(ports.iter().map(|&p| (listen(p), all.clone())));
    } else {
        for &port in &ports {
            let key = (spec.name.clone(), Some(port));
            let endpoints = spec
                .endpoints
                .iter()
                .filter(|e| e.addr.port() == port)
                .cloned()
                .collect();
            backends.push((key.clone(), endpoints));
            listeners.push((listen(port), key));
        }
    }
    if protocol != Protocol::Tcp
        && http_port != 0
        && !ports.contains(&http_port)
        && !ports.is_empty()
    {
        listeners.push((listen(http_port), all));
    }
    Plan {
        backends,
        listeners,
    }
}

/// An open listener.
pub(crate) struct Open {
    pub(crate) target: Arc<ArcSwap<Backend>>,
    pub(crate) key: BackendKey,
    stop: CancellationToken,
    name: String,
    sockets: Arc<Sockets>,
}

impl Open {
    /// Stops accepting; a successor process will not be handed it.
    pub(crate) fn close(&self) {
        self.stop.cancel();
        self.sockets.closed(&self.name);
    }

    /// Stops accepting because a successor process serves it now.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

/// What every accept loop and connection shares.
#[derive(Clone)]
pub(crate) struct Tasks {
    pub(crate) tracker: TaskTracker,
    /// The threads connections run on.
    pub(crate) workers: Arc<Workers>,
    /// Connections finish their requests and close (HTTP) ...
    pub(crate) drain: CancellationToken,
    /// ... and stop at once (L4, and whatever is left after the grace).
    pub(crate) stop: CancellationToken,
    /// The sockets a previous process handed over, and those served.
    pub(crate) sockets: Arc<Sockets>,
}

/// Opens a listener on `addr` for `backend`: with the sockets a previous
/// process served it from, if it handed them over, else new ones.
pub(crate) fn open(
    addr: SocketAddr,
    key: BackendKey,
    backend: Arc<Backend>,
    tasks: &Tasks,
) -> std::io::Result<Open> {
    // One socket per worker, all bound to `addr` (SO_REUSEPORT): the
    // kernel spreads new connections over them, and a connection wakes
    // only the worker whose socket it came to, where one shared socket
    // woke every worker for each connection and all but one found
    // nothing to accept. All are bound before any is served, so a port
    // in use fails the whole listener. Inherited sockets are all served,
    // even more than there are workers: what is queued on each must be.
    let name = vip_name(addr);
    let mut sockets = tasks.sockets.take_tcp(&name, addr);
    while sockets.len() < tasks.workers.count() {
        sockets.push(bind(addr)?);
    }
    tasks.sockets.serving(&name, &sockets)?;
    let target = Arc::new(ArcSwap::new(backend));
    let stop = tasks.drain.child_token();
    for (n, listener) in sockets.into_iter().enumerate() {
        let (target, stop, tasks2) = (target.clone(), stop.clone(), tasks.clone());
        tasks.workers.spawn_on(
            n % tasks.workers.count(),
            tasks
                .tracker
                .track_future(accept_loop(listener, addr, target, stop, tasks2)),
        );
    }
    Ok(Open {
        target,
        key,
        stop,
        name,
        sockets: tasks.sockets.clone(),
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// One worker's accept loop on a listener.
async fn accept_loop(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    target: Arc<ArcSwap<Backend>>,
    stop: CancellationToken,
    tasks: Tasks,
) {
    // An HTTP instance answers every request: the request's ACK can go
    // with the answer. A listener whose service changes protocol keeps
    // its socket and this setting, which is then only a lost saving (an
    // L4 connection turns quick ACKs back on as soon as it waits).
    let acks = if target.load().snapshot().protocol == Protocol::Tcp {
        Acks::Quick
    } else {
        Acks::Delayed { read: false }
    };
    let listener = match Listener::new(listener, acks) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%addr, %error, "cannot accept on the listener");
            return;
        }
    };
    tracing::debug!(%addr, service = %target.load().name, "listening");
    // This loop's own tokens: a connection's clone and wait then lock
    // only them, not the proxy's tokens that every thread shares.
    let (conn_drain, conn_stop) = (tasks.drain.child_token(), tasks.stop.child_token());
    let mut failing = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, client)) => {
                failing.recovered(addr);
                let backend = target.load_full();
                let (drain, stop) = (conn_drain.clone(), conn_stop.clone());
                let workers = &tasks.workers;
                if backend.snapshot().protocol == Protocol::Tcp {
                    workers.spawn_connection(&tasks.tracker, stream, move |stream| {
                        crate::tcp::serve(backend, stream, client, stop, None)
                    });
                } else {
                    workers.spawn_connection(&tasks.tracker, stream, move |stream| {
                        crate::http::serve(backend, stream, client, drain, stop)
                    });
                }
            }
            Err(error) => {
                // Out of file descriptors, mostly: wait instead of spinning.
                let wait = failing.failed(addr, &error);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
    tracing::debug!(%addr, "listener closed");
}

/// Tests of [`plan`].
#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use signpost_core::model::{Health, Weights};
    use signpost_core::policy::Policy;

    use super::*;

    fn spec(ports: &[u16]) -> ServiceSpec {
        ServiceSpec {
            name: "web".to_string(),
            service: "web".to_string(),
            vip: Ipv4Addr::new(127, 77, 0, 9),
            protocol: Protocol::Http,
            endpoints: ports
                .iter()
                .enumerate()
                .map(|(i, &port)| Endpoint {
                    addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], port)),
                    zone: String::new(),
                    tags: Vec::new(),
                    health: Health::Passing,
                    weights: Weights::default(),
                    host_gone: false,
                    mesh: None,
                })
                .collect(),
            policy: Policy::default(),
        }
    }

    fn ports(plan: &Plan) -> Vec<(u16, Option<u16>)> {
        plan.listeners
            .iter()
            .map(|(addr, key)| (addr.port(), key.1))
            .collect()
    }

    #[test]
    fn one_port_and_the_http_port_share_a_backend() {
        let p = plan(&spec(&[8080, 8080]), Protocol::Http, 80);
        assert_eq!(ports(&p), vec![(8080, None), (80, None)]);
        assert_eq!(p.backends.len(), 1);
        let tcp = plan(&spec(&[6379]), Protocol::Tcp, 80);
        assert_eq!(ports(&tcp), vec![(6379, None)]);
        let off = plan(&spec(&[8080]), Protocol::Http, 0);
        assert_eq!(ports(&off), vec![(8080, None)]);
    }

    #[test]
    fn different_ports_get_their_own_backends() {
        let p = plan(&spec(&[8080, 9090, 9090]), Protocol::Http, 80);
        assert_eq!(
            ports(&p),
            vec![(8080, Some(8080)), (9090, Some(9090)), (80, None)]
        );
        let by_port = |port| {
            p.backends
                .iter()
                .find(|(k, _)| k.1 == Some(port))
                .map(|(_, e)| e.len())
        };
        assert_eq!(by_port(8080), Some(1));
        assert_eq!(by_port(9090), Some(2));
    }

    /// Every worker's socket binds the same address, but a port that
    /// another program listens on is refused, as without SO_REUSEPORT.
    #[test]
    fn workers_share_an_address_that_others_cannot_take() {
        let first = bind(SocketAddr::from(([127, 77, 0, 9], 0))).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        let taken = std::net::TcpListener::bind("127.77.0.10:0").unwrap();
        let refused = bind(taken.local_addr().unwrap()).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse);
    }

    #[test]
    fn no_instances_no_listeners() {
        assert!(plan(&spec(&[]), Protocol::Http, 80).listeners.is_empty());
    }
}
