//! Consul's KV store, transactions and sessions, kept by a real control
//! plane and reached through real agents as Consul clients reach them:
//! every flag of `/v1/kv`, all-or-nothing transactions, locks with their
//! lock delay, blocking watches on a prefix from several agents, and an
//! agent that serves its cached configuration while the control plane is
//! down, across its own restart. `clients` drives the same with py-consul
//! and node-consul, the leader-election recipe included.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

pub(crate) mod clients;

use base64::Engine as _;
use serde_json::{Value, json};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane};

/// A control plane and `n` agents joined to it (with its HTTP API for KV).
async fn fleet(n: usize) -> (ControlPlane, Vec<Agent>) {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let mut agents = Vec::new();
    for i in 0..n {
        agents.push(Agent::start_named(&format!("kv-node-{i}"), &join).await);
    }
    // Sessions need their node in the catalog: every agent has joined.
    if let Some(first) = agents.first() {
        first
            .eventually("every agent in the control plane's catalog", || async {
                let nodes = cp.get("/v1/nodes").await.json();
                (nodes.as_array().map_or(0, Vec::len) >= n).then_some(())
            })
            .await;
    }
    (cp, agents)
}

fn client() -> reqwest::Client {
    signpost_tests::api_client().build().unwrap()
}

async fn put(agent: &Agent, path: &str, body: &str) -> (u16, String) {
    let r = client()
        .put(format!("{}{path}", agent.base()))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn delete(agent: &Agent, path: &str) -> (u16, String) {
    let r = client()
        .delete(format!("{}{path}", agent.base()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn value_of(entry: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(entry["Value"].as_str().unwrap_or(""))
        .unwrap()
}

#[tokio::test]
async fn kv_through_an_agent_speaks_consuls_api() {
    let (_cp, agents) = fleet(1).await;
    let a = &agents[0];

    // PUT with flags, GET as a KVPair array with base64 and indexes.
    assert_eq!(
        put(a, "/v1/kv/app/db/url?flags=42", "postgres://db").await,
        (200, "true".into())
    );
    let r = a.get("/v1/kv/app/db/url").await;
    assert_eq!(r.status, 200);
    let entry = &r.json()[0];
    assert_eq!(entry["Key"], "app/db/url");
    assert_eq!(entry["Flags"], 42);
    assert_eq!(value_of(entry), b"postgres://db");
    let created = entry["ModifyIndex"].as_u64().unwrap();
    assert_eq!(entry["CreateIndex"].as_u64().unwrap(), created);
    assert!(r.index() >= created);
    // ?raw: the bytes.
    assert_eq!(a.get("/v1/kv/app/db/url?raw").await.text, "postgres://db");
    // An empty value reads back as null.
    assert_eq!(put(a, "/v1/kv/app/empty", "").await.1, "true");
    assert_eq!(
        a.get("/v1/kv/app/empty").await.json()[0]["Value"],
        Value::Null
    );

    // A missing key: 404, empty body, with an index.
    let r = a.get("/v1/kv/app/missing").await;
    assert_eq!((r.status.as_u16(), r.text.as_str()), (404, ""));
    assert!(r.index() >= 1);

    // cas=0 creates only; cas=<ModifyIndex> replaces only at that index.
    assert_eq!(put(a, "/v1/kv/app/db/url?cas=0", "other").await.1, "false");
    assert_eq!(put(a, "/v1/kv/app/new?cas=0", "v1").await.1, "true");
    let index = a.get("/v1/kv/app/new").await.json()[0]["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert_eq!(
        put(a, &format!("/v1/kv/app/new?cas={}", index + 1000), "v2")
            .await
            .1,
        "false"
    );
    assert_eq!(
        put(a, &format!("/v1/kv/app/new?cas={index}"), "v2").await.1,
        "true"
    );
    assert_eq!(a.get("/v1/kv/app/new?raw").await.text, "v2");

    // recurse, keys with a separator.
    put(a, "/v1/kv/app/db/user", "app").await;
    put(a, "/v1/kv/app/cache/ttl", "30s").await;
    let all = a.get("/v1/kv/app/?recurse").await.json();
    let keys: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "app/cache/ttl",
            "app/db/url",
            "app/db/user",
            "app/empty",
            "app/new"
        ]
    );
    assert_eq!(
        a.get("/v1/kv/app/?keys&separator=/").await.json(),
        json!(["app/cache/", "app/db/", "app/empty", "app/new"])
    );

    // DELETE with cas, then recurse.
    let index = a.get("/v1/kv/app/new").await.json()[0]["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert_eq!(delete(a, "/v1/kv/app/new?cas=1").await.1, "false");
    assert_eq!(
        delete(a, &format!("/v1/kv/app/new?cas={index}")).await.1,
        "true"
    );
    assert_eq!(a.get("/v1/kv/app/new").await.status, 404);
    assert_eq!(delete(a, "/v1/kv/app/db/?recurse").await.1, "true");
    assert_eq!(a.get("/v1/kv/app/db/?recurse").await.status, 404);
    assert_eq!(
        a.get("/v1/kv/app/cache/ttl?raw").await.text,
        "30s",
        "other keys stay"
    );

    // Bounds and bad names: clear errors, nothing stored.
    let big = "x".repeat(512 * 1024 + 1);
    let (status, text) = put(a, "/v1/kv/app/big", &big).await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(a.get("/v1/kv/app/big").await.status, 404);
    for (path, says) in [
        ("/v1/kv/a//b", "empty segment"),
        ("/v1/kv/a%2F..%2Fb", "'..'"),
        ("/v1/kv/a%00b", "control characters"),
        ("/v1/kv/a?flags=x", "invalid flags"),
        ("/v1/kv/a?acquire=nope", "invalid session ID"),
    ] {
        let (status, text) = put(a, path, "v").await;
        assert_eq!(status, 400, "{path}: {text}");
        assert!(text.contains(says), "{path}: {text}");
    }
    assert_eq!(
        a.get("/v1/kv/?keys").await.json(),
        json!(["app/cache/ttl", "app/empty"])
    );

    // A route we do not serve is an error every client raises.
    let r = a.get("/v1/query").await;
    assert_eq!(r.status, 501, "{}", r.text);
}

#[tokio::test]
async fn transactions_apply_whole_or_not_at_all() {
    let (_cp, agents) = fleet(1).await;
    let a = &agents[0];
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let ops = json!([
        {"KV": {"Verb": "set", "Key": "tx/a", "Value": b64("1")}},
        {"KV": {"Verb": "set", "Key": "tx/b", "Value": b64("2"), "Flags": 9}},
        {"KV": {"Verb": "get", "Key": "tx/a"}},
    ]);
    let (status, text) = put(a, "/v1/txn", &ops.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let results = answer["Results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0]["KV"]["ModifyIndex"],
        results[1]["KV"]["ModifyIndex"]
    );
    assert_eq!(
        results[0]["KV"]["Value"],
        Value::Null,
        "writes answer without the value"
    );
    assert_eq!(value_of(&results[2]["KV"]), b"1");
    let index = results[0]["KV"]["ModifyIndex"].as_u64().unwrap();

    // A failed check rolls everything back: 409 with the failing op.
    let ops = json!([
        {"KV": {"Verb": "set", "Key": "tx/c", "Value": b64("3")}},
        {"KV": {"Verb": "delete", "Key": "tx/a"}},
        {"KV": {"Verb": "check-index", "Key": "tx/b", "Index": index + 100}},
    ]);
    let (status, text) = put(a, "/v1/txn", &ops.to_string()).await;
    assert_eq!(status, 409, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["Errors"][0]["OpIndex"], 2);
    assert!(
        answer["Errors"][0]["What"]
            .as_str()
            .unwrap()
            .contains("modify index")
    );
    assert_eq!(
        a.get("/v1/kv/tx/c").await.status,
        404,
        "the set was rolled back"
    );
    assert_eq!(
        a.get("/v1/kv/tx/a?raw").await.text,
        "1",
        "the delete was rolled back"
    );

    // Bad bodies are refused before anything runs.
    let many: Vec<Value> = (0..65)
        .map(|i| json!({"KV": {"Verb": "set", "Key": format!("tx/{i}")}}))
        .collect();
    for (body, says) in [
        (json!(many).to_string(), "too many operations"),
        ("{\"KV\": 1}".to_string(), "JSON array"),
        (
            json!([{"KV": {"Verb": "set", "Key": "../x"}}]).to_string(),
            "operation 0",
        ),
        (
            json!([{"KV": {"Verb": "frobnicate", "Key": "x"}}]).to_string(),
            "unknown KV verb",
        ),
    ] {
        let (status, text) = put(a, "/v1/txn", &body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(says), "{text}");
    }
    assert_eq!(
        a.get("/v1/kv/tx/?keys").await.json(),
        json!(["tx/a", "tx/b"])
    );
}

#[tokio::test]
async fn locks_follow_sessions_and_their_lock_delay() {
    let (_cp, agents) = fleet(2).await;
    let (a, b) = (&agents[0], &agents[1]);
    // Created through an agent, a session is on its node.
    let (status, text) = put(
        a,
        "/v1/session/create",
        &json!({"Name": "lead", "LockDelay": "60s", "TTL": "30s"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let s1 = serde_json::from_str::<Value>(&text).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let info = a.get(&format!("/v1/session/info/{s1}")).await.json();
    assert_eq!(info[0]["Node"], "kv-node-0");
    assert_eq!(info[0]["TTL"], "30s");
    assert_eq!(info[0]["NodeChecks"], json!(["serfHealth"]));
    let (_, text) = put(b, "/v1/session/create", "{\"lockdelay\": \"60s\"}").await;
    let s2 = serde_json::from_str::<Value>(&text).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        b.get("/v1/session/node/kv-node-1").await.json()[0]["ID"],
        s2.as_str()
    );
    assert_eq!(
        a.get("/v1/session/list")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // One holder at a time; the lock index counts acquisitions.
    assert_eq!(
        put(a, &format!("/v1/kv/svc/leader?acquire={s1}"), "node-0")
            .await
            .1,
        "true"
    );
    assert_eq!(
        put(b, &format!("/v1/kv/svc/leader?acquire={s2}"), "node-1")
            .await
            .1,
        "false"
    );
    let held = b.get("/v1/kv/svc/leader?consistent").await.json();
    assert_eq!(held[0]["Session"], s1.as_str());
    assert_eq!(held[0]["LockIndex"], 1);
    // Only the holder releases.
    assert_eq!(
        put(b, &format!("/v1/kv/svc/leader?release={s2}"), "")
            .await
            .1,
        "false"
    );
    // Renewing answers the session; an unknown one is a 404.
    let (status, text) = put(a, &format!("/v1/session/renew/{s1}"), "").await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = put(
        a,
        "/v1/session/renew/00000000-0000-4000-8000-000000000000",
        "",
    )
    .await;
    assert_eq!(status, 404);
    // An unknown session cannot lock.
    let (status, text) = put(
        a,
        "/v1/kv/x?acquire=00000000-0000-4000-8000-000000000000",
        "",
    )
    .await;
    assert_eq!(status, 500, "{text}");

    // Destroying the holder releases the key (behavior release) and the
    // lock delay keeps the other contender out.
    assert_eq!(
        put(a, &format!("/v1/session/destroy/{s1}"), "").await.1,
        "true"
    );
    let released = b.get("/v1/kv/svc/leader?consistent").await.json();
    assert!(released[0].get("Session").is_none(), "{released}");
    assert_eq!(value_of(&released[0]), b"node-0", "the key stays");
    assert_eq!(
        put(b, &format!("/v1/kv/svc/leader?acquire={s2}"), "node-1")
            .await
            .1,
        "false"
    );

    // Behavior delete: the key goes with the session.
    let (_, text) = put(
        b,
        "/v1/session/create",
        "{\"Behavior\": \"delete\", \"LockDelay\": \"0s\"}",
    )
    .await;
    let s3 = serde_json::from_str::<Value>(&text).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        put(b, &format!("/v1/kv/eph/b?acquire={s3}"), "here")
            .await
            .1,
        "true"
    );
    assert_eq!(
        put(b, &format!("/v1/session/destroy/{s3}"), "").await.1,
        "true"
    );
    assert_eq!(b.get("/v1/kv/eph/b?consistent").await.status, 404);

    // Bad sessions are refused with what is wrong.
    for (body, says) in [
        ("{\"TTL\": \"1s\"}", "TTL"),
        ("{\"Behavior\": \"keep\"}", "Behavior"),
        ("{\"Checks\": [\"no-such-check\"]}", "no-such-check"),
        ("{\"Node\": \"no-such-node\"}", "no-such-node"),
    ] {
        let (status, text) = put(a, "/v1/session/create", body).await;
        assert!(status == 400 || status == 500, "{body}: {status} {text}");
        assert!(text.contains(says), "{body}: {text}");
    }
}

#[tokio::test]
async fn a_failed_check_ends_its_session_and_frees_the_lock() {
    let (_cp, agents) = fleet(1).await;
    let a = &agents[0];
    let r = a
        .put(
            "/v1/agent/service/register",
            Some(json!({"Name": "worker", "Port": 9, "Check": {"CheckID": "worker-ttl", "TTL": "1h"}})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    a.put("/v1/agent/check/pass/worker-ttl", None).await;
    // The control plane has the check once the agent reported it.
    let body = json!({"Checks": ["serfHealth", "worker-ttl"], "LockDelay": "0s"}).to_string();
    let id = a
        .eventually("a session on the worker's check", || async {
            let (status, text) = put(a, "/v1/session/create", &body).await;
            (status == 200).then(|| {
                serde_json::from_str::<Value>(&text).unwrap()["ID"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .await;
    assert_eq!(
        put(a, &format!("/v1/kv/work/owner?acquire={id}"), "me")
            .await
            .1,
        "true"
    );
    a.put("/v1/agent/check/fail/worker-ttl", None).await;
    a.eventually("the session ended and the lock is free", || async {
        let entry = a.get("/v1/kv/work/owner?consistent").await.json();
        let gone = a.get(&format!("/v1/session/info/{id}")).await.json() == json!([]);
        (entry[0].get("Session").is_none() && gone).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_prefix_watched_from_three_agents_wakes_each_once_per_change() {
    let (_cp, agents) = fleet(3).await;
    put(&agents[0], "/v1/kv/cfg/web/timeout", "1s").await;
    // Each agent reads the prefix (and caches it).
    let mut indexes = Vec::new();
    for a in &agents {
        let r = a.get("/v1/kv/cfg/web/?recurse").await;
        assert_eq!(r.status, 200);
        indexes.push(r.index());
    }
    let watchers: Vec<_> = agents
        .iter()
        .zip(&indexes)
        .map(|(a, index)| {
            let url = format!("{}/v1/kv/cfg/web/?recurse&index={index}&wait=5m", a.base());
            tokio::spawn(async move { client().get(url).send().await.unwrap() })
        })
        .collect();
    // A write elsewhere wakes nobody; the write under the prefix wakes
    // each watcher with it.
    put(&agents[1], "/v1/kv/cfg/other", "x").await;
    put(&agents[2], "/v1/kv/cfg/web/timeout", "2s").await;
    let mut after = Vec::new();
    for (w, before) in watchers.into_iter().zip(&indexes) {
        let r = w.await.unwrap();
        let index: u64 = r.headers()["X-Consul-Index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(index > *before);
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            value_of(&body[0]),
            b"2s",
            "woken by the change it watches, with it"
        );
        after.push(index);
    }
    // And once only: with nothing new, a blocking read waits its wait out
    // and answers the same index.
    for (a, index) in agents.iter().zip(&after) {
        let r = a
            .get(&format!("/v1/kv/cfg/web/?recurse&index={index}&wait=1s"))
            .await;
        assert_eq!(r.index(), *index, "no change, no new index");
    }
}

#[tokio::test]
async fn an_agent_serves_its_cached_prefix_without_the_control_plane_across_a_restart() {
    let (mut cp, mut agents) = fleet(1).await;
    let a = &mut agents[0];
    put(a, "/v1/kv/feature/flags/dark-mode", "on").await;
    let r = a.get("/v1/kv/feature/flags/?recurse").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["X-Consul-KnownLeader"], "true");
    let index = r.index();

    cp.kill();
    // The agent restarts while the control plane is down.
    a.restart().await;
    for path in [
        "/v1/kv/feature/flags/?recurse",
        "/v1/kv/feature/flags/?recurse&stale",
    ] {
        let r = a.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(value_of(&r.json()[0]), b"on");
        assert_eq!(r.headers["X-Consul-KnownLeader"], "false");
        assert!(r.headers.contains_key("X-Consul-LastContact"));
        assert_eq!(r.index(), index);
    }
    // Writes fail clearly; an uncached key cannot be read.
    let (status, text) = put(a, "/v1/kv/feature/flags/new", "x").await;
    assert!(status >= 500, "{status} {text}");
    assert!(text.contains("control plane"), "{text}");
    assert!(a.get("/v1/kv/never/read").await.status.as_u16() >= 500);

    // Back: the agent's watch catches up and writes work again.
    cp.restart().await;
    a.eventually("the cache follows the control plane again", || async {
        let r = a.get("/v1/kv/feature/flags/?recurse").await;
        (r.headers["X-Consul-KnownLeader"] == "true").then_some(())
    })
    .await;
    assert_eq!(
        put(a, "/v1/kv/feature/flags/dark-mode", "off").await.1,
        "true"
    );
    assert_eq!(
        a.get("/v1/kv/feature/flags/dark-mode?raw").await.text,
        "off"
    );
}

#[tokio::test]
async fn user_events_reach_the_agents_they_name() {
    let (_cp, agents) = fleet(3).await;
    let r = agents[1]
        .put(
            "/v1/agent/service/register",
            Some(json!({"Name": "web", "Port": 80, "Tags": ["canary"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let index = agents[1].get("/v1/event/list?name=deploy").await.index();
    let waiting = {
        let url = format!(
            "{}/v1/event/list?name=deploy&index={index}&wait=5m",
            agents[1].base()
        );
        tokio::spawn(async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let (status, text) = put(
        &agents[0],
        "/v1/event/fire/deploy?service=^web$&tag=canary",
        "v2",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let fired: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fired["Name"], "deploy");
    assert_eq!(fired["ServiceFilter"], "^web$");
    // The blocked watcher on the agent running a canary web wakes with it.
    let seen = waiting.await.unwrap();
    assert_eq!(seen.as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(seen[0]["ID"], fired["ID"]);
    assert_eq!(value_of(&json!({"Value": seen[0]["Payload"]})), b"v2");
    // An agent without the service does not list it.
    let other = agents[2].get("/v1/event/list?name=deploy").await.json();
    assert_eq!(other, json!([]));
    // Bounds: a payload over 512 bytes, a bad filter.
    let (status, _) = put(&agents[0], "/v1/event/fire/deploy", &"x".repeat(513)).await;
    assert_eq!(status, 413);
    let (status, text) = put(&agents[0], "/v1/event/fire/deploy?node=(", "").await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("node filter"), "{text}");
}

async fn passing_db(agent: &Agent) -> Option<usize> {
    agent
        .get("/v1/health/service/db?passing")
        .await
        .json()
        .as_array()
        .map(Vec::len)
}

#[tokio::test]
async fn external_services_registered_in_the_catalog_reach_every_agent() {
    let (mut cp, agents) = fleet(2).await;
    let register = json!({
        "Node": "managed-db", "Address": "127.0.0.1",
        "Service": {"ID": "db-primary", "Service": "db", "Port": 5432, "Tags": ["primary"]},
        "Check": {"CheckID": "db-up", "Name": "db up", "ServiceID": "db-primary", "Status": "passing"},
    });
    let (status, text) = put(&agents[0], "/v1/catalog/register", &register.to_string()).await;
    assert_eq!((status, text.as_str()), (200, "true"));
    // Every agent sees it, healthy as registered.
    agents[1]
        .eventually("the external db on the other agent", || async {
            (passing_db(&agents[1]).await == Some(1)).then_some(())
        })
        .await;
    let entry = agents[1].get("/v1/health/service/db").await.json();
    assert_eq!(entry[0]["Node"]["Node"], "managed-db");
    assert_eq!(entry[0]["Service"]["Port"], 5432);
    // Its health is what its registration says.
    let critical = json!({"Node": "managed-db", "Address": "127.0.0.1",
        "Check": {"CheckID": "db-up", "ServiceID": "db-primary", "Status": "critical"}});
    assert_eq!(
        put(&agents[1], "/v1/catalog/register", &critical.to_string())
            .await
            .0,
        200
    );
    agents[0]
        .eventually("the db critical everywhere", || async {
            (passing_db(&agents[0]).await == Some(0)).then_some(())
        })
        .await;
    // It is never probed or failed, and survives a control-plane restart.
    // Its registration answered once it was on disk.
    let kept = std::fs::read(cp.dir.path().join("data").join("catalog.pb")).unwrap();
    assert!(String::from_utf8_lossy(&kept).contains("managed-db"));
    cp.restart().await;
    let nodes = cp.get("/v1/nodes").await.json();
    let db = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["Node"] == "managed-db")
        .cloned()
        .unwrap_or_else(|| panic!("{nodes}\n{}", cp.log()));
    assert_eq!(db["Status"], "alive");
    // A node with an agent is its agent's; a bad registration is named.
    let (status, text) = put(
        &agents[0],
        "/v1/catalog/register",
        &json!({"Node": "kv-node-1", "Address": "127.0.0.1"}).to_string(),
    )
    .await;
    assert_eq!(status, 409, "{text}");
    let (status, text) = put(
        &agents[0],
        "/v1/catalog/register",
        &json!({"Node": "x", "Address": "127.0.0.1", "Service": {"Service": "bad name!"}})
            .to_string(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    // Deregistering the node removes it from every agent.
    let (status, _) = put(
        &agents[0],
        "/v1/catalog/deregister",
        &json!({"Node": "managed-db"}).to_string(),
    )
    .await;
    assert_eq!(status, 200);
    agents[1]
        .eventually("the db gone", || async {
            (agents[1].get("/v1/health/service/db").await.json() == json!([])).then_some(())
        })
        .await;
}

#[tokio::test]
async fn service_defaults_make_a_library_registered_service_http_in_the_proxy() {
    use signpost_tests::upstream::{proxy_config, spread, upstreams, vip_client};
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    let web = upstreams("web", 2).await;
    let a = Agent::start_named("sd-a", &join).await;
    // Registered as a Consul library does: no protocol.
    for u in &web {
        let body = json!({"ID": format!("web-{}", u.addr.ip()), "Name": "web", "Address": u.addr.ip().to_string(), "Port": u.addr.port()});
        let r = a.put("/v1/agent/service/register", Some(body)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let b = Agent::start_named(
        "sd-b",
        &format!(
            "{join}{}",
            proxy_config("  defaults:\n    balancer: round_robin\n")
        ),
    )
    .await;
    let (c, url) = vip_client(&b, "web", web[0].addr.port()).await;
    // TCP: one client connection goes to one instance.
    b.eventually("web reachable through the VIP", || async {
        c.get(&url)
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
    })
    .await;
    assert_eq!(
        spread(&c, &url, 10).await.len(),
        1,
        "L4: one connection, one instance"
    );

    let defaults = json!({"Kind": "service-defaults", "Name": "web", "Protocol": "http"});
    assert_eq!(
        put(&b, "/v1/config", &defaults.to_string()).await,
        (200, "true".into())
    );
    let entry = b.get("/v1/config/service-defaults/web").await;
    assert_eq!(entry.status, 200, "{}", entry.text);
    assert_eq!(entry.json()["Protocol"], "http");
    assert_eq!(
        b.get("/v1/config/service-defaults")
            .await
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // HTTP: requests, not connections, are balanced (on a new
    // connection: one opened before is spliced through as it was).
    b.eventually("web balanced per request", || async {
        let (c, url) = vip_client(&b, "web", web[0].addr.port()).await;
        (spread(&c, &url, 10).await.len() == 2).then_some(())
    })
    .await;
    // Bad entries are named; deleting it makes web TCP again.
    let (status, text) = put(
        &b,
        "/v1/config",
        &json!({"Kind": "service-defaults", "Name": "web", "Protocol": "smtp"}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = put(
        &b,
        "/v1/config",
        &json!({"Kind": "proxy-defaults", "Name": "global"}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        delete(&b, "/v1/config/service-defaults/web").await,
        (200, "true".into())
    );
    assert_eq!(b.get("/v1/config/service-defaults/web").await.status, 404);
    b.eventually("web back to one instance per connection", || async {
        let (c, url) = vip_client(&b, "web", web[0].addr.port()).await;
        (spread(&c, &url, 10).await.len() == 1).then_some(())
    })
    .await;
}
