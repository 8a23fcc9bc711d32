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
    /// Where the fleet's state lives: `file` (under `data_dir`, one
    /// replica) or `etcd` (several equal replicas, see [`EtcdConfig`]).
    pub store: StoreKind,
    pub etcd: EtcdConfig,
    pub acl: AclConfig,
    pub mesh: MeshCaConfig,
}

/// The service mesh's CA and the fleet-wide intention settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshCaConfig {
    /// The trust domain of the services' identities
    /// (`spiffe://<trust_domain>/dc/<dc>/svc/<service>`), fixed when the
    /// mesh CA is first created.
    pub trust_domain: String,
    /// How long a service's certificate is valid; agents renew at two
    /// thirds of it.
    #[serde(with = "crate::duration::serde_go")]
    pub leaf_ttl: std::time::Duration,
    /// What a call no intention matches gets: `allow` keeps an upgraded
    /// fleet working; `deny` (recommended) lets through only what an
    /// intention allows.
    pub default_intention: crate::intention::Action,
    /// Every deny is only logged and counted (`signpost_agent_proxy_mesh_requests_total`
    /// with `decision="shadow_deny"`): to tighten rules without an outage.
    pub shadow: bool,
}

impl Default for MeshCaConfig {
    fn default() -> Self {
        MeshCaConfig {
            trust_domain: "signpost.mesh".to_string(),
            leaf_ttl: std::time::Duration::from_secs(72 * 3600),
            default_intention: crate::intention::Action::Allow,
            shadow: false,
        }
    }
}

/// Access control on the control plane's API (tokens and policies).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// What a service, node, key or agent no rule names gives a request
    /// (with or without a token): `allow` keeps an upgraded fleet's
    /// reads open, `deny` (recommended) shows each token only what its
    /// policies grant. `acl` and `operator` always need a rule.
    pub default_policy: crate::acl::DefaultPolicy,
}

/// The control plane's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Files under `data_dir`: one replica.
    #[default]
    File,
    /// An etcd cluster shared by every replica.
    Etcd,
}

/// The etcd cluster replicas share (`store: etcd`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Every key Signpost writes starts with this.
    pub prefix: String,
    /// The CA that signed the members' certificates (for `https://`).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key, when etcd asks for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user and password, when etcd has authentication on.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// How long the agents of a replica that died keep counting as
    /// alive: they reconnect to another replica well within it.
    #[serde(with = "crate::duration::serde_go")]
    pub lease_ttl: std::time::Duration,
    /// A request etcd has not answered within this has failed.
    #[serde(with = "crate::duration::serde_go")]
    pub timeout: std::time::Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            prefix: "/signpost/".to_string(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            lease_ttl: std::time::Duration::from_secs(15),
            timeout: std::time::Duration::from_secs(5),
        }
    }
}

impl EtcdConfig {
    /// Checks the section; `Err((field, reason))`.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, reason: &str| Err((format!("etcd.{field}"), reason.to_string()));
        if self.endpoints.is_empty() || self.endpoints.len() > 64 {
            return bad("endpoints", "give between 1 and 64 etcd client URLs");
        }
        if let Some(e) = self
            .endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return bad(
                "endpoints",
                &format!("{e:?} must start with http:// or https://"),
            );
        }
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            return bad("endpoints", "mix of http:// and https://: use one");
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() > 128 {
            return bad(
                "prefix",
                "must start and end with / (like /signpost/), at most 128 characters",
            );
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad(
                "cert_file",
                "give both etcd.cert_file and etcd.key_file, or neither",
            );
        }
        if !tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return bad("ca_file", "TLS files need https:// endpoints");
        }
        if self.username.is_some() != self.password_file.is_some() {
            return bad(
                "username",
                "give both etcd.username and etcd.password_file, or neither",
            );
        }
        if !(std::time::Duration::from_secs(5)..=std::time::Duration::from_secs(300))
            .contains(&self.lease_ttl)
        {
            return bad("lease_ttl", "must be between 5s and 5m");
        }
        if !(std::time::Duration::from_millis(100)..=std::time::Duration::from_secs(60))
            .contains(&self.timeout)
        {
            return bad("timeout", "must be between 100ms and 1m");
        }
        Ok(())
    }
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
            store: StoreKind::File,
            etcd: EtcdConfig::default(),
            acl: AclConfig::default(),
            mesh: MeshCaConfig::default(),
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
    /// The CA agents' client certificates are checked against and signed
    /// by. Default: `data_dir/tls/ca.pem`; without it, agents connect
    /// with their token only.
    pub ca_file: Option<PathBuf>,
    /// The CA's key, to sign agents' certificates. Default:
    /// `data_dir/tls/ca-key.pem`; without it, none are issued.
    pub ca_key_file: Option<PathBuf>,
    /// How long an agent's client certificate is valid; agents renew at
    /// two thirds of it.
    #[serde(with = "crate::duration::serde_go")]
    pub client_cert_ttl: std::time::Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8300)),
            cert_file: None,
            key_file: None,
            ca_file: None,
            ca_key_file: None,
            client_cert_ttl: std::time::Duration::from_secs(72 * 3600),
        }
    }
}

/// The HTTP API (ACL, commands, audit, catalog, nodes, `/metrics`):
/// HTTPS with the agents' endpoint's certificate unless told otherwise.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub limits: HttpLimits,
    /// Plain HTTP instead of HTTPS: only on a loopback address.
    pub plaintext: bool,
    /// The server certificate and key; default: the agents' endpoint's
    /// (`grpc.cert_file`, `grpc.key_file`).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8700)),
            limits: HttpLimits::default(),
            plaintext: false,
            cert_file: None,
            key_file: None,
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
        if let Err((field, reason)) = config.etcd.validate() {
            return Err(invalid(&field, &reason));
        }
        if config.grpc.cert_file.is_some() != config.grpc.key_file.is_some() {
            return Err(invalid(
                "grpc.cert_file",
                "give both grpc.cert_file and grpc.key_file, or neither",
            ));
        }
        if config.http.cert_file.is_some() != config.http.key_file.is_some() {
            return Err(invalid(
                "http.cert_file",
                "give both http.cert_file and http.key_file, or neither",
            ));
        }
        if config.http.plaintext && !config.http.listen.ip().is_loopback() {
            return Err(invalid(
                "http.plaintext",
                "plain HTTP only on a loopback address: tokens cross this API",
            ));
        }
        if !(std::time::Duration::from_secs(5)..=std::time::Duration::from_secs(365 * 24 * 3600))
            .contains(&config.grpc.client_cert_ttl)
        {
            return Err(invalid(
                "grpc.client_cert_ttl",
                "must be between 5s and 8760h",
            ));
        }
        if !(std::time::Duration::from_secs(60)..=std::time::Duration::from_secs(365 * 24 * 3600))
            .contains(&config.mesh.leaf_ttl)
        {
            return Err(invalid("mesh.leaf_ttl", "must be between 1m and 8760h"));
        }
        if !crate::identity::valid_trust_domain(&config.mesh.trust_domain) {
            return Err(invalid(
                "mesh.trust_domain",
                "must be a DNS name: lowercase letters, digits, '-' and '.'",
            ));
        }
        Ok(config)
    }

    /// The server certificate and key of the agents' endpoint.
    pub fn tls_files(&self) -> (PathBuf, PathBuf) {
        match (&self.grpc.cert_file, &self.grpc.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (
                self.data_dir.join("tls").join("server.pem"),
                self.data_dir.join("tls").join("server-key.pem"),
            ),
        }
    }

    /// The server certificate and key of the HTTP API.
    pub fn http_tls_files(&self) -> (PathBuf, PathBuf) {
        match (&self.http.cert_file, &self.http.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => self.tls_files(),
        }
    }

    /// The CA of agents' client certificates, and its key.
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        let tls = self.data_dir.join("tls");
        (
            self.grpc
                .ca_file
                .clone()
                .unwrap_or_else(|| tls.join("ca.pem")),
            self.grpc
                .ca_key_file
                .clone()
                .unwrap_or_else(|| tls.join("ca-key.pem")),
        )
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
            ("etcd:\n  endpoints: []\n", "etcd.endpoints"),
            ("etcd:\n  endpoints: [127.0.0.1:2379]\n", "etcd.endpoints"),
            ("etcd:\n  prefix: signpost\n", "etcd.prefix"),
            ("etcd:\n  lease_ttl: 1s\n", "etcd.lease_ttl"),
            ("etcd:\n  username: u\n", "etcd.username"),
            (
                "http:\n  listen: 0.0.0.0:8700\n  plaintext: true\n",
                "http.plaintext",
            ),
            ("grpc:\n  client_cert_ttl: 1s\n", "grpc.client_cert_ttl"),
            (
                "acl:\n  default_policy: maybe\n",
                "cp.yaml:2:19: unknown variant `maybe`",
            ),
        ] {
            let e = ControlPlaneConfig::from_yaml("cp.yaml", yaml).unwrap_err();
            assert!(e.to_string().contains(field), "{yaml}: {e}");
        }
    }
}
