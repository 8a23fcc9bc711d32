//! The agent <-> control plane protocol: the gRPC `Sync` service and its
//! messages, generated from `signpost/v1/sync.proto` (the agent's and the
//! control plane's on-disk snapshots use the same messages), and the
//! control plane's checks of what an agent reports ([`reported`]) before
//! it is taken in.
//!
//! A crate of its own so that the data-plane crates (`dns`, `proxy`),
//! which depend on `signpost-core` only, never compile tonic or prost.

#[allow(unreachable_pub, clippy::all, clippy::unwrap_used, clippy::expect_used)]
mod generated {
    tonic::include_proto!("signpost.v1");
}
pub use generated::*;

pub mod reported;

use signpost_core::model;

impl From<model::Health> for Health {
    fn from(h: model::Health) -> Self {
        match h {
            model::Health::Passing => Health::Passing,
            model::Health::Warning => Health::Warning,
            model::Health::Critical => Health::Critical,
        }
    }
}

impl From<model::Protocol> for Protocol {
    fn from(p: model::Protocol) -> Self {
        match p {
            model::Protocol::Tcp => Protocol::Tcp,
            model::Protocol::Http => Protocol::Http,
            model::Protocol::Http2 => Protocol::Http2,
            model::Protocol::Grpc => Protocol::Grpc,
        }
    }
}

impl Check {
    /// The check's status: the enum, else the text an earlier version
    /// sent; `None` when neither says one.
    pub fn health(&self) -> Option<model::Health> {
        match Health::try_from(self.status) {
            Ok(Health::Passing) => Some(model::Health::Passing),
            Ok(Health::Warning) => Some(model::Health::Warning),
            Ok(Health::Critical) => Some(model::Health::Critical),
            Ok(Health::Unspecified) | Err(_) => self.status_text.parse().ok(),
        }
    }

    /// Sets the status, as the enum and as the text earlier versions read.
    pub fn set_health(&mut self, health: model::Health) {
        self.status = Health::from(health).into();
        self.status_text = health.as_str().to_string();
    }

    /// Both forms of the status, from whichever the sender wrote (an
    /// earlier version wrote only the text); unchanged when neither says
    /// one (`reported` refuses that).
    pub fn normalize(&mut self) {
        if let Some(health) = self.health() {
            self.set_health(health);
        }
    }
}

impl Instance {
    /// How the proxy speaks to the instance: the enum, else the text an
    /// earlier version sent; `None` when neither says one.
    pub fn proxy_protocol(&self) -> Option<model::Protocol> {
        match Protocol::try_from(self.protocol) {
            Ok(Protocol::Tcp) => Some(model::Protocol::Tcp),
            Ok(Protocol::Http) => Some(model::Protocol::Http),
            Ok(Protocol::Http2) => Some(model::Protocol::Http2),
            Ok(Protocol::Grpc) => Some(model::Protocol::Grpc),
            Ok(Protocol::Unspecified) | Err(_) => self.protocol_text.parse().ok(),
        }
    }

    /// Sets the protocol, as the enum and as the text earlier versions
    /// read.
    pub fn set_proxy_protocol(&mut self, protocol: model::Protocol) {
        self.protocol = Protocol::from(protocol).into();
        self.protocol_text = protocol.as_str().to_string();
    }

    /// Both forms of the protocol and of every check's status, from
    /// whichever the sender wrote (see [`Check::normalize`]).
    pub fn normalize(&mut self) {
        if let Some(protocol) = self.proxy_protocol() {
            self.set_proxy_protocol(protocol);
        }
        self.checks.iter_mut().for_each(Check::normalize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enum_wins_and_the_text_of_earlier_versions_is_read() {
        let mut check = Check::default();
        assert_eq!(check.health(), None);
        check.status_text = "warning".to_string();
        assert_eq!(
            check.health(),
            Some(model::Health::Warning),
            "an earlier version's"
        );
        check.set_health(model::Health::Critical);
        assert_eq!(check.health(), Some(model::Health::Critical));
        assert_eq!(
            check.status_text, "critical",
            "still written for earlier versions"
        );
        check.status = 99;
        check.status_text = "nonsense".to_string();
        assert_eq!(check.health(), None);

        let mut instance = Instance::default();
        assert_eq!(instance.proxy_protocol(), None);
        instance.protocol_text = "http".to_string();
        assert_eq!(instance.proxy_protocol(), Some(model::Protocol::Http));
        instance.set_proxy_protocol(model::Protocol::Grpc);
        assert_eq!(instance.proxy_protocol(), Some(model::Protocol::Grpc));
        assert_eq!(instance.protocol_text, "grpc");

        let mut old = Instance {
            protocol_text: "http2".to_string(),
            checks: vec![Check {
                status_text: "critical".to_string(),
                ..Check::default()
            }],
            ..Instance::default()
        };
        old.normalize();
        assert_eq!(old.protocol, i32::from(Protocol::Http2));
        assert_eq!(old.checks[0].status, i32::from(Health::Critical));
    }

    #[test]
    fn a_message_of_an_earlier_version_decodes() {
        use prost::Message as _;
        // Check {id: "c", status (text, field 3): "passing"}, as an
        // earlier version encoded it.
        let old = [
            0x0a, 0x01, b'c', 0x1a, 0x07, b'p', b'a', b's', b's', b'i', b'n', b'g',
        ];
        let check = Check::decode(old.as_slice()).unwrap();
        assert_eq!(check.id, "c");
        assert_eq!(check.health(), Some(model::Health::Passing));
    }
}
