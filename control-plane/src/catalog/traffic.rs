//! The traffic agents report for the services they call (every few
//! seconds, what their proxy sent each one over that window), summed
//! for the console: requests per second, the share answered with a 5xx,
//! and the 99th percentile of the duration. Kept apart from the catalog's
//! lock: reports come from every agent all the time and change nothing
//! anyone is sent.

use std::sync::{Mutex, PoisonError};

use signpost_proto::Traffic;

use super::*;

/// A report older than this no longer counts (the agent stopped sending
/// the service anything, or went away).
pub(super) const TRAFFIC_FRESH: Duration = Duration::from_secs(15);

/// The upper bound (seconds) of duration bucket `b`, as agents count
/// them: 0.5 ms doubling.
fn bound(b: usize) -> f64 {
    0.0005 * 2f64.powi(i32::try_from(b).unwrap_or(i32::MAX))
}

#[derive(Default)]
pub(super) struct TrafficReports {
    by_node: Mutex<HashMap<String, NodeReport>>,
}

struct NodeReport {
    at: Instant,
    window: Duration,
    services: HashMap<String, signpost_proto::ServiceTraffic>,
}

/// A service's traffic, summed over the agents that call it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TrafficSummary {
    pub requests_per_second: f64,
    /// Share of the requests answered with a 5xx (0 to 1).
    pub error_rate: f64,
    #[serde(rename = "P99Ms")]
    pub p99_ms: f64,
    /// Agents whose proxy sent it requests lately.
    pub agents: usize,
}

impl Catalog {
    /// `node`'s agent's latest traffic report (it replaces the last).
    pub fn traffic(&self, node: &str, report: Traffic) {
        self.traffic_at(node, report, Instant::now());
    }

    fn traffic_at(&self, node: &str, report: Traffic, now: Instant) {
        let services = report
            .services
            .into_iter()
            .map(|s| (s.service.clone(), s))
            .collect();
        let mut by_node = self
            .traffic
            .by_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        by_node.retain(|_, r| now.duration_since(r.at) < TRAFFIC_FRESH);
        by_node.insert(
            node.to_string(),
            NodeReport {
                at: now,
                window: Duration::from_millis(u64::from(report.window_ms)),
                services,
            },
        );
    }

    /// `service`'s traffic from the agents that reported it lately.
    pub fn traffic_of(&self, service: &str) -> Option<TrafficSummary> {
        self.traffic_of_at(service, Instant::now())
    }

    fn traffic_of_at(&self, service: &str, now: Instant) -> Option<TrafficSummary> {
        let by_node = self
            .traffic
            .by_node
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut rate, mut requests, mut errors, mut agents) = (0.0, 0u64, 0u64, 0usize);
        let mut buckets: Vec<u64> = Vec::new();
        for report in by_node.values() {
            if now.duration_since(report.at) >= TRAFFIC_FRESH {
                continue;
            }
            let Some(t) = report.services.get(service) else {
                continue;
            };
            agents += 1;
            let seconds = report.window.as_secs_f64().max(0.001);
            rate += t.requests as f64 / seconds;
            requests += t.requests;
            errors += t.errors;
            if buckets.len() < t.duration_buckets.len() {
                buckets.resize(t.duration_buckets.len(), 0);
            }
            for (total, n) in buckets.iter_mut().zip(&t.duration_buckets) {
                *total += n;
            }
        }
        (agents > 0).then(|| TrafficSummary {
            requests_per_second: rate,
            error_rate: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p99_ms: quantile(&buckets, 0.99) * 1000.0,
            agents,
        })
    }
}

/// The `q` quantile (seconds) of counts per bucket, interpolated within
/// its bucket as Prometheus' `histogram_quantile` does; the unbounded
/// last bucket gives its lower bound.
fn quantile(buckets: &[u64], q: f64) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (b, &n) in buckets.iter().enumerate() {
        if (below + n) as f64 >= rank && n > 0 {
            let lower = if b == 0 { 0.0 } else { bound(b - 1) };
            if b + 1 == buckets.len() {
                return lower;
            }
            let upper = bound(b);
            return lower + (upper - lower) * (rank - below as f64) / n as f64;
        }
        below += n;
    }
    bound(buckets.len().saturating_sub(2))
}

#[cfg(test)]
mod tests {
    use signpost_proto::ServiceTraffic;

    use super::*;

    fn report(service: &str, requests: u64, errors: u64, buckets: Vec<u64>) -> Traffic {
        Traffic {
            window_ms: 5000,
            services: vec![ServiceTraffic {
                service: service.to_string(),
                requests,
                errors,
                duration_buckets: buckets,
            }],
        }
    }

    #[test]
    fn the_agents_reports_are_summed_and_stale_ones_dropped() {
        let catalog = Catalog::default();
        let now = Instant::now();
        // a: 500 requests in 5 s, all within 1 ms; b: 500, 10 failed,
        // 20 of them between 64 and 128 ms.
        catalog.traffic_at("a", report("web", 500, 0, vec![0, 500]), now);
        let mut slow = vec![0u64; 17];
        slow[1] = 480;
        slow[8] = 20;
        catalog.traffic_at("b", report("web", 500, 10, slow), now);
        let t = catalog.traffic_of_at("web", now).unwrap();
        assert_eq!(t.agents, 2);
        assert!((t.requests_per_second - 200.0).abs() < 1e-9, "{t:?}");
        assert!((t.error_rate - 0.01).abs() < 1e-9, "{t:?}");
        // The 990th of 1000 is the 10th of the 20 in (64 ms, 128 ms].
        assert!((t.p99_ms - 96.0).abs() < 1e-6, "{t:?}");
        assert_eq!(catalog.traffic_of_at("db", now), None);

        // b's next report names no web: only a's counts.
        catalog.traffic_at("b", report("db", 5, 0, vec![5]), now);
        assert_eq!(catalog.traffic_of_at("web", now).unwrap().agents, 1);
        // Nothing fresh: nothing to show.
        let later = now + TRAFFIC_FRESH;
        assert_eq!(catalog.traffic_of_at("web", later), None);
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        assert_eq!(quantile(&[], 0.99), 0.0);
        assert!((quantile(&[100, 0], 0.5) - 0.000_25).abs() < 1e-12);
        // All in the unbounded bucket: its lower bound.
        let mut b = vec![0u64; 17];
        b[16] = 3;
        assert!((quantile(&b, 0.99) - bound(15)).abs() < 1e-12);
    }
}
