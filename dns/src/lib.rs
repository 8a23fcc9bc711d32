//! Signpost's local DNS server: the step between an application's
//! resolver and the catalog. Names under the DNS domain
//! (`payments.service.internal`, `web-1.node.internal`, ...) are answered
//! from the agent's catalog view through the [`Catalog`] trait: the
//! service's VIP (the proxy takes it from there) or its healthy instances,
//! Consul's way. Every other name is forwarded to the upstream resolvers
//! and cached, so the agent can be the host's only resolver.
//!
//! hickory-server does the wire format (including setting TC when an
//! answer does not fit the client's UDP size); this crate is the answer
//! logic ([`answer`]), the query-name grammar ([`names`]), the forwarder
//! ([`forward`]), the bytes in and out of the handler ([`wire`]), the UDP
//! loop with its cache of encoded answers ([`udp`]) and the TCP accept
//! loop with its limits ([`tcp`]). Like every library crate it
//! reads no file: the agent passes the configuration and the recursors.

mod answer;
mod forward;
pub mod metrics;
mod names;
mod tcp;
mod udp;
mod wire;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use signpost_core::config::DnsConfig;
use signpost_core::model::{Health, Weights};
use tokio::net::{TcpListener, UdpSocket};

pub use answer::Handler;
pub use metrics::DnsMetrics;

/// One instance of a service, as DNS needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: String,
    /// `None` when the instance's address is a host name: it is then left
    /// out of instance answers but still makes the service known (VIP).
    pub address: Option<IpAddr>,
    /// The address is the service's own, not its node's (the SRV target is
    /// then `<hexip>.addr.<domain>`).
    pub service_address: bool,
    pub port: u16,
    /// The worst of the instance's and its node's checks.
    pub health: Health,
    pub weights: Weights,
}

/// A node, for `<node>.node.<domain>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub address: IpAddr,
    pub meta: BTreeMap<String, String>,
}

/// What an address we answer with stands for (PTR queries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A service VIP.
    Service {
        service: String,
        tag: Option<String>,
    },
    Node(String),
}

/// The catalog view DNS answers from; the agent implements it over its
/// local state and the fleet cache.
pub trait Catalog: Send + Sync + 'static {
    /// Called before a service name is answered: subscribes to the service
    /// if this host did not use it yet and waits (a bounded time) for its
    /// instances.
    fn first_use(&self, service: &str) -> impl Future<Output = ()> + Send;

    /// Every instance of `service` (whatever its health) carrying `tag`;
    /// `None` when no such service is known. Names compare ignoring ASCII
    /// case, as DNS names do.
    fn instances(&self, service: &str, tag: Option<&str>) -> Option<Vec<Endpoint>>;

    /// The stable VIP of `service` (filtered by `tag`), allocated on first
    /// use; `None` if none can be had.
    fn vip(&self, service: &str, tag: Option<&str>) -> Option<Ipv4Addr>;

    fn node(&self, name: &str) -> Option<NodeRecord>;

    /// Whose address `ip` is, among those DNS hands out.
    fn owner(&self, ip: IpAddr) -> Option<Owner>;

    /// A number that moves whenever anything the other methods return may
    /// have changed (instances, health, nodes, the names the control plane
    /// has). UDP answers are reused for identical queries only while it
    /// stays the same, so a change is never answered stale. Called for
    /// every UDP query: keep it to a few atomic reads.
    fn generation(&self) -> u64;
}

/// Everything the server needs besides the catalog.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: DnsConfig,
    /// The datacenter a `.<dc>.` label must name.
    pub datacenter: String,
    /// Where other names go; empty: refused.
    pub recursors: Vec<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen on {addr} ({protocol}): {source}")]
    Bind {
        addr: SocketAddr,
        protocol: &'static str,
        source: std::io::Error,
    },
    #[error("bad dns.domain {0:?}")]
    Domain(String),
    #[error("cannot set up forwarding to the recursors: {0}")]
    Forwarder(String),
    #[error("DNS server failed: {0}")]
    Serve(String),
}

/// Most serving threads when `dns.threads` is 0 (one per core).
const MAX_THREADS: usize = 4;

/// A bound DNS server: UDP and TCP on the same address, served by one
/// thread per core (up to [`MAX_THREADS`], or `dns.threads`), each with its own
/// single-threaded runtime and its own `SO_REUSEPORT` sockets, so a query
/// is received, answered and sent on one thread without waking another.
pub struct DnsServer<C: Catalog> {
    handler: Arc<Handler<C>>,
    sockets: Vec<(std::net::UdpSocket, std::net::TcpListener)>,
    addr: SocketAddr,
}

impl<C: Catalog> DnsServer<C> {
    /// Binds `settings.config.listen` (UDP and TCP; port 0 picks one port
    /// free for both), or serves from `inherited`: the sockets a previous
    /// process served this address from (with what is queued on them).
    /// Serving starts with [`DnsServer::run_until`].
    pub async fn bind(
        settings: Settings,
        catalog: Arc<C>,
        metrics: Arc<DnsMetrics>,
        inherited: Vec<(std::net::UdpSocket, std::net::TcpListener)>,
    ) -> Result<Self, DnsError> {
        let listen = settings.config.listen;
        let settings_threads = settings.config.threads;
        let handler = Arc::new(Handler::new(settings, catalog, metrics)?);
        let mut sockets = inherited;
        if sockets.is_empty() {
            sockets.push(bind_both(listen)?);
        }
        let addr = sockets[0]
            .0
            .local_addr()
            .map_err(bind_error(listen, "udp"))?;
        let threads = match settings_threads {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_THREADS),
            n => n,
        };
        // Inherited sockets are all served, even more than `threads`:
        // what is queued on each must be answered.
        while sockets.len() < threads {
            sockets.push((bind_udp(addr)?, bind_tcp(addr)?));
        }
        Ok(DnsServer {
            handler,
            sockets,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The sockets served from: UDP, then TCP.
    pub fn sockets(&self) -> (Vec<&std::net::UdpSocket>, Vec<&std::net::TcpListener>) {
        self.sockets.iter().map(|(u, t)| (u, t)).unzip()
    }

    /// What answers the queries, to give it new settings while it serves
    /// ([`Handler::reconfigure`]).
    pub fn handler(&self) -> Arc<Handler<C>> {
        self.handler.clone()
    }

    /// Serves until `shutdown` completes, then lets in-flight queries
    /// finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut done = Vec::new();
        for (n, (udp, tcp)) in self.sockets.into_iter().enumerate() {
            let (report, result) = tokio::sync::oneshot::channel();
            let handler = self.handler.clone();
            let stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("signpost-dns-{n}"))
                .spawn(move || {
                    let _ = report.send(serve_thread(handler, udp, tcp, stopped));
                })
                .map_err(|e| DnsError::Serve(format!("cannot start a DNS thread: {e}")))?;
            done.push(result);
        }
        shutdown.await;
        let _ = stop.send(true);
        let mut outcome = Ok(());
        for result in done {
            match result.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => outcome = Err(e),
                Err(_) => outcome = Err(DnsError::Serve("a DNS thread panicked".to_string())),
            }
        }
        outcome
    }
}

/// One serving thread: a current-thread runtime running the UDP loop
/// ([`udp`]) and the TCP accept loop ([`tcp`]) on this thread's sockets.
fn serve_thread<C: Catalog>(
    handler: Arc<Handler<C>>,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<(), DnsError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DnsError::Serve(format!("cannot start a DNS runtime: {e}")))?;
    let stop = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    runtime.block_on(async move {
        let udp = UdpSocket::from_std(udp).map_err(|e| DnsError::Serve(e.to_string()))?;
        let tcp = TcpListener::from_std(tcp).map_err(|e| DnsError::Serve(e.to_string()))?;
        tokio::join!(
            udp::serve(handler.clone(), udp, stop(stopped.clone())),
            tcp::serve(handler, tcp, stop(stopped)),
        );
        Ok(())
    })
}

fn bind_error(addr: SocketAddr, protocol: &'static str) -> impl Fn(std::io::Error) -> DnsError {
    move |source| DnsError::Bind {
        addr,
        protocol,
        source,
    }
}

fn reuse_port_socket(
    addr: SocketAddr,
    kind: socket2::Type,
    protocol: &'static str,
) -> Result<socket2::Socket, DnsError> {
    let error = bind_error(addr, protocol);
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(addr), kind, None).map_err(&error)?;
    socket.set_reuse_port(true).map_err(&error)?;
    if kind == socket2::Type::STREAM {
        socket.set_reuse_address(true).map_err(&error)?;
    }
    socket.set_nonblocking(true).map_err(&error)?;
    socket.bind(&addr.into()).map_err(&error)?;
    Ok(socket)
}

fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, DnsError> {
    reuse_port_socket(addr, socket2::Type::DGRAM, "udp").map(Into::into)
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, DnsError> {
    let socket = reuse_port_socket(addr, socket2::Type::STREAM, "tcp")?;
    socket.listen(1024).map_err(bind_error(addr, "tcp"))?;
    Ok(socket.into())
}

/// Binds the first pair. An address another socket holds is refused
/// first with plain binds: `SO_REUSEPORT` alone would share it silently
/// (say, with a second agent given the same `dns.listen`).
fn bind_both(listen: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener), DnsError> {
    // With port 0, find a port free for both protocols.
    for _ in 0..32 {
        let probe = std::net::UdpSocket::bind(listen).map_err(bind_error(listen, "udp"))?;
        let addr = probe.local_addr().map_err(bind_error(listen, "udp"))?;
        match std::net::TcpListener::bind(addr) {
            Ok(tcp_probe) => {
                drop((probe, tcp_probe));
                return Ok((bind_udp(addr)?, bind_tcp(addr)?));
            }
            Err(e) if listen.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error(addr, "tcp")(e)),
        }
    }
    Err(bind_error(listen, "tcp")(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no port free for both UDP and TCP",
    )))
}

/// The upstream resolvers of a resolv.conf text, other than `ourselves`
/// (an agent that is the host's resolver must not forward to itself).
pub fn recursors_from_resolv_conf(text: &str, ourselves: SocketAddr) -> Vec<SocketAddr> {
    let Ok((config, _)) = hickory_server::resolver::system_conf::parse_resolv_conf(text) else {
        return Vec::new();
    };
    let mut found: Vec<SocketAddr> = config
        .name_servers()
        .iter()
        .map(|s| SocketAddr::new(s.ip, 53))
        .filter(|addr| {
            !(addr.port() == ourselves.port()
                && (addr.ip() == ourselves.ip() || ourselves.ip().is_unspecified()))
        })
        .collect();
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_recursors_leave_ourselves_out() {
        let text =
            "search example.com\nnameserver 127.0.0.1\nnameserver 10.0.0.2\nnameserver ::1\n";
        let on_53: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let on_8600: SocketAddr = "127.0.0.1:8600".parse().unwrap();
        let ip = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            recursors_from_resolv_conf(text, on_53),
            vec![ip("10.0.0.2:53"), ip("[::1]:53")]
        );
        let everywhere: SocketAddr = "0.0.0.0:53".parse().unwrap();
        assert!(recursors_from_resolv_conf(text, everywhere).is_empty());
        assert_eq!(
            recursors_from_resolv_conf(text, on_8600),
            vec![ip("127.0.0.1:53"), ip("10.0.0.2:53"), ip("[::1]:53")]
        );
        assert!(recursors_from_resolv_conf("# nothing\n", on_53).is_empty());
    }
}
