//! Choosing an instance: which instances are candidates (health,
//! ejection, panic threshold, zone) and which candidate gets the request
//! (P2C over peak-EWMA cost, weighted round robin, or a rendezvous hash).

use std::cell::Cell;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use signpost_core::model::Health;
use signpost_core::policy::{Balancer, Policy};
use tokio::time::Instant;

use crate::endpoint::{Member, Standing};

/// The result of a pick: an index into the members. When the instance
/// was ejected, the pick claimed its single readmission probe.
pub(crate) struct Pick {
    pub(crate) index: usize,
}

/// Everything a pick depends on besides the members.
pub(crate) struct Request<'a> {
    pub(crate) policy: &'a Policy,
    /// The agent's zone.
    pub(crate) zone: &'a str,
    /// Instances already tried for this request: avoided while others
    /// remain.
    pub(crate) tried: &'a [SocketAddr],
    /// The hash of the request's key, for [`Balancer::Hash`].
    pub(crate) key: Option<u64>,
    /// When the choice is made (ejections end, latency estimates decay).
    pub(crate) now: Instant,
}

/// Picks an instance; `None` when there is none. Also says whether the
/// panic threshold was crossed.
pub(crate) fn pick(
    members: &[Member],
    req: &Request<'_>,
    round_robin: &AtomicU64,
) -> (Option<Pick>, bool) {
    let mut candidates = CANDIDATES.take();
    candidates.clear();
    let picked = choose(members, req, round_robin, &mut candidates);
    CANDIDATES.set(candidates);
    picked
}

thread_local! {
    /// [`pick`]'s working list, kept between calls so that a request
    /// allocates none.
    static CANDIDATES: Cell<Vec<(usize, Standing)>> = const { Cell::new(Vec::new()) };
}

fn choose(
    members: &[Member],
    req: &Request<'_>,
    round_robin: &AtomicU64,
    candidates: &mut Vec<(usize, Standing)>,
) -> (Option<Pick>, bool) {
    let now = req.now;
    let usable = |i: usize, standing: Standing| {
        let e = &members[i].endpoint;
        e.health != Health::Critical && e.weight() > 0 && standing != Standing::Ejected
    };
    let in_zone = |i: usize| members[i].endpoint.zone == req.zone;
    // (index, standing) of every member not blocked (blocked instances
    // are out of the pool altogether), and in the same pass the counts
    // the panic threshold and the zone preference look at.
    let (mut available, mut local, mut zone_size) = (0usize, 0usize, 0usize);
    candidates.extend(
        members
            .iter()
            .enumerate()
            .filter(|(_, m)| !req.policy.overlay.blocked.contains(&m.endpoint.addr))
            .map(|(i, m)| {
                let standing = m.stats.standing(now);
                let here = req.policy.zone_aware && in_zone(i);
                zone_size += usize::from(here);
                if usable(i, standing) {
                    available += 1;
                    local += usize::from(here);
                }
                (i, standing)
            }),
    );
    let pool = candidates.len();
    let panic = pool > 0 && (available as f64) < req.policy.panic_threshold * pool as f64;
    if !panic && available < pool {
        candidates.retain(|&(i, standing)| usable(i, standing));
    }
    // Only the usable ones are local (`local` counts no others).
    if req.policy.zone_aware
        && !panic
        && local > 0
        && local < candidates.len()
        && local as f64 >= req.policy.zone_min_available * zone_size as f64
    {
        candidates.retain(|(i, _)| in_zone(*i));
    }
    if !req.policy.tag_weights.is_empty() {
        by_tag_weight(members, candidates, &req.policy.tag_weights);
    }
    let tried = |i: usize| req.tried.contains(&members[i].endpoint.addr);
    if !req.tried.is_empty() && candidates.iter().any(|(i, _)| !tried(*i)) {
        candidates.retain(|(i, _)| !tried(*i));
    }
    // In panic every instance counts as passing.
    let weight = |i: usize| {
        let e = &members[i].endpoint;
        if panic {
            2 * u64::from(e.weights.passing.max(1))
        } else {
            e.weight()
        }
    };
    // A probe that another request claimed first is not a candidate.
    loop {
        if candidates.is_empty() {
            return (None, panic);
        }
        let chosen = match req.policy.balancer {
            Balancer::P2cEwma => p2c(members, candidates, weight, now),
            Balancer::RoundRobin => round_robin_pick(candidates, weight, round_robin),
            Balancer::Hash => rendezvous(members, candidates, weight, req.key.unwrap_or(0)),
        };
        let (i, standing) = candidates[chosen];
        if standing != Standing::Probe || members[i].stats.claim_probe(now) {
            return (Some(Pick { index: i }), panic);
        }
        candidates.swap_remove(chosen);
    }
}

/// Keeps the candidates of one tag, chosen by `weights` among the tags
/// that have candidates; instances with none of the tags get nothing
/// (unless no weighted tag has a candidate left).
fn by_tag_weight(
    members: &[Member],
    candidates: &mut Vec<(usize, Standing)>,
    weights: &std::collections::BTreeMap<String, u32>,
) {
    let tag_of = |i: usize| {
        weights
            .keys()
            .find(|t| members[i].endpoint.tags.iter().any(|have| have == *t))
    };
    let present: Vec<(&String, u32)> = weights
        .iter()
        .filter(|(tag, w)| **w > 0 && candidates.iter().any(|(i, _)| tag_of(*i) == Some(*tag)))
        .map(|(tag, w)| (tag, *w))
        .collect();
    let total: u64 = present.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return;
    }
    let mut at = rand::random_range(0..total);
    let chosen = present
        .iter()
        .find(|(_, w)| {
            let hit = at < u64::from(*w);
            at = at.saturating_sub(u64::from(*w));
            hit
        })
        .map(|(tag, _)| *tag);
    candidates.retain(|(i, _)| tag_of(*i) == chosen);
}

/// Two weighted random candidates; the one with the lower cost per unit
/// of weight wins.
fn p2c(
    members: &[Member],
    candidates: &[(usize, Standing)],
    weight: impl Fn(usize) -> u64,
    now: Instant,
) -> usize {
    let n = candidates.len();
    if n == 1 {
        return 0;
    }
    let first = weight(candidates[0].0);
    let (a, b) = if candidates.iter().all(|(i, _)| weight(*i) == first) {
        // Equal weights (the usual case): two distinct at random.
        let a = rand::random_range(0..n);
        let b = rand::random_range(0..n - 1);
        (a, if b >= a { b + 1 } else { b })
    } else {
        let a = weighted_random(candidates, &weight, None);
        (a, weighted_random(candidates, &weight, Some(a)))
    };
    let cost = |c: usize| {
        let i = candidates[c].0;
        members[i].stats.cost(now) / weight(i) as f64
    };
    if cost(b) < cost(a) { b } else { a }
}

fn weighted_random(
    candidates: &[(usize, Standing)],
    weight: impl Fn(usize) -> u64,
    skip: Option<usize>,
) -> usize {
    let total: u64 = (0..candidates.len())
        .filter(|c| Some(*c) != skip)
        .map(|c| weight(candidates[c].0))
        .sum();
    if total == 0 {
        return (0..candidates.len())
            .find(|c| Some(*c) != skip)
            .unwrap_or(0);
    }
    let mut at = rand::random_range(0..total);
    for c in (0..candidates.len()).filter(|c| Some(*c) != skip) {
        let w = weight(candidates[c].0);
        if at < w {
            return c;
        }
        at -= w;
    }
    0
}

fn round_robin_pick(
    candidates: &[(usize, Standing)],
    weight: impl Fn(usize) -> u64,
    counter: &AtomicU64,
) -> usize {
    let total: u64 = candidates.iter().map(|&(i, _)| weight(i)).sum();
    if total == 0 {
        return 0;
    }
    let mut at = counter.fetch_add(1, Ordering::Relaxed) % total;
    for (c, &(i, _)) in candidates.iter().enumerate() {
        let w = weight(i);
        if at < w {
            return c;
        }
        at -= w;
    }
    0
}

/// Rendezvous (highest random weight) hashing: each instance scores the
/// key, the best score wins, so only the keys of an instance that leaves
/// move. Weighted with the logarithm method.
fn rendezvous(
    members: &[Member],
    candidates: &[(usize, Standing)],
    weight: impl Fn(usize) -> u64,
    key: u64,
) -> usize {
    let score = |c: usize| {
        let i = candidates[c].0;
        let mut h = DefaultHasher::new();
        (key, members[i].endpoint.addr).hash(&mut h);
        // A uniform number in (0, 1).
        let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        weight(i) as f64 / -u.ln()
    };
    (0..candidates.len())
        .max_by(|a, b| score(*a).total_cmp(&score(*b)))
        .unwrap_or(0)
}

/// The hash of a balancing key.
pub(crate) fn hash_key(key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// The hash of a client's address, for `client_ip` keys.
pub(crate) fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_key(&v4.octets()),
        IpAddr::V6(v6) => hash_key(&v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use signpost_core::model::Weights;

    use super::*;
    use crate::endpoint::{Endpoint, Stats};

    fn member(port: u16, zone: &str, health: Health) -> Member {
        Member {
            endpoint: Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                zone: zone.to_string(),
                tags: vec![format!("v{}", port % 2 + 1)],
                health,
                weights: Weights::default(),
                host_gone: false,
                mesh: None,
            },
            stats: Arc::new(Stats::new(
                crate::ProxyMetrics::default().status_counters("web", "a"),
                1,
            )),
            label: port.to_string(),
            authority: http::uri::Authority::from_static("127.0.0.1:1"),
        }
    }

    fn counts(members: &[Member], policy: &Policy, key: impl Fn(u64) -> Option<u64>) -> Vec<u32> {
        let rr = AtomicU64::new(0);
        let mut counts = vec![0; members.len()];
        for n in 0..1000 {
            let req = Request {
                policy,
                zone: "a",
                tried: &[],
                key: key(n),
                now: Instant::now(),
            };
            if let (Some(p), _) = pick(members, &req, &rr) {
                counts[p.index] += 1;
            }
        }
        counts
    }

    #[test]
    fn critical_instances_get_nothing_and_warning_ones_less() {
        let members = [
            member(1, "a", Health::Passing),
            member(2, "a", Health::Warning),
            member(3, "a", Health::Critical),
        ];
        let policy = Policy {
            balancer: Balancer::RoundRobin,
            ..Policy::default()
        };
        assert_eq!(counts(&members, &policy, |_| None), vec![667, 333, 0]);
    }

    #[test]
    fn below_the_panic_threshold_every_instance_is_used() {
        let members = [
            member(1, "a", Health::Passing),
            member(2, "a", Health::Critical),
            member(3, "a", Health::Critical),
        ];
        let policy = Policy {
            balancer: Balancer::RoundRobin,
            ..Policy::default()
        };
        let rr = AtomicU64::new(0);
        let req = Request {
            policy: &policy,
            zone: "a",
            tried: &[],
            key: None,
            now: Instant::now(),
        };
        assert!(
            pick(&members, &req, &rr).1,
            "1 of 3 available is below 50 %"
        );
        assert!(counts(&members, &policy, |_| None).iter().all(|&c| c > 300));
        let strict = Policy {
            panic_threshold: 0.0,
            ..policy
        };
        assert_eq!(counts(&members, &strict, |_| None), vec![1000, 0, 0]);
    }

    #[test]
    fn the_local_zone_is_preferred_while_enough_of_it_is_available() {
        let mut members = vec![
            member(1, "a", Health::Passing),
            member(2, "a", Health::Passing),
            member(3, "b", Health::Passing),
            member(4, "b", Health::Passing),
        ];
        let policy = Policy {
            balancer: Balancer::RoundRobin,
            ..Policy::default()
        };
        assert_eq!(counts(&members, &policy, |_| None)[2..], [0, 0]);
        // One of two local instances left is still half: kept local.
        members[1].endpoint.health = Health::Critical;
        assert_eq!(counts(&members, &policy, |_| None)[2..], [0, 0]);
        members[0].endpoint.health = Health::Critical;
        members.push(member(5, "b", Health::Passing));
        let c = counts(&members, &policy, |_| None);
        assert_eq!(c[..2], [0, 0]);
        assert!(c[2..].iter().all(|&n| n > 200), "{c:?}");
    }

    #[test]
    fn p2c_prefers_the_faster_instance() {
        let members = [
            member(1, "a", Health::Passing),
            member(2, "a", Health::Passing),
        ];
        let now = Instant::now();
        members[1].stats.success(Duration::from_millis(200), now);
        members[0].stats.success(Duration::from_millis(1), now);
        let c = counts(&members, &Policy::default(), |_| None);
        assert_eq!(c, vec![1000, 0], "with two, P2C always compares both");
    }

    #[test]
    fn a_hash_key_keeps_its_instance_and_only_a_leaver_s_keys_move() {
        let members: Vec<Member> = (1..=4).map(|p| member(p, "a", Health::Passing)).collect();
        let policy = Policy {
            balancer: Balancer::Hash,
            ..Policy::default()
        };
        let rr = AtomicU64::new(0);
        let chosen = |members: &[Member], key: u64| {
            let req = Request {
                policy: &policy,
                zone: "a",
                tried: &[],
                key: Some(key),
                now: Instant::now(),
            };
            members[pick(members, &req, &rr).0.unwrap().index]
                .endpoint
                .addr
        };
        let before: Vec<SocketAddr> = (0..400).map(|k| chosen(&members, k)).collect();
        assert_eq!(
            before,
            (0..400).map(|k| chosen(&members, k)).collect::<Vec<_>>()
        );
        let spread = counts(&members, &policy, Some);
        assert!(spread.iter().all(|&c| c > 150), "{spread:?}");
        let gone = members[3].endpoint.addr;
        let rest = &members[..3];
        for (k, addr) in before.iter().enumerate() {
            if *addr != gone {
                assert_eq!(chosen(rest, k as u64), *addr, "key {k} moved");
            }
        }
    }

    #[test]
    fn blocked_instances_get_nothing_even_in_panic() {
        let members = [
            member(1, "a", Health::Passing),
            member(2, "a", Health::Critical),
            member(3, "a", Health::Critical),
        ];
        let mut policy = Policy {
            balancer: Balancer::RoundRobin,
            ..Policy::default()
        };
        policy.overlay.blocked = vec![members[0].endpoint.addr];
        let c = counts(&members, &policy, |_| None);
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 400 && c[2] > 400, "the rest are in panic: {c:?}");
        let mut all = policy;
        all.overlay.blocked = members.iter().map(|m| m.endpoint.addr).collect();
        assert_eq!(counts(&members, &all, |_| None), vec![0, 0, 0]);
    }

    #[test]
    fn tag_weights_split_the_traffic() {
        // Ports 1 and 3 are tagged v2, 2 and 4 v1.
        let members: Vec<Member> = (1..=4).map(|p| member(p, "a", Health::Passing)).collect();
        let policy = Policy {
            balancer: Balancer::RoundRobin,
            tag_weights: [("v1".to_string(), 90), ("v2".to_string(), 10)].into(),
            ..Policy::default()
        };
        let c = counts(&members, &policy, |_| None);
        let v2 = c[0] + c[2];
        assert!((60..=150).contains(&v2), "about 10 % to v2: {c:?}");
        assert_eq!(c.iter().sum::<u32>(), 1000);
        // Without available v1 instances, v2 takes it all.
        let mut v1_gone = policy;
        v1_gone.overlay.blocked = vec![members[1].endpoint.addr, members[3].endpoint.addr];
        let c = counts(&members, &v1_gone, |_| None);
        assert_eq!(c[1] + c[3], 0);
        assert_eq!(c[0] + c[2], 1000);
    }

    #[test]
    fn tried_instances_are_avoided_while_others_remain() {
        let members = [
            member(1, "a", Health::Passing),
            member(2, "a", Health::Passing),
        ];
        let policy = Policy::default();
        let rr = AtomicU64::new(0);
        let tried = [members[0].endpoint.addr];
        for _ in 0..100 {
            let req = Request {
                policy: &policy,
                zone: "a",
                tried: &tried,
                key: None,
                now: Instant::now(),
            };
            assert_eq!(pick(&members, &req, &rr).0.unwrap().index, 1);
        }
        let both = [members[0].endpoint.addr, members[1].endpoint.addr];
        let req = Request {
            policy: &policy,
            zone: "a",
            tried: &both,
            key: None,
            now: Instant::now(),
        };
        assert!(
            pick(&members, &req, &rr).0.is_some(),
            "all tried: any will do"
        );
    }
}
