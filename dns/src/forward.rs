//! Names outside the domain go to the upstream resolvers: hickory's
//! resolver does the fail-over, timeouts and TCP retry, and hickory's
//! response cache keeps answers (positive and negative) for their TTL.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_server::resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_server::resolver::net::NetError;
use hickory_server::resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::resolver::proto::op::{Message, Query};
use hickory_server::resolver::{Resolver, ResponseCache, TtlConfig};

/// A forwarded answer and where it came from.
pub(crate) struct Forwarded {
    pub(crate) result: Result<Message, NetError>,
    pub(crate) cached: bool,
}

pub(crate) struct Forwarder {
    resolver: Resolver<TokioRuntimeProvider>,
    cache: ResponseCache,
}

impl Forwarder {
    pub(crate) fn new(
        upstreams: &[SocketAddr],
        timeout: Duration,
        cache_size: u64,
    ) -> Result<Self, NetError> {
        let name_servers = upstreams
            .iter()
            .map(|addr| {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut server.connections {
                    connection.port = addr.port();
                }
                server
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.timeout = timeout;
        // The resolver's own cache stays empty: answers are cached here,
        // where hits can be counted.
        options.cache_size = 0;
        options.use_hosts_file = ResolveHosts::Never;
        options.preserve_intermediates = true;
        options.recursion_desired = true;
        options.ndots = 0;
        let ttls = TtlConfig::from_opts(&options);
        let mut builder = Resolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), name_servers),
            TokioRuntimeProvider::default(),
        );
        *builder.options_mut() = options;
        Ok(Forwarder {
            resolver: builder.build()?,
            cache: ResponseCache::new(cache_size, ttls),
        })
    }

    pub(crate) async fn forward(&self, query: Query) -> Forwarded {
        if let Some(result) = self.cache.get(&query, Instant::now()) {
            return Forwarded {
                result,
                cached: true,
            };
        }
        let result = self
            .resolver
            .lookup(query.name().clone(), query.query_type())
            .await
            .map(|lookup| lookup.message().clone());
        self.cache.insert(query, result.clone(), Instant::now());
        Forwarded {
            result,
            cached: false,
        }
    }
}
