//! Agents for the catalog's unit tests: a session opened with a Hello,
//! and what the control plane sent it.

use signpost_proto::{
    AckStatus, ControlMessage, Hello, Instance, ProbeRequest, ServiceUpdate, control_message::Body,
};
use tokio::sync::mpsc;

use super::{Catalog, SessionId};

/// A Hello from `node`, its address and probe address made from its name.
pub(super) fn hello(node: &str) -> Hello {
    Hello {
        node: node.to_string(),
        address: format!("198.18.0.{}", node.len()),
        zone: "z".to_string(),
        probe_address: format!("198.18.0.{}:8301", node.len()),
        ..Hello::default()
    }
}

/// An instance `id` of `service` on port 80.
pub(super) fn instance(id: &str, service: &str) -> Instance {
    Instance {
        id: id.to_string(),
        name: service.to_string(),
        port: 80,
        ..Instance::default()
    }
}

/// An agent's session, with what the control plane sends it.
pub(super) struct Agent {
    pub(super) session: SessionId,
    rx: mpsc::Receiver<ControlMessage>,
}

impl Agent {
    pub(super) fn connect(catalog: &Catalog, node: &str) -> Agent {
        let (tx, rx) = mpsc::channel(64);
        let session = catalog.connect(hello(node), tx);
        Agent { session, rx }
    }

    /// A session on a replica that shares its store.
    pub(super) fn attach(catalog: &Catalog, node: &str) -> Agent {
        let (tx, rx) = mpsc::channel(64);
        let session = catalog.attach(node, tx);
        Agent { session, rx }
    }

    /// What was received since the last look.
    fn received(&mut self) -> Vec<Body> {
        let mut out = Vec::new();
        while let Ok(message) = self.rx.try_recv() {
            out.extend(message.body);
        }
        out
    }

    /// The probe requests received since the last look.
    pub(super) fn probes(&mut self) -> Vec<ProbeRequest> {
        let received = self.received();
        received
            .into_iter()
            .filter_map(|b| match b {
                Body::Probe(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// The service updates received since the last look.
    pub(super) fn updates(&mut self) -> Vec<ServiceUpdate> {
        let received = self.received();
        received
            .into_iter()
            .filter_map(|b| match b {
                Body::Update(u) => Some(u),
                _ => None,
            })
            .collect()
    }

    /// The acknowledgement statuses received since the last look.
    pub(super) fn ack_statuses(&mut self) -> Vec<AckStatus> {
        let received = self.received();
        received
            .into_iter()
            .filter_map(|b| match b {
                Body::AckStatus(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}
