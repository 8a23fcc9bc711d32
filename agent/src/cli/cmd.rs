//! `signpost cmd ...`: operator commands on the control plane (an
//! operator token is needed to create or revoke them).

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Client, ago, str_of, table};

/// What every new command carries.
pub struct Common<'a> {
    pub service: &'a str,
    /// Only the agents on hosts running these services apply it.
    pub callers: &'a [String],
    /// Only requests under this path prefix (and with this method).
    pub path: Option<&'a str>,
    pub method: Option<&'a str>,
    pub reason: &'a str,
    pub ttl: Duration,
    pub json: bool,
}

/// Creates a command with `action` and prints it.
pub async fn create(
    client: &Client,
    common: &Common<'_>,
    action: Value,
    instance: Option<&str>,
) -> anyhow::Result<()> {
    let mut target = json!({ "service": common.service, "callers": common.callers });
    if let Some(path) = common.path {
        target["route"] =
            json!({ "path_prefix": path, "method": common.method.map(str::to_ascii_uppercase) });
    }
    if let Some(instance) = instance {
        target["instance"] = json!(instance);
    }
    let body = json!({
        "action": action,
        "target": target,
        "reason": common.reason,
        "ttl": signpost_core::duration::format(common.ttl),
    });
    let command = client
        .post_body("/v1/commands", &body, "create the command")
        .await?;
    print(&[command], common.json)
}

/// `signpost cmd unblock`: revokes the blocks of that instance.
pub async fn unblock(client: &Client, service: &str, instance: &str) -> anyhow::Result<()> {
    let active = client
        .get(&format!("/v1/commands?service={service}&state=active"))
        .await?;
    let blocks: Vec<String> = active
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["action"]["kind"] == "block" && c["target"]["instance"] == instance)
        .map(|c| str_of(c, "id").to_string())
        .collect();
    if blocks.is_empty() {
        anyhow::bail!("{instance} of {service} is not blocked");
    }
    for id in &blocks {
        revoke(client, id).await?;
    }
    Ok(())
}

pub async fn revoke(client: &Client, id: &str) -> anyhow::Result<()> {
    client
        .delete(&format!("/v1/commands/{id}"), "revoke the command")
        .await?;
    println!("command {id} revoked");
    Ok(())
}

pub async fn list(
    client: &Client,
    service: Option<&str>,
    state: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let mut query = Vec::new();
    if let Some(s) = service {
        query.push(format!("service={s}"));
    }
    if let Some(s) = state {
        query.push(format!("state={s}"));
    }
    let commands = client
        .get(&format!("/v1/commands?{}", query.join("&")))
        .await?;
    print(commands.as_array().map_or(&[][..], Vec::as_slice), json)
}

pub async fn show(client: &Client, id: &str, json: bool) -> anyhow::Result<()> {
    let command = client.get(&format!("/v1/commands/{id}")).await?;
    print(&[command], json)
}

fn print(commands: &[Value], json: bool) -> anyhow::Result<()> {
    if json {
        let text = match commands {
            [one] => serde_json::to_string_pretty(one),
            all => serde_json::to_string_pretty(all),
        };
        println!("{}", text.context("cannot print the commands")?);
        return Ok(());
    }
    let rows = commands
        .iter()
        .map(|c| {
            let target = match c["target"]["instance"].as_str() {
                Some(i) => format!("{} {i}", str_of(&c["target"], "service")),
                None => str_of(&c["target"], "service").to_string(),
            };
            let expires = c["expires_at"].as_u64().map_or(String::new(), |t| {
                let now = signpost_core::command::now_millis();
                if t > now {
                    format!(
                        "in {}",
                        signpost_core::duration::format(Duration::from_secs((t - now) / 1000))
                    )
                } else {
                    ago(t)
                }
            });
            vec![
                str_of(c, "id").to_string(),
                str_of(&c["action"], "kind").to_string(),
                target,
                str_of(c, "state").to_string(),
                format!(
                    "{} of {} ({} using it)",
                    c["applied"].as_u64().unwrap_or(0),
                    c["agents_connected"].as_u64().unwrap_or(0),
                    c["agents_subscribed"].as_u64().unwrap_or(0)
                ),
                expires,
                str_of(c, "reason").to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "KIND", "TARGET", "STATE", "APPLIED", "EXPIRES", "REASON",
        ],
        rows,
    );
    Ok(())
}
