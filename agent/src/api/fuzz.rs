//! Fuzzing the agent's API bodies: mutations of registrations as Consul
//! clients send them (PascalCase, lowercase, snake_case; Go durations and
//! nanoseconds) go through the decoding, validation and local state the
//! handlers use. Nothing may panic; what is refused says why; what is
//! accepted validates again, renders in Consul's shapes and can be
//! deregistered. Checks are not run (their targets are random: no probe
//! may leave for them). See `signpost-fuzz` for the dose.

use signpost_core::model::{Health, ServiceDefinition};
use signpost_fuzz::Dose;

use super::{decode, render};
use crate::state::{LocalState, NodeInfo, Source};

fn state() -> LocalState {
    LocalState::new(NodeInfo {
        name: "fuzz".into(),
        id: "fuzz-id".into(),
        address: "127.0.0.1".into(),
        datacenter: "dc1".into(),
        zone: "a".into(),
        meta: Default::default(),
        mesh: true,
        connect_by_default: false,
    })
}

const SERVICES: &[&str] = &[
    r#"{"ID": "redis1", "Name": "redis", "Tags": ["primary", "v1"], "Address": "127.0.0.1", "Port": 8000, "Meta": {"redis_version": "4.0"}, "EnableTagOverride": false, "Weights": {"Passing": 10, "Warning": 1}, "Check": {"DeregisterCriticalServiceAfter": "90m", "HTTP": "http://localhost:5000/health", "Interval": "10s", "Timeout": "5s"}}"#,
    r#"{"name": "web", "id": "web-1", "port": 8080, "tags": ["a"], "checks": [{"ttl": "10s"}, {"tcp": "127.0.0.1:8080", "interval": 10000000000}, {"grpc": "127.0.0.1:9000/svc", "grpc_use_tls": true, "interval": "1s"}]}"#,
    r#"{"Name": "db", "Port": 5432, "Check": {"Args": ["/bin/true"], "Interval": "30s", "SuccessBeforePassing": 2, "FailuresBeforeCritical": 3, "Status": "passing", "Notes": "n", "OutputMaxSize": 8192}}"#,
];

const CHECKS: &[&str] = &[
    r#"{"Name": "mem", "ID": "mem", "TTL": "15s", "Notes": "n", "Status": "warning"}"#,
    r#"{"name": "api", "service_id": "web-1", "http": "http://127.0.0.1/h", "method": "POST", "header": {"X": ["1"]}, "interval": "5s", "timeout": "1s", "tls_skip_verify": true}"#,
];

#[test]
fn registrations_never_panic_and_what_is_accepted_holds() {
    let seeds: Vec<Vec<u8>> = SERVICES
        .iter()
        .chain(CHECKS)
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let state = state();
    let mut dose = Dose::from_env(20_000);
    let (mut services, mut checks) = (0, 0);
    while dose.another() {
        let input = dose.mutation(&seeds);
        let Ok(value) = decode::body(&input) else {
            continue;
        };
        if dose.done().is_multiple_of(2) {
            let Ok(mut def) = decode::service(value) else {
                continue;
            };
            if def.validate().is_err() {
                continue;
            }
            let again: ServiceDefinition = def.clone();
            let Ok(_) = state.register_service(def, Source::Api, true) else {
                continue;
            };
            services += 1;
            let rendered = state.read(|inner| {
                let entry = &inner.services[&again.id];
                (
                    render::agent_service(inner, entry),
                    render::health_entry(inner, entry),
                )
            });
            assert_eq!(rendered.0.id, again.id.as_str(), "{}", dose.at());
            assert!(
                rendered.1.checks.len() >= again.checks.len(),
                "{}",
                dose.at()
            );
            assert!(serde_json::to_vec(&rendered.1).is_ok(), "{}", dose.at());
            // TTL checks take reports of any status and output.
            for check in &again.checks {
                if let Some(id) = &check.id {
                    let _ = state.update_ttl(id, Health::Warning, "x".repeat(10_000));
                }
            }
            state
                .deregister_service(&again.id, &Source::Api)
                .unwrap_or_else(|e| panic!("{}: cannot deregister {}: {e}", dose.at(), again.id));
        } else {
            let Ok(check) = decode::check(value, true) else {
                continue;
            };
            if check.validate().is_err() || check.service_id.is_some() {
                continue;
            }
            let id = check.effective_id();
            if state.register_check(check, Source::Api).is_ok() {
                checks += 1;
                let rendered = state.read(|inner| render::check(inner, &inner.checks[&id]));
                assert_eq!(rendered.check_id, id.as_str(), "{}", dose.at());
                state
                    .deregister_check(&id, &Source::Api)
                    .unwrap_or_else(|e| panic!("{}: cannot deregister {id}: {e}", dose.at()));
            }
        }
    }
    assert!(
        services > 0 && checks > 0,
        "the seeds are broken: {services} services, {checks} checks"
    );
}
