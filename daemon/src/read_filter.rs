//! What a read may see, on the agent's API and the control plane's: the
//! token's rules decide per service and node; what they hide is left out
//! and the answer says so (`X-Consul-Results-Filtered-By-ACLs: true`), as
//! Consul does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::HeaderValue;
use axum::response::Response;
use signpost_core::acl::{Access, Authorizer, Resource};

/// One read's filter.
pub struct ReadFilter {
    authorizer: Arc<Authorizer>,
    filtered: AtomicBool,
}

impl ReadFilter {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        ReadFilter {
            authorizer,
            filtered: AtomicBool::new(false),
        }
    }

    fn sees(&self, resource: Resource<'_>) -> bool {
        let ok = self.authorizer.allows(resource, Access::Read);
        if !ok {
            self.filtered.store(true, Ordering::Relaxed);
        }
        ok
    }

    /// Whether service `name` may be read (if not, the answer is marked).
    pub fn service(&self, name: &str) -> bool {
        self.sees(Resource::Service(name))
    }

    /// Whether node `name` may be read (if not, the answer is marked).
    pub fn node(&self, name: &str) -> bool {
        self.sees(Resource::Node(name))
    }

    /// Whether key `name` may be read (if not, the answer is marked).
    pub fn key(&self, name: &str) -> bool {
        self.sees(Resource::Key(name))
    }

    /// Whether events named `name` may be read.
    pub fn event(&self, name: &str) -> bool {
        self.sees(Resource::Event(name))
    }

    /// Whether the sessions of node `name` may be read.
    pub fn session(&self, node: &str) -> bool {
        self.sees(Resource::Session(node))
    }

    /// The answer, marked when something was left out.
    pub fn answer(&self, mut response: Response) -> Response {
        if self.filtered.load(Ordering::Relaxed) {
            response.headers_mut().insert(
                "X-Consul-Results-Filtered-By-ACLs",
                HeaderValue::from_static("true"),
            );
        }
        response
    }
}
