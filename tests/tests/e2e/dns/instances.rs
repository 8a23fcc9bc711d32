//! Instances mode: the healthy instances of a service, as their checks
//! change, SRV with weights and targets, per-service overrides, host-name
//! addresses, and a service of another host on its first lookup.

use super::*;

/// The A answers for `name`, which must be an authoritative NOERROR
/// without duplicates, as a set.
async fn instance_addresses(agent: &Agent, name: &str, over: Transport) -> BTreeSet<Ipv4Addr> {
    let m = ask(agent, name, RecordType::A, over).await;
    assert_answered(&m, &format!("{name} over {over:?}"));
    let answers = a_answers(&m);
    let set: BTreeSet<Ipv4Addr> = answers.iter().copied().collect();
    assert_eq!(set.len(), answers.len(), "duplicate addresses:\n{m}");
    set
}

fn ips(list: &[[u8; 4]]) -> BTreeSet<Ipv4Addr> {
    list.iter().map(|&o| Ipv4Addr::from(o)).collect()
}

/// Repeated UDP queries are answered from the bytes of an identical
/// earlier answer, but never across a change: the query right after a
/// registration, a health change or a deregistration already sees it, in
/// instances mode and in VIP mode.
#[tokio::test]
async fn repeated_queries_see_every_change_at_once() {
    let agent = Agent::start(
        "dns:\n  answer: instances\n  recursors: []\n  services:\n    shop:\n      answer: vip\n",
    )
    .await;
    let hits = r#"signpost_agent_dns_answer_cache_total{result="hit"}"#;
    let register = |id: &str, name: &str, ip: &str| {
        json!({
            "ID": id, "Name": name, "Address": ip, "Port": 9000,
            "Check": {"TTL": "60s", "Status": "passing"},
        })
    };
    let put = |path: String, body: Option<serde_json::Value>| {
        let agent = &agent;
        async move {
            let r = agent.put(&path, body).await;
            assert!(r.status.is_success(), "{path}: {}", r.text);
        }
    };
    let repeat = |name: &'static str, expected: BTreeSet<Ipv4Addr>, what: &'static str| {
        let agent = &agent;
        async move {
            for _ in 0..20 {
                assert_eq!(
                    instance_addresses(agent, name, Transport::Udp).await,
                    expected,
                    "{what}"
                );
            }
        }
    };

    put(
        "/v1/agent/service/register".into(),
        Some(register("solo-1", "solo", "127.0.0.31")),
    )
    .await;
    let before = agent.metric(hits).await;
    repeat(
        "solo.service.internal",
        ips(&[[127, 0, 0, 31]]),
        "one instance",
    )
    .await;
    assert!(
        agent.metric(hits).await > before,
        "identical queries are answered from the answer cache"
    );

    // A second instance: both, at once.
    put(
        "/v1/agent/service/register".into(),
        Some(register("solo-2", "solo", "127.0.0.32")),
    )
    .await;
    repeat(
        "solo.service.internal",
        ips(&[[127, 0, 0, 31], [127, 0, 0, 32]]),
        "a second instance",
    )
    .await;

    // A health change.
    set_check(&agent, "service:solo-2", "critical").await;
    repeat(
        "solo.service.internal",
        ips(&[[127, 0, 0, 31]]),
        "solo-2 critical",
    )
    .await;
    set_check(&agent, "service:solo-1", "critical").await;
    let m = ask(
        &agent,
        "solo.service.internal",
        RecordType::A,
        Transport::Udp,
    )
    .await;
    assert_nxdomain(&m, "every instance critical");

    // VIP mode: the VIP while the service exists, NXDOMAIN once it is gone.
    put(
        "/v1/agent/service/register".into(),
        Some(register("shop-1", "shop", "127.0.0.33")),
    )
    .await;
    let mut vips = BTreeSet::new();
    for _ in 0..20 {
        let m = ask(
            &agent,
            "shop.service.internal",
            RecordType::A,
            Transport::Udp,
        )
        .await;
        vips.insert(the_vip(&m, "shop"));
    }
    assert_eq!(vips.len(), 1, "one stable VIP: {vips:?}");
    put("/v1/agent/service/deregister/shop-1".into(), None).await;
    let m = ask(
        &agent,
        "shop.service.internal",
        RecordType::A,
        Transport::Udp,
    )
    .await;
    assert_nxdomain(&m, "shop deregistered");
}

/// In instances mode a service name answers with the addresses of its
/// instances that are not critical, following their checks as they
/// change: warning ones are kept unless `only_passing` is set for the
/// service, a shared address comes once, and a service with no healthy
/// instance is NXDOMAIN.
#[tokio::test]
async fn instances_mode_answers_the_healthy_instances_as_their_checks_change() {
    let agent = Agent::start(
        "dns:\n  answer: instances\n  recursors: []\n  services:\n    strict:\n      only_passing: true\n",
    )
    .await;
    agent.write_service_file("api.yaml", API);
    wait_services(
        &agent,
        &["api-1", "api-2", "api-3", "api-4", "strict-1", "strict-2"],
    )
    .await;

    // TTL checks start critical: nothing to answer with.
    for over in BOTH {
        let m = ask(&agent, "api.service.internal", RecordType::A, over).await;
        assert_nxdomain(&m, "api with every instance critical");
    }

    set_check(&agent, "service:api-1", "passing").await;
    set_check(&agent, "service:api-2", "passing").await;
    set_check(&agent, "service:api-3", "warning").await;
    set_check(&agent, "service:api-4", "passing").await;
    for over in BOTH {
        assert_eq!(
            instance_addresses(&agent, "api.service.internal", over).await,
            ips(&[[127, 0, 0, 11], [127, 0, 0, 12], [127, 0, 0, 13]]),
            "passing and warning instances over {over:?}"
        );
    }

    set_check(&agent, "service:api-2", "critical").await;
    for over in BOTH {
        assert_eq!(
            instance_addresses(&agent, "api.service.internal", over).await,
            ips(&[[127, 0, 0, 11], [127, 0, 0, 13]]),
            "api-2 critical, over {over:?}"
        );
    }

    // api-1's address stays while api-4, on the same address, passes.
    set_check(&agent, "service:api-1", "critical").await;
    assert_eq!(
        instance_addresses(&agent, "api.service.internal", Transport::Udp).await,
        ips(&[[127, 0, 0, 11], [127, 0, 0, 13]])
    );

    // only_passing drops the warning instance.
    set_check(&agent, "service:strict-1", "passing").await;
    set_check(&agent, "service:strict-2", "warning").await;
    for over in BOTH {
        assert_eq!(
            instance_addresses(&agent, "strict.service.internal", over).await,
            ips(&[[127, 0, 0, 21]]),
            "only_passing over {over:?}"
        );
    }
    set_check(&agent, "service:strict-1", "critical").await;
    let m = ask(
        &agent,
        "strict.service.internal",
        RecordType::A,
        Transport::Udp,
    )
    .await;
    assert_nxdomain(&m, "strict with only a warning instance");

    // Every instance critical again: NXDOMAIN.
    set_check(&agent, "service:api-3", "critical").await;
    set_check(&agent, "service:api-4", "critical").await;
    for over in BOTH {
        let m = ask(&agent, "api.service.internal", RecordType::A, over).await;
        assert_nxdomain(&m, "api with every instance critical again");
    }
}

/// `api` answered per instance by a `dns.services` override (with its own
/// TTL) while `web` keeps the VIP: SRV gives each healthy instance with
/// its weight for its health and its port, targeting the node's name or,
/// for an instance with its own address, its `.addr.` name, with A glue
/// once per target; the targets resolve.
#[tokio::test]
async fn srv_in_instances_mode_gives_weights_ports_and_resolvable_targets() {
    let agent = Agent::start(
        "dns:\n  recursors: []\n  services:\n    \"api*\":\n      answer: instances\n      ttl: 7s\n",
    )
    .await;
    agent.write_service_file(
        "api.yaml",
        "services:
  - name: api
    id: api-1
    port: 8001
    weights: { passing: 10, warning: 3 }
    checks: [{ ttl: 10m }]
  - name: api
    id: api-2
    port: 8002
    weights: { passing: 10, warning: 3 }
    checks: [{ ttl: 10m }]
  - { name: api, id: api-3, address: 127.0.0.31, port: 8003 }
  - { name: api, id: api-4, address: 127.0.0.32, port: 8004, checks: [{ ttl: 10m }] }
  - { name: web, id: web-1, port: 80 }
",
    );
    wait_services(&agent, &["api-1", "api-2", "api-3", "api-4", "web-1"]).await;
    set_check(&agent, "service:api-1", "passing").await;
    set_check(&agent, "service:api-2", "warning").await;
    agent.wait_check("service:api-4", "critical").await;
    let me = agent_ip(&agent);
    let node_target = "test-node.node.dc1.internal.";
    let addr_target = "7f00001f.addr.dc1.internal.";

    for over in BOTH {
        let m = ask(&agent, "_api._tcp.service.internal", RecordType::SRV, over).await;
        assert_answered(&m, "api SRV");
        assert_eq!(
            srv_answers(&m),
            vec![
                (1, 1, 8003, addr_target.to_string()),
                (1, 3, 8002, node_target.to_string()),
                (1, 10, 8001, node_target.to_string()),
            ],
            "over {over:?}:\n{m}"
        );
        assert!(m.answers.iter().all(|r| r.ttl == 7), "override TTL:\n{m}");
        assert_eq!(glue(&m, node_target), vec![me], "node glue once:\n{m}");
        assert_eq!(
            glue(&m, addr_target),
            vec![Ipv4Addr::new(127, 0, 0, 31)],
            "{m}"
        );
        assert_eq!(m.additionals.len(), 2, "{m}");

        // The targets resolve, as a client following the SRV does.
        let m = ask(&agent, node_target, RecordType::A, over).await;
        assert_answered(&m, node_target);
        assert_eq!(a_answers(&m), vec![me]);
        let m = ask(&agent, addr_target, RecordType::A, over).await;
        assert_answered(&m, addr_target);
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(127, 0, 0, 31)]);

        // A gives the healthy addresses; web, not overridden, its VIP.
        assert_eq!(
            instance_addresses(&agent, "api.service.internal", over).await,
            BTreeSet::from([me, Ipv4Addr::new(127, 0, 0, 31)])
        );
        let m = ask(&agent, "web.service.internal", RecordType::A, over).await;
        the_vip(&m, "web keeps the VIP mode");
        assert!(m.answers.iter().all(|r| r.ttl == 5), "default TTL:\n{m}");
    }
}

/// A `dns.services` override written with the service's own spelling
/// (`Billing`) applies to it: DNS names arrive in any case (resolvers
/// lowercase or randomize them), and the service is found whatever the
/// case, so its settings must be too.
#[tokio::test]
async fn service_overrides_apply_whatever_the_case_of_the_name() {
    let agent = Agent::start(
        "dns:\n  recursors: []\n  services:\n    Billing:\n      answer: instances\n      ttl: 9s\n",
    )
    .await;
    agent.write_service_file(
        "billing.yaml",
        "service:\n  name: Billing\n  id: billing-1\n  address: 127.0.0.51\n  port: 80\n",
    );
    wait_services(&agent, &["billing-1"]).await;
    for name in ["Billing.service.internal", "billing.service.internal"] {
        let m = ask(&agent, name, RecordType::A, Transport::Udp).await;
        assert_answered(&m, name);
        assert_eq!(
            a_answers(&m),
            vec![Ipv4Addr::new(127, 0, 0, 51)],
            "{name} should answer with the instance (override), not a VIP:\n{m}"
        );
        assert!(m.answers.iter().all(|r| r.ttl == 9), "override TTL:\n{m}");
    }
}

/// An instance registered with a host name as its address (an external
/// database, say) is not on this node: DNS must never send its clients
/// to the node's address instead, neither in A answers nor through an
/// SRV target that resolves to the node; the service still has its VIP.
#[tokio::test]
async fn an_instance_with_a_host_name_address_never_resolves_to_the_node() {
    let agent = Agent::start("dns:\n  answer: instances\n  recursors: []\n").await;
    agent.write_service_file(
        "db.yaml",
        "service:\n  name: db\n  id: db-1\n  address: db.example.invalid\n  port: 5432\n",
    );
    wait_services(&agent, &["db-1"]).await;
    let me = agent_ip(&agent);
    let m = ask(&agent, "db.service.internal", RecordType::A, Transport::Udp).await;
    assert!(
        !a_answers(&m).contains(&me),
        "db.example.invalid answered with the node's address:\n{m}"
    );
    let m = ask(
        &agent,
        "_db._tcp.service.internal",
        RecordType::SRV,
        Transport::Udp,
    )
    .await;
    let targets: Vec<String> = srv_answers(&m).into_iter().map(|s| s.3).collect();
    assert!(
        !targets.contains(&"test-node.node.dc1.internal.".to_string()),
        "db.example.invalid's SRV targets the node:\n{m}"
    );
    assert!(
        !glue(&m, "test-node.node.dc1.internal").contains(&me),
        "{m}"
    );
    // The service is still known: its VIP answers (the proxy can reach a
    // host name).
    let m = ask(&agent, "db.virtual.internal", RecordType::A, Transport::Udp).await;
    the_vip(&m, "db.virtual");
}

/// A host's first lookup of a service that only another host runs
/// already answers: the name is looked up at the control plane and the
/// answer waits for its instances instead of saying NXDOMAIN.
#[tokio::test]
async fn first_lookup_of_a_service_on_another_host_answers() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let instances = "dns:\n  answer: instances\n  recursors: []\n";
    let a = Agent::start_named("a", &format!("{join}{instances}")).await;
    let b = Agent::start_named("b", &format!("{join}{instances}")).await;
    let body = json!({"ID": "pay-1", "Name": "pay", "Port": 7000,
        "Check": {"TTL": "10m", "Status": "passing"}});
    let r = a.put("/v1/agent/service/register", Some(body)).await;
    assert!(r.status.is_success(), "{}", r.text);

    // B hears of the name (the list every agent gets) but holds nothing
    // about it: it never used it.
    b.eventually("pay in b's service list", || async {
        let services = b.get("/v1/catalog/services").await.json();
        services.get("pay").is_some().then_some(())
    })
    .await;
    assert_eq!(b.metric("signpost_agent_sync_updates_total").await, 0.0);

    let m = ask(&b, "pay.service.internal", RecordType::A, Transport::Udp).await;
    assert_answered(&m, "b's first lookup of pay");
    assert_eq!(a_answers(&m), vec![agent_ip(&a)], "{m}");
}
