//! Fuzzing what agents send: mutations of encoded `AgentMessage`s (full
//! states, deltas, subscriptions, acks, probe results) are decoded as the
//! gRPC stream does, checked, and taken into a catalog with two sessions
//! exactly as a session takes them in. Nothing may panic, nothing that
//! breaks [`reported`]'s rules may reach the catalog, and the catalog can
//! always be kept (its snapshot encodes). See `signpost-fuzz` for the dose.

use std::collections::HashMap;

use prost::Message;
use signpost_fuzz::Dose;
use signpost_proto::reported;
use signpost_proto::{
    AckQuery, AgentMessage, Check, Delta, FullState, Hello, Instance, ProbeResult, Subscribe,
    Unsubscribe, agent_message::Body,
};
use tokio::sync::mpsc;

use super::{Reports, check, dispatch};
use crate::catalog::Catalog;
use crate::commands::Commands;

fn hello(node: &str) -> Hello {
    Hello {
        node: node.to_string(),
        address: "10.0.0.1".to_string(),
        zone: "a".to_string(),
        datacenter: "dc1".to_string(),
        probe_address: "10.0.0.1:8301".to_string(),
        ..Hello::default()
    }
}

fn instance(id: &str, name: &str, port: u32) -> Instance {
    Instance {
        id: id.to_string(),
        name: name.to_string(),
        address: "10.0.0.1".to_string(),
        port,
        tags: vec!["v1".to_string()],
        meta: HashMap::from([("version".to_string(), "1.2".to_string())]),
        zone: "a".to_string(),
        weight_passing: 1,
        weight_warning: 1,
        protocol: signpost_proto::Protocol::Http.into(),
        checks: vec![Check {
            id: format!("service:{id}"),
            name: "check".to_string(),
            status: signpost_proto::Health::Passing.into(),
            output: "ok".to_string(),
            r#type: "http".to_string(),
            ..Check::default()
        }],
        ..Instance::default()
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let bodies = [
        Body::FullState(FullState {
            instances: vec![instance("web-1", "web", 8080), instance("db-1", "db", 5432)],
            node_checks: Vec::new(),
        }),
        Body::Delta(Delta {
            upserts: vec![instance("web-2", "web", 8081)],
            removed: vec!["db-1".to_string()],
            node_checks_changed: false,
            node_checks: Vec::new(),
        }),
        Body::Subscribe(Subscribe {
            services: HashMap::from([("web".to_string(), 0), ("db".to_string(), 7)]),
        }),
        Body::Unsubscribe(Unsubscribe {
            services: vec!["db".to_string()],
        }),
        Body::AckQuery(AckQuery {
            query_id: 1,
            service: "web".to_string(),
            min_index: 3,
            address: "10.0.0.1:8080".to_string(),
        }),
        Body::ProbeResult(ProbeResult {
            probe_id: 1,
            reachable: false,
            error: "timeout".to_string(),
        }),
    ];
    bodies
        .into_iter()
        .map(|body| AgentMessage { body: Some(body) }.encode_to_vec())
        .collect()
}

#[test]
fn agent_messages_never_panic_and_garbage_never_enters_the_catalog() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let commands = Commands::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let acl = crate::acl::Acl::open(
        dir.path(),
        Default::default(),
        signpost_core::acl::DefaultPolicy::Deny,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let catalog = Catalog::default();
    let (tx, mut rx) = mpsc::channel(1 << 16);
    let sessions = [
        (catalog.connect(hello("node-a"), tx.clone()), "node-a"),
        (catalog.connect(hello("node-b"), tx), "node-b"),
    ];
    let seeds = seeds();
    let mut dose = Dose::from_env(20_000);
    let mut taken = 0;
    while dose.another() {
        let bytes = dose.mutation(&seeds);
        let Ok(message) = AgentMessage::decode(bytes.as_slice()) else {
            continue;
        };
        let Some(body) = message.body else { continue };
        let (session, node) = sessions[dose.done() % 2];
        if check(&body, || catalog.subscription_count(session)).is_err() {
            continue;
        }
        taken += 1;
        dispatch(
            &catalog,
            &commands,
            &acl,
            &Reports::Local,
            session,
            node,
            body,
        );
        while rx.try_recv().is_ok() {}
        if dose.done().is_multiple_of(64) {
            let kept = catalog.snapshot();
            for node in &kept.nodes {
                for instance in &node.instances {
                    reported::instance(instance).unwrap_or_else(|e| {
                        panic!("{}: garbage in the catalog ({e}): {instance:?}", dose.at())
                    });
                }
            }
            let encoded = kept.encode_to_vec();
            signpost_proto::CatalogSnapshot::decode(encoded.as_slice())
                .unwrap_or_else(|e| panic!("{}: the kept catalog does not decode: {e}", dose.at()));
        }
    }
    assert!(taken > 0, "nothing was taken in: the seeds are broken");
}
