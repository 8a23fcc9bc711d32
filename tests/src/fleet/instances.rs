//! What runs on the fleet's hosts besides Signpost: service instances
//! (HTTP, gRPC, TCP echo) and a relay that adds latency to a path.

use std::net::SocketAddr;
use std::time::Duration;

use super::Host;

/// A TCP relay on `host` from `listen` to `to` that holds every chunk for
/// `delay` in each direction (the added latency of a long link; this
/// kernel has no `netem`). Runs until the host stops.
pub async fn delay_relay(host: &Host, listen: SocketAddr, to: SocketAddr, delay: Duration) {
    let listener = host
        .run(async move { tokio::net::TcpListener::bind(listen).await.unwrap() })
        .await;
    host.spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(delay_line(ri, wo, delay), delay_line(ro, wi, delay));
            });
        }
    });
}

/// Copies `from` to `to`, each chunk `delay` after it was read, in order.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        to.shutdown().await.ok();
    };
    tokio::join!(reader, writer);
}

/// An HTTP instance on `host` at `port` (all addresses): `/` answers the
/// host's name, `/health` answers 200.
pub async fn http_instance(host: &Host, port: u16) {
    let name = host.name.clone();
    let listener = host.listen(port).await;
    host.spawn(async move {
        let app = axum::Router::new()
            .route("/", axum::routing::get(move || async move { name }))
            .route("/health", axum::routing::get(|| async { "ok" }));
        axum::serve(listener, app).await.ok();
    });
}

/// An HTTP instance on `host` that listens on its loopback only, at
/// `port`: `/health` answers 200, any other path `<host> <method> <path>`.
pub async fn loopback_http_instance(host: &Host, port: u16) {
    let name = host.name.clone();
    let listener = host
        .run(async move {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap()
        })
        .await;
    host.spawn(async move {
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .fallback(move |method: axum::http::Method, uri: axum::http::Uri| {
                let name = name.clone();
                async move { format!("{name} {method} {}", uri.path()) }
            });
        axum::serve(listener, app).await.ok();
    });
}

/// An echo instance on `host` that listens on its loopback only.
pub async fn loopback_echo_instance(host: &Host, port: u16) {
    let listener = host
        .run(async move {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .unwrap()
        })
        .await;
    host.spawn(crate::upstream::serve_echo(listener));
}

/// A gRPC instance on `host` at `port`: the standard health service,
/// serving.
pub async fn grpc_instance(host: &Host, port: u16) {
    let listener = host.listen(port).await;
    host.spawn(crate::upstream::serve_grpc_health(listener, ""));
}

/// A TCP echo instance on `host` at `port`.
pub async fn echo_instance(host: &Host, port: u16) {
    let listener = host.listen(port).await;
    host.spawn(crate::upstream::serve_echo(listener));
}
