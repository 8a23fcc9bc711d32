//! The shared model of Signpost: what every other crate agrees on.
//!
//! Layout:
//! - [`accept`]: what an accept loop does when accepting fails (back off,
//!   log once a period), and the tally of refusals logged the same way.
//! - [`acl`]: ACL rules in Consul's shape (service, node, key, agent,
//!   operator, acl) and the decision they make for a request.
//! - [`duration`]: Go-style durations ("10s", "1m30s", "250ms"), the one way
//!   every config file and API body spells a time span.
//! - [`event`]: Consul's user events (name, payload, filters).
//! - [`intention`]: Consul's service intentions (who may call whom, per
//!   connection or per HTTP request), their `/v1/connect/intentions` JSON,
//!   and the compiled set an agent's inbound listener enforces.
//! - [`identity`]: service identities in the mesh (SPIFFE IDs) and the
//!   server names inbound listeners are dialled with.
//! - [`kv`]: Consul's key/value store and sessions as clients speak them
//!   (key names, `KVPair`, session and transaction bodies, `/v1/kv` queries).
//! - [`model`]: services, instances' checks and health, with newtypes for the
//!   identifiers (`ServiceId`, `ServiceName`, `CheckId`) and the validation
//!   rules that hold whatever the source (YAML file or HTTP API).
//! - [`command`]: operator commands (block, degrade, circuit, policy) with
//!   their target, reason and expiry, and their validation.
//! - [`consul`]: Consul's JSON shapes, for every API and the CLI.
//! - [`config`], [`control_plane_config`]: the agent's and the control
//!   plane's YAML configuration, strictly typed and validated before any
//!   socket is bound.
//! - [`policy`]: the proxy's per-service traffic policy (timeouts,
//!   retries, limits, balancer, ejection, breaker), from configuration.
//! - [`overlay`]: operator commands applied over a policy.
//! - [`request`]: Consul request bodies, read case-insensitively.
//! - [`sockets`]: the listening sockets a restarting process hands its
//!   successor, by name.
//! - [`service_file`]: the `services.d/*.yaml` format that turns into
//!   [`model::ServiceDefinition`]s.
//! - [`vip`]: stable service VIPs from `proxy.vip_range`, shared by DNS and
//!   the proxy.
//! - [`yaml`]: YAML parsing with `file:line:col: what is wrong` errors.
//!
//! This crate never reads files or the environment; the binaries do.

pub mod accept;
pub mod acl;
pub mod command;
pub mod config;
pub mod consul;
pub mod control_plane_config;
pub mod duration;
pub mod event;
pub mod identity;
pub mod intention;
pub mod kv;
pub mod model;
pub mod overlay;
pub mod policy;
pub mod request;
pub mod service_file;
pub mod sockets;
pub mod uuid;
pub mod vip;
pub mod yaml;

/// An error and its causes on one line (`a: b: c`), each cause once even
/// when a message already repeats it: for logs and health-check output.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod examples {
    //! Every shipped example must parse and validate.

    #[test]
    fn example_agent_config_parses() {
        let text = include_str!("../../examples/agent.yaml");
        let config = crate::config::AgentConfig::from_yaml("examples/agent.yaml", text).unwrap();
        assert_eq!(config.node_name.as_deref(), Some("web-1"));
    }

    #[test]
    fn example_control_plane_config_parses() {
        let text = include_str!("../../examples/control-plane.yaml");
        let config = crate::control_plane_config::ControlPlaneConfig::from_yaml(
            "examples/control-plane.yaml",
            text,
        )
        .unwrap();
        assert_eq!(config.agent_tokens.len(), 1);
    }

    #[test]
    fn example_service_files_parse() {
        let text = include_str!("../../examples/services.d/payments.yaml");
        let defs = crate::service_file::parse("payments.yaml", text).unwrap();
        assert_eq!(defs.len(), 2);
        assert_eq!(defs[0].checks.len(), 3);
    }
}
