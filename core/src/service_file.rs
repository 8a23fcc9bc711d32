//! The service definition files in `services_dir/*.yaml`.
//!
//! ```yaml
//! services:
//!   - name: payments
//!     id: payments-1          # default: the name
//!     address: 127.0.0.1      # default: the node's advertise_addr
//!     port: 8080
//!     tags: [v1]
//!     meta: { team: billing }
//!     protocol: http          # tcp | http | http2 | grpc
//!     weights: { passing: 10, warning: 1 }
//!     checks:
//!       - http: http://127.0.0.1:8080/healthz
//!         interval: 5s
//!         timeout: 1s
//! ```
//!
//! A file holds one `service:` or a list of `services:`. A check names what
//! it probes with exactly one of `http`, `tcp`, `grpc`, `args` or `ttl`, the
//! same field names as Consul's check definitions.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::model::{
    CheckDefinition, CheckId, CheckKind, DEFAULT_OUTPUT_MAX_SIZE, DrainOnStop, Health,
    MAX_DRAIN_ON_STOP, Protocol, ServiceDefinition, ServiceId, ServiceName, TaggedAddress, Weights,
    valid_unit_name,
};
use crate::yaml::{self, YamlError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    service: Option<Spanned<ServiceSpec>>,
    services: Option<Vec<Spanned<ServiceSpec>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    id: Option<String>,
    #[serde(default)]
    address: String,
    port: Option<u16>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default)]
    tagged_addresses: BTreeMap<String, TaggedAddress>,
    zone: Option<String>,
    #[serde(default)]
    weights: WeightsSpec,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    enable_tag_override: bool,
    #[serde(default)]
    checks: Vec<Spanned<CheckSpec>>,
    /// Meshed (see [`ServiceDefinition::connect`]).
    connect: Option<bool>,
    drain: Option<Spanned<DrainSpec>>,
}

/// `drain:` (see [`DrainOnStop`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainSpec {
    unit: String,
    #[serde(default = "default_drain_timeout", with = "crate::duration::serde_go")]
    timeout: Duration,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct WeightsSpec {
    passing: u32,
    warning: u32,
}

impl Default for WeightsSpec {
    fn default() -> Self {
        let w = Weights::default();
        WeightsSpec {
            passing: w.passing,
            warning: w.warning,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSpec {
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    notes: String,

    http: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, OneOrMany>,
    body: Option<String>,
    #[serde(default)]
    disable_redirects: bool,
    tcp: Option<String>,
    grpc: Option<String>,
    #[serde(default)]
    grpc_use_tls: bool,
    #[serde(default)]
    tls_skip_verify: bool,
    tls_server_name: Option<String>,
    args: Option<Vec<String>>,
    #[serde(default, with = "crate::duration::serde_go_opt")]
    ttl: Option<Duration>,

    #[serde(default, with = "crate::duration::serde_go_opt")]
    interval: Option<Duration>,
    #[serde(default, with = "crate::duration::serde_go_opt")]
    timeout: Option<Duration>,
    status: Option<Health>,
    #[serde(default)]
    success_before_passing: u32,
    #[serde(default)]
    failures_before_warning: u32,
    #[serde(default)]
    failures_before_critical: u32,
    #[serde(default, with = "crate::duration::serde_go_opt")]
    deregister_critical_after: Option<Duration>,
    output_max_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Parses and validates the text of one service file.
pub fn parse(file: &str, text: &str) -> Result<Vec<ServiceDefinition>, YamlError> {
    if text.trim().is_empty() {
        return Err(YamlError::new(
            file,
            0,
            0,
            "the file is empty: expected `service:` or `services:`",
        ));
    }
    let parsed: ServiceFile = yaml::from_str(file, text)?;
    let specs = match (parsed.service, parsed.services) {
        (Some(one), None) => vec![one],
        (None, Some(many)) => many,
        (Some(_), Some(_)) => {
            return Err(YamlError::new(
                file,
                0,
                0,
                "use either `service:` or `services:`, not both",
            ));
        }
        (None, None) => {
            return Err(YamlError::new(
                file,
                0,
                0,
                "expected `service:` or `services:`",
            ));
        }
    };
    let mut out: Vec<ServiceDefinition> = Vec::with_capacity(specs.len());
    for spec in specs {
        let at = |message: String| {
            YamlError::new(
                file,
                spec.referenced.line(),
                spec.referenced.column(),
                message,
            )
        };
        let def = spec.value.into_definition(file)?;
        let mut def = def;
        def.validate()
            .map_err(|e| at(format!("service {:?}: {e}", def.name.as_str())))?;
        if out.iter().any(|d| d.id == def.id) {
            return Err(at(format!(
                "service id {:?} appears twice in this file",
                def.id.as_str()
            )));
        }
        out.push(def);
    }
    Ok(out)
}

impl ServiceSpec {
    fn into_definition(self, file: &str) -> Result<ServiceDefinition, YamlError> {
        let mut checks = Vec::with_capacity(self.checks.len());
        for (i, check) in self.checks.into_iter().enumerate() {
            let (line, column) = (check.referenced.line(), check.referenced.column());
            let def = check.value.into_definition().map_err(|reason| {
                YamlError::new(
                    file,
                    line,
                    column,
                    format!("service {:?}: check {}: {reason}", self.name, i + 1),
                )
            })?;
            checks.push(def);
        }
        let drain = match self.drain {
            None => None,
            Some(spec) => {
                let (line, column) = (spec.referenced.line(), spec.referenced.column());
                let invalid = |reason: String| {
                    YamlError::new(
                        file,
                        line,
                        column,
                        format!("service {:?}: drain: {reason}", self.name),
                    )
                };
                let DrainSpec { unit, timeout } = spec.value;
                if !valid_unit_name(&unit) {
                    return Err(invalid(format!(
                        "unit {unit:?} is not a systemd service unit's name (such as payments.service)"
                    )));
                }
                if timeout.is_zero() || timeout > MAX_DRAIN_ON_STOP {
                    return Err(invalid(format!(
                        "timeout must be between 1ms and {}",
                        crate::duration::format(MAX_DRAIN_ON_STOP)
                    )));
                }
                Some(DrainOnStop { unit, timeout })
            }
        };
        Ok(ServiceDefinition {
            id: ServiceId::new(self.id.unwrap_or_else(|| self.name.clone())),
            name: ServiceName::new(self.name),
            address: self.address,
            port: self.port.unwrap_or(0),
            tags: self.tags,
            meta: self.meta,
            tagged_addresses: self.tagged_addresses,
            zone: self.zone,
            weights: Weights {
                passing: self.weights.passing,
                warning: self.weights.warning,
            },
            protocol: self.protocol,
            enable_tag_override: self.enable_tag_override,
            checks,
            connect: self.connect,
            drain,
        })
    }
}

impl CheckSpec {
    fn into_definition(self) -> Result<CheckDefinition, String> {
        let mut kinds = Vec::new();
        if let Some(url) = self.http {
            kinds.push(CheckKind::Http {
                url,
                method: self.method.unwrap_or_else(|| "GET".to_string()),
                headers: self
                    .headers
                    .into_iter()
                    .map(|(k, v)| {
                        let values = match v {
                            OneOrMany::One(s) => vec![s],
                            OneOrMany::Many(v) => v,
                        };
                        (k, values)
                    })
                    .collect(),
                body: self.body.unwrap_or_default(),
                tls_skip_verify: self.tls_skip_verify,
                tls_server_name: self.tls_server_name,
                disable_redirects: self.disable_redirects,
            });
        }
        if let Some(address) = self.tcp {
            kinds.push(CheckKind::Tcp { address });
        }
        if let Some(target) = self.grpc {
            kinds.push(CheckKind::Grpc {
                target,
                use_tls: self.grpc_use_tls,
                tls_skip_verify: self.tls_skip_verify,
            });
        }
        if let Some(args) = self.args {
            kinds.push(CheckKind::Exec { args });
        }
        if let Some(ttl) = self.ttl {
            kinds.push(CheckKind::Ttl { ttl });
        }
        let kind = match kinds.len() {
            1 => kinds.remove(0),
            0 => return Err("name what to probe with one of http, tcp, grpc, args or ttl".into()),
            _ => {
                return Err("give only one of http, tcp, grpc, args or ttl per check".into());
            }
        };
        let is_ttl = matches!(kind, CheckKind::Ttl { .. });
        if is_ttl && self.interval.is_some() {
            return Err("ttl checks take no interval: the application reports in".into());
        }
        Ok(CheckDefinition {
            id: self.id.map(CheckId::new),
            name: self.name,
            notes: self.notes,
            service_id: None,
            kind,
            interval: self.interval.unwrap_or(Duration::ZERO),
            timeout: self.timeout,
            initial_status: self.status,
            success_before_passing: self.success_before_passing,
            failures_before_warning: self.failures_before_warning,
            failures_before_critical: self.failures_before_critical,
            deregister_critical_after: self.deregister_critical_after,
            output_max_size: self.output_max_size.unwrap_or(DEFAULT_OUTPUT_MAX_SIZE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_service() {
        let text = "services:\n  - name: payments\n    id: payments-1\n    port: 8080\n    \
                    tags: [v1]\n    protocol: http\n    weights: { passing: 10, warning: 1 }\n    \
                    checks:\n      - http: http://127.0.0.1:8080/healthz\n        interval: 5s\n      \
                    - ttl: 30s\n";
        let defs = parse("p.yaml", text).unwrap();
        assert_eq!(defs.len(), 1);
        let d = &defs[0];
        assert_eq!(d.id.as_str(), "payments-1");
        assert_eq!(d.protocol, Protocol::Http);
        assert_eq!(d.weights.passing, 10);
        assert_eq!(d.checks.len(), 2);
        assert_eq!(
            d.checks[0].id.as_ref().map(|c| c.as_str()),
            Some("service:payments-1:1")
        );
        assert_eq!(d.checks[0].interval, Duration::from_secs(5));
    }

    #[test]
    fn drain_names_a_unit_with_a_bounded_timeout() {
        let defs = parse(
            "d.yaml",
            "service:\n  name: web\n  port: 80\n  drain:\n    unit: web@1.service\n",
        )
        .unwrap();
        assert_eq!(
            defs[0].drain,
            Some(DrainOnStop {
                unit: "web@1.service".to_string(),
                timeout: Duration::from_secs(30),
            })
        );
        for (drain, message) in [
            ("unit: web.socket", "not a systemd service unit's name"),
            (
                "unit: web.service\n    timeout: 2h",
                "timeout must be between 1ms and 1h",
            ),
        ] {
            let text = format!("service:\n  name: web\n  port: 80\n  drain:\n    {drain}\n");
            let err = parse("d.yaml", &text).unwrap_err();
            assert_eq!(err.line, 5, "{err}");
            assert!(err.message.contains(message), "{err}");
        }
    }

    #[test]
    fn id_defaults_to_name() {
        let defs = parse("a.yaml", "service:\n  name: web\n  port: 80\n").unwrap();
        assert_eq!(defs[0].id.as_str(), "web");
    }

    #[test]
    fn check_without_target_names_service_and_line() {
        let text = "service:\n  name: web\n  port: 80\n  checks:\n    - interval: 5s\n";
        let err = parse("w.yaml", text).unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.message.contains("check 1"), "{err}");
    }

    #[test]
    fn bad_duration_and_unknown_key_have_positions() {
        let err = parse(
            "w.yaml",
            "service:\n  name: web\n  checks:\n    - tcp: 127.0.0.1:1\n      interval: soon\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        let err = parse("w.yaml", "service:\n  name: web\n  prot: 80\n").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
    }

    #[test]
    fn validation_errors_point_at_the_service() {
        let err = parse(
            "w.yaml",
            "services:\n  - name: a\n  - name: b\n    address: 0.0.0.0\n",
        )
        .unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("invalid service address"), "{err}");
    }
}
