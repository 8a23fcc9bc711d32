//! Fuzzing the parsers of what operators write (service files, the agent's
//! and the control plane's configuration, operator commands): mutations of
//! the shipped examples never panic, every refusal names the file (and,
//! for YAML, the line), and whatever is accepted passes validation again
//! with every duration within what a clock can hold. See `signpost-fuzz`
//! for the dose.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use signpost_core::command::NewCommand;
use signpost_core::config::AgentConfig;
use signpost_core::control_plane_config::ControlPlaneConfig;
use signpost_core::model::CheckKind;
use signpost_core::{duration, service_file};
use signpost_fuzz::Dose;

fn seeds(texts: &[&str]) -> Vec<Vec<u8>> {
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}

#[test]
fn service_files_never_panic_and_what_they_accept_is_valid() {
    let seeds = seeds(&[
        include_str!("../../examples/services.d/payments.yaml"),
        "service:\n  name: web\n  port: 8080\n  tags: [v1]\n  checks:\n    - http: http://127.0.0.1:8080/health\n      interval: 10s\n      timeout: 2s\n    - ttl: 30s\n      deregister_critical_after: 90m\n",
        "services:\n  - name: db\n    address: 10.0.0.5\n    port: 5432\n    protocol: tcp\n    meta: {role: primary}\n    weights: {passing: 3, warning: 1}\n    checks:\n      - tcp: 10.0.0.5:5432\n        interval: 5s\n      - grpc: 127.0.0.1:9000\n        interval: 1s\n        failures_before_critical: 3\n",
    ]);
    let mut dose = Dose::from_env(20_000);
    let mut accepted = 0;
    while dose.another() {
        let input = dose.mutation(&seeds);
        let Ok(text) = std::str::from_utf8(&input) else {
            continue;
        };
        match service_file::parse("fuzz.yaml", text) {
            Ok(defs) => {
                accepted += 1;
                for def in defs {
                    def.clone().validate().unwrap_or_else(|e| {
                        panic!("{}: accepted but invalid ({e}): {text:?}", dose.at())
                    });
                    for check in &def.checks {
                        let ttl = match check.kind {
                            CheckKind::Ttl { ttl } => Some(ttl),
                            _ => None,
                        };
                        let durations = [
                            Some(check.interval),
                            check.timeout,
                            ttl,
                            check.deregister_critical_after,
                            Some(check.effective_timeout()),
                        ];
                        for d in durations.into_iter().flatten() {
                            assert!(d <= duration::MAX, "{}: {d:?} in {text:?}", dose.at());
                        }
                    }
                }
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("fuzz.yaml"), "{}: {e}", dose.at());
            }
        }
    }
    assert!(
        accepted > 0,
        "no mutation was accepted: the seeds are broken"
    );
}

#[test]
fn configurations_never_panic_and_refusals_name_the_file() {
    let agent = seeds(&[include_str!("../../examples/agent.yaml")]);
    let cp = seeds(&[include_str!("../../examples/control-plane.yaml")]);
    let mut dose = Dose::from_env(10_000);
    while dose.another() {
        let control_plane = dose.done().is_multiple_of(2);
        let input = dose.mutation(if control_plane { &cp } else { &agent });
        let Ok(text) = std::str::from_utf8(&input) else {
            continue;
        };
        let refused = if control_plane {
            ControlPlaneConfig::from_yaml("fuzz.yaml", text)
                .err()
                .map(|e| e.to_string())
        } else {
            AgentConfig::from_yaml("fuzz.yaml", text)
                .err()
                .map(|e| e.to_string())
        };
        if let Some(e) = refused {
            assert!(e.starts_with("fuzz.yaml"), "{}: {e}", dose.at());
        }
    }
}

#[test]
fn operator_commands_never_panic() {
    let seeds = seeds(&[
        r#"{"action": {"kind": "block"}, "target": {"service": "web", "instance": "10.0.0.7:8080"}, "reason": "bad", "ttl": "2h"}"#,
        r#"{"action": {"kind": "degrade", "fallback": {"status": 503, "body": "later"}}, "target": {"service": "web"}, "reason": "r", "ttl": "10m"}"#,
        r#"{"action": {"kind": "circuit", "state": "open"}, "target": {"service": "web", "callers": ["api"]}, "reason": "r", "ttl": "1h"}"#,
    ]);
    let mut dose = Dose::from_env(20_000);
    let mut parsed = 0;
    while dose.another() {
        let input = dose.mutation(&seeds);
        if let Ok(command) = serde_json::from_slice::<NewCommand>(&input) {
            parsed += 1;
            let _ = command.validate();
        }
    }
    assert!(parsed > 0, "no mutation parsed: the seeds are broken");
}
