//! What a reload does with each field of the file it read: applied to the
//! running agent, or left for the next start. Decided field by field by
//! what the agent can change while serving; the struct patterns name
//! every field, so a new one does not compile until it is decided here.

use signpost_core::config::{
    AgentAclConfig, AgentConfig, ApiConfig, ChecksConfig, ControlPlaneClientConfig, DnsConfig,
    HttpLimits, LogConfig, MeshConfig, ProxyConfig,
};

/// A file compared with the configuration in force.
#[derive(Debug)]
pub(crate) struct Diff {
    /// The configuration to run with: the one in force, with every field
    /// a reload applies taken from the file.
    pub(crate) next: AgentConfig,
    /// The YAML paths of the fields that changed and are applied.
    pub(crate) applied: Vec<String>,
    /// The YAML paths of the fields that changed but apply only at the
    /// next start.
    pub(crate) restart_required: Vec<String>,
}

impl Diff {
    /// Whether the section at `prefix` (`dns`, `checks`) has a field
    /// applied.
    pub(crate) fn applies(&self, prefix: &str) -> bool {
        self.applied
            .iter()
            .any(|path| path == prefix || path.starts_with(&format!("{prefix}.")))
    }

    /// `path` is applied: the next configuration takes the file's value.
    fn live<T: PartialEq + Clone>(
        &mut self,
        path: &str,
        file: &T,
        field: impl FnOnce(&mut AgentConfig) -> &mut T,
    ) {
        let slot = field(&mut self.next);
        if slot != file {
            slot.clone_from(file);
            self.applied.push(path.to_string());
        }
    }

    /// `path` keeps its value until the next start.
    fn restart<T: PartialEq>(
        &mut self,
        path: &str,
        file: &T,
        field: impl FnOnce(&AgentConfig) -> &T,
    ) {
        if field(&self.next) != file {
            self.restart_required.push(path.to_string());
        }
    }
}

/// Compares `file` with `running`, the configuration in force.
pub(crate) fn diff(running: &AgentConfig, file: &AgentConfig) -> Diff {
    let mut d = Diff {
        next: running.clone(),
        applied: Vec::new(),
        restart_required: Vec::new(),
    };
    let AgentConfig {
        node_name,
        data_dir,
        advertise_addr,
        liveness_port,
        drain_timeout,
        zone,
        datacenter,
        services_dir,
        node_meta,
        api,
        log,
        checks,
        control_plane,
        upstreams,
        dns,
        proxy,
        acl,
        mesh,
    } = file;
    // Who this node is, where it keeps its state and what it listens on
    // are settled at start.
    d.restart("node_name", node_name, |c| &c.node_name);
    d.restart("data_dir", data_dir, |c| &c.data_dir);
    d.restart("advertise_addr", advertise_addr, |c| &c.advertise_addr);
    d.restart("liveness_port", liveness_port, |c| &c.liveness_port);
    d.restart("drain_timeout", drain_timeout, |c| &c.drain_timeout);
    d.restart("zone", zone, |c| &c.zone);
    d.restart("datacenter", datacenter, |c| &c.datacenter);
    d.restart("services_dir", services_dir, |c| &c.services_dir);
    d.restart("node_meta", node_meta, |c| &c.node_meta);
    d.live("upstreams", upstreams, |c| &mut c.upstreams);
    api_section(&mut d, api);
    log_section(&mut d, log);
    checks_section(&mut d, checks);
    control_plane_section(&mut d, control_plane.as_ref());
    dns_section(&mut d, dns);
    proxy_section(&mut d, proxy);
    acl_section(&mut d, acl);
    mesh_section(&mut d, mesh);
    d
}

fn api_section(d: &mut Diff, api: &ApiConfig) {
    let ApiConfig {
        listen,
        max_query_time,
        default_query_time,
        limits:
            HttpLimits {
                header_timeout,
                max_connections_per_client,
            },
    } = api;
    d.restart("api.listen", listen, |c| &c.api.listen);
    // Read by each blocking query.
    d.live("api.max_query_time", max_query_time, |c| {
        &mut c.api.max_query_time
    });
    d.live("api.default_query_time", default_query_time, |c| {
        &mut c.api.default_query_time
    });
    // The HTTP server's loop took them at start.
    d.restart("api.limits.header_timeout", header_timeout, |c| {
        &c.api.limits.header_timeout
    });
    d.restart(
        "api.limits.max_connections_per_client",
        max_connections_per_client,
        |c| &c.api.limits.max_connections_per_client,
    );
}

fn log_section(d: &mut Diff, log: &LogConfig) {
    let LogConfig { format, level } = log;
    d.restart("log.format", format, |c| &c.log.format);
    d.live("log.level", level, |c| &mut c.log.level);
}

fn checks_section(d: &mut Diff, checks: &ChecksConfig) {
    let ChecksConfig {
        fast_recheck_count,
        fast_recheck_spacing,
        enable_exec,
        http_keep_alive,
    } = checks;
    d.live("checks.fast_recheck_count", fast_recheck_count, |c| {
        &mut c.checks.fast_recheck_count
    });
    d.live("checks.fast_recheck_spacing", fast_recheck_spacing, |c| {
        &mut c.checks.fast_recheck_spacing
    });
    // Exec checks allowed at start run; turning them off would have to
    // remove registered checks, turning them on to re-read refused files.
    d.restart("checks.enable_exec", enable_exec, |c| &c.checks.enable_exec);
    d.live("checks.http_keep_alive", http_keep_alive, |c| {
        &mut c.checks.http_keep_alive
    });
}

/// The sync's connection, identity and subscriptions are set up at start.
fn control_plane_section(d: &mut Diff, file: Option<&ControlPlaneClientConfig>) {
    let (Some(file), Some(running)) = (file, d.next.control_plane.as_ref()) else {
        d.restart("control_plane", &file.cloned(), |c| &c.control_plane);
        return;
    };
    let ControlPlaneClientConfig {
        addresses,
        ca_file,
        token,
        server_name,
        http,
        first_lookup_wait,
        subscription_idle,
    } = file;
    let changed = [
        ("addresses", *addresses != running.addresses),
        ("ca_file", *ca_file != running.ca_file),
        ("token", *token != running.token),
        ("server_name", *server_name != running.server_name),
        ("http", *http != running.http),
        (
            "first_lookup_wait",
            *first_lookup_wait != running.first_lookup_wait,
        ),
        (
            "subscription_idle",
            *subscription_idle != running.subscription_idle,
        ),
    ];
    let paths = changed
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(field, _)| format!("control_plane.{field}"));
    d.restart_required.extend(paths);
}

fn dns_section(d: &mut Diff, dns: &DnsConfig) {
    let DnsConfig {
        enabled,
        listen,
        threads,
        domain,
        answer,
        only_passing,
        ttl,
        node_ttl,
        services,
        recursors,
        recursor_timeout,
        cache_size,
    } = dns;
    // The sockets and their threads.
    d.restart("dns.enabled", enabled, |c| &c.dns.enabled);
    d.restart("dns.listen", listen, |c| &c.dns.listen);
    d.restart("dns.threads", threads, |c| &c.dns.threads);
    // What the server answers with, swapped whole.
    d.live("dns.domain", domain, |c| &mut c.dns.domain);
    d.live("dns.answer", answer, |c| &mut c.dns.answer);
    d.live("dns.only_passing", only_passing, |c| {
        &mut c.dns.only_passing
    });
    d.live("dns.ttl", ttl, |c| &mut c.dns.ttl);
    d.live("dns.node_ttl", node_ttl, |c| &mut c.dns.node_ttl);
    d.live("dns.services", services, |c| &mut c.dns.services);
    d.live("dns.recursors", recursors, |c| &mut c.dns.recursors);
    d.live("dns.recursor_timeout", recursor_timeout, |c| {
        &mut c.dns.recursor_timeout
    });
    d.live("dns.cache_size", cache_size, |c| &mut c.dns.cache_size);
}

fn proxy_section(d: &mut Diff, proxy: &ProxyConfig) {
    let ProxyConfig {
        enabled,
        vip_range,
        http_port,
        threads,
        pool_idle_timeout,
        client_idle_timeout,
        client_first_byte_timeout,
        tcp_keepalive,
        tcp_user_timeout,
        access_log,
        defaults,
        services,
    } = proxy;
    // The proxy's threads, VIPs and connection settings are set up at
    // start.
    d.restart("proxy.enabled", enabled, |c| &c.proxy.enabled);
    d.restart("proxy.vip_range", vip_range, |c| &c.proxy.vip_range);
    d.restart("proxy.http_port", http_port, |c| &c.proxy.http_port);
    d.restart("proxy.threads", threads, |c| &c.proxy.threads);
    d.restart("proxy.pool_idle_timeout", pool_idle_timeout, |c| {
        &c.proxy.pool_idle_timeout
    });
    d.restart("proxy.client_idle_timeout", client_idle_timeout, |c| {
        &c.proxy.client_idle_timeout
    });
    d.restart(
        "proxy.client_first_byte_timeout",
        client_first_byte_timeout,
        |c| &c.proxy.client_first_byte_timeout,
    );
    d.restart("proxy.tcp_keepalive", tcp_keepalive, |c| {
        &c.proxy.tcp_keepalive
    });
    d.restart("proxy.tcp_user_timeout", tcp_user_timeout, |c| {
        &c.proxy.tcp_user_timeout
    });
    d.restart("proxy.access_log", access_log, |c| &c.proxy.access_log);
    // Each service's policy, given to the proxy as its instances are.
    d.live("proxy.defaults", defaults, |c| &mut c.proxy.defaults);
    d.live("proxy.services", services, |c| &mut c.proxy.services);
}

/// The local API's token cache is set up at start.
fn acl_section(d: &mut Diff, acl: &AgentAclConfig) {
    let AgentAclConfig {
        default_policy,
        down_policy,
        token_ttl,
    } = acl;
    d.restart("acl.default_policy", default_policy, |c| {
        &c.acl.default_policy
    });
    d.restart("acl.down_policy", down_policy, |c| &c.acl.down_policy);
    d.restart("acl.token_ttl", token_ttl, |c| &c.acl.token_ttl);
}

/// The inbound listener and what this node tells the fleet about its
/// services are set up at start.
fn mesh_section(d: &mut Diff, mesh: &MeshConfig) {
    let MeshConfig {
        enabled,
        inbound_port,
        connect_by_default,
        default_source,
    } = mesh;
    d.restart("mesh.enabled", enabled, |c| &c.mesh.enabled);
    d.restart("mesh.inbound_port", inbound_port, |c| &c.mesh.inbound_port);
    d.restart("mesh.connect_by_default", connect_by_default, |c| {
        &c.mesh.connect_by_default
    });
    d.restart("mesh.default_source", default_source, |c| {
        &c.mesh.default_source
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> AgentConfig {
        AgentConfig::from_yaml("agent.yaml", yaml).unwrap()
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let running = config("dns:\n  ttl: 7s\nupstreams: [web]\n");
        let d = diff(&running, &running.clone());
        assert!(d.applied.is_empty(), "{:?}", d.applied);
        assert!(d.restart_required.is_empty(), "{:?}", d.restart_required);
        assert_eq!(d.next, running);
    }

    #[test]
    fn live_fields_are_applied_and_the_rest_waits_for_a_restart() {
        let running = config("api:\n  listen: 127.0.0.1:8500\n");
        let file = config(
            "api:\n  listen: 127.0.0.2:8500\n  max_query_time: 1m\n  default_query_time: 30s\n\
             log:\n  level: debug\n  format: json\n\
             checks:\n  fast_recheck_count: 1\n  enable_exec: true\n\
             dns:\n  ttl: 42s\n  recursors: [10.0.0.2]\n  listen: 127.0.0.1:53\n\
             proxy:\n  defaults: {timeout: 2s}\n  services:\n    web: {retries: 0}\n  http_port: 8080\n\
             upstreams: [payments]\n\
             node_name: other\nzone: b\nacl:\n  token_ttl: 1m\nmesh:\n  inbound_port: 9443\n",
        );
        let d = diff(&running, &file);
        assert_eq!(
            d.applied,
            [
                "upstreams",
                "api.max_query_time",
                "api.default_query_time",
                "log.level",
                "checks.fast_recheck_count",
                "dns.ttl",
                "dns.recursors",
                "proxy.defaults",
                "proxy.services",
            ]
        );
        assert_eq!(
            d.restart_required,
            [
                "node_name",
                "zone",
                "api.listen",
                "log.format",
                "checks.enable_exec",
                "dns.listen",
                "proxy.http_port",
                "acl.token_ttl",
                "mesh.inbound_port",
            ]
        );
        // What is applied is the file's; what waits keeps its value.
        assert_eq!(d.next.dns.ttl, file.dns.ttl);
        assert_eq!(d.next.proxy.policy("web"), file.proxy.policy("web"));
        assert_eq!(d.next.upstreams, ["payments"]);
        assert_eq!(d.next.log.level, "debug");
        assert_eq!(d.next.api.listen, running.api.listen);
        assert_eq!(d.next.dns.listen, running.dns.listen);
        assert_eq!(d.next.node_name, None);
        assert!(!d.next.checks.enable_exec);
        assert!(d.applies("dns") && d.applies("checks") && !d.applies("mesh"));
        assert!(!d.applies("dn"), "a prefix is a whole section");
    }

    #[test]
    fn a_field_waiting_for_a_restart_is_reported_until_then() {
        let running = config("");
        let file = config("api:\n  listen: 127.0.0.2:8500\ndns:\n  ttl: 9s\n");
        let first = diff(&running, &file);
        assert_eq!(first.applied, ["dns.ttl"]);
        assert_eq!(first.restart_required, ["api.listen"]);
        let again = diff(&first.next, &file);
        assert!(again.applied.is_empty());
        assert_eq!(again.restart_required, ["api.listen"]);
    }

    #[test]
    fn control_plane_changes_are_named_by_field() {
        let cp =
            "control_plane:\n  addresses: [\"127.0.0.1:8300\"]\n  ca_file: /ca.pem\n  token: t\n";
        let running = config(cp);
        let file = config(&format!("{cp}  subscription_idle: 1m\n"));
        let d = diff(&running, &file);
        assert_eq!(d.restart_required, ["control_plane.subscription_idle"]);
        let d = diff(&running, &config(""));
        assert_eq!(d.restart_required, ["control_plane"]);
        let d = diff(&config(""), &running);
        assert_eq!(d.restart_required, ["control_plane"]);
    }
}
