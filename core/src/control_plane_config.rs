//! The control plane's configuration file (`/etc/signpost/control-plane.yaml`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{ConfigError, HttpLimits, LogConfig};
use crate::yaml;

/// `signpost-control-plane`'s configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// Where the control plane keeps its state and, by default, its TLS files.
    pub data_dir: PathBuf,
    /// Consul's datacenter, reported in API answers (as the agents'
    /// `datacenter`).
    pub datacenter: String,
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    /// Tokens agents present (`control_plane.token` in their config), on
    /// top of the ACL tokens with the `agent` role.
    pub agent_tokens: Vec<String>,
    /// A failed node's registrations are removed after this.
    #[serde(with = "crate::duration::serde_go")]
    pub node_reap_after: std::time::Duration,
    /// After a restart, nodes kept in the store whose agents have not
    /// reconnected within this are probed by their peers, and failed if
    /// none reaches them.
    #[serde(with = "crate::duration::serde_go")]
    pub restore_grace: std::time::Duration,
    pub audit: AuditConfig,
    pub log: LogConfig,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            data_dir: PathBuf::from("/var/lib/signpost-control-plane"),
            datacenter: "dc1".to_string(),
            grpc: GrpcConfig::default(),
            http: HttpConfig::default(),
            agent_tokens: Vec::new(),
            node_reap_after: std::time::Duration::from_secs(600),
            restore_grace: std::time::Duration::from_secs(30),
            audit: AuditConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// The audit log (`data_dir/audit.jsonl`) and its rotation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The live file is rotated (to `audit.jsonl.1`, the older ones
    /// shifting to `.2`, ...) before it grows past this many bytes.
    pub max_size: u64,
    /// Rotated files kept.
    pub max_files: u32,
    /// Rotated files last written longer ago are deleted, and the live
    /// file is rotated once its first entry is this old.
    #[serde(with = "crate::duration::serde_go")]
    pub max_age: std::time::Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_size: 16 << 20,
            max_files: 5,
            // 90 days.
            max_age: std::time::Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// The agents' gRPC endpoint; always TLS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    /// Server certificate and key (PEM). Default: `data_dir/tls/server.pem`
    /// and `server-key.pem`, as written by `signpost-control-plane init-tls`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8300)),
            cert_file: None,
            key_file: None,
        }
    }
}

/// The HTTP API (catalog, nodes, `/metrics`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub limits: HttpLimits,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8700)),
            limits: HttpLimits::default(),
        }
    }
}

impl ControlPlaneConfig {
    /// Parses and validates the text of a control-plane configuration file.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: ControlPlaneConfig = if text.trim().is_empty() {
            ControlPlaneConfig::default()
        } else {
            yaml::from_str(file, text)?
        };
        let invalid = |field: &str, reason: &str| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            reason: reason.to_string(),
        };
        if config.agent_tokens.iter().any(|t| t.len() < 16) {
            return Err(invalid(
                "agent_tokens",
                "tokens must be at least 16 characters",
            ));
        }
        if config.datacenter.trim().is_empty() {
            return Err(invalid("datacenter", "must not be empty"));
        }
        if config.node_reap_after < std::time::Duration::from_secs(1) {
            return Err(invalid("node_reap_after", "must be at least 1s"));
        }
        if config.restore_grace < std::time::Duration::from_secs(1) {
            return Err(invalid("restore_grace", "must be at least 1s"));
        }
        if !(4096..=1 << 30).contains(&config.audit.max_size) {
            return Err(invalid(
                "audit.max_size",
                "must be between 4096 and 1073741824 bytes",
            ));
        }
        if config.audit.max_files > 1000 {
            return Err(invalid("audit.max_files", "must be at most 1000"));
        }
        if config.audit.max_age < std::time::Duration::from_secs(60) {
            return Err(invalid("audit.max_age", "must be at least 1m"));
        }
        if let Err((field, reason)) = config.http.limits.validate("http") {
            return Err(invalid(&field, &reason));
        }
        if config.grpc.cert_file.is_some() != config.grpc.key_file.is_some() {
            return Err(invalid(
                "grpc.cert_file",
                "give both grpc.cert_file and grpc.key_file, or neither",
            ));
        }
        Ok(config)
    }

    /// The server certificate and key to use.
    pub fn tls_files(&self) -> (PathBuf, PathBuf) {
        match (&self.grpc.cert_file, &self.grpc.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (
                self.data_dir.join("tls").join("server.pem"),
                self.data_dir.join("tls").join("server-key.pem"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_short_tokens() {
        let c = ControlPlaneConfig::from_yaml(
            "cp.yaml",
            "data_dir: /tmp/cp\nagent_tokens: [0123456789abcdef]\ngrpc:\n  listen: 127.0.0.1:8300\n",
        )
        .unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8700");
        let e = ControlPlaneConfig::from_yaml("cp.yaml", "agent_tokens: [short]\n").unwrap_err();
        assert!(e.to_string().contains("agent_tokens"), "{e}");
        let e = ControlPlaneConfig::from_yaml("cp.yaml", "grpc:\n  lisen: x\n").unwrap_err();
        assert!(e.to_string().starts_with("cp.yaml:2:"), "{e}");
    }

    #[test]
    fn limits_and_the_audit_log_are_bounded() {
        for (yaml, field) in [
            (
                "http:\n  limits:\n    header_timeout: 0s\n",
                "http.limits.header_timeout",
            ),
            (
                "http:\n  limits:\n    max_connections_per_client: 0\n",
                "http.limits.max_connections_per_client",
            ),
            ("audit:\n  max_size: 100\n", "audit.max_size"),
            ("audit:\n  max_files: 5000\n", "audit.max_files"),
            ("audit:\n  max_age: 1s\n", "audit.max_age"),
            ("datacenter: ''\n", "datacenter"),
        ] {
            let e = ControlPlaneConfig::from_yaml("cp.yaml", yaml).unwrap_err();
            assert!(e.to_string().contains(field), "{yaml}: {e}");
        }
    }
}
