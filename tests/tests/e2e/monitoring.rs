//! The monitoring assets the packages ship (`packaging/monitoring/`:
//! Prometheus alerting rules, their unit tests, Grafana dashboards) held
//! to the real binaries: a control plane and agents do some work (proxied
//! requests, a 5xx, an ejection, a proxy error, DNS, a reload, a failed
//! node), both `/metrics` pass `promtool check metrics`, the rules pass
//! `promtool check rules` and `promtool test rules`, the dashboards are
//! Grafana models whose queries parse, and every metric the rules and
//! dashboards name is in the scrapes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use signpost_tests::upstream::{bind, proxy_config, upstreams, vip_client};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane, PATIENCE, poll};

const RULES: &str = "signpost-alerts.yml";
const RULE_TESTS: &str = "signpost-alerts.test.yml";
const DASHBOARDS: [&str; 2] = [
    "grafana-signpost-agents.json",
    "grafana-signpost-control-plane.json",
];

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/monitoring")
}

#[tokio::test]
#[ignore = "needs promtool (prometheus)"]
async fn shipped_rules_and_dashboards_name_only_metrics_the_binaries_export() {
    let cp = ControlPlane::start().await;
    let join = cp.agent_config(AGENT_TOKEN);
    // One consecutive failure ejects an instance.
    let proxy = "  defaults:\n    balancer: round_robin\n    eject_after: 1\n";
    let a = Agent::start_named("a", &format!("{join}{}", proxy_config(proxy))).await;
    let mut c = Agent::start_named("c", &join).await;

    // web: one instance answers 500 (a 5xx, then its ejection); gone: its
    // one instance refuses connections (the proxy's own 503).
    let web = upstreams("web", 2).await;
    web[0].set_status(500);
    let gone = bind(0).await.local_addr().unwrap();
    let entries: String = web.iter().map(|u| u.entry("web", "http")).collect();
    a.write_service_file(
        "monitoring.yaml",
        &format!(
            "services:\n{entries}  - name: gone\n    address: {}\n    port: {}\n    protocol: http\n",
            gone.ip(),
            gone.port()
        ),
    );
    let (client, url) = vip_client(&a, "web", web[0].addr.port()).await;
    a.eventually("an ejection", || async {
        client.get(&url).send().await.unwrap();
        let text = a.get("/metrics").await.text;
        text.contains("signpost_agent_proxy_ejections_total{")
            .then_some(())
    })
    .await;
    let (client, url) = vip_client(&a, "gone", gone.port()).await;
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.headers().get("x-signpost-error"));
    let r = a.put("/v1/agent/reload", None).await;
    assert!(r.status.is_success(), "{}", r.text);

    // c dies: the control plane has a probe run, and fails it.
    poll(
        "c known to the control plane",
        PATIENCE,
        || cp.log(),
        || async { node_status(&cp, "c").await.filter(|s| s == "alive") },
    )
    .await;
    c.kill();
    poll(
        "c failed",
        PATIENCE,
        || cp.log(),
        || async { node_status(&cp, "c").await.filter(|s| s == "failed") },
    )
    .await;

    let mut problems = Vec::new();
    let mut scrapes = Vec::new();
    for (what, r) in [
        ("the control plane", cp.get("/metrics").await),
        ("the agent", a.get("/metrics").await),
    ] {
        assert!(
            r.status.is_success() && !r.text.is_empty(),
            "{what}'s /metrics: {} {}",
            r.status,
            r.text
        );
        let (ok, out) = promtool(&["check", "metrics"], Some(&text_format(&r.text)));
        if !ok {
            problems.push(format!("{what}'s /metrics: promtool check metrics:\n{out}"));
        }
        scrapes.push(exported_names(&r.text));
    }
    let [control_plane, agent] = [&scrapes[0], &scrapes[1]];

    let dir = monitoring_dir();
    let rules = std::fs::read_to_string(dir.join(RULES)).unwrap();
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let (ok, out) = promtool_in(&dir, &args, None);
        assert!(ok, "promtool {}:\n{out}", args.join(" "));
    }
    let mut named = metric_names(&rules);
    for file in DASHBOARDS {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let dashboard: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: not JSON: {e}"));
        check_dashboard(file, &dashboard);
        let mut strings = Vec::new();
        strings_in(&dashboard, &mut strings);
        for s in strings {
            named.extend(metric_names(s));
        }
    }

    for name in &named {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        let (scrape, what) = if family.starts_with("signpost_agent_") {
            (agent, "the agent's")
        } else if family.starts_with("signpost_control_plane_") {
            (control_plane, "the control plane's")
        } else {
            problems.push(format!(
                "{name}: neither an agent's nor the control plane's"
            ));
            continue;
        };
        if !scrape.contains(family) {
            problems.push(format!("{name}: not in {what} /metrics"));
        }
    }
    assert!(
        problems.is_empty(),
        "the shipped rules and dashboards do not match the binaries:\n{}",
        problems.join("\n")
    );
}

/// What the test above compares: whole names from expressions and
/// prose, and what a scrape exports, read as PromQL sees it.
#[test]
fn names_are_read_from_expressions_and_scrapes_as_promql_sees_them() {
    let expr = "sum(rate(signpost_agent_dns_queries_total{rcode=\"SERVFAIL\"}[5m])) \
        / x_signpost_other and signpost_control_plane_fanout_seconds_bucket, signpost_cp_";
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "signpost_agent_dns_queries_total",
            "signpost_control_plane_fanout_seconds_bucket",
            "signpost_cp"
        ]
    );
    let scrape = "# HELP signpost_x_requests Requests.\n# TYPE signpost_x_requests counter\n\
        signpost_x_requests_total{class=\"2xx\"} 1\n\
        # HELP signpost_x_seconds Latency.\n# TYPE signpost_x_seconds histogram\n\
        signpost_x_seconds_bucket{le=\"+Inf\"} 1\nsignpost_x_seconds_sum 0.5\n\
        signpost_x_seconds_count 1\n# EOF\n";
    let exported = exported_names(scrape);
    assert!(exported.contains("signpost_x_requests_total"));
    assert!(!exported.contains("signpost_x_requests"), "{exported:?}");
    assert!(exported.contains("signpost_x_seconds"));
    let text = text_format(scrape);
    assert!(text.starts_with(
        "# HELP signpost_x_requests_total Requests.\n# TYPE signpost_x_requests_total counter\n"
    ));
    assert!(text.contains("# TYPE signpost_x_seconds histogram\n"));
    assert!(!text.contains("# EOF"));
}

/// `node`'s liveness as the control plane reports it.
async fn node_status(cp: &ControlPlane, node: &str) -> Option<String> {
    let nodes = cp.get("/v1/nodes").await.json();
    nodes
        .as_array()?
        .iter()
        .find(|n| n["Node"] == node)
        .and_then(|n| n["Status"].as_str().map(str::to_string))
}

/// The dashboard conventions: a recent schema, a `datasource` variable
/// every panel and query uses, `job` and `instance` variables, and
/// queries Prometheus parses (checked as recording rules, with the
/// variables filled in).
fn check_dashboard(file: &str, dashboard: &Value) {
    let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!(schema >= 36, "{file}: schemaVersion {schema}");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{file}: no {name} variable"))
    };
    let datasource = variable("datasource");
    assert_eq!(datasource["type"], "datasource", "{file}");
    assert_eq!(datasource["query"], "prometheus", "{file}");
    for name in ["job", "instance"] {
        assert_eq!(
            variable(name)["datasource"]["uid"],
            "${datasource}",
            "{file}: {name}"
        );
    }
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap();
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{file}: {title}"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{file}: {title}: no query");
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{file}: {title}"
            );
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$job", "signpost")
            .replace("$instance", ".*")
            .replace("$service", ".*");
        // A JSON string is a YAML double-quoted scalar.
        yaml.push_str(&format!(
            "      - record: query_{i}\n        expr: {}\n",
            Value::from(expr)
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("queries.yml"), yaml).unwrap();
    let (ok, out) = promtool_in(dir.path(), &["check", "rules", "queries.yml"], None);
    assert!(ok, "{file}: a query does not parse:\n{out}");
}

/// Every string in a JSON value.
fn strings_in<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| strings_in(v, out)),
        Value::Object(fields) => fields.values().for_each(|v| strings_in(v, out)),
        _ => {}
    }
}

/// The `signpost_[a-z_]+` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("signpost_") {
        let starts_a_word = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if starts_a_word {
            names.insert(tail[..end].trim_end_matches('_').to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The names a scrape exports: its samples' (`foo_total`,
/// `foo_seconds_bucket`) and its families' (`foo_seconds`), except a
/// counter's family name, which PromQL never sees (OpenMetrics writes
/// `# TYPE foo counter` over `foo_total` samples).
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            let mut words = family.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next())
                && kind != "counter"
            {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// `scrape` (OpenMetrics, as Signpost serves it) in Prometheus's text
/// format 0.0.4, the one `promtool check metrics` reads: a counter's HELP
/// and TYPE name its `_total` samples, and no `# EOF`. Read as it is,
/// every counter would be "no help text".
fn text_format(scrape: &str) -> String {
    let counters: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::new();
    for line in scrape.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|kind| {
            let rest = line.strip_prefix(kind)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{kind}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    promtool_in(Path::new("."), args, stdin)
}

/// Runs `promtool args` in `dir` with `stdin`; whether it succeeded, and
/// what it wrote.
fn promtool_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool (Debian: prometheus): {e}"));
    let writer = stdin.map(|text| {
        let mut pipe = child.stdin.take().unwrap();
        let text = text.to_string();
        std::thread::spawn(move || pipe.write_all(text.as_bytes()))
    });
    let out = child.wait_with_output().unwrap();
    if let Some(writer) = writer {
        writer.join().unwrap().unwrap();
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
