//! The agent's configuration file (`/etc/signpost/agent.yaml`).
//!
//! Every field has a default, so an empty file is a valid configuration;
//! unknown keys, bad durations and bad addresses are refused with their
//! position. Parsing is separate from reading the file so tests can check
//! the shipped examples.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::yaml::{self, YamlError};

/// `signpost agent`'s configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The node's name in the catalog; defaults to the host name.
    pub node_name: Option<String>,
    /// Where the agent keeps its state (API registrations, check status).
    pub data_dir: PathBuf,
    /// The address other hosts reach this host's services at when a service
    /// does not give its own.
    pub advertise_addr: IpAddr,
    /// The failure domain this host is in (used for zone-aware routing).
    pub zone: String,
    /// Consul's datacenter, reported in API answers.
    pub datacenter: String,
    /// The directory of `*.yaml` service definitions, watched for changes.
    pub services_dir: PathBuf,
    /// Free-form node metadata (`NodeMeta`).
    pub node_meta: std::collections::BTreeMap<String, String>,
    pub api: ApiConfig,
    pub log: LogConfig,
    pub checks: ChecksConfig,
    /// Where the control plane is; without it the agent serves only its
    /// own node.
    pub control_plane: Option<ControlPlaneClientConfig>,
    /// Services this host uses, subscribed to from the start.
    pub upstreams: Vec<String>,
}

/// How the agent reaches the control plane.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneClientConfig {
    /// `host:port` of each control-plane replica; a name resolving to
    /// several addresses also works.
    pub addresses: Vec<String>,
    /// The CA that signed the control plane's certificate (`init-tls`).
    pub ca_file: PathBuf,
    /// The agent token the control plane knows (`agent_tokens`).
    pub token: String,
    /// The name to verify in the server certificate; default: the host
    /// part of the address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// How long the first lookup of a service not subscribed to yet waits
    /// for the control plane's snapshot before answering with what is known.
    #[serde(
        default = "default_first_lookup_wait",
        with = "crate::duration::serde_go"
    )]
    pub first_lookup_wait: Duration,
    /// A service nothing on this host asked for this long is unsubscribed
    /// from (`upstreams` never are).
    #[serde(
        default = "default_subscription_idle",
        with = "crate::duration::serde_go"
    )]
    pub subscription_idle: Duration,
}

fn default_subscription_idle() -> Duration {
    Duration::from_secs(600)
}

fn default_first_lookup_wait() -> Duration {
    Duration::from_millis(250)
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_name: None,
            data_dir: PathBuf::from("/var/lib/signpost"),
            advertise_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            zone: "default".to_string(),
            datacenter: "dc1".to_string(),
            services_dir: PathBuf::from("/etc/signpost/services.d"),
            node_meta: Default::default(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
            checks: ChecksConfig::default(),
            control_plane: None,
            upstreams: Vec::new(),
        }
    }
}

/// The local HTTP API (Consul-compatible subset and `/metrics`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Longest a blocking query may wait (Consul's `max_query_time`).
    #[serde(with = "crate::duration::serde_go")]
    pub max_query_time: Duration,
    /// Wait of a blocking query that names none (`default_query_time`).
    #[serde(with = "crate::duration::serde_go")]
    pub default_query_time: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8500)),
            max_query_time: Duration::from_secs(600),
            default_query_time: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `signpost_agent=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// How health checks run on this host.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// When a passing check fails, probe again this many times at once
    /// before counting the failure (0 disables the fast re-check).
    pub fast_recheck_count: u32,
    /// Spacing of the fast re-checks.
    #[serde(with = "crate::duration::serde_go")]
    pub fast_recheck_spacing: Duration,
    /// Allow `args` (exec) checks. Off by default, as in Consul, because
    /// anyone who can reach the local API could run programs as the agent.
    pub enable_exec: bool,
    /// Reuse HTTP check connections between probes (Envoy's default);
    /// `false` opens a new connection per probe, as Consul does.
    pub http_keep_alive: bool,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        ChecksConfig {
            fast_recheck_count: 3,
            fast_recheck_spacing: Duration::from_millis(100),
            enable_exec: false,
            http_keep_alive: true,
        }
    }
}

/// A configuration that parsed but breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Yaml(#[from] YamlError),
    #[error("{file}: {field}: {reason}")]
    Invalid {
        file: String,
        field: &'static str,
        reason: String,
    },
}

impl AgentConfig {
    /// Parses and validates the text of an agent configuration file.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: AgentConfig = if text.trim().is_empty() {
            AgentConfig::default()
        } else {
            yaml::from_str(file, text)?
        };
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            field,
            reason,
        };
        if let Some(name) = &self.node_name
            && !valid_node_name(name)
        {
            return Err(invalid(
                "node_name",
                format!("{name:?} must be 1 to 63 letters, digits, '-' or '_'"),
            ));
        }
        if self.advertise_addr.is_unspecified() {
            return Err(invalid(
                "advertise_addr",
                "the unspecified address cannot be reached by other hosts".to_string(),
            ));
        }
        if self.zone.is_empty() {
            return Err(invalid("zone", "must not be empty".to_string()));
        }
        if self.datacenter.is_empty() {
            return Err(invalid("datacenter", "must not be empty".to_string()));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".to_string()));
        }
        if self.api.default_query_time.is_zero()
            || self.api.default_query_time > self.api.max_query_time
        {
            return Err(invalid(
                "api.default_query_time",
                "must be greater than 0 and at most api.max_query_time".to_string(),
            ));
        }
        if let Some(cp) = &self.control_plane {
            if cp.addresses.is_empty() {
                return Err(invalid(
                    "control_plane.addresses",
                    "give at least one host:port".to_string(),
                ));
            }
            if let Some(bad) = cp.addresses.iter().find(|a| {
                a.rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            }) {
                return Err(invalid(
                    "control_plane.addresses",
                    format!("{bad:?} must be host:port"),
                ));
            }
            if cp.subscription_idle < Duration::from_secs(1) {
                return Err(invalid(
                    "control_plane.subscription_idle",
                    "must be at least 1s".to_string(),
                ));
            }
            if cp.token.is_empty() {
                return Err(invalid(
                    "control_plane.token",
                    "must not be empty".to_string(),
                ));
            }
        }
        if self.checks.fast_recheck_count > 10 {
            return Err(invalid(
                "checks.fast_recheck_count",
                "at most 10 re-checks are allowed".to_string(),
            ));
        }
        if self.checks.fast_recheck_spacing > Duration::from_secs(5) {
            return Err(invalid(
                "checks.fast_recheck_spacing",
                "must be at most 5s".to_string(),
            ));
        }
        Ok(())
    }
}

/// Node names become DNS labels (`<node>.node.<domain>`).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c = AgentConfig::from_yaml("agent.yaml", "").unwrap();
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:8500");
    }

    #[test]
    fn full_file_parses() {
        let c = AgentConfig::from_yaml(
            "agent.yaml",
            "node_name: web-1\ndata_dir: /tmp/x\nadvertise_addr: 127.0.0.2\nzone: a\n\
             services_dir: /tmp/s\napi:\n  listen: 127.0.0.2:8501\nlog:\n  format: json\n\
             checks:\n  fast_recheck_spacing: 250ms\n",
        )
        .unwrap();
        assert_eq!(c.node_name.as_deref(), Some("web-1"));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.checks.fast_recheck_spacing, Duration::from_millis(250));
    }

    #[test]
    fn unknown_key_bad_duration_bad_address_name_their_line() {
        let e = AgentConfig::from_yaml("a.yaml", "zone: a\nnode_nmae: x\n").unwrap_err();
        assert!(e.to_string().starts_with("a.yaml:2:1: "), "{e}");
        let e = AgentConfig::from_yaml("a.yaml", "checks:\n  fast_recheck_spacing: 10 s\n")
            .unwrap_err();
        assert!(e.to_string().starts_with("a.yaml:2:"), "{e}");
        assert!(e.to_string().contains("invalid duration"), "{e}");
        let e = AgentConfig::from_yaml("a.yaml", "api:\n  listen: 127.0.0.1\n").unwrap_err();
        assert!(e.to_string().starts_with("a.yaml:2:"), "{e}");
    }

    #[test]
    fn cross_field_rules() {
        let e = AgentConfig::from_yaml("a.yaml", "advertise_addr: 0.0.0.0\n").unwrap_err();
        assert!(e.to_string().contains("advertise_addr"), "{e}");
    }
}
