//! Switched protocols: an HTTP/1.1 upgrade (a WebSocket) becomes a
//! tunnel between the client and the instance, closed when the
//! instance's host vanishes.

use super::*;

/// Every packet to and from an address is dropped while this lives: the
/// host there is gone without a reset, as when it loses power or the
/// network between is cut.
struct Vanished(std::net::IpAddr);

impl Vanished {
    fn new(ip: std::net::IpAddr) -> Vanished {
        for side in ["-s", "-d"] {
            let status = std::process::Command::new("iptables")
                .args(["-I", "INPUT", side, &ip.to_string(), "-j", "DROP"])
                .status()
                .expect("cannot run iptables (install iptables; needs root)");
            assert!(status.success(), "iptables could not drop {side} {ip}");
        }
        Vanished(ip)
    }
}

impl Drop for Vanished {
    fn drop(&mut self) {
        for side in ["-s", "-d"] {
            let removed = std::process::Command::new("iptables")
                .args(["-D", "INPUT", side, &self.0.to_string(), "-j", "DROP"])
                .status();
            if !removed.is_ok_and(|s| s.success()) {
                eprintln!(
                    "could not remove the iptables rule dropping {side} {}",
                    self.0
                );
            }
        }
    }
}

/// Connections to an instance whose host goes silent are closed, and the
/// clients' with them: keep-alive probes find an idle L4 connection and
/// an idle tunnel (a switch of protocols), unacknowledged data a busy L4
/// connection. Without them the idle ones would stay open forever and
/// the busy one for 15 minutes.
#[tokio::test]
#[ignore = "needs root and iptables"]
async fn connections_to_an_instance_whose_host_vanished_are_closed() {
    let agent = agent("  tcp_keepalive: 1s\n  tcp_user_timeout: 3s\n").await;
    let echo_addr = echo_server().await;
    register_at(&agent, "echo", "tcp", echo_addr);
    let addr = vip(&agent, "echo", echo_addr.port()).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert_eq!(echo(&mut idle, "idle").await, "idle");
    let mut busy = TcpStream::connect(addr).await.unwrap();
    assert_eq!(echo(&mut busy, "busy").await, "busy");
    let server = upgrading_server().await;
    register_at(&agent, "ws", "http", server);
    let (mut tunnel, head) = switch_to_echo(vip(&agent, "ws", server.port()).await).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(echo(&mut tunnel, "tunnel").await, "tunnel");

    let _gone = [Vanished::new(echo_addr.ip()), Vanished::new(server.ip())];
    busy.write_all(b"to a host that is gone").await.unwrap();
    for (what, stream) in [
        ("idle", &mut idle),
        ("busy", &mut busy),
        ("tunnel", &mut tunnel),
    ] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(2 * signpost_tests::PATIENCE, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the {what} connection is still open"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the {what} connection is closed, not answered: {read:?}"
        );
    }
}

/// An HTTP/1.1 instance that switches to an echo protocol when asked
/// (`Upgrade: echo`), also unasked on `/unasked`, and otherwise answers
/// with the `Upgrade` header it received (`-` when none).
async fn upgrading_server() -> SocketAddr {
    let listener = bind(0).await;
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|mut req: hyper::Request<_>| async move {
                let asked = req.headers().get("upgrade").cloned();
                let echo = asked.as_ref().is_some_and(|v| v == "echo");
                let response = if echo || req.uri().path() == "/unasked" {
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = upgrade.await else { return };
                        let mut io = hyper_util::rt::TokioIo::new(upgraded);
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = io.read(&mut buf).await {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    hyper::Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                } else {
                    let seen = asked.map_or("-".to_string(), |v| v.to_str().unwrap().to_string());
                    hyper::Response::builder()
                        .body(http_body_util::Full::new(bytes::Bytes::from(seen)))
                };
                Ok::<_, std::convert::Infallible>(response.unwrap())
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Connects to `addr` and asks to switch to `upgrading_server`'s echo
/// protocol; the answer's head, lower-cased.
async fn switch_to_echo(addr: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: ws.service.internal\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await;
    (stream, head)
}

/// Reads an answer's head (to the blank line), lower-cased.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "closed after {head:?}"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

/// A client that asks to switch protocols (as a WebSocket does) gets the
/// instance's 101 and then a tunnel to it that holds its connection
/// (admission included) until the client closes it; an h2c switch is not
/// passed on, and a 101 nobody asked for is the instance's error.
#[tokio::test]
async fn a_switch_of_protocols_becomes_a_tunnel_to_the_instance() {
    let agent = agent("").await;
    let server = upgrading_server().await;
    register_at(&agent, "ws", "http", server);
    let addr = vip(&agent, "ws", server.port()).await;
    let active = "signpost_agent_proxy_connections_active{service=\"ws\"}";

    let (mut stream, head) = switch_to_echo(addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("\r\nupgrade: echo\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert_eq!(echo(&mut stream, "hello").await, "hello");
    let long = "x".repeat(100_000);
    assert_eq!(echo(&mut stream, &long).await, long);
    assert_eq!(
        agent.metric(active).await,
        1.0,
        "the tunnel is still a connection"
    );
    drop(stream);
    agent
        .eventually("the tunnel's connection to close", || async {
            (agent.metric(active).await == 0.0).then_some(())
        })
        .await;

    let (client, url) = vip_client(&agent, "ws", server.port()).await;
    let answer = client
        .get(&url)
        .header("connection", "upgrade")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.text().await.unwrap(),
        "-",
        "h2c reached the instance"
    );

    let answer = client.get(format!("{url}unasked")).send().await.unwrap();
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.headers()["x-signpost-error"], "upstream_upgrade");
}

/// A real WebSocket server and client (python3-websockets, from the
/// Debian package, hence the system interpreter) talk through the VIP.
#[tokio::test]
#[ignore = "needs python3-websockets"]
async fn a_websocket_client_reaches_a_websocket_server_through_the_vip() {
    const PYTHON: &str = "/usr/bin/python3";
    let peer = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/websocket.py");
    let agent = agent("").await;
    let port = bind(0).await.local_addr().unwrap();
    let mut server = tokio::process::Command::new(PYTHON)
        .args([
            peer,
            "serve",
            &port.ip().to_string(),
            &port.port().to_string(),
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run /usr/bin/python3 (install python3-websockets)");
    let mut ready = String::new();
    tokio::io::BufReader::new(server.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .await
        .unwrap();
    assert_eq!(
        ready.trim(),
        "listening",
        "the server did not start (install python3-websockets)"
    );
    register_at(&agent, "chat", "http", port);
    let addr = vip(&agent, "chat", port.port()).await;
    let out = tokio::process::Command::new(PYTHON)
        .args([peer, "client", &format!("ws://{addr}/chat")])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}\n{stderr}"
    );
    server.kill().await.unwrap();
}
