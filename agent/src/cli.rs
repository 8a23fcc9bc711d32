//! The `signpost` subcommands that talk to a running agent over its local
//! API: readable tables by default, `--json` for scripts.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A client of the agent's local API.
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(addr: &str) -> Self {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        crate::tls::install_crypto_provider();
        Client {
            base,
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<String> {
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach the agent at {} (is it running? see --http-addr)",
                self.base
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .context("cannot read the agent's answer")?;
        if !status.is_success() {
            bail!("{what}: the agent answered {status}: {}", text.trim());
        }
        Ok(text)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let text = self
            .send(self.http.get(format!("{}{path}", self.base)), "query")
            .await?;
        serde_json::from_str(&text).context("the agent's answer is not JSON")
    }

    /// A PUT whose answer is JSON, waiting up to `timeout`.
    pub async fn put_json(
        &self,
        path: &str,
        what: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Value> {
        let request = self
            .http
            .put(format!("{}{path}", self.base))
            .timeout(timeout);
        let text = self.send(request, what).await?;
        serde_json::from_str(&text).context("the agent's answer is not JSON")
    }

    pub async fn put(&self, path: &str, body: Option<&Value>, what: &str) -> anyhow::Result<()> {
        let mut request = self.http.put(format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request, what).await.map(|_| ())
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub async fn services(client: &Client, json: bool) -> anyhow::Result<()> {
    let body = client.get("/v1/signpost/services").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let services = body["services"].as_array().cloned().unwrap_or_default();
    let rows = services
        .iter()
        .map(|s| {
            let source = match s.get("file").and_then(Value::as_str) {
                Some(file) => file.to_string(),
                None => str_of(s, "source").to_string(),
            };
            vec![
                str_of(s, "id").to_string(),
                str_of(s, "name").to_string(),
                format!("{}:{}", str_of(s, "address"), s["port"]),
                str_of(s, "status").to_string(),
                s["checks"].to_string(),
                source,
            ]
        })
        .collect();
    table(
        &["ID", "NAME", "ADDRESS", "STATUS", "CHECKS", "SOURCE"],
        rows,
    );
    let errors: Vec<&Value> = body["files"]
        .as_array()
        .map(|f| f.iter().filter(|f| !f["error"].is_null()).collect())
        .unwrap_or_default();
    if !errors.is_empty() {
        println!();
        println!("Service files with errors (their last good version keeps serving):");
        for f in errors {
            println!("  {}", str_of(f, "error"));
        }
    }
    Ok(())
}

pub async fn status(client: &Client, json: bool) -> anyhow::Result<()> {
    let body = client.get("/v1/signpost/status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "node:           {} (signpost {})",
        str_of(&body, "node"),
        str_of(&body, "version")
    );
    println!("services:       {}", body["services"]);
    let c = &body["checks"];
    println!(
        "checks:         {} passing, {} warning, {} critical",
        c["passing"], c["warning"], c["critical"]
    );
    let cp = &body["control_plane"];
    if cp.is_null() {
        println!("control plane:  not configured (this agent answers for its own node only)");
        return Ok(());
    }
    let addresses: Vec<&str> = cp["addresses"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if cp["connected"] == Value::Bool(true) {
        println!("control plane:  connected ({})", addresses.join(", "));
    } else {
        let last = match cp["last_contact_ms"].as_u64() {
            Some(ms) => format!("last contact {:.1}s ago", ms as f64 / 1000.0),
            None => "no contact since start".to_string(),
        };
        println!(
            "control plane:  UNREACHABLE ({}): serving the last known view, {last}",
            addresses.join(", ")
        );
    }
    let subs: Vec<&str> = cp["subscriptions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "subscriptions:  {}",
        if subs.is_empty() {
            "none".to_string()
        } else {
            subs.join(", ")
        }
    );
    Ok(())
}

pub async fn checks(client: &Client, json: bool) -> anyhow::Result<()> {
    let body = client.get("/v1/agent/checks").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let rows = body
        .as_object()
        .map(|m| {
            m.values()
                .map(|c| {
                    let output: String = str_of(c, "Output")
                        .lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(60)
                        .collect();
                    vec![
                        str_of(c, "CheckID").to_string(),
                        str_of(c, "ServiceID").to_string(),
                        str_of(c, "Type").to_string(),
                        str_of(c, "Status").to_string(),
                        output,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["CHECK", "SERVICE", "TYPE", "STATUS", "OUTPUT"], rows);
    Ok(())
}

pub async fn register(client: &Client, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let defs = signpost_core::service_file::parse(&file.display().to_string(), &text)?;
    for def in &defs {
        let body = crate::api::decode::to_consul_json(def);
        client
            .put(
                "/v1/agent/service/register",
                Some(&body),
                &format!("register {}", def.id),
            )
            .await?;
        println!("registered {}", def.id);
    }
    Ok(())
}

pub async fn drain(
    client: &Client,
    id: &str,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let path = format!(
        "/v1/signpost/drain/{}?timeout={}",
        encode(id),
        encode(&signpost_core::duration::format(timeout))
    );
    let body = client
        .put_json(
            &path,
            &format!("drain {id}"),
            timeout + std::time::Duration::from_secs(10),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let (acked, subscribers) = (&body["acknowledged"], &body["subscribers"]);
    if body["control_plane"] == Value::Bool(false) {
        println!(
            "{id} is in maintenance (no control plane configured: no other agent to wait for)"
        );
    } else if body["complete"] == Value::Bool(true) {
        println!("{id} drained: {acked} of {subscribers} subscribed agents acknowledged");
    } else {
        println!(
            "{id} in maintenance; timed out after {}: {acked} of {subscribers} subscribed agents acknowledged",
            signpost_core::duration::format(timeout)
        );
    }
    Ok(())
}

pub async fn deregister(client: &Client, id: &str) -> anyhow::Result<()> {
    let path = format!("/v1/agent/service/deregister/{}", encode(id));
    client.put(&path, None, &format!("deregister {id}")).await?;
    println!("deregistered {id}");
    Ok(())
}

pub async fn maint(
    client: &Client,
    id: Option<&str>,
    enable: bool,
    reason: &str,
) -> anyhow::Result<()> {
    let query = format!("enable={enable}&reason={}", encode(reason));
    let (path, what) = match id {
        Some(id) => (
            format!("/v1/agent/service/maintenance/{}?{query}", encode(id)),
            format!("service {id}"),
        ),
        None => (
            format!("/v1/agent/maintenance?{query}"),
            "this node".to_string(),
        ),
    };
    client.put(&path, None, "maintenance").await?;
    println!(
        "maintenance {} for {what}",
        if enable { "enabled" } else { "disabled" }
    );
    Ok(())
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `signpost agent --validate`: every service file must parse and
/// validate; returns how many there are, or every error.
pub fn validate_service_files(dir: &Path) -> Result<usize, Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(vec![format!(
                "{}: cannot read services_dir: {e}",
                dir.display()
            )]);
        }
    };
    let mut errors = Vec::new();
    let mut count = 0;
    let mut ids: std::collections::HashMap<String, String> = Default::default();
    let mut checks: std::collections::HashMap<String, String> = Default::default();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if !crate::files::is_service_file(&path) {
            continue;
        }
        count += 1;
        let name = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Err(e) => errors.push(format!("{name}: cannot read: {e}")),
            Ok(text) => match signpost_core::service_file::parse(&name, &text) {
                Err(e) => errors.push(e.to_string()),
                Ok(defs) => {
                    for def in defs {
                        for check in def.checks.iter().filter_map(|c| c.id.as_ref()) {
                            if let Some(other) = checks.insert(check.to_string(), name.clone()) {
                                errors.push(format!(
                                    "{name}: check id {:?} is also defined in {other}",
                                    check.as_str()
                                ));
                            }
                        }
                        if let Some(other) = ids.insert(def.id.to_string(), name.clone()) {
                            errors.push(format!(
                                "{name}: service id {:?} is also defined in {other}",
                                def.id.as_str()
                            ));
                        }
                    }
                }
            },
        }
    }
    if errors.is_empty() {
        Ok(count)
    } else {
        Err(errors)
    }
}
