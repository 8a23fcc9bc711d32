//! Balancing: slow instances get less, failing ones are ejected and
//! readmitted, the panic threshold, the agent's zone first, hash keys
//! that stick.

use super::*;

/// Peak-EWMA: a slow instance gets a small share of the requests.
#[tokio::test]
async fn a_slow_instance_receives_less_traffic() {
    let agent = agent("").await;
    let web = upstreams("web", 2).await;
    web[0].set_delay(100);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let addr = vip(&agent, "web", port).await;
    let c = client("web.service.internal", addr);
    let seen = spread(&c, &format!("http://web.service.internal:{port}/"), 100).await;
    let slow = seen.get("web-1").copied().unwrap_or(0);
    assert!(slow <= 10, "the slow instance got {slow} of 100: {seen:?}");
}

/// Consecutive 5xx eject an instance; once its ejection is over, one
/// probe request readmits it if it answers well.
#[tokio::test]
async fn failing_instances_are_ejected_and_readmitted_after_a_good_probe() {
    let agent = agent(
        "  defaults:\n    balancer: round_robin\n    retries: 0\n    eject_after: 3\n    eject_base: 3s\n",
    )
    .await;
    let web = upstreams("web", 2).await;
    web[0].set_status(500);
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    let mut errors = 0;
    for _ in 0..20 {
        let r = c.get(&url).send().await;
        let r = r.unwrap_or_else(|e| panic!("{e:?}\n{}", agent.log()));
        if r.status() == 500 {
            errors += 1;
        }
    }
    assert_eq!(errors, 3, "ejected after 3 consecutive 5xx");
    let ejections = agent
        .metric(&format!(
            "signpost_agent_proxy_ejections_total{{service=\"web\",instance=\"{}\"}}",
            web[0].addr
        ))
        .await;
    assert_eq!(ejections, 1.0);

    web[0].set_status(200);
    let before = web[0].hits();
    // After the ejection period the instance gets its probe, then traffic.
    agent
        .eventually("the healed instance to be used again", || async {
            let seen = spread(&c, &url, 4).await;
            (seen.get("web-1").copied().unwrap_or(0) >= 2).then_some(())
        })
        .await;
    assert!(web[0].hits() > before);
    assert!(agent.log().contains("readmitted"), "{}", agent.log());
}

/// With fewer than half the instances healthy, the proxy balances over
/// all of them rather than piling everything on the survivors.
#[tokio::test]
async fn below_the_panic_threshold_all_instances_get_traffic() {
    let agent = agent("  defaults:\n    balancer: round_robin\n").await;
    let web = upstreams("web", 3).await;
    register(&agent, "web.yaml", "web", "http", &web);
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;

    // One of three in maintenance (critical): the other two take it all.
    agent
        .put("/v1/agent/service/maintenance/web-1?enable=true", None)
        .await;
    agent
        .eventually("web-1 to leave the rotation", || async {
            let seen = spread(&c, &url, 12).await;
            (!seen.contains_key("web-1")).then_some(())
        })
        .await;
    assert_eq!(
        agent
            .metric("signpost_agent_proxy_panic{service=\"web\"}")
            .await,
        0.0
    );

    // Two of three: 33 % available is under 50 %, so all three serve.
    agent
        .put("/v1/agent/service/maintenance/web-2?enable=true", None)
        .await;
    agent
        .eventually("every instance to serve in panic", || async {
            let seen = spread(&c, &url, 12).await;
            (seen.len() == 3).then_some(())
        })
        .await;
    assert_eq!(
        agent
            .metric("signpost_agent_proxy_panic{service=\"web\"}")
            .await,
        1.0
    );
}

/// Instances in the agent's zone take the traffic while they are
/// available; then the other zone does.
#[tokio::test]
async fn the_agents_zone_is_preferred_while_it_has_available_instances() {
    let range = format!("127.76.{}.0/24", rand::random_range(0..=255u8));
    let agent = Agent::start(&format!(
        "zone: east\ndns:\n  recursors: []\nproxy:\n  vip_range: {range}\n  defaults:\n    balancer: round_robin\n"
    ))
    .await;
    let web = upstreams("web", 3).await;
    let zones = ["east", "west", "west"];
    let entries: String = web
        .iter()
        .zip(zones)
        .map(|(u, zone)| format!("{}    zone: {zone}\n", u.entry("web", "http")))
        .collect();
    agent.write_service_file("web.yaml", &format!("services:\n{entries}"));
    let port = web[0].addr.port();
    let (c, url) = vip_client(&agent, "web", port).await;
    let seen = spread(&c, &url, 12).await;
    assert_eq!(
        seen.get("web-1"),
        Some(&12),
        "all in the agent's zone: {seen:?}"
    );

    agent
        .put("/v1/agent/service/maintenance/web-1?enable=true", None)
        .await;
    agent
        .eventually("the other zone to take over", || async {
            let seen = spread(&c, &url, 12).await;
            (!seen.contains_key("web-1") && seen.len() == 2).then_some(())
        })
        .await;
}

/// Asks for each of 30 keys three times, `ask(key)` giving the instance
/// that answered; each key must stay on one instance and the keys must
/// spread over all three.
async fn keys_stick<F, Fut>(what: &str, mut ask: F)
where
    F: FnMut(u8) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut owners = HashMap::new();
    for round in 0..3 {
        for key in 0..30 {
            let instance = ask(key).await;
            let first = owners.entry(key).or_insert_with(|| instance.clone());
            assert_eq!(*first, instance, "{what}: key {key} moved in round {round}");
        }
    }
    let used: std::collections::HashSet<&String> = owners.values().collect();
    assert_eq!(used.len(), 3, "{what}: 30 keys spread over the 3 instances");
}

/// The hash balancer keeps each key on one instance: a header, a cookie
/// (among others in the header), the client's address for L7 and, for
/// L4, the client's address of each new connection.
#[tokio::test]
async fn a_hash_key_sticks_to_one_instance() {
    let agent = agent(concat!(
        "  services:\n",
        "    header: {balancer: hash, hash_key: \"header:x-user\"}\n",
        "    cookie: {balancer: hash, hash_key: \"cookie:sid\"}\n",
        "    address: {balancer: hash, hash_key: client_ip}\n",
        "    bulk: {balancer: hash}\n",
    ))
    .await;
    let mut urls = HashMap::new();
    for (service, protocol) in [
        ("header", "http"),
        ("cookie", "http"),
        ("address", "http"),
        ("bulk", "tcp"),
    ] {
        let ups = upstreams(service, 3).await;
        register(&agent, &format!("{service}.yaml"), service, protocol, &ups);
        let port = ups[0].addr.port();
        let addr = vip(&agent, service, port).await;
        urls.insert(
            service,
            (addr, format!("http://{service}.service.internal:{port}/")),
        );
    }
    // A client of its own per key, on its own loopback address, opening
    // a new connection for every request.
    let net = rand::random_range(0..=255u8);
    let from = |service: &str, key: u8| {
        let (addr, _) = urls[service];
        client_builder(&format!("{service}.service.internal"), addr)
            .local_address(std::net::IpAddr::from([127, 78, net, key + 1]))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let text = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 200, "{:?}", r.headers().get("x-signpost-error"));
        r.text().await.unwrap()
    };

    let c = from("header", 0);
    keys_stick("header", |key| {
        let r = c
            .get(&urls["header"].1)
            .header("x-user", format!("user-{key}"))
            .send();
        async move { text(r.await.unwrap()).await }
    })
    .await;
    let c = from("cookie", 0);
    keys_stick("cookie", |key| {
        let cookie = format!("theme=dark; sid=session-{key}; lang=en");
        let r = c.get(&urls["cookie"].1).header("cookie", cookie).send();
        async move { text(r.await.unwrap()).await }
    })
    .await;
    for service in ["address", "bulk"] {
        let clients: Vec<_> = (0..30).map(|key| from(service, key)).collect();
        keys_stick(service, |key| {
            let r = clients[usize::from(key)].get(&urls[service].1).send();
            async move { text(r.await.unwrap()).await }
        })
        .await;
    }
}
