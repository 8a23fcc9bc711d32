//! The agent's configuration file (`/etc/signpost/agent.yaml`).
//!
//! Every field has a default, so an empty file is a valid configuration;
//! unknown keys, bad durations and bad addresses are refused with their
//! position. Parsing is separate from reading the file so tests can check
//! the shipped examples.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{Policy, PolicyOverride};
use crate::vip::VipRange;
use crate::yaml::{self, YamlError};

mod data_plane;

pub use self::data_plane::{AnswerMode, DnsConfig, DnsServiceOverride, ProxyConfig};

/// How long connections get to finish when the agent stops or hands over
/// (`drain_timeout`), by default and at most.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
pub const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3600);

/// `signpost agent`'s configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The node's name in the catalog; defaults to the host name.
    pub node_name: Option<String>,
    /// Where the agent keeps its state (API registrations, check status).
    pub data_dir: PathBuf,
    /// The address other hosts reach this host at: its services that give
    /// no address of their own, and its peer liveness listener. `None`:
    /// detected at start (see [`Advertise`]).
    pub advertise_addr: Option<Advertise>,
    /// The port of the read-only liveness listener on the advertise
    /// address, which peers probe when this host's stream to the control
    /// plane drops (0: any free port, reported to the control plane).
    pub liveness_port: u16,
    /// How long the agent, when it stops or hands over to a new process,
    /// lets its proxy's connections finish: HTTP requests in flight, and
    /// L4 connections until they close (then they are closed).
    #[serde(with = "crate::duration::serde_go")]
    pub drain_timeout: Duration,
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
    pub dns: DnsConfig,
    pub proxy: ProxyConfig,
    pub acl: AgentAclConfig,
    pub mesh: MeshConfig,
}

/// The service mesh on this host: the inbound listener through which
/// other hosts reach its meshed instances (mutual TLS, intentions), and
/// which local service a connection to a meshed service calls as.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// Serve the inbound listener and dial meshed services through their
    /// hosts' listeners. Off: meshed services on other hosts cannot be
    /// reached from this host, and none here are meshed.
    pub enabled: bool,
    /// The inbound listener's port on the advertise address (0: any free
    /// port, reported to the control plane).
    pub inbound_port: u16,
    /// Whether a service that says nothing (`connect`) is meshed.
    pub connect_by_default: bool,
    /// The local service a connection calls as when its source address
    /// is no local service's own (see the README's service mesh
    /// section); `None`: the only service registered here, if there is
    /// one name.
    pub default_source: Option<String>,
}

/// Where other hosts reach a host's mesh inbound listener by default.
pub const DEFAULT_INBOUND_PORT: u16 = 8443;

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: true,
            inbound_port: DEFAULT_INBOUND_PORT,
            connect_by_default: false,
            default_source: None,
        }
    }
}

/// Access control on the agent's local API: tokens are resolved by the
/// control plane and cached here.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentAclConfig {
    /// What a request may do where its token's rules (or, without a
    /// token, no rules) say nothing: `allow` (the default, as before
    /// ACLs) or `deny` (recommended: each service registers with its
    /// own token). `deny` needs a control plane to resolve tokens.
    pub default_policy: crate::acl::DefaultPolicy,
    /// When the control plane cannot resolve a token: `extend-cache`
    /// (tokens seen before keep their rules, others are refused),
    /// `allow` or `deny`.
    pub down_policy: crate::acl::DownPolicy,
    /// How long a resolved token is used before it is asked about again.
    #[serde(with = "crate::duration::serde_go")]
    pub token_ttl: Duration,
}

impl Default for AgentAclConfig {
    fn default() -> Self {
        AgentAclConfig {
            default_policy: crate::acl::DefaultPolicy::Allow,
            down_policy: crate::acl::DownPolicy::ExtendCache,
            token_ttl: Duration::from_secs(30),
        }
    }
}

/// Where peers probe an agent by default (Consul's Serf LAN port).
pub const DEFAULT_LIVENESS_PORT: u16 = 8301;

/// `advertise_addr` as written: an address, or the address of a network
/// interface (`interface:eth0`), found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advertise {
    Ip(IpAddr),
    Interface(String),
}

impl std::str::FromStr for Advertise {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("interface:") {
            // Linux interface names: 1 to 15 bytes, no '/' or whitespace.
            if name.is_empty()
                || name.len() > 15
                || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(format!("{s:?}: {name:?} is not an interface name"));
            }
            return Ok(Advertise::Interface(name.to_string()));
        }
        s.parse::<IpAddr>()
            .map(Advertise::Ip)
            .map_err(|_| format!("{s:?} must be an IP address or interface:NAME"))
    }
}

impl std::fmt::Display for Advertise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Advertise::Ip(ip) => ip.fmt(f),
            Advertise::Interface(name) => write!(f, "interface:{name}"),
        }
    }
}

impl<'de> Deserialize<'de> for Advertise {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl ControlPlaneClientConfig {
    /// Whether every control-plane address is on this host's loopback
    /// (`127.0.0.0/8`, `::1` or `localhost`): then the fleet is this one
    /// host, and loopback is a fine address to advertise.
    pub fn on_loopback(&self) -> bool {
        self.addresses.iter().all(|address| {
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(h, _)| h)
                .trim_matches(['[', ']']);
            host.eq_ignore_ascii_case("localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        })
    }
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
    /// `host:port` of the control plane's HTTP API (HTTPS, verified with
    /// `ca_file`; `http://host:port` for a plain-HTTP one on loopback),
    /// where the local API forwards operator actions (`/v1/commands`,
    /// `/v1/acl/...`, `/v1/audit`) that carry a token.
    #[serde(default)]
    pub http: Option<String>,
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
            advertise_addr: None,
            liveness_port: DEFAULT_LIVENESS_PORT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            zone: "default".to_string(),
            datacenter: "dc1".to_string(),
            services_dir: PathBuf::from("/etc/signpost/services.d"),
            node_meta: Default::default(),
            api: ApiConfig::default(),
            log: LogConfig::default(),
            checks: ChecksConfig::default(),
            control_plane: None,
            upstreams: Vec::new(),
            dns: DnsConfig::default(),
            proxy: ProxyConfig::default(),
            acl: AgentAclConfig::default(),
            mesh: MeshConfig::default(),
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
    pub limits: HttpLimits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8500)),
            max_query_time: Duration::from_secs(600),
            default_query_time: Duration::from_secs(300),
            limits: HttpLimits::default(),
        }
    }
}

/// What one client may hold of an HTTP API (the agent's and the control
/// plane's), so that idle or slow connections cannot lock others out.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// A connection must send a request's headers within this time of
    /// opening or of the previous response, or it is closed: the header
    /// and keep-alive timeout in one, as HAProxy's `timeout
    /// http-request`. A request being answered (a blocking query) is not
    /// affected.
    #[serde(with = "crate::duration::serde_go")]
    pub header_timeout: Duration,
    /// Open connections from one client address; more are closed as they
    /// arrive (Consul's `http_max_conns_per_client`).
    pub max_connections_per_client: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            max_connections_per_client: 200,
        }
    }
}

impl HttpLimits {
    /// Checks the limits of the section `at` (`api`, `http`).
    pub fn validate(&self, at: &str) -> Result<(), (String, String)> {
        if self.header_timeout < Duration::from_millis(100)
            || self.header_timeout > Duration::from_secs(600)
        {
            return Err((
                format!("{at}.limits.header_timeout"),
                "must be between 100ms and 10m".to_string(),
            ));
        }
        if !(1..=100_000).contains(&self.max_connections_per_client) {
            return Err((
                format!("{at}.limits.max_connections_per_client"),
                "must be between 1 and 100000".to_string(),
            ));
        }
        Ok(())
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
        field: String,
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
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
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
        if let Some(Advertise::Ip(ip)) = &self.advertise_addr
            && (ip.is_unspecified() || ip.is_multicast())
        {
            return Err(invalid(
                "advertise_addr",
                format!("{ip} cannot be reached by other hosts: give this host's own address"),
            ));
        }
        if self.drain_timeout.is_zero() || self.drain_timeout > MAX_DRAIN_TIMEOUT {
            return Err(invalid(
                "drain_timeout",
                format!(
                    "must be between 1ms and {}",
                    crate::duration::format(MAX_DRAIN_TIMEOUT)
                ),
            ));
        }
        if self.zone.is_empty() {
            return Err(invalid("zone", "must not be empty".to_string()));
        }
        if let Some(source) = &self.mesh.default_source
            && !crate::model::valid_name(source)
        {
            return Err(invalid(
                "mesh.default_source",
                format!("{source:?} is not a service name"),
            ));
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
        self.api
            .limits
            .validate("api")
            .map_err(|(field, reason)| invalid(&field, reason))?;
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
            if let Some(http) = cp.http.as_deref().and_then(|h| h.strip_prefix("http://")) {
                let host = http
                    .rsplit_once(':')
                    .map_or(http, |(h, _)| h)
                    .trim_matches(['[', ']']);
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(invalid(
                        "control_plane.http",
                        format!(
                            "{http:?}: plain http:// only to a loopback address (tokens cross it); use host:port for HTTPS"
                        ),
                    ));
                }
            }
            if cp.token.is_empty() {
                return Err(invalid(
                    "control_plane.token",
                    "must not be empty".to_string(),
                ));
            }
        }
        if self.acl.default_policy == crate::acl::DefaultPolicy::Deny
            && self.control_plane.is_none()
        {
            return Err(invalid(
                "acl.default_policy",
                "deny needs a control_plane: it resolves the tokens".to_string(),
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.acl.token_ttl) {
            return Err(invalid(
                "acl.token_ttl",
                "must be between 1s and 1h".to_string(),
            ));
        }
        self.validate_dns(file)?;
        self.validate_proxy(file)?;
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

impl AgentConfig {
    fn validate_proxy(&self, file: &str) -> Result<(), ConfigError> {
        let proxy = &self.proxy;
        let base = Policy::default().apply(&proxy.defaults);
        let mut policies = vec![("proxy.defaults".to_string(), base.clone())];
        for (key, o) in &proxy.services {
            policies.push((format!("proxy.services.{key:?}"), base.apply(o)));
        }
        for (at, policy) in policies {
            if let Err((field, reason)) = policy.check() {
                return Err(ConfigError::Invalid {
                    file: file.to_string(),
                    field: format!("{at}.{field}"),
                    reason,
                });
            }
        }
        if proxy.threads > 64 {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                field: "proxy.threads".to_string(),
                reason: "at most 64 (0: one per core)".to_string(),
            });
        }
        if proxy.pool_idle_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                field: "proxy.pool_idle_timeout".to_string(),
                reason: "must be greater than 0".to_string(),
            });
        }
        Ok(())
    }

    fn validate_dns(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            file: file.to_string(),
            field: field.to_string(),
            reason,
        };
        let dns = &self.dns;
        let domain = dns.domain.trim_end_matches('.');
        if domain.is_empty()
            || domain.len() > 200
            || !domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
        {
            return Err(invalid(
                "dns.domain",
                format!("{:?} must be a DNS name such as \"internal\"", dns.domain),
            ));
        }
        if let Some(Err(reason)) = dns.recursor_addrs() {
            return Err(invalid("dns.recursors", reason));
        }
        if dns.threads > 64 {
            return Err(invalid(
                "dns.threads",
                "at most 64 (0: one per core)".to_string(),
            ));
        }
        if dns.recursor_timeout.is_zero() {
            return Err(invalid(
                "dns.recursor_timeout",
                "must be greater than 0".to_string(),
            ));
        }
        for (field, ttl) in [("dns.ttl", dns.ttl), ("dns.node_ttl", dns.node_ttl)]
            .into_iter()
            .chain(
                dns.services
                    .values()
                    .filter_map(|o| o.ttl.map(|t| ("dns.services.ttl", t))),
            )
        {
            if ttl.as_secs() > u64::from(u32::MAX >> 1) {
                return Err(invalid(field, "is longer than DNS allows".to_string()));
            }
        }
        if let Some(key) = dns.services.keys().find(|k| {
            let name = k.strip_suffix('*').unwrap_or(k);
            name.contains('*') || (name.is_empty() && k.as_str() != "*")
        }) {
            return Err(invalid(
                "dns.services",
                format!("{key:?}: a key is a service name, or a prefix ending in '*'"),
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
        let e = AgentConfig::from_yaml("a.yaml", "api:\n  limits:\n    header_timeout: 1h\n")
            .unwrap_err();
        assert!(e.to_string().contains("api.limits.header_timeout"), "{e}");
    }

    #[test]
    fn dns_settings_per_service_and_their_errors() {
        let c = AgentConfig::from_yaml(
            "a.yaml",
            "dns:\n  ttl: 7s\n  recursors: [10.0.0.2, \"127.0.0.1:5353\"]\n  services:\n    \"*\": {ttl: 1s}\n    \"pay*\": {answer: instances}\n    payments: {only_passing: true}\n",
        )
        .unwrap();
        let d = &c.dns;
        assert_eq!(
            d.service_settings("web"),
            (AnswerMode::Vip, Duration::from_secs(1), false)
        );
        // The longest key wins, and only what it sets.
        assert_eq!(
            d.service_settings("payroll"),
            (AnswerMode::Instances, Duration::from_secs(7), false)
        );
        assert_eq!(
            d.service_settings("payments"),
            (AnswerMode::Vip, Duration::from_secs(7), true)
        );
        assert_eq!(
            d.recursor_addrs().unwrap().unwrap(),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:5353".parse().unwrap()
            ]
        );
        for (yaml, field) in [
            ("dns:\n  recursors: [resolver.example]\n", "dns.recursors"),
            ("dns:\n  domain: \"bad domain\"\n", "dns.domain"),
            (
                "dns:\n  services:\n    \"a*b\": {ttl: 1s}\n",
                "dns.services",
            ),
            ("dns:\n  recursor_timeout: 0s\n", "dns.recursor_timeout"),
        ] {
            let e = AgentConfig::from_yaml("a.yaml", yaml).unwrap_err();
            assert!(e.to_string().contains(field), "{yaml}: {e}");
        }
        let e = AgentConfig::from_yaml("a.yaml", "proxy:\n  vip_range: 10.0.0.0/8\n").unwrap_err();
        assert!(e.to_string().starts_with("a.yaml:2:"), "{e}");
        assert!(e.to_string().contains("127.0.0.0/8"), "{e}");
    }

    #[test]
    fn cross_field_rules() {
        let e = AgentConfig::from_yaml("a.yaml", "advertise_addr: 0.0.0.0\n").unwrap_err();
        assert!(e.to_string().contains("advertise_addr"), "{e}");
    }

    #[test]
    fn advertise_addr_is_an_address_or_an_interface() {
        let c = AgentConfig::from_yaml("a.yaml", "advertise_addr: 10.0.0.7\n").unwrap();
        assert_eq!(
            c.advertise_addr,
            Some(Advertise::Ip("10.0.0.7".parse().unwrap()))
        );
        let c = AgentConfig::from_yaml("a.yaml", "advertise_addr: interface:eth0\n").unwrap();
        assert_eq!(
            c.advertise_addr,
            Some(Advertise::Interface("eth0".to_string()))
        );
        assert_eq!(c.advertise_addr.unwrap().to_string(), "interface:eth0");
        assert_eq!(AgentConfig::default().advertise_addr, None);
        for bad in [
            "advertise_addr: eth0\n",
            "advertise_addr: \"interface:\"\n",
            "advertise_addr: interface:a/b\n",
        ] {
            let e = AgentConfig::from_yaml("a.yaml", bad).unwrap_err();
            assert!(e.to_string().starts_with("a.yaml:1:"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_control_plane_on_loopback_is_told_apart() {
        let cp = |addresses: &[&str]| ControlPlaneClientConfig {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ca_file: PathBuf::from("ca.pem"),
            token: "t".to_string(),
            server_name: None,
            http: None,
            first_lookup_wait: default_first_lookup_wait(),
            subscription_idle: default_subscription_idle(),
        };
        assert!(cp(&["127.0.0.1:8300", "localhost:8300", "[::1]:8300"]).on_loopback());
        assert!(!cp(&["127.0.0.1:8300", "198.18.0.1:8300"]).on_loopback());
        assert!(!cp(&["cp.example:8300"]).on_loopback());
    }

    #[test]
    fn proxy_policies_merge_and_bad_ones_are_named() {
        let yaml = "proxy:\n  defaults:\n    retries: 1\n  services:\n    \"pay*\": {balancer: round_robin, try_timeout: 300ms}\n    payments: {retries: 3}\n";
        let config = AgentConfig::from_yaml("a.yaml", yaml).unwrap();
        let p = config.proxy.policy("payments");
        assert_eq!(p.retry.retries, 3, "the exact key wins");
        assert_eq!(p.balancer, crate::policy::Balancer::P2cEwma);
        let p = config.proxy.policy("payroll");
        assert_eq!(p.retry.retries, 1, "the defaults apply");
        assert_eq!(p.try_timeout, Some(Duration::from_millis(300)));
        assert_eq!(config.proxy.policy("web").retry.retries, 1);

        let bad = "proxy:\n  services:\n    web: {panic_threshold: 2}\n";
        let e = AgentConfig::from_yaml("a.yaml", bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("proxy.services.\"web\".panic_threshold"),
            "{e}"
        );
        let e = AgentConfig::from_yaml("a.yaml", "proxy:\n  defaults: {retrys: 1}\n").unwrap_err();
        assert!(e.to_string().contains("retrys"), "{e}");
    }
}
