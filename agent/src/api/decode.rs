//! Consul request bodies into the model (read with
//! [`signpost_core::request`], which normalises their field names).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use signpost_core::model::{
    CheckDefinition, CheckId, CheckKind, DEFAULT_OUTPUT_MAX_SIZE, Health, MIN_CHECK_INTERVAL,
    Protocol, ServiceDefinition, ServiceId, ServiceName, TaggedAddress, Weights,
};
pub(crate) use signpost_core::request::body;
#[cfg(test)]
use signpost_core::request::normalize;
use signpost_core::request::{Fields, bad, object};

/// `PUT /v1/agent/service/register`.
pub(crate) fn service(value: Value) -> Result<ServiceDefinition, String> {
    let mut f = object(value, "the service definition")?;
    let name = f.string("name")?.unwrap_or_default();
    let id = f
        .string("id")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    let mut tags = f.strings("tags")?;
    // Legacy single `tag`.
    if let Some(tag) = f.string("tag")? {
        tags.push(tag);
    }
    let port = match f.take("port") {
        None => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| bad("Port", "a port number (0-65535)"))?,
        Some(_) => return Err(bad("Port", "a number")),
    };
    let tagged_addresses = match f.take("taggedaddresses") {
        None => BTreeMap::new(),
        Some(Value::Object(map)) => {
            let mut out = BTreeMap::new();
            for (tag, v) in map {
                let mut a = object(v, "a tagged address")?;
                let address = a.string("address")?.unwrap_or_default();
                let port = a.u32("port")?;
                let port =
                    u16::try_from(port).map_err(|_| bad("TaggedAddresses", "a port number"))?;
                out.insert(tag, TaggedAddress { address, port });
            }
            out
        }
        Some(_) => return Err(bad("TaggedAddresses", "an object")),
    };
    let weights = match f.take("weights") {
        None => Weights::default(),
        Some(v) => {
            let mut w = object(v, "Weights")?;
            Weights {
                passing: w.u32("passing")?,
                warning: w.u32("warning")?,
            }
        }
    };
    // Signpost's `Protocol`, else Consul's convention a library can send:
    // `Meta: {"protocol": "http"}`.
    let protocol_field = f.string("protocol")?;
    let from_meta = match f.peek("meta") {
        Some(Value::Object(meta)) => meta
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("protocol"))
            .and_then(|(_, v)| v.as_str().map(str::to_ascii_lowercase)),
        _ => None,
    };
    let protocol = match protocol_field
        .filter(|p| !p.is_empty())
        .or(from_meta)
        .as_deref()
    {
        None | Some("") | Some("tcp") => Protocol::Tcp,
        Some("http") => Protocol::Http,
        Some("http2") => Protocol::Http2,
        Some("grpc") => Protocol::Grpc,
        Some(other) => {
            return Err(format!(
                "Invalid protocol {other:?}: expected tcp, http, http2 or grpc"
            ));
        }
    };
    if let Some(kind) = f.string("kind")?
        && !kind.is_empty()
    {
        return Err(format!(
            "Unsupported service kind {kind:?}: Signpost registers typical services only"
        ));
    }
    let mut checks = Vec::new();
    if let Some(check) = f.take("check") {
        checks.push(self::check(check, false)?);
    }
    match f.take("checks") {
        None => {}
        Some(Value::Array(items)) => {
            for item in items {
                checks.push(self::check(item, false)?);
            }
        }
        Some(_) => return Err(bad("Checks", "a list of checks")),
    }
    Ok(ServiceDefinition {
        id: ServiceId::new(id),
        name: ServiceName::new(name),
        address: f.string("address")?.unwrap_or_default(),
        port,
        tags,
        meta: f.string_map("meta")?,
        tagged_addresses,
        zone: f.string("zone")?.filter(|z| !z.is_empty()),
        weights,
        protocol,
        enable_tag_override: f.bool("enabletagoverride")?,
        checks,
        connect: connect(f.take("connect"))?,
        // Service files only: the API has no unit to drain on.
        drain: None,
    })
}

/// Whether a registration asks to be meshed: Consul's `Connect` with a
/// `SidecarService` (Signpost's inbound listener is every service's
/// sidecar) or `Native`, or `true`/`false`; `None` when it says nothing.
fn connect(value: Option<Value>) -> Result<Option<bool>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::Object(connect)) => Ok(Some(connect.iter().any(|(k, v)| {
            (k.eq_ignore_ascii_case("sidecarservice") && !v.is_null())
                || (k.eq_ignore_ascii_case("native") && v.as_bool() == Some(true))
        }))),
        Some(_) => Err(bad(
            "Connect",
            "an object ({\"SidecarService\": {}}) or a boolean",
        )),
    }
}

/// A check of a service registration, or of `PUT /v1/agent/check/register`
/// (`standalone`, which may name its `ServiceID`).
pub(crate) fn check(value: Value, standalone: bool) -> Result<CheckDefinition, String> {
    let mut f = object(value, "a check")?;
    let id = match f.string("checkid")? {
        Some(id) if !id.is_empty() => Some(id),
        _ => f.string("id")?.filter(|s| !s.is_empty()),
    };
    let name = f.string("name")?.unwrap_or_default();
    let service_id = if standalone {
        f.string("serviceid")?
            .filter(|s| !s.is_empty())
            .map(ServiceId::new)
    } else {
        None
    };
    let kind = check_kind(&mut f)?;
    let is_ttl = matches!(kind, CheckKind::Ttl { .. });
    let interval = match f.duration("interval")? {
        _ if is_ttl => Duration::ZERO,
        None => {
            return Err(
                "Invalid check: Interval is required for HTTP, TCP, GRPC and Args checks"
                    .to_string(),
            );
        }
        // Consul clamps intervals below its minimum rather than refusing.
        Some(i) => i.max(MIN_CHECK_INTERVAL),
    };
    let initial_status = match f.string("status")?.filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            s.parse::<Health>()
                .map_err(|e| format!("Invalid check: {e}"))?,
        ),
    };
    let output_max_size = match f.u32("outputmaxsize")? {
        0 => DEFAULT_OUTPUT_MAX_SIZE,
        n => n as usize,
    };
    Ok(CheckDefinition {
        id: id.map(CheckId::new),
        name,
        notes: f.string("notes")?.unwrap_or_default(),
        service_id,
        kind,
        interval,
        timeout: f.duration("timeout")?.filter(|t| !t.is_zero()),
        initial_status,
        success_before_passing: f.u32("successbeforepassing")?,
        failures_before_warning: f.u32("failuresbeforewarning")?,
        failures_before_critical: f.u32("failuresbeforecritical")?,
        deregister_critical_after: f.duration("deregistercriticalserviceafter")?,
        output_max_size,
    })
}

/// A check's kind: exactly one of HTTP, TCP, GRPC, Args or TTL, with the
/// fields that go with it.
fn check_kind(f: &mut Fields) -> Result<CheckKind, String> {
    for unsupported in [
        "script",
        "dockercontainerid",
        "h2ping",
        "udp",
        "aliasnode",
        "aliasservice",
        "osservice",
    ] {
        if f.take(unsupported).is_some() {
            return Err(format!(
                "Invalid check: {unsupported} checks are not supported by Signpost; use http, tcp, grpc, args or ttl"
            ));
        }
    }
    let tls_skip_verify = f.bool("tlsskipverify")?;
    let mut kinds = Vec::new();
    if let Some(url) = f.string("http")?.filter(|s| !s.is_empty()) {
        let headers = http_headers(f.take("header"))?;
        kinds.push(CheckKind::Http {
            url,
            method: f
                .string("method")?
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "GET".to_string()),
            headers,
            body: f.string("body")?.unwrap_or_default(),
            tls_skip_verify,
            tls_server_name: f.string("tlsservername")?.filter(|s| !s.is_empty()),
            disable_redirects: f.bool("disableredirects")?,
        });
    }
    if let Some(address) = f.string("tcp")?.filter(|s| !s.is_empty()) {
        kinds.push(CheckKind::Tcp { address });
    }
    if let Some(target) = f.string("grpc")?.filter(|s| !s.is_empty()) {
        kinds.push(CheckKind::Grpc {
            target,
            use_tls: f.bool("grpcusetls")?,
            tls_skip_verify,
        });
    }
    let mut args = f.strings("args")?;
    if args.is_empty() {
        args = f.strings("scriptargs")?;
    }
    if !args.is_empty() {
        kinds.push(CheckKind::Exec { args });
    }
    if let Some(ttl) = f.duration("ttl")? {
        kinds.push(CheckKind::Ttl { ttl });
    }
    match kinds.len() {
        1 => Ok(kinds.remove(0)),
        0 => Err("Invalid check: one of HTTP, TCP, GRPC, Args or TTL is required".to_string()),
        _ => Err("Invalid check: give only one of HTTP, TCP, GRPC, Args or TTL".to_string()),
    }
}

/// An HTTP check's `Header`: a map of string lists (a single string is
/// taken as a list of one).
fn http_headers(header: Option<Value>) -> Result<BTreeMap<String, Vec<String>>, String> {
    let headers = match header {
        None => BTreeMap::new(),
        Some(Value::Object(map)) => {
            let mut out = BTreeMap::new();
            for (k, v) in map {
                let values = match v {
                    Value::Array(items) => items
                        .into_iter()
                        .map(|i| match i {
                            Value::String(s) => Ok(s),
                            _ => Err(bad("Header", "a map of string lists")),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    Value::String(s) => vec![s],
                    _ => return Err(bad("Header", "a map of string lists")),
                };
                out.insert(k, values);
            }
            out
        }
        Some(_) => return Err(bad("Header", "a map of string lists")),
    };
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn protocol_comes_from_meta_when_not_given() {
        let def = service(normalize(
            json!({"Name": "web", "Port": 80, "Meta": {"protocol": "HTTP"}}),
        ))
        .unwrap();
        assert_eq!(def.protocol, Protocol::Http);
        let def = service(normalize(
            json!({"Name": "web", "Port": 80, "Protocol": "grpc", "Meta": {"protocol": "http"}}),
        ))
        .unwrap();
        assert_eq!(def.protocol, Protocol::Grpc, "the field wins");
        assert!(
            service(normalize(
                json!({"Name": "web", "Meta": {"protocol": "smtp"}})
            ))
            .is_err()
        );
    }

    #[test]
    fn pascal_lower_and_snake_case_decode_alike() {
        let pascal = json!({"ID": "r1", "Name": "redis", "Port": 8000, "Meta": {"Redis_Version": "4"},
            "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "90m"}});
        let lower = json!({"id": "r1", "name": "redis", "port": 8000, "meta": {"Redis_Version": "4"},
            "check": {"ttl": "10s", "deregister_critical_service_after": "90m"}});
        let a = service(normalize(pascal)).unwrap();
        let b = service(normalize(lower)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.meta.get("Redis_Version").map(String::as_str), Some("4"));
        assert_eq!(
            a.checks[0].deregister_critical_after,
            Some(Duration::from_secs(5400))
        );
    }

    #[test]
    fn numbers_are_nanoseconds_and_small_intervals_clamp() {
        let c = check(
            normalize(json!({"name": "s", "args": ["/bin/true"], "interval": 10})),
            true,
        )
        .unwrap();
        assert_eq!(c.interval, MIN_CHECK_INTERVAL);
        let c = check(
            normalize(json!({"Name": "t", "TTL": 5_000_000_000u64})),
            true,
        )
        .unwrap();
        assert_eq!(
            c.kind,
            CheckKind::Ttl {
                ttl: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn check_fields_map() {
        let c = check(
            normalize(json!({"ID": "web-http", "Name": "web", "ServiceID": "web-1", "HTTP": "http://127.0.0.1/h",
                "Method": "POST", "Header": {"X-A": ["1", "2"]}, "Interval": "5s", "Timeout": "1s",
                "TLSSkipVerify": true, "SuccessBeforePassing": 2, "FailuresBeforeCritical": 3, "Status": "passing"})),
            true,
        )
        .unwrap();
        assert_eq!(c.id, Some(CheckId::new("web-http")));
        assert_eq!(c.service_id, Some(ServiceId::new("web-1")));
        assert_eq!(c.success_before_passing, 2);
        assert_eq!(c.initial_status, Some(Health::Passing));
        match c.kind {
            CheckKind::Http {
                method,
                headers,
                tls_skip_verify,
                ..
            } => {
                assert_eq!(method, "POST");
                assert_eq!(headers["X-A"], ["1", "2"]);
                assert!(tls_skip_verify);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn what_signpost_register_sends_decodes_back() {
        let text = "service:\n  name: web\n  port: 80\n  tags: [a]\n  zone: z1\n  protocol: http\n  weights: {passing: 3, warning: 1}\n  meta: {Team: x}\n  checks:\n    - http: http://127.0.0.1/\n      interval: 5s\n      headers: {X-A: [\"1\"]}\n    - ttl: 1m\n      deregister_critical_after: 90m\n    - tcp: 127.0.0.1:80\n      interval: 10s\n      timeout: 2s\n    - grpc: 127.0.0.1:9000\n      interval: 10s\n    - args: [/bin/true]\n      interval: 30s\n";
        let mut def = signpost_core::service_file::parse("w.yaml", text)
            .unwrap()
            .remove(0);
        let sent =
            serde_json::to_value(signpost_core::consul::ServiceRegistration::from(&def)).unwrap();
        let mut back = service(normalize(sent)).unwrap();
        back.validate().unwrap();
        def.validate().unwrap();
        assert_eq!(back, def);
    }

    #[test]
    fn errors_name_the_field() {
        let e = service(normalize(json!({"Name": "x", "Port": "80"}))).unwrap_err();
        assert!(e.contains("Port"), "{e}");
        let e = check(normalize(json!({"Name": "x", "HTTP": "http://a/"})), true).unwrap_err();
        assert!(e.contains("Interval"), "{e}");
    }
}
