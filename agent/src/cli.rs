//! The `signpost` subcommands that talk to a running agent over its local
//! API, or to the control plane (`acl`, `audit`, `cmd`, `intention`,
//! `ca`): readable tables by default, `--json` for scripts; a refused
//! token exits with 77, input the server refused with 65.

pub mod ca;
pub mod cmd;
pub mod intention;

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::Value;
use signpost_core::consul::HealthCheck;

/// A client of the agent's local API, or of the control plane's.
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// "the agent" or "the control plane", for messages.
    peer: &'static str,
    /// Where the address comes from, for messages.
    flag: &'static str,
    token: Option<String>,
}

/// The server refused the token (401 or 403): the command exits with
/// [`EXIT_DENIED`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Denied(String);

/// Exit code when the token was refused (sysexits EX_NOPERM).
pub const EXIT_DENIED: u8 = 77;

/// The server refused what was sent as invalid (400): the command exits
/// with [`EXIT_INVALID`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

/// Exit code for input the server refused (sysexits EX_DATAERR).
pub const EXIT_INVALID: u8 = 65;

/// The token the CLI presents: `--token`, else `--token-file`, else
/// Consul's `CONSUL_HTTP_TOKEN` and `CONSUL_HTTP_TOKEN_FILE`, so scripts
/// written for Consul work unchanged.
pub fn token(given: Option<String>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if given.is_some() {
        return Ok(given);
    }
    let file = file.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("CONSUL_HTTP_TOKEN_FILE")
            .filter(|f| !f.is_empty())
            .map(Into::into)
    });
    if let Some(file) = file {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read the token file {}", file.display()))?;
        return Ok(Some(text.trim().to_string()).filter(|t| !t.is_empty()));
    }
    Ok(std::env::var("CONSUL_HTTP_TOKEN")
        .ok()
        .filter(|t| !t.is_empty()))
}

impl Client {
    /// A client of the agent at `addr` (plain HTTP on loopback, where
    /// the agent listens), presenting `token` if any.
    pub fn new(addr: &str, token: Option<String>) -> Self {
        crate::tls::install_crypto_provider();
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        Client {
            base,
            http: reqwest::Client::new(),
            peer: "the agent",
            flag: "--http-addr",
            token,
        }
    }

    /// A client of the control plane's HTTP API at `addr` (HTTPS unless
    /// it says `http://`), verified with the CA in `ca_file` (else the
    /// system's roots), presenting `token` (an ACL token's secret).
    pub fn control_plane(
        addr: &str,
        token: Option<String>,
        ca_file: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let http = crate::api::control_plane_client(ca_file)?;
        Ok(Client {
            base: crate::api::control_plane_url(addr),
            http,
            peer: "the control plane",
            flag: "--control-plane",
            token,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<String> {
        let request = match &self.token {
            Some(token) => request.header("X-Consul-Token", token),
            None => request,
        };
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach {} at {} (is it running? see {})",
                self.peer, self.base, self.flag
            )
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("cannot read {}'s answer", self.peer))?;
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            let hint = if self.token.is_none() {
                " (pass a token with --token or SIGNPOST_TOKEN)"
            } else {
                ""
            };
            return Err(Denied(format!(
                "{what}: {} answered {status}: {}{hint}",
                self.peer,
                text.trim()
            ))
            .into());
        }
        if status == reqwest::StatusCode::BAD_REQUEST {
            return Err(Invalid(format!(
                "{what}: {} answered {status}: {}",
                self.peer,
                text.trim()
            ))
            .into());
        }
        if !status.is_success() {
            bail!("{what}: {} answered {status}: {}", self.peer, text.trim());
        }
        Ok(text)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let text = self
            .send(self.http.get(format!("{}{path}", self.base)), "query")
            .await?;
        self.parse(&text)
    }

    fn parse(&self, text: &str) -> anyhow::Result<Value> {
        serde_json::from_str(text).with_context(|| format!("{}'s answer is not JSON", self.peer))
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
        self.parse(&text)
    }

    /// A POST with a JSON body whose answer is JSON.
    pub async fn post_body(&self, path: &str, body: &Value, what: &str) -> anyhow::Result<Value> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        let text = self.send(request, what).await?;
        self.parse(&text)
    }

    /// A PUT with a JSON body whose answer is JSON.
    pub async fn put_body(&self, path: &str, body: &Value, what: &str) -> anyhow::Result<Value> {
        let request = self.http.put(format!("{}{path}", self.base)).json(body);
        let text = self.send(request, what).await?;
        self.parse(&text)
    }

    pub async fn delete(&self, path: &str, what: &str) -> anyhow::Result<()> {
        let request = self.http.delete(format!("{}{path}", self.base));
        self.send(request, what).await.map(|_| ())
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
    let checks: std::collections::BTreeMap<String, HealthCheck> =
        serde_json::from_value(body).context("the agent's checks are not in Consul's shape")?;
    let rows = checks
        .into_values()
        .map(|c| {
            let output: String = c
                .output
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect();
            vec![
                c.check_id,
                c.service_id,
                c.kind,
                c.status.to_string(),
                output,
            ]
        })
        .collect();
    table(&["CHECK", "SERVICE", "TYPE", "STATUS", "OUTPUT"], rows);
    Ok(())
}

pub async fn register(client: &Client, file: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let defs = signpost_core::service_file::parse(&file.display().to_string(), &text)?;
    for def in &defs {
        let body = serde_json::to_value(signpost_core::consul::ServiceRegistration::from(def))
            .context("cannot encode the registration")?;
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

/// What `signpost drain` does once the instance is drained.
pub struct AfterDrain {
    pub deregister: bool,
    pub exec: Option<String>,
}

pub async fn drain(
    client: &Client,
    id: &str,
    timeout: std::time::Duration,
    then: &AfterDrain,
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
    let (acked, subscribers) = (&body["acknowledged"], &body["subscribers"]);
    let drained =
        body["complete"] == Value::Bool(true) || body["control_plane"] == Value::Bool(false);
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else if body["control_plane"] == Value::Bool(false) {
        println!(
            "{id} is in maintenance (no control plane configured: no other agent to wait for)"
        );
    } else if drained {
        println!(
            "{id} drained: {acked} of {subscribers} subscribed agents acknowledged, nothing in flight"
        );
    }
    if !drained {
        let pending: Vec<&str> = body["pending"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let after = signpost_core::duration::format(timeout);
        if body["acknowledged"] != body["subscribers"] {
            bail!(
                "{id} is in maintenance, but after {after} only {acked} of {subscribers} agents using it stopped sending it new requests; still sending: {}",
                if pending.is_empty() {
                    "unknown".to_string()
                } else {
                    pending.join(", ")
                }
            );
        }
        let in_flight: Vec<String> = body["in_flight"]
            .as_array()
            .map(|f| {
                f.iter()
                    .map(|n| format!("{} ({})", n["node"].as_str().unwrap_or("?"), n["count"]))
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "{id} is in maintenance and no agent sends it new requests, but after {after} requests and connections are still in flight from: {}",
            in_flight.join(", ")
        );
    }
    if then.deregister {
        deregister(client, id).await?;
    }
    if let Some(command) = &then.exec {
        let status = tokio::process::Command::new("sh")
            .args(["-c", command])
            .status()
            .await
            .with_context(|| format!("cannot run {command:?}"))?;
        anyhow::ensure!(status.success(), "{command:?} failed: {status}");
    }
    Ok(())
}

/// `signpost restart`: answered once the new process serves.
pub async fn restart(client: &Client) -> anyhow::Result<()> {
    let body = client
        .put_json(
            "/v1/signpost/restart",
            "restart the agent",
            std::time::Duration::from_secs(180),
        )
        .await?;
    println!(
        "restarted: the new agent process ({}) serves; the previous one finishes its connections and exits",
        body["pid"]
    );
    Ok(())
}

/// `signpost reload`: the agent re-reads its configuration file; prints
/// what it applied and what takes a restart. A file it refuses is an
/// error (the configuration in force keeps serving).
pub async fn reload(client: &Client, json: bool) -> anyhow::Result<()> {
    let body = client
        .put_json(
            "/v1/agent/reload",
            "reload the configuration",
            std::time::Duration::from_secs(30),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let paths = |key: &str| -> Vec<String> {
        body[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (applied, restart) = (paths("applied"), paths("restart_required"));
    if applied.is_empty() && restart.is_empty() {
        println!("configuration reloaded: nothing changed");
        return Ok(());
    }
    if applied.is_empty() {
        println!("configuration reloaded: nothing applied");
    } else {
        println!("configuration reloaded: applied {}", applied.join(", "));
    }
    if !restart.is_empty() {
        println!("not applied, needs a restart: {}", restart.join(", "));
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

/// The unit `--self` or `--unit` names: `--self`, the systemd unit this
/// process runs in (from `/proc/self/cgroup`).
pub fn which_unit(own: bool, unit: Option<String>) -> anyhow::Result<String> {
    if let Some(unit) = unit.filter(|_| !own) {
        return Ok(unit);
    }
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .context("--self: cannot read /proc/self/cgroup")?;
    crate::systemd::jobs::unit_of_cgroup(&cgroup).ok_or_else(|| {
        anyhow::anyhow!(
            "--self: this command does not run in a systemd service unit (run it from the unit's ExecStop= or ExecStartPost=, or name it with --unit)"
        )
    })
}

/// The instances of `unit` (`drain: {unit: …}` in their service files)
/// and their drain timeouts.
async fn unit_instances(
    client: &Client,
    unit: &str,
) -> anyhow::Result<Vec<(String, std::time::Duration)>> {
    let body = client
        .get(&format!("/v1/signpost/unit/{}", encode(unit)))
        .await?;
    let instances: Vec<(String, std::time::Duration)> = body["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| {
                    let id = i["id"].as_str()?.to_string();
                    let timeout = signpost_core::duration::parse(i["timeout"].as_str()?).ok()?;
                    Some((id, timeout))
                })
                .collect()
        })
        .unwrap_or_default();
    if instances.is_empty() {
        bail!("no service file on this agent names unit {unit} (drain: {{unit: {unit}}})");
    }
    Ok(instances)
}

/// `signpost drain --self` / `--unit`: each instance of the unit in turn,
/// with its own timeout unless `timeout` is given; fails if any did not
/// drain.
pub async fn drain_unit(
    client: &Client,
    unit: anyhow::Result<String>,
    timeout: Option<std::time::Duration>,
    then: &AfterDrain,
    json: bool,
) -> anyhow::Result<()> {
    let unit = unit?;
    let mut failed = Vec::new();
    for (id, own_timeout) in unit_instances(client, &unit).await? {
        if let Err(error) = drain(client, &id, timeout.unwrap_or(own_timeout), then, json).await {
            eprintln!("signpost: {error:#}");
            failed.push(id);
        }
    }
    if !failed.is_empty() {
        bail!("{unit}: not drained: {}", failed.join(", "));
    }
    Ok(())
}

/// `signpost maint --self` / `--unit`: every instance of the unit.
pub async fn maint_unit(
    client: &Client,
    unit: anyhow::Result<String>,
    enable: bool,
    reason: &str,
) -> anyhow::Result<()> {
    let unit = unit?;
    for (id, _) in unit_instances(client, &unit).await? {
        maint(client, Some(&id), enable, reason).await?;
    }
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

/// What `signpost acl token create` asks for.
pub struct NewToken {
    pub description: String,
    /// Policy names or IDs.
    pub policies: Vec<String>,
    pub node_identities: Vec<String>,
    pub service_identities: Vec<String>,
    /// A Go duration.
    pub ttl: Option<String>,
    /// A role from before policies (its built-in policy).
    pub role: Option<String>,
}

/// `signpost acl token create`.
pub async fn token_create(client: &Client, new: NewToken, json: bool) -> anyhow::Result<()> {
    let mut body = serde_json::json!({
        "Description": new.description,
        "Policies": new.policies.iter().map(|p| serde_json::json!({"Name": p})).collect::<Vec<_>>(),
        "NodeIdentities": new.node_identities.iter().map(|n| serde_json::json!({"NodeName": n})).collect::<Vec<_>>(),
        "ServiceIdentities": new.service_identities.iter().map(|n| serde_json::json!({"ServiceName": n})).collect::<Vec<_>>(),
    });
    if let Some(ttl) = new.ttl {
        body["ExpirationTTL"] = Value::String(ttl);
    }
    if let Some(role) = new.role {
        body["Role"] = Value::String(role);
    }
    let token = client
        .put_body("/v1/acl/token", &body, "create the token")
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&token)?);
    } else {
        table(
            &["ACCESSOR", "GRANTS", "SECRET (shown once)"],
            vec![vec![
                str_of(&token, "AccessorID").to_string(),
                grants(&token),
                str_of(&token, "SecretID").to_string(),
            ]],
        );
    }
    Ok(())
}

/// A token's policies and identities, in one cell.
fn grants(token: &Value) -> String {
    let names = |key: &str, field: &str, prefix: &str| -> Vec<String> {
        token
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|v| format!("{prefix}{}", str_of(v, field)))
            .collect()
    };
    let mut all = names("Policies", "Name", "");
    all.extend(names("NodeIdentities", "NodeName", "node:"));
    all.extend(names("ServiceIdentities", "ServiceName", "service:"));
    all.join(",")
}

/// `signpost acl policy create`: `rules` is HCL or JSON, or `@file`.
pub async fn policy_create(
    client: &Client,
    name: &str,
    description: &str,
    rules: &str,
    json: bool,
) -> anyhow::Result<()> {
    let rules = match rules.strip_prefix('@') {
        Some(file) => std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the rules file {file}"))?,
        None => rules.to_string(),
    };
    let body = serde_json::json!({"Name": name, "Description": description, "Rules": rules});
    let policy = client
        .put_body("/v1/acl/policy", &body, "create the policy")
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&policy)?);
    } else {
        println!(
            "policy {} created: {}",
            str_of(&policy, "Name"),
            str_of(&policy, "ID")
        );
    }
    Ok(())
}

/// `signpost acl policy list`.
pub async fn policy_list(client: &Client, json: bool) -> anyhow::Result<()> {
    let policies = client.get("/v1/acl/policies").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&policies)?);
        return Ok(());
    }
    let rows = policies
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                str_of(p, "ID").to_string(),
                str_of(p, "Name").to_string(),
                str_of(p, "Description").to_string(),
            ]
        })
        .collect();
    table(&["ID", "NAME", "DESCRIPTION"], rows);
    Ok(())
}

/// `signpost acl policy delete`.
pub async fn policy_delete(client: &Client, id: &str) -> anyhow::Result<()> {
    client
        .delete(&format!("/v1/acl/policy/{id}"), "delete the policy")
        .await?;
    println!("policy {id} deleted");
    Ok(())
}

/// `signpost acl token list`.
pub async fn token_list(client: &Client, json: bool) -> anyhow::Result<()> {
    let tokens = client.get("/v1/acl/tokens").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    let rows = tokens
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            vec![
                str_of(t, "AccessorID").to_string(),
                grants(t),
                str_of(t, "CreatedBy").to_string(),
                str_of(t, "Description").to_string(),
            ]
        })
        .collect();
    table(&["ACCESSOR", "GRANTS", "CREATED BY", "DESCRIPTION"], rows);
    Ok(())
}

/// `signpost acl token delete`.
pub async fn token_delete(client: &Client, accessor: &str) -> anyhow::Result<()> {
    client
        .delete(&format!("/v1/acl/token/{accessor}"), "delete the token")
        .await?;
    println!("token {accessor} deleted");
    Ok(())
}

/// `signpost audit`: the newest entries of the control plane's audit log.
pub async fn audit(client: &Client, limit: usize, json: bool) -> anyhow::Result<()> {
    let entries = client.get(&format!("/v1/audit?limit={limit}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let rows = entries
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let who = match str_of(e, "who") {
                "" => "-",
                w => w,
            };
            vec![
                e.get("time")
                    .and_then(Value::as_u64)
                    .map_or(String::new(), ago),
                who.to_string(),
                str_of(e, "action").to_string(),
                str_of(e, "target").to_string(),
                str_of(e, "outcome").to_string(),
                str_of(e, "reason").to_string(),
            ]
        })
        .collect();
    table(
        &["TIME", "WHO", "ACTION", "TARGET", "OUTCOME", "REASON"],
        rows,
    );
    Ok(())
}

/// How long ago a Unix time in milliseconds was, e.g. `1m30s ago`.
fn ago(unix_millis: u64) -> String {
    let now = signpost_core::command::now_millis();
    let elapsed = std::time::Duration::from_secs(now.saturating_sub(unix_millis) / 1000);
    format!("{} ago", signpost_core::duration::format(elapsed))
}
