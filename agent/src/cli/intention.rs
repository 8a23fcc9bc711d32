//! `signpost intention ...`: the mesh's intentions on the control plane
//! (`/v1/connect/intentions`), as `consul intention` manages them.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Client, Invalid, encode, str_of, table};

/// Exit code of `intention check` for a denied connection (Consul's).
pub const EXIT_NOT_ALLOWED: u8 = 1;
/// Exit code of `intention check` when it could not tell (Consul's 2:
/// 1 means denied).
pub const EXIT_CHECK_FAILED: u8 = 2;

/// What `signpost intention create` asks for.
pub struct NewIntention<'a> {
    pub source: &'a str,
    pub destination: &'a str,
    pub deny: bool,
    pub shadow: bool,
    pub description: &'a str,
    /// A file with Consul's `Permissions` array (L7): the intention then
    /// has no action of its own.
    pub permissions: Option<&'a Path>,
}

/// The permissions in `text`: Consul's `Permissions` array, or an object
/// that holds one (a whole intention, say).
fn permissions(text: &str, file: &Path) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Invalid(format!("{}: not JSON: {e}", file.display())))?;
    let list = match value {
        Value::Array(_) => value,
        Value::Object(map) => map
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("permissions"))
            .map(|(_, v)| v)
            .unwrap_or(Value::Null),
        _ => Value::Null,
    };
    match list {
        Value::Array(items) if !items.is_empty() => Ok(Value::Array(items)),
        _ => Err(Invalid(format!(
            "{}: expected Consul's Permissions, a non-empty JSON array ([{{\"Action\": \"allow\", \"HTTP\": {{\"PathPrefix\": \"/\"}}}}])",
            file.display()
        ))
        .into()),
    }
}

/// The body of a new intention.
fn body(new: &NewIntention<'_>) -> anyhow::Result<Value> {
    let mut body = json!({
        "SourceName": new.source,
        "DestinationName": new.destination,
        "Description": new.description,
        "Shadow": new.shadow,
    });
    match new.permissions {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the permissions file {}", file.display()))?;
            body["Permissions"] = permissions(&text, file)?;
        }
        None => body["Action"] = json!(if new.deny { "deny" } else { "allow" }),
    }
    Ok(body)
}

/// `signpost intention create`.
pub async fn create(client: &Client, new: &NewIntention<'_>) -> anyhow::Result<()> {
    let body = body(new)?;
    let created = client
        .post_body("/v1/connect/intentions", &body, "create the intention")
        .await?;
    let does = match body.get("Permissions").and_then(Value::as_array) {
        Some(p) => format!("{} HTTP permissions", p.len()),
        None => str_of(&body, "Action").to_string(),
    };
    println!(
        "Created: {} => {} ({does}), ID {}",
        new.source,
        new.destination,
        str_of(&created, "ID")
    );
    Ok(())
}

/// What an intention does, in one cell: `allow`, `deny`, or
/// `L7 (n permissions)` when HTTP permissions decide.
pub fn action(intention: &Value) -> String {
    match intention.get("Permissions").and_then(Value::as_array) {
        Some(p) if p.len() == 1 => "L7 (1 permission)".to_string(),
        Some(p) if !p.is_empty() => format!("L7 ({} permissions)", p.len()),
        _ => str_of(intention, "Action").to_string(),
    }
}

/// The rows of `signpost intention list`, in the order given (Consul's:
/// the first that matches a call applies).
fn rows(intentions: &Value) -> Vec<Vec<String>> {
    intentions
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                str_of(i, "ID").to_string(),
                str_of(i, "SourceName").to_string(),
                str_of(i, "DestinationName").to_string(),
                action(i),
                if i["Shadow"] == Value::Bool(true) {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
                i["Precedence"].as_u64().unwrap_or(0).to_string(),
            ]
        })
        .collect()
}

/// `signpost intention list`.
pub async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let intentions = client.get("/v1/connect/intentions").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&intentions)?);
        return Ok(());
    }
    table(
        &[
            "ID",
            "SOURCE",
            "DESTINATION",
            "ACTION",
            "SHADOW",
            "PRECEDENCE",
        ],
        rows(&intentions),
    );
    Ok(())
}

fn exact(source: &str, destination: &str) -> String {
    format!(
        "source={}&destination={}",
        encode(source),
        encode(destination)
    )
}

/// `signpost intention delete`.
pub async fn delete(client: &Client, source: &str, destination: &str) -> anyhow::Result<()> {
    client
        .delete(
            &format!(
                "/v1/connect/intentions/exact?{}",
                exact(source, destination)
            ),
            "delete the intention",
        )
        .await?;
    println!("Intention {source} => {destination} deleted");
    Ok(())
}

/// `signpost intention check`: whether a connection from `source` to
/// `destination` is allowed (printed `Allowed` or `Denied`).
pub async fn check(client: &Client, source: &str, destination: &str) -> anyhow::Result<bool> {
    let answer = client
        .get(&format!(
            "/v1/connect/intentions/check?{}",
            exact(source, destination)
        ))
        .await?;
    let allowed = answer
        .get("Allowed")
        .and_then(Value::as_bool)
        .context("the control plane's answer has no Allowed")?;
    println!("{}", if allowed { "Allowed" } else { "Denied" });
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_action_column_says_what_decides() {
        assert_eq!(action(&json!({"Action": "allow"})), "allow");
        assert_eq!(
            action(&json!({"Action": "deny", "Permissions": []})),
            "deny"
        );
        let one = json!({"Permissions": [{"Action": "deny", "HTTP": {"PathPrefix": "/admin"}}]});
        assert_eq!(action(&one), "L7 (1 permission)");
        let two = json!({"Permissions": [{}, {}]});
        assert_eq!(action(&two), "L7 (2 permissions)");
        let rows = rows(&json!([
            {"ID": "a", "SourceName": "web", "DestinationName": "db", "Action": "allow",
             "Shadow": false, "Precedence": 9},
            {"ID": "b", "SourceName": "*", "DestinationName": "db", "Permissions": [{}, {}, {}],
             "Shadow": true, "Precedence": 8},
        ]));
        assert_eq!(rows[0], ["a", "web", "db", "allow", "no", "9"]);
        assert_eq!(rows[1], ["b", "*", "db", "L7 (3 permissions)", "yes", "8"]);
    }

    #[test]
    fn new_intentions_are_consuls_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let new = NewIntention {
            source: "web",
            destination: "db",
            deny: true,
            shadow: true,
            description: "no",
            permissions: None,
        };
        let b = body(&new).unwrap();
        assert_eq!(b["Action"], "deny");
        assert_eq!(b["Shadow"], true);
        assert!(b.get("Permissions").is_none());

        let file = dir.path().join("p.json");
        std::fs::write(
            &file,
            r#"[{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]"#,
        )
        .unwrap();
        let b = body(&NewIntention {
            permissions: Some(&file),
            deny: false,
            ..new
        })
        .unwrap();
        assert!(b.get("Action").is_none(), "permissions decide instead");
        assert_eq!(b["Permissions"][0]["HTTP"]["PathPrefix"], "/");

        std::fs::write(&file, r#"{"permissions": [{"Action": "deny"}]}"#).unwrap();
        let b = body(&NewIntention {
            permissions: Some(&file),
            ..new
        })
        .unwrap();
        assert_eq!(b["Permissions"][0]["Action"], "deny");

        for bad in ["{", "[]", "{\"Action\": \"allow\"}", "3"] {
            std::fs::write(&file, bad).unwrap();
            let e = body(&NewIntention {
                permissions: Some(&file),
                ..new
            })
            .unwrap_err();
            assert!(e.downcast_ref::<Invalid>().is_some(), "{bad}: {e}");
        }
        let missing = dir.path().join("missing.json");
        assert!(
            body(&NewIntention {
                permissions: Some(&missing),
                ..new
            })
            .is_err()
        );
    }

    #[test]
    fn pairs_are_url_encoded() {
        assert_eq!(exact("*", "db"), "source=*&destination=db");
        assert_eq!(exact("a b", "db"), "source=a+b&destination=db");
    }
}
