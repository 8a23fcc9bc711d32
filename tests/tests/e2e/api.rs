//! The Consul-compatible local HTTP API, used the way Consul clients
//! (py-consul, node-consul, Spring, the Go api client) use it: request
//! bodies in any key casing, the exact response shapes, status codes and
//! error texts they react to, and blocking queries.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use signpost_tests::{Agent, FlipServer, Response};

const REGISTER: &str = "/v1/agent/service/register";
const CHECK_REGISTER: &str = "/v1/agent/check/register";

/// A PUT that must succeed as Consul's do: 200 with an empty body.
async fn put_ok(agent: &Agent, path: &str, body: Value) {
    put_body(agent, path, Some(body)).await;
}

/// [`put_ok`] without a body.
async fn ok(agent: &Agent, path: &str) {
    put_body(agent, path, None).await;
}

async fn put_body(agent: &Agent, path: &str, body: Option<Value>) {
    let r = agent.put(path, body).await;
    assert_eq!(r.status, StatusCode::OK, "PUT {path}: {}", r.text);
    assert_eq!(r.text, "", "PUT {path} answers an empty body");
}

/// A PUT of raw bytes (the harness sends only valid JSON).
async fn put_raw(agent: &Agent, path: &str, body: &str) -> (StatusCode, String) {
    let url = format!("{}{path}", agent.base());
    let client = reqwest::Client::builder().no_proxy().build();
    let r = client.map(|c| c.put(url).body(body.to_string()));
    let r = r.unwrap_or_else(|e| panic!("{e}")).send().await;
    let r = r.unwrap_or_else(|e| panic!("PUT {path}: {e}"));
    let status = r.status();
    (status, r.text().await.unwrap_or_else(|e| panic!("{e}")))
}

/// Registers instance `id` of `name` with one TTL check (`service:<id>`).
async fn register_ttl(agent: &Agent, id: &str, name: &str, tags: &[&str], status: Option<&str>) {
    let mut check = json!({"TTL": "10m"});
    if let Some(s) = status {
        check["Status"] = json!(s);
    }
    let body = json!({"ID": id, "Name": name, "Tags": tags, "Port": 8080, "Check": check});
    put_ok(agent, REGISTER, body).await;
}

async fn agent_checks(agent: &Agent) -> Value {
    agent.get("/v1/agent/checks").await.json()
}

async fn agent_services(agent: &Agent) -> Value {
    agent.get("/v1/agent/services").await.json()
}

/// Asserts that object `v` has every field of `want`, with its value.
#[track_caller]
fn has(v: &Value, want: &Value) {
    let want_map = want.as_object().unwrap_or_else(|| panic!("{want}"));
    let fields = want_map.keys();
    let got: Value = fields.map(|k| (k.clone(), v[k].clone())).collect();
    assert_eq!(&got, want, "in {v}");
}

fn keys(v: &Value) -> BTreeSet<String> {
    let map = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    map.keys().cloned().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The string at `path` in every element of a JSON array, in order.
fn column(v: &Value, path: &[&str]) -> Vec<String> {
    let items = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    let at = |item: &Value| path.iter().fold(item.clone(), |x, f| x[*f].clone());
    let text = |item: &Value| match at(item) {
        Value::String(s) => s,
        other => panic!("{path:?} is {other} in {item}"),
    };
    items.iter().map(text).collect()
}

/// [`column`] as a set.
fn ids(v: &Value, path: &[&str]) -> BTreeSet<String> {
    column(v, path).into_iter().collect()
}

/// The service IDs of a `/v1/health/service` answer.
fn instances(v: &Value) -> Vec<String> {
    column(v, &["Service", "ID"])
}

#[track_caller]
fn waited(start: Instant, at_least: Duration) {
    let took = start.elapsed();
    assert!(took >= at_least, "answered after {took:?}");
}

/// A blocking-capable GET: 200 and an `X-Consul-Index` of at least 1.
async fn indexed(agent: &Agent, path: &str) -> (u64, Value) {
    let r = agent.get(path).await;
    assert_eq!(r.status, StatusCode::OK, "GET {path}: {}", r.text);
    let index = r.index();
    assert!(index >= 1, "GET {path}: X-Consul-Index {index}");
    (index, r.json())
}

/// Sends GET `path` (a blocking query) and, `delay` later, makes `change`
/// (a delay, not a bound: it gives the query time to arrive first).
async fn get_while(
    agent: &Agent,
    path: &str,
    delay: Duration,
    change: impl Future<Output = ()>,
) -> Response {
    let (r, ()) = tokio::join!(agent.get(path), async {
        tokio::time::sleep(delay).await;
        change.await;
    });
    r
}

#[tokio::test]
async fn register_decodes_pascal_and_snake_case_alike() {
    let agent = Agent::start("").await;
    // node-consul / Spring style.
    let pascal = json!({
        "ID": "web-1", "Name": "web", "Tags": ["primary", "v1"], "Address": "10.1.2.3", "Port": 8000,
        "Meta": {"Build_Id": "42"},
        "TaggedAddresses": {"wan": {"Address": "198.51.100.7", "Port": 80}},
        "Weights": {"Passing": 10, "Warning": 1},
        "EnableTagOverride": true,
        "Check": {"TTL": "10m", "DeregisterCriticalServiceAfter": "90m"},
        "Checks": [{"TTL": "10m", "Name": "second"}, {"TTL": "10m", "Status": "passing"}],
    });
    // py-consul style: lowercase and snake_case keys; user data keys as sent.
    let snake = json!({
        "id": "web-1", "name": "web", "tags": ["primary", "v1"], "address": "10.1.2.3", "port": 8000,
        "meta": {"Build_Id": "42"},
        "tagged_addresses": {"wan": {"address": "198.51.100.7", "port": 80}},
        "weights": {"passing": 10, "warning": 1},
        "enable_tag_override": true,
        "check": {"ttl": "10m", "deregister_critical_service_after": "90m"},
    });
    let expected = json!({
        "ID": "web-1", "Service": "web", "Tags": ["primary", "v1"], "Meta": {"Build_Id": "42"},
        "Port": 8000, "Address": "10.1.2.3", "Weights": {"Passing": 10, "Warning": 1},
        "EnableTagOverride": true, "Datacenter": "dc1",
    });
    let mut entry_keys = keys(&expected);
    entry_keys.insert("TaggedAddresses".into());

    put_ok(&agent, REGISTER, pascal).await;
    let services = agent_services(&agent).await;
    assert_eq!(keys(&services), set(&["web-1"]));
    let entry = services["web-1"].clone();
    assert_eq!(keys(&entry), entry_keys, "{entry}");
    has(&entry, &expected);
    let me = agent.get("/v1/agent/self").await.json();
    assert_eq!(entry["Datacenter"], me["Config"]["Datacenter"]);
    // The tagged address sent comes back as Consul renders it, with the
    // lan_ipv4/wan_ipv4 entries Consul adds for an IP Address.
    let tagged = json!({"wan": {"Address": "198.51.100.7", "Port": 80},
        "lan_ipv4": {"Address": "10.1.2.3", "Port": 8000},
        "wan_ipv4": {"Address": "10.1.2.3", "Port": 8000}});
    assert_eq!(entry["TaggedAddresses"], tagged);

    // Check + Checks: `service:<id>:N`, 1-based in order, default names.
    let web_checks = |checks: &Value| -> BTreeSet<String> {
        let all = checks.as_object().unwrap().iter();
        let mine = all.filter(|(_, c)| c["ServiceID"] == "web-1");
        mine.map(|(id, _)| id.clone()).collect()
    };
    let checks = agent_checks(&agent).await;
    let numbered = set(&["service:web-1:1", "service:web-1:2", "service:web-1:3"]);
    assert_eq!(web_checks(&checks), numbered);
    let want = json!({"CheckID": "service:web-1:1", "Name": "Service 'web' check",
        "ServiceName": "web", "ServiceTags": ["primary", "v1"], "Status": "critical"});
    has(&checks["service:web-1:1"], &want);
    let want = json!({"Name": "second", "Status": "critical"});
    has(&checks["service:web-1:2"], &want);
    assert_eq!(checks["service:web-1:3"]["Status"], "passing");

    // The snake_case body gives the same entry; without
    // replace-existing-checks the checks it does not list stay.
    put_ok(&agent, REGISTER, snake.clone()).await;
    let services = agent_services(&agent).await;
    assert_eq!(keys(&services), set(&["web-1"]));
    assert_eq!(services["web-1"], entry);
    let checks = agent_checks(&agent).await;
    let mut all = numbered.clone();
    all.insert("service:web-1".into());
    assert_eq!(web_checks(&checks), all);
    assert_eq!(checks["service:web-1"]["Name"], "Service 'web' check");

    // With it, they go.
    let replace = format!("{REGISTER}?replace-existing-checks");
    put_ok(&agent, &replace, snake).await;
    let checks = agent_checks(&agent).await;
    assert_eq!(web_checks(&checks), set(&["service:web-1"]));
}

#[tokio::test]
async fn check_ids_and_standalone_check_registration() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "api-1", "api", &[], None).await;
    let checks = agent_checks(&agent).await;
    let want = json!({"Name": "Service 'api' check", "ServiceID": "api-1"});
    has(&checks["service:api-1"], &want);

    // Without an ID the check's ID is its Name; node-level without ServiceID.
    let disk = json!({"Name": "disk", "TTL": "10m", "Notes": "root fs"});
    put_ok(&agent, CHECK_REGISTER, disk).await;
    // Bound to a service, with an initial status; and py-consul's casing.
    let ready = json!({"Name": "ready", "ServiceID": "api-1", "TTL": "10m", "Status": "passing"});
    put_ok(&agent, CHECK_REGISTER, ready).await;
    let lower =
        json!({"name": "lower", "id": "low", "ttl": "10m", "serviceid": "api-1", "notes": "n"});
    put_ok(&agent, CHECK_REGISTER, lower).await;

    let checks = agent_checks(&agent).await;
    let want = json!({"CheckID": "disk", "Name": "disk", "Notes": "root fs", "ServiceID": "",
        "ServiceName": "", "Status": "critical"});
    has(&checks["disk"], &want);
    let want = json!({"CheckID": "ready", "Name": "ready", "Notes": "", "ServiceID": "api-1",
        "ServiceName": "api", "Status": "passing"});
    has(&checks["ready"], &want);
    let want = json!({"CheckID": "low", "Name": "lower", "Notes": "n", "ServiceID": "api-1",
        "ServiceName": "api", "Status": "critical"});
    has(&checks["low"], &want);
    assert!(checks.get("lower").is_none());
    let (_, hc) = indexed(&agent, "/v1/health/checks/api").await;
    let want = set(&["service:api-1", "ready", "low"]);
    assert_eq!(ids(&hc, &["CheckID"]), want);

    // An unknown ServiceID: 404, and no check.
    let orphan = json!({"Name": "orphan", "ServiceID": "nope", "TTL": "10m"});
    let r = agent.put(CHECK_REGISTER, Some(orphan)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert!(agent.check_status("orphan").await.is_none());

    ok(&agent, "/v1/agent/check/deregister/disk").await;
    assert!(agent.check_status("disk").await.is_none());
}

#[tokio::test]
async fn ttl_updates_and_their_errors() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &[], None).await;
    let id = "service:web-1";
    let shows = |want: Value| {
        let agent = &agent;
        async move { has(&agent_checks(agent).await[id], &want) }
    };
    shows(json!({"Status": "critical"})).await;

    for (path, status, output) in [
        ("pass/service:web-1?note=all%20good", "passing", "all good"),
        ("warn/service:web-1?note=slow", "warning", "slow"),
        ("fail/service:web-1?note=down", "critical", "down"),
        ("pass/service:web-1", "passing", ""),
    ] {
        ok(&agent, &format!("/v1/agent/check/{path}")).await;
        shows(json!({"Status": status, "Output": output})).await;
    }

    let update = format!("/v1/agent/check/update/{id}");
    let body = json!({"Status": "warning", "Output": "from update"});
    put_ok(&agent, &update, body.clone()).await;
    shows(body).await;
    let body = json!({"status": "passing", "output": "ok"});
    put_ok(&agent, &update, body).await;
    shows(json!({"Status": "passing", "Output": "ok"})).await;
    let r = agent.put(&update, Some(json!({"Status": "bogus"}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    shows(json!({"Status": "passing", "Output": "ok"})).await;

    // Unknown check IDs: 404 with Consul's text.
    let unknown = "Unknown check ID \"x\". \
        Ensure that the check ID is passed, not the check name.";
    for verb in ["pass", "warn", "fail", "update"] {
        let body = (verb == "update").then(|| json!({"Status": "passing"}));
        let r = agent.put(&format!("/v1/agent/check/{verb}/x"), body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{verb}");
        assert_eq!(r.text, unknown, "{verb}");
    }

    // A check that is not a TTL check: 500, the text clients string-match.
    let flip = FlipServer::start(200).await;
    let probe = json!({"Name": "probe", "HTTP": flip.url(), "Interval": "10s"});
    put_ok(&agent, CHECK_REGISTER, probe).await;
    let r = agent.put("/v1/agent/check/pass/probe", None).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.text, "CheckID \"probe\" does not have associated TTL");
}

#[tokio::test]
async fn maintenance_mode_of_a_service_and_of_the_node() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &[], Some("passing")).await;
    let passing = || async {
        let (_, body) = indexed(&agent, "/v1/health/service/web?passing").await;
        instances(&body)
    };
    assert_eq!(passing().await, ["web-1"]);
    let service = "/v1/agent/service/maintenance/web-1";
    let node = "/v1/agent/maintenance";
    let maint = "_service_maintenance:web-1";

    ok(&agent, &format!("{service}?enable=true&reason=disk%20full")).await;
    let want = json!({"Status": "critical", "Notes": "disk full", "ServiceID": "web-1"});
    has(&agent_checks(&agent).await[maint], &want);
    assert!(passing().await.is_empty(), "hidden from ?passing");
    let (_, all) = indexed(&agent, "/v1/health/service/web").await;
    assert_eq!(instances(&all), ["web-1"]);
    assert!(ids(&all[0]["Checks"], &["CheckID"]).contains(maint));

    ok(&agent, &format!("{service}?enable=false")).await;
    assert!(agent.check_status(maint).await.is_none());
    assert_eq!(passing().await, ["web-1"]);

    ok(&agent, &format!("{service}?enable=true")).await;
    let notes = "Maintenance mode is enabled for this service, \
        but no reason was provided. This is a default message.";
    assert_eq!(agent_checks(&agent).await[maint]["Notes"], notes);
    ok(&agent, &format!("{service}?enable=false")).await;

    // Node-wide.
    ok(&agent, &format!("{node}?enable=true&reason=kernel")).await;
    let want = json!({"Status": "critical", "Notes": "kernel", "ServiceID": ""});
    has(&agent_checks(&agent).await["_node_maintenance"], &want);
    assert!(passing().await.is_empty(), "node maintenance hides all");
    ok(&agent, &format!("{node}?enable=false")).await;
    assert!(agent.check_status("_node_maintenance").await.is_none());
    assert_eq!(passing().await, ["web-1"]);
    ok(&agent, &format!("{node}?enable=true")).await;
    let notes = "Maintenance mode is enabled for this node, \
        but no reason was provided. This is a default message.";
    assert_eq!(
        agent_checks(&agent).await["_node_maintenance"]["Notes"],
        notes
    );
    ok(&agent, &format!("{node}?enable=false")).await;

    ok(&agent, &format!("{service}?enable=1")).await;
    assert_eq!(agent.check_status(maint).await.as_deref(), Some("critical"));
    ok(&agent, &format!("{service}?enable=0")).await;
    assert!(agent.check_status(maint).await.is_none());
    let r = agent.put(&format!("{service}?enable=maybe"), None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    for path in [service, node] {
        let r = agent.put(path, None).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text);
    }
    let unknown = "/v1/agent/service/maintenance/nope?enable=true";
    let r = agent.put(unknown, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let checks = keys(&agent_checks(&agent).await);
    assert!(!checks.contains("_service_maintenance:nope"), "{checks:?}");
    assert_eq!(passing().await, ["web-1"]);
}

#[tokio::test]
async fn deregister_removes_the_service_and_its_checks() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &[], None).await;
    register_ttl(&agent, "web-2", "web", &[], None).await;
    let extra = json!({"Name": "extra", "ServiceID": "web-1", "TTL": "10m"});
    put_ok(&agent, CHECK_REGISTER, extra).await;

    ok(&agent, "/v1/agent/service/deregister/web-1").await;
    let services = agent_services(&agent).await;
    assert_eq!(keys(&services), set(&["web-2"]));
    let checks = keys(&agent_checks(&agent).await);
    assert!(!checks.contains("service:web-1"), "{checks:?}");
    assert!(!checks.contains("extra"), "{checks:?}");
    assert!(checks.contains("service:web-2"), "{checks:?}");
    let r = agent.get("/v1/agent/service/web-1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let (_, health) = indexed(&agent, "/v1/health/service/web").await;
    assert_eq!(instances(&health), ["web-2"]);

    // Unknown: 404, as Consul (since 1.11), and nothing changes.
    let r = agent.put("/v1/agent/service/deregister/nope", None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.text,
        "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name."
    );
    assert_eq!(agent_services(&agent).await, services);
}

#[tokio::test]
async fn agent_self_members_service_checks_and_leader() {
    let agent = Agent::start("").await;
    let me = agent.get("/v1/agent/self").await.json();
    let want = "Config DebugConfig Coord Member Meta Stats xDS";
    assert_eq!(keys(&me), want.split(' ').map(String::from).collect());
    let want = json!({"NodeName": "test-node", "Datacenter": "dc1"});
    has(&me["Config"], &want);
    assert_eq!(me["Member"]["Name"], "test-node");

    let members = agent.get("/v1/agent/members").await.json();
    assert_eq!(column(&members, &["Name"]), ["test-node"]);
    let ip = agent.addr.ip().to_string();
    has(&members[0], &json!({"Addr": ip, "Status": 1}));

    let leader = agent.get("/v1/status/leader").await;
    assert_eq!(leader.status, StatusCode::OK);
    let text = leader.json().as_str().unwrap().to_string();
    assert!(!text.is_empty(), "{}", leader.text);

    // No service checks on a fresh agent. TODO(bug): Consul answers `{}`
    // (serfHealth is a catalog check, not an agent check).
    let checks = agent_checks(&agent).await;
    let mut checks = checks.as_object().unwrap().values();
    assert!(checks.all(|c| c["ServiceID"] == ""));
    assert_eq!(agent_checks(&agent).await, json!({}));
    assert_eq!(agent_services(&agent).await, json!({}));

    register_ttl(&agent, "web-1", "web", &["a"], None).await;
    let r = agent.get("/v1/agent/service/web-1").await;
    assert_eq!(r.status, StatusCode::OK);
    let one = r.json();
    has(&one, &agent_services(&agent).await["web-1"]);
    has(&one, &json!({"Tags": ["a"], "Port": 8080}));
    assert!(!one["ContentHash"].as_str().unwrap().is_empty());
    let r = agent.get("/v1/agent/service/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn agent_health_endpoints_map_status_to_http_codes() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &[], Some("passing")).await;
    register_ttl(&agent, "web-2", "web", &[], Some("passing")).await;
    let health = |path: String| {
        let agent = &agent;
        async move {
            let path = format!("/v1/agent/health/service/{path}");
            agent.get(&path).await
        }
    };

    let r = health("name/web".into()).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    let statuses = column(&body, &["AggregatedStatus"]);
    assert_eq!(statuses, ["passing", "passing"]);
    assert_eq!(ids(&body, &["Service", "ID"]), set(&["web-1", "web-2"]));
    let r = health("id/web-1".into()).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    has(&body, &json!({"AggregatedStatus": "passing"}));
    assert_eq!(body["Service"]["ID"], "web-1");
    assert!(ids(&body["Checks"], &["CheckID"]).contains("service:web-1"));

    for (verb, status, code) in [
        ("warn", "warning", StatusCode::TOO_MANY_REQUESTS),
        ("fail", "critical", StatusCode::SERVICE_UNAVAILABLE),
        ("pass", "passing", StatusCode::OK),
    ] {
        ok(&agent, &format!("/v1/agent/check/{verb}/service:web-2")).await;
        for path in ["name/web", "id/web-2"] {
            let r = health(path.into()).await;
            assert_eq!(r.status, code, "{path} after {verb}");
            // name/ answers a list of instances, id/ one object.
            assert_eq!(r.json().is_array(), path == "name/web");
            let r = health(format!("{path}?format=text")).await;
            assert_eq!(r.status, code, "{path} after {verb}");
            assert_eq!(r.text, status, "{path} after {verb}");
        }
        let r = health("id/web-1".into()).await;
        assert_eq!(r.status, StatusCode::OK, "web-1 is unaffected");
    }

    for path in ["name/nope", "id/nope", "name/nope?format=text"] {
        let r = health(path.into()).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn catalog_endpoints() {
    let agent = Agent::start("").await;
    let ip = agent.addr.ip().to_string();
    let web1 = json!({"ID": "web-1", "Name": "web", "Tags": ["primary", "v1"],
        "Address": "10.1.2.3", "Port": 8000, "Meta": {"k": "v"}});
    put_ok(&agent, REGISTER, web1).await;
    let web2 = json!({"ID": "web-2", "Name": "web", "Tags": ["secondary"], "Port": 8001});
    put_ok(&agent, REGISTER, web2).await;
    put_ok(&agent, REGISTER, json!({"Name": "db", "Port": 5432})).await;

    let (_, services) = indexed(&agent, "/v1/catalog/services").await;
    let want = set(&["primary", "secondary", "v1"]);
    assert_eq!(ids(&services["web"], &[]), want);
    assert_eq!(services["db"], json!([]));

    let (_, web) = indexed(&agent, "/v1/catalog/service/web").await;
    assert_eq!(column(&web, &["ServiceID"]), ["web-1", "web-2"]);
    let want = json!({"Node": "test-node", "Address": ip, "Datacenter": "dc1",
        "ServiceName": "web", "ServiceAddress": "10.1.2.3", "ServicePort": 8000,
        "ServiceTags": ["primary", "v1"], "ServiceMeta": {"k": "v"}});
    has(&web[0], &want);
    // No address given: empty, and clients fall back to the node's.
    let want = json!({"Node": "test-node", "Address": ip, "Datacenter": "dc1",
        "ServiceName": "web", "ServiceAddress": "", "ServicePort": 8001,
        "ServiceTags": ["secondary"], "ServiceMeta": {}});
    has(&web[1], &want);

    for (query, want) in [
        ("?tag=primary", &["web-1"][..]),
        ("?tag=secondary", &["web-2"]),
        ("?tag=primary&tag=v1", &["web-1"]),
        ("?tag=primary&tag=secondary", &[]),
        ("?tag=nope", &[]),
        ("?tag=PRIMARY", &["web-1"]),
        ("?tag=Primary&tag=V1", &["web-1"]),
    ] {
        let path = format!("/v1/catalog/service/web{query}");
        let (_, body) = indexed(&agent, &path).await;
        assert_eq!(column(&body, &["ServiceID"]), want, "{query}");
    }
    let (_, db) = indexed(&agent, "/v1/catalog/service/db").await;
    assert_eq!(column(&db, &["ServiceID"]), ["db"]);
    assert_eq!(db[0]["ServiceTags"], json!([]));
    let (_, none) = indexed(&agent, "/v1/catalog/service/nope").await;
    assert_eq!(none, json!([]));

    let (_, nodes) = indexed(&agent, "/v1/catalog/nodes").await;
    assert_eq!(column(&nodes, &["Node"]), ["test-node"]);
    has(&nodes[0], &json!({"Address": ip, "Datacenter": "dc1"}));

    let (_, node) = indexed(&agent, "/v1/catalog/node/test-node").await;
    has(&node["Node"], &json!({"Node": "test-node", "Address": ip}));
    let services = &node["Services"];
    assert_eq!(keys(services), set(&["db", "web-1", "web-2"]));
    let want = json!({"Service": "web", "Port": 8000, "Tags": ["primary", "v1"]});
    has(&services["web-1"], &want);
    assert_eq!(services["db"]["Tags"], json!([]));
    // Consul answers null for an unknown node.
    let (_, other) = indexed(&agent, "/v1/catalog/node/other-node").await;
    assert_eq!(other, Value::Null);
}

#[tokio::test]
async fn health_endpoints() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &["primary"], Some("passing")).await;
    register_ttl(&agent, "web-2", "web", &["secondary"], None).await;
    register_ttl(&agent, "db-1", "db", &[], Some("passing")).await;
    let ip = agent.addr.ip().to_string();

    let (_, web) = indexed(&agent, "/v1/health/service/web").await;
    assert_eq!(instances(&web), ["web-1", "web-2"]);
    for (entry, id) in web.as_array().unwrap().iter().zip(["web-1", "web-2"]) {
        has(&entry["Node"], &json!({"Node": "test-node", "Address": ip}));
        has(&entry["Service"], &json!({"Service": "web", "Port": 8080}));
        // The node's checks come with the service's.
        let checks = &entry["Checks"];
        assert_eq!(ids(checks, &["ServiceID"]), set(&[id, ""]));
        let mut checks = checks.as_array().unwrap().iter();
        let serf = checks.find(|c| c["CheckID"] == "serfHealth").unwrap();
        has(serf, &json!({"Status": "passing", "ServiceTags": []}));
    }
    assert_eq!(web[0]["Service"]["Tags"], json!(["primary"]));
    let (_, db) = indexed(&agent, "/v1/health/service/db").await;
    assert_eq!(db[0]["Service"]["Tags"], json!([]));

    for (query, want) in [
        ("?passing", &["web-1"][..]),
        ("?passing=1", &["web-1"]),
        ("?passing=true", &["web-1"]),
        ("?passing=false", &["web-1", "web-2"]),
        ("?tag=secondary", &["web-2"]),
        ("?tag=Secondary", &["web-2"]),
        ("?tag=secondary&passing", &[]),
        ("?tag=nope", &[]),
    ] {
        let path = format!("/v1/health/service/web{query}");
        let (_, body) = indexed(&agent, &path).await;
        assert_eq!(instances(&body), want, "{query}");
    }
    let r = agent.get("/v1/health/service/web?passing=maybe").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("passing"), "{}", r.text);
    let (_, none) = indexed(&agent, "/v1/health/service/nope").await;
    assert_eq!(none, json!([]));

    let (_, checks) = indexed(&agent, "/v1/health/checks/web").await;
    let want = set(&["service:web-1", "service:web-2"]);
    assert_eq!(ids(&checks, &["CheckID"]), want);
    let (_, none) = indexed(&agent, "/v1/health/checks/nope").await;
    assert_eq!(none, json!([]));

    let passing = ["serfHealth", "service:web-1", "service:db-1"];
    let all = set(&[&passing[..], &["service:web-2"]].concat());
    for (state, want) in [
        ("any", all.clone()),
        ("passing", set(&passing)),
        ("warning", set(&[])),
        ("critical", set(&["service:web-2"])),
    ] {
        let path = format!("/v1/health/state/{state}");
        let (_, body) = indexed(&agent, &path).await;
        assert_eq!(ids(&body, &["CheckID"]), want, "{state}");
    }
    let r = agent.get("/v1/health/state/bogus").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let (_, node) = indexed(&agent, "/v1/health/node/test-node").await;
    assert_eq!(ids(&node, &["CheckID"]), all);
    assert_eq!(ids(&node, &["Node"]), set(&["test-node"]));
    let (_, none) = indexed(&agent, "/v1/health/node/other-node").await;
    assert_eq!(none, json!([]));
}

#[tokio::test]
async fn blocking_queries_wake_on_change_and_wait_otherwise() {
    let agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &[], None).await;
    register_ttl(&agent, "db-1", "db", &[], None).await;
    let web_status = |body: &Value| {
        let mut checks = body[0]["Checks"].as_array().unwrap().iter();
        let check = checks.find(|c| c["CheckID"] == "service:web-1");
        check.map(|c| c["Status"].as_str().unwrap().to_string())
    };
    let moment = Duration::from_millis(300);
    let second = Duration::from_secs(1);
    let (first, body) = indexed(&agent, "/v1/health/service/web").await;
    assert_eq!(web_status(&body).as_deref(), Some("critical"));

    // A flip of web's check, made while the query waits, ends it.
    let path = format!("/v1/health/service/web?index={first}&wait=5s");
    let pass = ok(&agent, "/v1/agent/check/pass/service:web-1");
    let woken = get_while(&agent, &path, moment, pass).await;
    assert_eq!(woken.status, StatusCode::OK);
    let index = woken.index();
    assert!(index > first, "index {index}, was {first}");
    assert_eq!(web_status(&woken.json()).as_deref(), Some("passing"));

    // Nothing changes: the query waits its time and keeps the index.
    let start = Instant::now();
    let path = format!("/v1/health/service/web?index={index}&wait=1s");
    let (same, body) = indexed(&agent, &path).await;
    waited(start, second);
    assert_eq!(same, index);
    assert_eq!(web_status(&body).as_deref(), Some("passing"));

    // A change to another service does not wake web's watchers (and the Go
    // client's `wait=1000ms` form is understood).
    let (db_before, _) = indexed(&agent, "/v1/health/service/db").await;
    let start = Instant::now();
    let path = format!("/v1/health/service/web?index={index}&wait=1000ms");
    let pass_db = ok(&agent, "/v1/agent/check/pass/service:db-1");
    let unrelated = get_while(&agent, &path, moment, pass_db).await;
    waited(start, second);
    assert_eq!(unrelated.index(), index, "web's index moved");
    let (db_after, _) = indexed(&agent, "/v1/health/service/db").await;
    assert!(db_after > db_before, "db's own index moves");

    // The catalog of a service wakes when an instance joins.
    let (cat, _) = indexed(&agent, "/v1/catalog/service/web").await;
    let path = format!("/v1/catalog/service/web?index={cat}&wait=5s");
    let join = register_ttl(&agent, "web-2", "web", &[], None);
    let joined = get_while(&agent, &path, moment, join).await;
    assert!(joined.index() > cat);
    let ids = column(&joined.json(), &["ServiceID"]);
    assert_eq!(ids, ["web-1", "web-2"]);

    // A service never registered still has a usable index.
    for path in ["/v1/health/service/ghost", "/v1/catalog/service/ghost"] {
        let (index, body) = indexed(&agent, path).await;
        assert!(index >= 1);
        assert_eq!(body, json!([]));
    }
}

#[tokio::test]
async fn sigterm_answers_blocking_queries_and_exits_cleanly() {
    let mut agent = Agent::start("").await;
    register_ttl(&agent, "web-1", "web", &[], None).await;
    let (index, _) = indexed(&agent, "/v1/health/service/web").await;
    let path = format!("/v1/health/service/web?index={index}&wait=60s");
    // A generous delay so that the query reaches the agent first.
    let term = async { agent.signal_term() };
    let r = get_while(&agent, &path, Duration::from_secs(1), term).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(instances(&r.json()), ["web-1"]);
    assert_eq!(agent.wait_exit().await, Some(0), "{}", agent.log());
}

#[tokio::test]
async fn bad_input_is_refused_with_consul_errors() {
    let agent = Agent::start("").await;
    for path in [REGISTER, CHECK_REGISTER] {
        let (status, text) = put_raw(&agent, path, "{\"Name\": ").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(text.starts_with("Request decode failed"), "{text}");
    }
    let r = agent.put(REGISTER, Some(json!({"Port": 80}))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.text.trim(), "Missing service name");
    for address in ["0.0.0.0", "::"] {
        let body = json!({"Name": "web", "Address": address, "Port": 80});
        let r = agent.put(REGISTER, Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{address}");
        assert!(r.text.contains("Invalid service address"), "{}", r.text);
    }
    assert_eq!(agent_services(&agent).await, json!({}));

    let deregister = "/v1/agent/service/deregister/x";
    for path in [REGISTER, "/v1/agent/check/pass/x", deregister] {
        let status = agent.get(path).await.status;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
    }
}

#[tokio::test]
async fn metrics_count_services_and_requests() {
    let agent = Agent::start("").await;
    let puts = "signpost_agent_api_requests_total{method=\"PUT\",code=\"200\"}";
    let before = agent.metric(puts).await;
    register_ttl(&agent, "web-1", "web", &[], None).await;
    register_ttl(&agent, "db-1", "db", &[], None).await;
    let text = agent.get("/metrics").await.text;
    assert!(text.contains("signpost_agent_services"), "{text}");
    assert!(text.contains("signpost_agent_api_requests_total"), "{text}");
    assert_eq!(agent.metric("signpost_agent_services").await, 2.0);
    assert!(agent.metric(puts).await >= before + 2.0);
    ok(&agent, "/v1/agent/service/deregister/db-1").await;
    assert_eq!(agent.metric("signpost_agent_services").await, 1.0);
}
