//! The DNS server's Prometheus metrics, registered into the agent's
//! registry under `signpost_dns_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    /// `A`, `SRV`, ...; rare types are counted as `other`.
    r#type: &'static str,
    rcode: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: &'static str,
}

/// Counters of the DNS server.
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    truncated: Counter,
    tcp_refused: Counter,
    forward_seconds: Histogram,
    cache: Family<CacheLabels, Counter>,
    reused: Family<CacheLabels, Counter>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            queries: Family::default(),
            truncated: Counter::default(),
            tcp_refused: Counter::default(),
            // 100 µs .. ~3.3 s
            forward_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            cache: Family::default(),
            reused: Family::default(),
        }
    }
}

impl DnsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let dns = registry.sub_registry_with_prefix("dns");
        dns.register(
            "queries",
            "DNS queries answered, by query type, response code and protocol",
            self.queries.clone(),
        );
        dns.register(
            "truncated",
            "UDP answers that did not fit and were sent with TC set (the client retries over TCP)",
            self.truncated.clone(),
        );
        dns.register(
            "tcp_refused",
            "TCP connections closed as they arrived because the serving thread had as many open as it may",
            self.tcp_refused.clone(),
        );
        dns.register(
            "forward_seconds",
            "Time to answer a forwarded name from the upstream resolvers (cache misses)",
            self.forward_seconds.clone(),
        );
        dns.register(
            "forward_cache",
            "Forwarded names answered from the cache (hit) or upstream (miss)",
            self.cache.clone(),
        );
        dns.register(
            "answer_cache",
            "UDP queries answered with the bytes of an identical earlier answer (hit) or worked out (miss)",
            self.reused.clone(),
        );
    }

    /// The hit and miss counters of the UDP answer cache.
    pub(crate) fn answer_cache(&self) -> (Counter, Counter) {
        let counter = |result| self.reused.get_or_create(&CacheLabels { result }).clone();
        (counter("hit"), counter("miss"))
    }

    pub(crate) fn answered(&self, qtype: &'static str, rcode: &'static str, tcp: bool) {
        self.query_counter(qtype, rcode, tcp).inc();
    }

    /// The counter [`DnsMetrics::answered`] increments, to keep with a
    /// cached answer.
    pub(crate) fn query_counter(
        &self,
        qtype: &'static str,
        rcode: &'static str,
        tcp: bool,
    ) -> Counter {
        let protocol = if tcp { "tcp" } else { "udp" };
        self.queries
            .get_or_create(&QueryLabels {
                r#type: qtype,
                rcode,
                protocol,
            })
            .clone()
    }

    pub(crate) fn truncated(&self) {
        self.truncated.inc();
    }

    pub(crate) fn tcp_refused(&self) {
        self.tcp_refused.inc();
    }

    pub(crate) fn forwarded(&self, cached: bool, seconds: f64) {
        let result = if cached { "hit" } else { "miss" };
        self.cache.get_or_create(&CacheLabels { result }).inc();
        if !cached {
            self.forward_seconds.observe(seconds);
        }
    }
}
