//! Fuzzing the proxy's request handling: mutations of real HTTP/1.1
//! requests (methods, targets, headers, content lengths, chunked bodies,
//! upgrades) sent to a VIP of a live proxy in front of a live instance.
//! Every connection ends once the client has sent all it will (no hang),
//! whatever comes back is an HTTP response, nothing panics, the instance
//! is never ejected for what clients sent, and a good request is served
//! at the end. See `signpost-fuzz` for the dose.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use signpost_core::model::{Health, Protocol, Weights};
use signpost_core::policy::Policy;
use signpost_fuzz::Dose;
use signpost_proxy::{Endpoint, Liveness, Proxy, ProxyMetrics, ServiceSpec, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An instance that reads each request's body and answers 200.
async fn instance() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                        let read = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len());
                        let text = format!("read {read:?}");
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(text),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

const REQUESTS: &[&str] = &[
    "GET / HTTP/1.1\r\nHost: web.service.internal\r\n\r\n",
    "GET /a/b?c=d&e HTTP/1.1\r\nHost: web\r\nAccept: */*\r\nConnection: keep-alive\r\nX-Request-Id: 1\r\n\r\nGET /again HTTP/1.1\r\nHost: web\r\n\r\n",
    "POST /submit HTTP/1.1\r\nHost: web\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"a\": [1, 2]}",
    "PUT /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "DELETE /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    "OPTIONS * HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
];

/// Sends `request` on a new connection, says it is done, and reads until
/// the proxy closes; what came back.
async fn exchange(vip: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(vip).await.unwrap();
    // The proxy may answer and close before reading it all.
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_hang_panic_or_eject_the_instance() {
    let backend = instance().await;
    let metrics = Arc::new(ProxyMetrics::default());
    let proxy = Proxy::new(
        Settings {
            zone: "a".to_string(),
            http_port: 0,
            pool_idle_timeout: Duration::from_secs(30),
            client_idle_timeout: Duration::from_secs(30),
            client_first_byte_timeout: Duration::from_secs(10),
            liveness: Liveness {
                keepalive: Duration::ZERO,
                user_timeout: Duration::ZERO,
            },
            access_log: false,
            threads: 1,
            sockets: Arc::default(),
        },
        metrics.clone(),
        |_| {},
    )
    .unwrap();
    let vip = Ipv4Addr::new(127, 77, 200, 9);
    let failed = proxy.update(vec![ServiceSpec {
        name: "web".to_string(),
        service: "web".to_string(),
        vip,
        protocol: Protocol::Http,
        endpoints: vec![Endpoint {
            addr: backend,
            zone: "a".to_string(),
            tags: Vec::new(),
            health: Health::Passing,
            weights: Weights::default(),
            host_gone: false,
            mesh: None,
        }],
        policy: Policy::default(),
    }]);
    assert_eq!(failed, 0);
    let vip = SocketAddr::from((vip, backend.port()));

    let seeds: Vec<Vec<u8>> = REQUESTS.iter().map(|r| r.as_bytes().to_vec()).collect();
    let mut dose = Dose::from_env(3_000);
    let mut answered = 0;
    while dose.another() {
        let request = dose.mutation(&seeds);
        let Ok(answer) =
            tokio::time::timeout(Duration::from_secs(15), exchange(vip, &request)).await
        else {
            panic!(
                "{}: the connection stays open after the client is done: {:?}",
                dose.at(),
                String::from_utf8_lossy(&request)
            );
        };
        if !answer.is_empty() {
            assert!(
                answer.starts_with(b"HTTP/1."),
                "{}: {:?} answered {:?}",
                dose.at(),
                String::from_utf8_lossy(&request),
                String::from_utf8_lossy(&answer)
            );
            answered += 1;
        }
    }
    assert!(answered > 0, "nothing was answered: the seeds are broken");

    // The instance is still in, and serves.
    let answer = exchange(vip, REQUESTS[0].as_bytes()).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("proxy_ejections_total{") && !l.ends_with(" 0")),
        "{text}"
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}
