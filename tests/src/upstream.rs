//! Upstream instances for proxy tests, and clients that reach a service
//! through its VIP name as a program on the host does.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::rr::{RData, RecordType};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::Agent;
use crate::dns::{Transport, query};

/// A status that makes an [`Upstream`] accept requests and never answer.
pub const HANG: u16 = 0;

/// An HTTP/1.1 instance on its own loopback address: reads the request
/// body, then answers with its name (and the body's length in
/// `x-body-length`), or with the status the test sets, after the delay
/// the test sets; closes each connection after one answer when the
/// test says so.
pub struct Upstream {
    pub addr: SocketAddr,
    name: String,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    close: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Upstream {
    /// Starts one on a fresh loopback address, on `port` (0: any).
    pub async fn start(name: &str, port: u16) -> Upstream {
        let listener = bind(port).await;
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let close = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let (s, d, c, h, t, n) = (
            status.clone(),
            delay_ms.clone(),
            close.clone(),
            hits.clone(),
            tasks.clone(),
            name.to_string(),
        );
        let (accepted, still_open) = (connections.clone(), open.clone());
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                still_open.fetch_add(1, Ordering::SeqCst);
                let closed = still_open.clone();
                let (s, d, c, h, n) = (s.clone(), d.clone(), c.clone(), h.clone(), n.clone());
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (s, d, c, h, n) =
                            (s.clone(), d.clone(), c.clone(), h.clone(), n.clone());
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            let (head, body) = req.into_parts();
                            // Read whole before any answer, as most
                            // applications do.
                            let received = http_body_util::BodyExt::collect(body)
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or_default();
                            let code = s.load(Ordering::SeqCst);
                            if code == HANG {
                                std::future::pending::<()>().await;
                            }
                            let delay = d.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let attempt = head
                                .headers
                                .get("x-signpost-attempt")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let body = http_body_util::Full::new(bytes::Bytes::from(n));
                            let mut response = hyper::Response::builder()
                                .status(code)
                                .header("x-attempt-seen", attempt)
                                .header("x-body-length", received);
                            if c.load(Ordering::SeqCst) {
                                response = response.header("connection", "close");
                            }
                            // What the request's identity was on arrival.
                            for (name, seen) in [
                                ("traceparent", "x-traceparent-seen"),
                                ("x-request-id", "x-request-id-seen"),
                            ] {
                                if let Some(value) = head.headers.get(name) {
                                    response = response.header(seen, value.clone());
                                }
                            }
                            let response = response.body(body).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    },
                );
                t.lock().unwrap().spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                    closed.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Upstream {
            addr,
            name: name.to_string(),
            status,
            delay_ms,
            close,
            hits,
            connections,
            open,
            tasks,
        }
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// From now on, close each connection after its answer (or not).
    pub fn set_close(&self, close: bool) {
        self.close.store(close, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections open now (closed by either side: not counted).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Dies like a killed process: the listener and every connection close.
    pub fn kill(&self) {
        self.tasks.lock().unwrap().abort_all();
    }

    /// Its service-file entry.
    pub fn entry(&self, service: &str, protocol: &str) -> String {
        format!(
            "  - name: {service}\n    id: {}\n    address: {}\n    port: {}\n    protocol: {protocol}\n",
            self.name,
            self.addr.ip(),
            self.addr.port()
        )
    }
}

/// A listener on a fresh loopback address, on `port` (0: any).
pub async fn bind(port: u16) -> TcpListener {
    loop {
        let ip = crate::free_addr().ip();
        if let Ok(l) = TcpListener::bind((ip, port)).await {
            return l;
        }
    }
}

/// Serves the standard gRPC health service on `listener`, with
/// `service` serving ("" is the server as a whole).
pub async fn serve_grpc_health(listener: TcpListener, service: &'static str) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service, tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .unwrap();
}

/// Echoes every connection on `listener` back to its sender.
pub async fn serve_echo(listener: TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// `n` upstreams serving the same port, as a service's instances do.
pub async fn upstreams(prefix: &str, n: usize) -> Vec<Upstream> {
    let first = Upstream::start(&format!("{prefix}-1"), 0).await;
    let port = first.addr.port();
    let mut all = vec![first];
    for i in 2..=n {
        all.push(Upstream::start(&format!("{prefix}-{i}"), port).await);
    }
    all
}

/// An agent configuration for proxy tests: a VIP range of its own
/// (tests run side by side), no DNS recursors, and `proxy` (YAML lines
/// under `proxy:`, indented by two spaces).
pub fn proxy_config(proxy: &str) -> String {
    let range = format!("127.76.{}.0/24", rand::random_range(0..=255u8));
    format!("dns:\n  recursors: []\nproxy:\n  vip_range: {range}\n{proxy}")
}

/// Resolves `name` with the agent's DNS, as an application does.
pub async fn resolve(agent: &Agent, name: &str) -> Option<Ipv4Addr> {
    let m = query(agent.dns_addr(), name, RecordType::A, Transport::Udp).await;
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// The service's VIP once the agent knows the service and its proxy
/// listens on `port` there.
pub async fn vip(agent: &Agent, service: &str, port: u16) -> SocketAddr {
    let name = format!("{service}.service.internal");
    let ip = agent
        .eventually(&format!("{name} to resolve"), || async {
            resolve(agent, &name).await
        })
        .await;
    let addr = SocketAddr::from((ip, port));
    agent
        .eventually(&format!("a listener on {addr}"), || async {
            TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
    addr
}

/// An HTTP client that reaches `host` at `addr`, the way a program that
/// resolved the name does.
pub fn client(host: &str, addr: SocketAddr) -> reqwest::Client {
    client_builder(host, addr).build().unwrap()
}

/// [`client`]'s settings, for a test to add its own.
pub fn client_builder(host: &str, addr: SocketAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .resolve(host, addr)
        .timeout(Duration::from_secs(30))
}

/// A client for `service`'s VIP on `port` (found through the agent's
/// DNS), and the URL of the service's root there.
pub async fn vip_client(agent: &Agent, service: &str, port: u16) -> (reqwest::Client, String) {
    let addr = vip(agent, service, port).await;
    let host = format!("{service}.service.internal");
    let url = format!("http://{host}:{port}/");
    (client(&host, addr), url)
}

/// GETs `url` `n` times; returns the bodies (instance names) by count.
pub async fn spread(client: &reqwest::Client, url: &str, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = client.get(url).send().await.unwrap();
        let reason = r.headers().get("x-signpost-error").cloned();
        assert_eq!(r.status(), 200, "{url}: {reason:?}");
        *seen.entry(r.text().await.unwrap()).or_insert(0) += 1;
    }
    seen
}
