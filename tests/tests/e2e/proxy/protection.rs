//! What protects a service: limits that fail fast with the reason,
//! blocked instances, a forced or automatic circuit breaker.

use super::*;

/// Beyond max_requests and max_pending a request fails at once with 503
/// and the limit's name; beyond max_connections a connection does.
#[tokio::test]
async fn limits_fail_fast_with_the_reason() {
    let agent =
        agent("  defaults:\n    max_requests: 1\n    max_pending: 0\n    max_connections: 3\n")
            .await;
    let web = upstreams("web", 1).await;
    // 3s: the second request surely comes while the first is held.
    web[0].set_delay(3000);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let url = format!("http://web.service.internal:{port}/");
    let slow = {
        let (c, url) = (client("web.service.internal", addr), url.clone());
        tokio::spawn(async move { c.get(&url).send().await.unwrap().status() })
    };
    agent
        .eventually("the slow request to reach the instance", || async {
            (web[0].hits() == 1).then_some(())
        })
        .await;
    let r = client("web.service.internal", addr)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-signpost-error"], "max_pending");
    assert_eq!(slow.await.unwrap(), 200, "the admitted request is served");
    assert!(
        agent.log().contains("max_pending"),
        "the log names the limit"
    );

    // Three connections are open (the two above may still be pooled, so
    // open fresh ones until one is refused).
    web[0].set_delay(0);
    let mut held = Vec::new();
    let refused = loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        if head.starts_with("HTTP/1.1 503") {
            break head;
        }
        assert!(held.len() < 5, "max_connections never applied: {head}");
        held.push(s);
    };
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("x-signpost-error: max_connections"),
        "{refused}"
    );
}

/// An operator's policy: a blocked instance gets nothing, an open circuit
/// fails every request at once with the reason.
#[tokio::test]
async fn blocked_instances_and_an_open_circuit_apply() {
    let web = upstreams("web", 2).await;
    let api = upstreams("api", 1).await;
    let agent = agent(&format!(
        "  services:\n    web: {{blocked: [\"{}\"]}}\n    api: {{circuit: open}}\n",
        web[0].addr
    ))
    .await;
    register(&agent, "web.yaml", "web", "http", &web);
    register(&agent, "api.yaml", "api", "http", &api);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    let seen = spread(&c, &format!("http://web.service.internal:{port}/"), 20).await;
    assert_eq!(seen.get("web-2"), Some(&20), "{seen:?}");
    assert_eq!(web[0].hits(), 0);

    let port = api[0].addr.port();
    let addr = vip(&agent, "api", port).await;
    let r = client("api.service.internal", addr)
        .get(format!("http://api.service.internal:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-signpost-error"], "circuit_open");
    assert_eq!(api[0].hits(), 0, "nothing reaches the instance");
}

/// The automatic breaker: consecutive failed requests open the circuit
/// (requests fail fast without reaching the service), a good probe after
/// `breaker_open_for` closes it.
#[tokio::test]
async fn the_breaker_opens_on_failures_and_a_good_probe_closes_it() {
    let agent = agent(
        "  defaults:\n    retries: 0\n    eject_after: 0\n    breaker_failures: 3\n    breaker_open_for: 3s\n",
    )
    .await;
    let web = upstreams("web", 1).await;
    web[0].set_status(500);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    for _ in 0..3 {
        assert_eq!(c.get(&url).send().await.unwrap().status(), 500);
    }
    let hits = web[0].hits();
    for _ in 0..5 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["x-signpost-error"], "circuit_open");
    }
    assert_eq!(web[0].hits(), hits, "an open circuit calls nothing");

    web[0].set_status(200);
    agent
        .eventually("the circuit to close after a good probe", || async {
            (c.get(&url).send().await.unwrap().status() == 200).then_some(())
        })
        .await;
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    assert!(agent.log().contains("circuit closed"), "{}", agent.log());
}
