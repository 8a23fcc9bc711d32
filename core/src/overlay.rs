//! Operator commands applied over a service's configured [`Policy`]:
//! what the agent's proxy serves. Each agent applies the commands in
//! force by itself (and stops applying them when they expire), so that
//! they hold with the control plane gone; later commands win.

use std::net::SocketAddr;

use crate::command::{Action, Command};
use crate::policy::{Circuit, Degraded, Policy, RateLimit, Route, RoutePolicy};

/// `policy` with the commands in force for `service` applied.
pub fn with_commands(mut policy: Policy, service: &str, commands: &[Command], now: u64) -> Policy {
    let applying = commands
        .iter()
        .filter(|c| c.active(now) && c.target.service.eq_ignore_ascii_case(service));
    for command in applying {
        if let Some(route) = &command.target.route {
            with_route_command(&mut policy, route, &command.action);
            continue;
        }
        if let (Some(instance), false) = (
            command.target.instance,
            matches!(command.action, Action::Block),
        ) {
            with_instance_command(&mut policy, instance, &command.action);
            continue;
        }
        match &command.action {
            Action::Block => policy.overlay.blocked.extend(command.target.instance),
            Action::Circuit { state } => policy.overlay.circuit = Some(*state),
            Action::Degrade { fallback } => {
                policy.overlay.degraded = Degraded::from(fallback.clone())
            }
            // A split limit arrives as this agent's share already.
            Action::RateLimit {
                per_second, burst, ..
            } => {
                policy.overlay.rate_limit = Some(RateLimit {
                    per_second: *per_second,
                    burst: *burst,
                })
            }
            Action::Policy { policy: o } => policy = policy.apply(o),
        }
    }
    policy
}

/// An instance-scoped command (other than a block).
fn with_instance_command(policy: &mut Policy, instance: SocketAddr, action: &Action) {
    match action {
        Action::Degrade { fallback } => {
            policy
                .overlay
                .instances
                .entry(instance)
                .or_default()
                .degraded = Degraded::from(fallback.clone());
        }
        Action::RateLimit {
            per_second, burst, ..
        } => {
            policy
                .overlay
                .instances
                .entry(instance)
                .or_default()
                .rate_limit = Some(RateLimit {
                per_second: *per_second,
                burst: *burst,
            });
        }
        // An open circuit on one instance is a block; closed is the norm.
        Action::Circuit { state } => {
            if *state == Circuit::Open {
                policy.overlay.blocked.push(instance);
            }
        }
        // Refused by the control plane's validation; a block is handled
        // with the service's.
        Action::Policy { .. } | Action::Block => {}
    }
}

/// A route-scoped command: merged into that route's entry.
fn with_route_command(policy: &mut Policy, route: &Route, action: &Action) {
    let entry = match policy.overlay.routes.iter().position(|r| &r.route == route) {
        Some(i) => &mut policy.overlay.routes[i],
        None => {
            policy.overlay.routes.push(RoutePolicy {
                route: route.clone(),
                degraded: Degraded::No,
                circuit: None,
                rate_limit: None,
            });
            let last = policy.overlay.routes.len() - 1;
            &mut policy.overlay.routes[last]
        }
    };
    match action {
        Action::Degrade { fallback } => entry.degraded = Degraded::from(fallback.clone()),
        Action::Circuit { state } => entry.circuit = Some(*state),
        Action::RateLimit {
            per_second, burst, ..
        } => {
            entry.rate_limit = Some(RateLimit {
                per_second: *per_second,
                burst: *burst,
            })
        }
        // Refused by the control plane's validation.
        Action::Block | Action::Policy { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Target;
    use crate::policy::{Fallback, InstancePolicy, PolicyOverride};

    fn command(service: &str, action: Action, at: u64) -> Command {
        Command {
            id: format!("c{at}"),
            action,
            target: Target {
                service: service.to_string(),
                instance: None,
                route: None,
                callers: Vec::new(),
            },
            reason: "test".to_string(),
            creator: "op".to_string(),
            created_at: at,
            expires_at: at + 1000,
            revoked_at: None,
        }
    }

    fn fallback() -> Fallback {
        Fallback {
            status: 200,
            headers: Default::default(),
            body: "cached".to_string(),
        }
    }

    #[test]
    fn commands_in_force_for_the_service_apply_and_later_ones_win() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut block = command("web", Action::Block, 1);
        block.target.instance = Some(addr);
        let mut expired = command(
            "web",
            Action::Circuit {
                state: Circuit::Open,
            },
            0,
        );
        expired.expires_at = 5;
        let mut revoked = command("web", Action::Degrade { fallback: None }, 2);
        revoked.revoked_at = Some(3);
        let other = command(
            "db",
            Action::Circuit {
                state: Circuit::Open,
            },
            4,
        );
        let degrade = command("WEB", Action::Degrade { fallback: None }, 5);
        let again = command(
            "web",
            Action::Degrade {
                fallback: Some(fallback()),
            },
            6,
        );
        let commands = [block, expired, revoked, other, degrade, again];
        let p = with_commands(Policy::default(), "web", &commands, 10);
        assert_eq!(p.overlay.blocked, vec![addr]);
        assert_eq!(p.overlay.circuit, None, "expired, or for another service");
        assert_eq!(p.overlay.degraded, Degraded::Fallback(fallback()));
        let p = with_commands(Policy::default(), "web", &commands[..5], 10);
        assert_eq!(p.overlay.degraded, Degraded::FailFast);
    }

    #[test]
    fn a_policy_command_keeps_what_other_commands_set() {
        let limit = Action::RateLimit {
            per_second: 5.0,
            burst: 10,
            split: false,
        };
        let policy = Action::Policy {
            policy: Box::new(PolicyOverride {
                retries: Some(0),
                ..PolicyOverride::default()
            }),
        };
        let commands = [command("web", limit, 1), command("web", policy, 2)];
        let p = with_commands(Policy::default(), "web", &commands, 10);
        assert_eq!(p.retry.retries, 0);
        assert_eq!(
            p.overlay.rate_limit,
            Some(RateLimit {
                per_second: 5.0,
                burst: 10
            })
        );
    }

    #[test]
    fn instance_and_route_commands_land_in_their_own_entries() {
        let addr: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut degrade = command("web", Action::Degrade { fallback: None }, 1);
        degrade.target.instance = Some(addr);
        let mut open = command(
            "web",
            Action::Circuit {
                state: Circuit::Open,
            },
            2,
        );
        open.target.instance = Some(addr);
        let route = Route {
            method: Some("POST".to_string()),
            path_prefix: "/pay".to_string(),
        };
        let mut on_route = command(
            "web",
            Action::Circuit {
                state: Circuit::Open,
            },
            3,
        );
        on_route.target.route = Some(route.clone());
        let mut fallback_on_route = command("web", Action::Degrade { fallback: None }, 4);
        fallback_on_route.target.route = Some(route.clone());
        let commands = [degrade, open, on_route, fallback_on_route];
        let p = with_commands(Policy::default(), "web", &commands, 10);
        assert_eq!(
            p.overlay.instances.get(&addr),
            Some(&InstancePolicy {
                degraded: Degraded::FailFast,
                rate_limit: None
            })
        );
        assert_eq!(
            p.overlay.blocked,
            vec![addr],
            "an open circuit on one instance blocks it"
        );
        assert_eq!(
            p.overlay.degraded,
            Degraded::No,
            "the service is not degraded"
        );
        assert_eq!(p.overlay.circuit, None);
        assert_eq!(p.overlay.routes.len(), 1, "one entry per route");
        let entry = p.route("POST", "/pay/now").unwrap();
        assert_eq!(entry.circuit, Some(Circuit::Open));
        assert_eq!(entry.degraded, Degraded::FailFast);
        assert!(p.route("GET", "/pay").is_none());
    }
}
