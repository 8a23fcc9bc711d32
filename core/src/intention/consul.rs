//! Consul's `/v1/connect/intentions` JSON: the body a create or update
//! sends ([`parse_consul`]) and the record reads return
//! ([`Intention::to_consul_json`]), so that Consul's CLI, API clients and
//! Terraform provider work unchanged.

use serde_json::{Map, Value, json};

use super::{Action, HeaderMatch, HttpMatch, Intention, Permission};
use crate::request::{Fields, bad, normalize, object};

/// Top-level fields Signpost reads (normalised: lowercase, no `_`/`-`).
const FIELDS: &[&str] = &[
    "sourcename",
    "destinationname",
    "sourcetype",
    "action",
    "permissions",
    "description",
    "meta",
    "shadow",
];
/// Consul's fields that Signpost accepts with the value it implies
/// (checked in [`parse_consul`]).
const SCOPES: &[(&str, &str)] = &[
    ("sourcens", "SourceNS"),
    ("destinationns", "DestinationNS"),
    ("sourcepartition", "SourcePartition"),
    ("destinationpartition", "DestinationPartition"),
    ("sourcepeer", "SourcePeer"),
];
/// Consul's fields that the server assigns or that mean nothing here: a
/// client echoing a record back may send them.
const IGNORED: &[&str] = &[
    "id",
    "precedence",
    "createindex",
    "modifyindex",
    "createdat",
    "updatedat",
    "hash",
    "legacyid",
    "legacymeta",
    "defaultaddr",
    "defaultport",
];
const PERMISSION_FIELDS: &[&str] = &["action", "http"];
const HTTP_FIELDS: &[&str] = &["pathexact", "pathprefix", "pathregex", "methods", "header"];
const HEADER_FIELDS: &[&str] = &[
    "name", "present", "exact", "prefix", "suffix", "regex", "invert",
];

/// How [`crate::request`] normalises a field name.
fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Reads a `POST /v1/connect/intentions` (or `PUT .../<id>`) body, any key
/// casing, as Consul's legacy API takes it, plus Signpost's `Shadow` and,
/// unlike Consul's legacy API, `Permissions`. The result is validated;
/// its ID and times are the store's to fill in.
///
/// Fields a server assigns (`ID`, `Precedence`, indexes, times, `Hash`,
/// `LegacyID`, `LegacyMeta`) are ignored; namespaces and partitions must be
/// empty or `default`, `SourcePeer` empty and `SourceType` empty or
/// `consul`; any other field is an error that names it.
pub fn parse_consul(body: &[u8]) -> Result<Intention, String> {
    let raw: Value =
        serde_json::from_slice(body).map_err(|e| format!("Request decode failed: {e}"))?;
    unknown_fields(&raw)?;
    let mut f = object(normalize(raw), "the intention")?;
    for (key, field) in SCOPES {
        let value = f.string(key)?.unwrap_or_default();
        let fits = match *key {
            "sourcepeer" => value.is_empty(),
            _ => value.is_empty() || value == "default",
        };
        if !fits {
            return Err(format!(
                "{field} {value:?} is not supported: Signpost has one namespace and partition (\"default\") and no peers"
            ));
        }
    }
    match f.string("sourcetype")?.as_deref() {
        None | Some("") | Some("consul") => {}
        Some(_) => return Err("SourceType must be set to 'consul'".to_string()),
    }
    let action = match f.string("action")?.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            Action::parse(text)
                .ok_or_else(|| "Action must be set to 'allow' or 'deny'".to_string())?,
        ),
    };
    let permissions = match f.take("permissions") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| permission(i, item))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("Permissions", "a list of permissions")),
    };
    let intention = Intention {
        id: String::new(),
        source: f.string("sourcename")?.unwrap_or_default(),
        destination: f.string("destinationname")?.unwrap_or_default(),
        action,
        permissions,
        shadow: f.bool("shadow")?,
        description: f.string("description")?.unwrap_or_default(),
        meta: f.string_map("meta")?,
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    intention.validate()?;
    Ok(intention)
}

/// Names the first field Signpost does not know, as the client spelled
/// it, at any depth.
fn unknown_fields(raw: &Value) -> Result<(), String> {
    let Value::Object(top) = raw else {
        return Ok(()); // `object` says what is wrong
    };
    let known = |k: &str| {
        FIELDS.contains(&k) || IGNORED.contains(&k) || SCOPES.iter().any(|(s, _)| *s == k)
    };
    check_keys(top, "", known)?;
    let Some(Value::Array(permissions)) = get(top, "permissions") else {
        return Ok(());
    };
    for (i, p) in permissions.iter().enumerate() {
        let Value::Object(p) = p else { continue };
        let at = format!("Permissions[{i}]");
        check_keys(p, &at, |k| PERMISSION_FIELDS.contains(&k))?;
        let Some(Value::Object(http)) = get(p, "http") else {
            continue;
        };
        check_keys(http, &format!("{at}.HTTP"), |k| HTTP_FIELDS.contains(&k))?;
        let Some(Value::Array(headers)) = get(http, "header") else {
            continue;
        };
        for (k, h) in headers.iter().enumerate() {
            if let Value::Object(h) = h {
                check_keys(h, &format!("{at}.HTTP.Header[{k}]"), |k| {
                    HEADER_FIELDS.contains(&k)
                })?;
            }
        }
    }
    Ok(())
}

fn check_keys(
    map: &Map<String, Value>,
    at: &str,
    known: impl Fn(&str) -> bool,
) -> Result<(), String> {
    match map.keys().find(|k| !known(&norm(k))) {
        None => Ok(()),
        Some(k) if at.is_empty() => Err(format!("Request decode failed: unknown field {k:?}")),
        Some(k) => Err(format!(
            "Request decode failed: unknown field {k:?} in {at}"
        )),
    }
}

fn get<'v>(map: &'v Map<String, Value>, key: &str) -> Option<&'v Value> {
    map.iter().find(|(k, _)| norm(k) == key).map(|(_, v)| v)
}

/// A string field where empty means unset, as Consul's `omitempty`.
fn optional(f: &mut Fields, key: &str) -> Result<Option<String>, String> {
    Ok(f.string(key)?.filter(|s| !s.is_empty()))
}

fn permission(i: usize, item: Value) -> Result<Permission, String> {
    let at = format!("Permissions[{i}]");
    let mut p = object(item, &at)?;
    let action = p
        .string("action")?
        .as_deref()
        .and_then(Action::parse)
        .ok_or_else(|| format!("{at}.Action must be set to 'allow' or 'deny'"))?;
    let Some(http) = p.take("http") else {
        return Err(format!("{at}.HTTP is required"));
    };
    let at = format!("{at}.HTTP");
    let mut h = object(http, &at)?;
    let headers = match h.take("header") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            // `Header` is one of the keys [`normalize`] leaves as sent.
            .map(|(k, item)| header(&format!("{at}.Header[{k}]"), normalize(item)))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("Header", "a list of header matches")),
    };
    let http = HttpMatch {
        path_exact: optional(&mut h, "pathexact")?,
        path_prefix: optional(&mut h, "pathprefix")?,
        path_regex: optional(&mut h, "pathregex")?,
        // Consul uppercases methods before it validates them.
        methods: h
            .strings("methods")?
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect(),
        headers,
    };
    Ok(Permission { action, http })
}

fn header(at: &str, item: Value) -> Result<HeaderMatch, String> {
    let mut h = object(item, at)?;
    Ok(HeaderMatch {
        name: h.string("name")?.unwrap_or_default(),
        present: h.bool("present")?,
        exact: optional(&mut h, "exact")?,
        prefix: optional(&mut h, "prefix")?,
        suffix: optional(&mut h, "suffix")?,
        regex: optional(&mut h, "regex")?,
        invert: h.bool("invert")?,
    })
}

// === impl Intention ===

impl Intention {
    /// The record as Consul's `/v1/connect/intentions` reads return it,
    /// with its Raft-style indexes, plus Signpost's `Shadow`. Empty fields
    /// are left out as Consul's `omitempty` does (`Action` when
    /// permissions decide, times the store never set).
    pub fn to_consul_json(&self, create_index: u64, modify_index: u64) -> Value {
        let mut v = Map::new();
        v.insert("ID".into(), json!(self.id));
        if !self.description.is_empty() {
            v.insert("Description".into(), json!(self.description));
        }
        v.insert("SourceNS".into(), json!("default"));
        v.insert("SourceName".into(), json!(self.source));
        v.insert("DestinationNS".into(), json!("default"));
        v.insert("DestinationName".into(), json!(self.destination));
        v.insert("SourceType".into(), json!("consul"));
        if let Some(action) = self.action {
            v.insert("Action".into(), json!(action.as_str()));
        }
        if !self.permissions.is_empty() {
            let permissions: Vec<Value> = self.permissions.iter().map(permission_json).collect();
            v.insert("Permissions".into(), Value::Array(permissions));
        }
        v.insert("Meta".into(), json!(self.meta));
        v.insert("Precedence".into(), json!(self.precedence()));
        if self.created_at_ms > 0 {
            v.insert("CreatedAt".into(), json!(rfc3339(self.created_at_ms)));
        }
        if self.updated_at_ms > 0 {
            v.insert("UpdatedAt".into(), json!(rfc3339(self.updated_at_ms)));
        }
        v.insert("CreateIndex".into(), json!(create_index));
        v.insert("ModifyIndex".into(), json!(modify_index));
        v.insert("Shadow".into(), json!(self.shadow));
        Value::Object(v)
    }
}

fn permission_json(p: &Permission) -> Value {
    let mut http = Map::new();
    let mut put = |key: &str, value: &Option<String>| {
        if let Some(value) = value {
            http.insert(key.into(), json!(value));
        }
    };
    put("PathExact", &p.http.path_exact);
    put("PathPrefix", &p.http.path_prefix);
    put("PathRegex", &p.http.path_regex);
    if !p.http.headers.is_empty() {
        let headers: Vec<Value> = p.http.headers.iter().map(header_json).collect();
        http.insert("Header".into(), Value::Array(headers));
    }
    if !p.http.methods.is_empty() {
        http.insert("Methods".into(), json!(p.http.methods));
    }
    json!({"Action": p.action.as_str(), "HTTP": http})
}

fn header_json(h: &HeaderMatch) -> Value {
    let mut v = Map::new();
    v.insert("Name".into(), json!(h.name));
    if h.present {
        v.insert("Present".into(), json!(true));
    }
    for (key, value) in [
        ("Exact", &h.exact),
        ("Prefix", &h.prefix),
        ("Suffix", &h.suffix),
        ("Regex", &h.regex),
    ] {
        if let Some(value) = value {
            v.insert(key.into(), json!(value));
        }
    }
    if h.invert {
        v.insert("Invert".into(), json!(true));
    }
    Value::Object(v)
}

/// Unix milliseconds as Go's `time.Time` marshals them in UTC (RFC 3339,
/// the fraction without trailing zeros): `2024-02-29T13:05:09.12Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let frac = ms % 1000;
    if frac > 0 {
        text.push('.');
        text.push_str(format!("{frac:03}").trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Howard Hinnant's `civil_from_days`, for days since 1970-01-01 (never
/// negative here, so unsigned arithmetic throughout).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{l4, l7, prefix};
    use super::*;

    #[test]
    fn reads_consuls_legacy_body_any_casing() {
        let i = parse_consul(
            br#"{"SourceName": "web", "DestinationName": "db", "SourceType": "consul",
                 "Action": "allow", "Description": "web reads", "Meta": {"Team-Name": "a"},
                 "SourceNS": "default", "DestinationNS": "", "ID": "ignored",
                 "Precedence": 1, "CreateIndex": 3, "CreatedAt": "2020-01-01T00:00:00Z",
                 "Shadow": true}"#,
        )
        .unwrap();
        assert_eq!(i.source, "web");
        assert_eq!(i.destination, "db");
        assert_eq!(i.action, Some(Action::Allow));
        assert_eq!(i.description, "web reads");
        assert_eq!(i.meta["Team-Name"], "a", "meta keys are data, kept as sent");
        assert!(i.shadow);
        assert!(i.id.is_empty());

        let i = parse_consul(
            br#"{"source_name": "*", "destination_name": "db", "permissions": [
                 {"action": "deny", "http": {"path_prefix": "/admin", "methods": ["post"],
                   "header": [{"name": "X-Debug", "present": true},
                              {"Name": "x-env", "Exact": "prod", "Invert": true}]}},
                 {"Action": "allow", "HTTP": {"PathRegex": "/v[0-9]/.*"}}]}"#,
        )
        .unwrap();
        assert_eq!(i.action, None);
        assert_eq!(i.permissions.len(), 2);
        let first = &i.permissions[0].http;
        assert_eq!(first.path_prefix.as_deref(), Some("/admin"));
        assert_eq!(
            first.methods,
            ["POST"],
            "methods are uppercased, as Consul does"
        );
        assert_eq!(first.headers[0].name, "X-Debug");
        assert!(first.headers[0].present);
        assert_eq!(first.headers[1].exact.as_deref(), Some("prod"));
        assert!(first.headers[1].invert);
        assert_eq!(i.permissions[1].action, Action::Allow);
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        for (body, says) in [
            (
                r#"{"SourceName":"web","DestinationName":"db","Action":"allow","Color":1}"#,
                "unknown field \"Color\"",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","SourceType":"external-uri","Action":"allow"}"#,
                "SourceType must be set to 'consul'",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","SourceNS":"team-a","Action":"allow"}"#,
                "SourceNS \"team-a\" is not supported",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","SourcePeer":"dc2","Action":"allow"}"#,
                "SourcePeer \"dc2\" is not supported",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Action":"permit"}"#,
                "Action must be set to 'allow' or 'deny'",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db"}"#,
                "Action must be set to 'allow' or 'deny'",
            ),
            (
                r#"{"DestinationName":"db","Action":"deny"}"#,
                "SourceName must be set",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Action":"deny","Permissions":[{"Action":"deny","HTTP":{"PathExact":"/"}}]}"#,
                "Action must be omitted if Permissions are specified",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":[{"Action":"deny"}]}"#,
                "Permissions[0].HTTP is required",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":[{"HTTP":{"PathExact":"/"}}]}"#,
                "Permissions[0].Action must be set",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":[{"Action":"deny","JWT":{}}]}"#,
                "unknown field \"JWT\" in Permissions[0]",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":[{"Action":"deny","HTTP":{"PathSuffix":"/"}}]}"#,
                "unknown field \"PathSuffix\" in Permissions[0].HTTP",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":[{"Action":"deny","HTTP":{"Header":[{"Name":"a","Contains":"b"}]}}]}"#,
                "unknown field \"Contains\" in Permissions[0].HTTP.Header[0]",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":[{"Action":"deny","HTTP":{"Methods":["FETCH"]}}]}"#,
                "Permissions[0].HTTP.Methods contains an invalid method \"FETCH\"",
            ),
            (
                r#"{"SourceName":"web","DestinationName":"db","Permissions":{}}"#,
                "field \"Permissions\": expected a list",
            ),
            (
                r#"{"SourceName":5,"DestinationName":"db","Action":"deny"}"#,
                "expected a string",
            ),
            (r#"[1]"#, "must be a JSON object"),
            ("", "Request decode failed"),
        ] {
            let e = parse_consul(body.as_bytes()).unwrap_err();
            assert!(e.contains(says), "{body}: {says:?} not in {e:?}");
        }
    }

    #[test]
    fn consul_json_round_trips() {
        let mut l7 = l7(
            "web",
            "db",
            vec![
                Permission {
                    action: Action::Deny,
                    http: HttpMatch {
                        path_regex: Some("/admin/.*".into()),
                        methods: vec!["DELETE".into(), "PUT".into()],
                        headers: vec![
                            HeaderMatch {
                                name: "x-a".into(),
                                present: true,
                                invert: true,
                                ..HeaderMatch::default()
                            },
                            HeaderMatch {
                                name: "x-b".into(),
                                suffix: Some(".z".into()),
                                ..HeaderMatch::default()
                            },
                        ],
                        ..HttpMatch::default()
                    },
                },
                prefix(Action::Allow, "/"),
            ],
        );
        l7.shadow = true;
        l7.description = "db guards its admin API".into();
        l7.meta.insert("owner".into(), "dba".into());
        let mut l4 = l4("*", "db", Action::Deny);
        l4.id = "8f3c".into();
        l4.created_at_ms = 1_709_211_909_120;
        l4.updated_at_ms = 1_709_211_910_000;
        for mut i in [l7, l4] {
            let json = i.to_consul_json(5, 7);
            assert_eq!(json["SourceNS"], "default");
            assert_eq!(json["SourceType"], "consul");
            assert_eq!(json["Precedence"], i.precedence());
            assert_eq!(json["CreateIndex"], 5);
            assert_eq!(json["ModifyIndex"], 7);
            assert_eq!(json["Shadow"], i.shadow);
            let back = parse_consul(json.to_string().as_bytes()).unwrap();
            i.id.clear();
            i.created_at_ms = 0;
            i.updated_at_ms = 0;
            assert_eq!(back, i, "{json}");
        }
        let l4 = super::super::tests::l4("web", "db", Action::Allow);
        let json = l4.to_consul_json(1, 1);
        assert_eq!(json["Action"], "allow");
        assert!(json.get("Permissions").is_none());
        assert!(json.get("CreatedAt").is_none(), "Go leaves zero times out");
        let l7 = super::super::tests::l7("web", "db", vec![prefix(Action::Deny, "/x")]);
        let json = l7.to_consul_json(1, 1);
        assert!(json.get("Action").is_none());
        assert_eq!(
            json["Permissions"],
            json!([{"Action": "deny", "HTTP": {"PathPrefix": "/x"}}])
        );
    }

    #[test]
    fn times_are_rfc3339_as_go_writes_them() {
        assert_eq!(rfc3339(1), "1970-01-01T00:00:00.001Z");
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_709_211_909_120), "2024-02-29T13:05:09.12Z");
        assert_eq!(rfc3339(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(4_102_444_800_000), "2100-01-01T00:00:00Z");
    }
}
