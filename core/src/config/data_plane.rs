//! The data plane's sections of the agent's configuration: `dns` (names,
//! answer modes, recursors, per-service overrides) and `proxy` (threads,
//! VIPs, ports, and the traffic policy of every service).

use super::*;

/// The local DNS server (`<service>.service.<domain>` and friends; every
/// other name is forwarded to `recursors`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Serve DNS at all.
    pub enabled: bool,
    /// UDP and TCP address.
    pub listen: SocketAddr,
    /// Serving threads, each with its own sockets; 0: one per core, up
    /// to 4.
    pub threads: usize,
    /// The domain the service, node and addr names live under.
    pub domain: String,
    /// What a service name resolves to.
    pub answer: AnswerMode,
    /// Leave out instances whose checks warn, not only critical ones.
    pub only_passing: bool,
    /// TTL of service answers.
    #[serde(with = "crate::duration::serde_go")]
    pub ttl: Duration,
    /// TTL of node and addr answers.
    #[serde(with = "crate::duration::serde_go")]
    pub node_ttl: Duration,
    /// Per-service settings; a key ending in `*` matches by prefix and the
    /// longest match wins (`"*"` matches every service).
    pub services: BTreeMap<String, DnsServiceOverride>,
    /// Upstream resolvers for every other name (`ip` or `ip:port`); by
    /// default those of /etc/resolv.conf other than this server, `[]` to
    /// refuse other names.
    pub recursors: Option<Vec<String>>,
    /// How long forwarding may take in all, across every recursor tried.
    #[serde(with = "crate::duration::serde_go")]
    pub recursor_timeout: Duration,
    /// Forwarded answers kept (each for its TTL).
    pub cache_size: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8600)),
            threads: 0,
            domain: "internal".to_string(),
            answer: AnswerMode::Vip,
            only_passing: false,
            ttl: Duration::from_secs(5),
            node_ttl: Duration::from_secs(5),
            services: BTreeMap::new(),
            recursors: None,
            recursor_timeout: Duration::from_secs(2),
            cache_size: 10_000,
        }
    }
}

/// What `<service>.service.<domain>` resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerMode {
    /// The service's stable VIP; the local proxy picks a healthy instance
    /// per connection.
    #[default]
    Vip,
    /// The healthy instances' own addresses, shuffled (Consul's answer).
    Instances,
}

/// Settings of the services whose name matches a `dns.services` key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsServiceOverride {
    #[serde(default)]
    pub answer: Option<AnswerMode>,
    #[serde(default, with = "crate::duration::serde_go_opt")]
    pub ttl: Option<Duration>,
    #[serde(default)]
    pub only_passing: Option<bool>,
}

impl DnsConfig {
    /// The settings that apply to `service`: the longest matching key of
    /// `services` (an exact key beats a prefix of the same length). Keys
    /// compare ignoring ASCII case, as service names do in DNS (queries
    /// arrive lowercased).
    pub fn service_settings(&self, service: &str) -> (AnswerMode, Duration, bool) {
        let best = longest_match(&self.services, service);
        (
            best.and_then(|o| o.answer).unwrap_or(self.answer),
            best.and_then(|o| o.ttl).unwrap_or(self.ttl),
            best.and_then(|o| o.only_passing)
                .unwrap_or(self.only_passing),
        )
    }

    /// The configured recursors as socket addresses (port 53 unless
    /// given); `None` when they come from the system.
    pub fn recursor_addrs(&self) -> Option<Result<Vec<SocketAddr>, String>> {
        self.recursors.as_ref().map(|list| {
            list.iter()
                .map(|r| {
                    r.parse::<SocketAddr>()
                        .or_else(|_| r.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .map_err(|_| format!("{r:?} must be ip or ip:port"))
                })
                .collect()
        })
    }
}

/// The value of the longest key of `map` matching `service`: a key
/// ending in `*` matches by prefix, and an exact key beats a prefix of the
/// same length. Keys compare ignoring ASCII case, as service names do in
/// DNS (queries arrive lowercased).
fn longest_match<'a, T>(map: &'a BTreeMap<String, T>, service: &str) -> Option<&'a T> {
    let starts_with = |prefix: &str| {
        service
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    map.iter()
        .filter_map(|(key, o)| match key.strip_suffix('*') {
            Some(prefix) if starts_with(prefix) => Some((prefix.len(), 0, o)),
            None if key.eq_ignore_ascii_case(service) => Some((key.len(), 1, o)),
            _ => None,
        })
        .max_by_key(|(len, exact, _)| (*len, *exact))
        .map(|(_, _, o)| o)
}

/// The local proxy: listeners on the service VIPs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Run the proxy at all.
    pub enabled: bool,
    /// Where service VIPs come from (inside 127.0.0.0/8).
    pub vip_range: VipRange,
    /// The extra port every HTTP service's VIP listens on (0: none).
    pub http_port: u16,
    /// Threads connections run on; 0: one per core, up to 4.
    pub threads: usize,
    /// Idle pooled connections to instances are closed after this; keep it
    /// below the instances' own keep-alive timeout.
    #[serde(with = "crate::duration::serde_go")]
    pub pool_idle_timeout: Duration,
    /// A client's HTTP connection that starts no request for this long is
    /// closed once its current exchange ends (0: never); keep it above
    /// the clients' own pool idle timeouts.
    #[serde(with = "crate::duration::serde_go")]
    pub client_idle_timeout: Duration,
    /// A client's HTTP connection that sends nothing for this long after
    /// it opened is closed (0: never), so connections that never ask for
    /// anything cannot hold `max_connections` (HAProxy's `timeout
    /// http-request` in spirit).
    #[serde(with = "crate::duration::serde_go")]
    pub client_first_byte_timeout: Duration,
    /// TCP keep-alive probes on connections to instances, this far apart,
    /// once a connection has carried nothing for this long (0: none), so
    /// an idle L4 connection or tunnel to a host that is gone is noticed.
    #[serde(with = "crate::duration::serde_go")]
    pub tcp_keepalive: Duration,
    /// A connection to an instance whose data or keep-alive probes go
    /// unacknowledged this long is closed (`TCP_USER_TIMEOUT`; 0: the
    /// kernel's retransmission limits, some 15 minutes).
    #[serde(with = "crate::duration::serde_go")]
    pub tcp_user_timeout: Duration,
    /// One JSON (or plain) log line per request or connection, on the
    /// `signpost::access` target.
    pub access_log: bool,
    /// Policy of every service...
    pub defaults: PolicyOverride,
    /// ...and per service: a key ending in `*` matches by prefix, the
    /// longest match wins.
    pub services: BTreeMap<String, PolicyOverride>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: true,
            vip_range: VipRange::default(),
            http_port: 80,
            threads: 0,
            pool_idle_timeout: Duration::from_secs(3),
            client_idle_timeout: Duration::from_secs(600),
            client_first_byte_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(10),
            tcp_user_timeout: Duration::from_secs(30),
            access_log: false,
            defaults: PolicyOverride::default(),
            services: BTreeMap::new(),
        }
    }
}

impl ProxyConfig {
    /// The policy of `service`: the built-in defaults, then `defaults`,
    /// then its longest match in `services`.
    pub fn policy(&self, service: &str) -> Policy {
        let base = Policy::default().apply(&self.defaults);
        match longest_match(&self.services, service) {
            Some(o) => base.apply(o),
            None => base,
        }
    }
}
