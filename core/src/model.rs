//! Services, checks and health: the model every source (service files, the
//! HTTP API, later the control plane) is turned into, with the rules that
//! hold whatever the source.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Checks run at most once a second (Consul's `MinInterval`).
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Output kept per check when the definition does not say (Consul's default).
pub const DEFAULT_OUTPUT_MAX_SIZE: usize = 4096;
/// Timeout of network checks when the definition does not say.
pub const DEFAULT_NETWORK_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of exec checks when the definition does not say.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a check's output kept (a probe reads no more than this of
/// an answer, so a service cannot make the agent buffer more).
pub const MAX_OUTPUT_MAX_SIZE: usize = 1024 * 1024;

/// A service, instance or check definition that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("missing service name")]
    MissingName,
    #[error("invalid service name {0:?}: use letters, digits, '-', '_' and '.' only")]
    InvalidName(String),
    #[error("invalid service id {0:?}: it must be non-empty and contain no '/' or whitespace")]
    InvalidServiceId(String),
    #[error("invalid service address {0:?}: {1}")]
    InvalidAddress(String, &'static str),
    #[error("invalid meta: {0}")]
    InvalidMeta(String),
    #[error("invalid tag {0:?}: tags must be non-empty and contain no whitespace")]
    InvalidTag(String),
    #[error("invalid weights: passing weight must be at least 1")]
    InvalidWeights,
    #[error("check {check}: {reason}")]
    InvalidCheck { check: String, reason: String },
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// The unique id of a service instance on its agent (Consul's `ServiceID`).
    ServiceId
);
string_id!(
    /// The name instances of a service share (Consul's `ServiceName`).
    ServiceName
);
string_id!(
    /// The unique id of a check on its agent (Consul's `CheckID`).
    CheckId
);

impl CheckId {
    /// The check of node-wide maintenance mode (Consul's `_node_maintenance`).
    pub fn node_maintenance() -> Self {
        Self("_node_maintenance".to_string())
    }
    /// The check of a service's maintenance mode (`_service_maintenance:<id>`).
    pub fn service_maintenance(service: &ServiceId) -> Self {
        Self(format!("_service_maintenance:{service}"))
    }
    /// Whether clients treat this check as maintenance (they match by id).
    pub fn is_maintenance(&self) -> bool {
        self.0 == "_node_maintenance" || self.0.starts_with("_service_maintenance:")
    }
}

/// The status of a check, and of an instance (the worst of its checks).
/// Ordered from best to worst, so `max` aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Health {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "passing" => Ok(Health::Passing),
            "warning" => Ok(Health::Warning),
            "critical" => Ok(Health::Critical),
            _ => Err(format!(
                "invalid status {s:?}: expected passing, warning or critical"
            )),
        }
    }
}

/// How the proxy speaks to a service's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            "http2" => Ok(Protocol::Http2),
            "grpc" => Ok(Protocol::Grpc),
            _ => Err(format!(
                "invalid protocol {s:?}: expected tcp, http, http2 or grpc"
            )),
        }
    }
}

/// Load-balancing weights of an instance by its health (Consul's `Weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            passing: 1,
            warning: 1,
        }
    }
}

/// An extra address a service is reachable at (Consul's `TaggedAddresses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedAddress {
    pub address: String,
    pub port: u16,
}

/// One service instance as registered on its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDefinition {
    pub id: ServiceId,
    pub name: ServiceName,
    /// Empty means "the node's address", as in Consul.
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    /// `None` means "the agent's zone".
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub weights: Weights,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub enable_tag_override: bool,
    #[serde(default)]
    pub checks: Vec<CheckDefinition>,
    /// Meshed: reached from other hosts only through this host's inbound
    /// listener, over mutual TLS, where intentions decide who may call
    /// it. `None`: the agent's `mesh.connect_by_default`.
    #[serde(default)]
    pub connect: Option<bool>,
    /// How the instance is drained when its program stops (service
    /// files only).
    #[serde(default)]
    pub drain: Option<DrainOnStop>,
}

/// A service file's `drain`: the systemd unit of the instance's program,
/// whose `ExecStop=signpost drain --self` drains it, and how long that
/// may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainOnStop {
    /// The unit's name, e.g. `payments.service`.
    pub unit: String,
    /// How long the drain may take (then `signpost drain` fails, and the
    /// unit's stop goes on).
    #[serde(with = "crate::duration::serde_go")]
    pub timeout: std::time::Duration,
}

/// The longest a drain on stop may take (systemd's default stop timeout
/// is 90 s; a unit can raise it).
pub const MAX_DRAIN_ON_STOP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Whether `unit` can be a systemd service unit's name.
pub fn valid_unit_name(unit: &str) -> bool {
    unit.len() <= 256
        && unit.strip_suffix(".service").is_some_and(|stem| {
            !stem.is_empty()
                && stem
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@:\\".contains(c))
        })
}

impl ServiceDefinition {
    /// Checks the rules every registration must follow, and gives the checks
    /// that have no id the ids Consul clients rely on (`service:<id>` for a
    /// single check, `service:<id>:N` for several).
    pub fn validate(&mut self) -> Result<(), ModelError> {
        if self.name.as_str().is_empty() {
            return Err(ModelError::MissingName);
        }
        if !valid_name(self.name.as_str()) {
            return Err(ModelError::InvalidName(self.name.to_string()));
        }
        if !valid_id(self.id.as_str()) {
            return Err(ModelError::InvalidServiceId(self.id.to_string()));
        }
        if !self.address.is_empty() {
            match self.address.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => {
                    return Err(ModelError::InvalidAddress(
                        self.address.clone(),
                        "the unspecified address cannot be reached",
                    ));
                }
                Ok(_) => {}
                Err(_) if valid_hostname(&self.address) => {}
                Err(_) => {
                    return Err(ModelError::InvalidAddress(
                        self.address.clone(),
                        "expected an IP address or a host name",
                    ));
                }
            }
        }
        for tag in &self.tags {
            if tag.is_empty() || tag.chars().any(char::is_whitespace) {
                return Err(ModelError::InvalidTag(tag.clone()));
            }
        }
        validate_meta(self.meta.iter())?;
        if self.weights.passing == 0 {
            return Err(ModelError::InvalidWeights);
        }
        let single = self.checks.len() == 1;
        for (i, check) in self.checks.iter_mut().enumerate() {
            if check.id.is_none() {
                check.id = Some(if single {
                    CheckId::new(format!("service:{}", self.id))
                } else {
                    CheckId::new(format!("service:{}:{}", self.id, i + 1))
                });
            }
            if check.name.is_empty() {
                check.name = format!("Service '{}' check", self.name);
            }
            check.service_id = Some(self.id.clone());
            check.validate()?;
        }
        Ok(())
    }
}

/// Does `have` carry every tag in `wanted`? Tags compare ignoring case,
/// as Consul's `serviceTagFilter` does (without allocating: this runs on
/// DNS lookups).
pub fn has_tags<'w>(have: &[String], wanted: impl IntoIterator<Item = &'w str>) -> bool {
    let same = |a: &str, b: &str| {
        a.chars()
            .flat_map(char::to_lowercase)
            .eq(b.chars().flat_map(char::to_lowercase))
    };
    wanted.into_iter().all(|w| have.iter().any(|h| same(h, w)))
}

pub fn valid_name(name: &str) -> bool {
    name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 256 && !id.contains('/') && !id.chars().any(char::is_whitespace)
}

pub fn valid_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

pub fn validate_meta<'a>(
    meta: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), ModelError> {
    if meta.len() > 64 {
        return Err(ModelError::InvalidMeta(format!(
            "{} pairs, at most 64 are allowed",
            meta.len()
        )));
    }
    for (key, value) in meta {
        if key.is_empty()
            || key.len() > 128
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ModelError::InvalidMeta(format!(
                "key {key:?}: keys are 1 to 128 characters of letters, digits, '-' and '_'"
            )));
        }
        if key.starts_with("consul-") {
            return Err(ModelError::InvalidMeta(format!(
                "key {key:?}: the \"consul-\" prefix is reserved"
            )));
        }
        if value.len() > 512 {
            return Err(ModelError::InvalidMeta(format!(
                "value of {key:?} is {} characters, at most 512 are allowed",
                value.len()
            )));
        }
    }
    Ok(())
}

/// What a check probes, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// 2xx passes, 429 warns, anything else is critical.
    Http {
        url: String,
        #[serde(default = "default_method")]
        method: String,
        #[serde(default)]
        headers: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        body: String,
        #[serde(default)]
        tls_skip_verify: bool,
        #[serde(default)]
        tls_server_name: Option<String>,
        #[serde(default)]
        disable_redirects: bool,
    },
    /// A successful connect passes.
    Tcp { address: String },
    /// The standard `grpc.health.v1.Health/Check`; `target` is
    /// `host:port[/service]`.
    Grpc {
        target: String,
        #[serde(default)]
        use_tls: bool,
        #[serde(default)]
        tls_skip_verify: bool,
    },
    /// Exit 0 passes, 1 warns, anything else (or a timeout) is critical.
    Exec { args: Vec<String> },
    /// The application reports its own status and must do so within `ttl`.
    Ttl {
        #[serde(with = "crate::duration::serde_go")]
        ttl: Duration,
    },
}

fn default_method() -> String {
    "GET".to_string()
}

impl CheckKind {
    /// The check type as Consul names it in `Type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Grpc { .. } => "grpc",
            CheckKind::Exec { .. } => "script",
            CheckKind::Ttl { .. } => "ttl",
        }
    }
}

/// A health check of a service (or of the node when `service_id` is `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckDefinition {
    /// Given by the registration, or derived from the service id.
    pub id: Option<CheckId>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub notes: String,
    #[serde(default)]
    pub service_id: Option<ServiceId>,
    pub kind: CheckKind,
    /// Zero for TTL checks, at least [`MIN_CHECK_INTERVAL`] otherwise.
    #[serde(with = "crate::duration::serde_go", default)]
    pub interval: Duration,
    #[serde(with = "crate::duration::serde_go_opt", default)]
    pub timeout: Option<Duration>,
    /// The status before the first result; Consul starts checks critical.
    #[serde(default)]
    pub initial_status: Option<Health>,
    #[serde(default)]
    pub success_before_passing: u32,
    #[serde(default)]
    pub failures_before_warning: u32,
    #[serde(default)]
    pub failures_before_critical: u32,
    #[serde(with = "crate::duration::serde_go_opt", default)]
    pub deregister_critical_after: Option<Duration>,
    #[serde(default = "default_output_max_size")]
    pub output_max_size: usize,
}

fn default_output_max_size() -> usize {
    DEFAULT_OUTPUT_MAX_SIZE
}

impl CheckDefinition {
    /// A definition with Consul's defaults for everything but what it probes.
    pub fn new(kind: CheckKind, interval: Duration) -> Self {
        CheckDefinition {
            id: None,
            name: String::new(),
            notes: String::new(),
            service_id: None,
            kind,
            interval,
            timeout: None,
            initial_status: None,
            success_before_passing: 0,
            failures_before_warning: 0,
            failures_before_critical: 0,
            deregister_critical_after: None,
            output_max_size: DEFAULT_OUTPUT_MAX_SIZE,
        }
    }

    /// The id, or the name when none was given (Consul's rule for
    /// standalone check registrations).
    pub fn effective_id(&self) -> CheckId {
        self.id
            .clone()
            .unwrap_or_else(|| CheckId::new(self.name.clone()))
    }

    /// The probe timeout after defaults.
    pub fn effective_timeout(&self) -> Duration {
        self.timeout.unwrap_or(match self.kind {
            CheckKind::Exec { .. } => DEFAULT_EXEC_TIMEOUT,
            _ => DEFAULT_NETWORK_TIMEOUT,
        })
    }

    /// Consecutive failures before the check turns warning (defaults to the
    /// critical threshold, as in Consul 1.11+).
    pub fn effective_failures_before_warning(&self) -> u32 {
        if self.failures_before_warning == 0 {
            self.failures_before_critical
        } else {
            self.failures_before_warning
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let label = self
            .id
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_else(|| self.name.clone());
        let err = |reason: String| ModelError::InvalidCheck {
            check: if label.is_empty() {
                "(unnamed)".to_string()
            } else {
                format!("{label:?}")
            },
            reason,
        };
        if self.id.is_none() && self.name.is_empty() {
            return Err(err("a check needs an id or a name".to_string()));
        }
        if let Some(id) = &self.id
            && (id.as_str().is_empty() || id.as_str().chars().any(char::is_whitespace))
        {
            return Err(err(
                "the id must be non-empty and contain no whitespace".to_string()
            ));
        }
        self.kind.validate(self.interval).map_err(err)?;
        if let Some(timeout) = self.timeout
            && timeout.is_zero()
        {
            return Err(err("timeout must be greater than 0".to_string()));
        }
        // Durations parsed from text are bounded already; these may come
        // as numbers of nanoseconds or from an older state file.
        let ttl = match &self.kind {
            CheckKind::Ttl { ttl } => Some(*ttl),
            _ => None,
        };
        for (field, d) in [
            ("interval", Some(self.interval)),
            ("timeout", self.timeout),
            ("ttl", ttl),
            ("deregister_critical_after", self.deregister_critical_after),
        ] {
            if d.is_some_and(|d| d > crate::duration::MAX) {
                return Err(err(format!(
                    "{field} is too large (at most 2562047h47m16.854775807s)"
                )));
            }
        }
        if self.failures_before_warning > self.failures_before_critical
            && self.failures_before_critical > 0
        {
            return Err(err(
                "failures_before_warning must not exceed failures_before_critical".to_string(),
            ));
        }
        if self.output_max_size == 0 || self.output_max_size > MAX_OUTPUT_MAX_SIZE {
            return Err(err(format!(
                "output_max_size must be between 1 and {MAX_OUTPUT_MAX_SIZE} bytes"
            )));
        }
        Ok(())
    }
}

impl CheckKind {
    /// The rules of this kind of check, run every `interval`: a TTL, or
    /// an interval of at least 1 s, and a target of the right form.
    fn validate(&self, interval: Duration) -> Result<(), String> {
        match self {
            CheckKind::Ttl { ttl } => {
                if ttl.is_zero() {
                    return Err("ttl must be greater than 0".to_string());
                }
            }
            kind => {
                if interval < MIN_CHECK_INTERVAL {
                    return Err(format!(
                        "interval is required for {} checks and must be at least 1s",
                        kind.type_name()
                    ));
                }
            }
        }
        match self {
            CheckKind::Http { url, method, .. } => {
                let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
                if !scheme_ok || url.len() <= "https://".len() {
                    return Err(format!(
                        "http url {url:?} must start with http:// or https://"
                    ));
                }
                if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) {
                    return Err(format!(
                        "http method {method:?} must be an upper-case HTTP method such as GET"
                    ));
                }
            }
            CheckKind::Tcp { address } => {
                if !valid_host_port(address) {
                    return Err(format!("tcp address {address:?} must be host:port"));
                }
            }
            CheckKind::Grpc { target, .. } => {
                let host_port = target.split('/').next().unwrap_or_default();
                if !valid_host_port(host_port) {
                    return Err(format!(
                        "grpc target {target:?} must be host:port or host:port/service"
                    ));
                }
            }
            CheckKind::Exec { args } => {
                if args.is_empty() || args[0].is_empty() {
                    return Err(
                        "args must name the program to run, e.g. [\"/usr/local/bin/check\"]"
                            .to_string(),
                    );
                }
            }
            CheckKind::Ttl { .. } => {}
        }
        Ok(())
    }
}

fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(checks: usize) -> ServiceDefinition {
        ServiceDefinition {
            id: "web-1".into(),
            name: "web".into(),
            address: String::new(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            tagged_addresses: BTreeMap::new(),
            zone: None,
            weights: Weights::default(),
            protocol: Protocol::Http,
            enable_tag_override: false,
            checks: (0..checks)
                .map(|_| {
                    CheckDefinition::new(
                        CheckKind::Tcp {
                            address: "127.0.0.1:80".into(),
                        },
                        Duration::from_secs(10),
                    )
                })
                .collect(),
            connect: None,
            drain: None,
        }
    }

    #[test]
    fn single_check_gets_consul_id_and_name() {
        let mut s = service(1);
        s.validate().unwrap();
        assert_eq!(s.checks[0].id, Some(CheckId::new("service:web-1")));
        assert_eq!(s.checks[0].name, "Service 'web' check");
        assert_eq!(s.checks[0].service_id, Some(ServiceId::new("web-1")));
    }

    #[test]
    fn several_checks_are_numbered_from_one() {
        let mut s = service(2);
        s.validate().unwrap();
        assert_eq!(s.checks[0].id, Some(CheckId::new("service:web-1:1")));
        assert_eq!(s.checks[1].id, Some(CheckId::new("service:web-1:2")));
    }

    #[test]
    fn rejects_unspecified_address_and_reserved_meta() {
        let mut s = service(0);
        s.address = "0.0.0.0".into();
        assert!(matches!(s.validate(), Err(ModelError::InvalidAddress(..))));
        let mut s = service(0);
        s.meta.insert("consul-x".into(), "y".into());
        assert!(matches!(s.validate(), Err(ModelError::InvalidMeta(_))));
    }

    #[test]
    fn rejects_short_interval_and_bad_thresholds() {
        let mut s = service(1);
        s.checks[0].interval = Duration::from_millis(10);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("at least 1s")
        );
        let mut s = service(1);
        s.checks[0].failures_before_warning = 5;
        s.checks[0].failures_before_critical = 2;
        assert!(s.validate().is_err());
    }

    #[test]
    fn durations_and_sizes_beyond_their_limits_are_refused() {
        let huge = crate::duration::MAX + Duration::from_nanos(1);
        let mut s = service(1);
        s.checks[0].deregister_critical_after = Some(huge);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("deregister_critical_after is too large"), "{e}");
        let mut s = service(1);
        s.checks[0].kind = CheckKind::Ttl { ttl: huge };
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("ttl is too large"), "{e}");
        let mut s = service(1);
        s.checks[0].output_max_size = MAX_OUTPUT_MAX_SIZE + 1;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("output_max_size"), "{e}");
        let mut s = service(1);
        s.checks[0].output_max_size = MAX_OUTPUT_MAX_SIZE;
        s.validate().unwrap();
    }

    #[test]
    fn health_orders_from_best_to_worst() {
        assert_eq!(
            [Health::Passing, Health::Critical, Health::Warning]
                .into_iter()
                .max(),
            Some(Health::Critical)
        );
        assert_eq!("WARNING".parse::<Health>(), Ok(Health::Warning));
    }
}
