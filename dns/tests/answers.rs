//! The DNS answers, decided against an in-memory catalog through the
//! server's own handler (`Handler::answer_bytes`, the path the UDP and
//! TCP loops take), without sockets or an agent: what each name form
//! answers in VIP and instances mode, health filtering, SRV targets,
//! reverse lookups, case, unknown names, and settings replaced while
//! serving (a reload). The end-to-end tests
//! (`tests/tests/e2e/dns.rs`) ask a real agent the same questions over
//! the network.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_server::proto::op::{Message, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, RecordType};
use signpost_core::config::{AnswerMode, DnsConfig};
use signpost_core::model::{Health, Weights};
use signpost_dns::{Catalog, DnsMetrics, Endpoint, Handler, NodeRecord, Owner, Settings};

/// Services by name, each a list of instances, and their VIPs.
#[derive(Default)]
struct Memory {
    services: Mutex<BTreeMap<String, Vec<Endpoint>>>,
    generation: Mutex<u64>,
}

impl Memory {
    fn set(&self, service: &str, instances: Vec<Endpoint>) {
        self.services
            .lock()
            .unwrap()
            .insert(service.to_string(), instances);
        *self.generation.lock().unwrap() += 1;
    }
}

fn vip_of(service: &str) -> Ipv4Addr {
    Ipv4Addr::new(127, 77, 0, service.len() as u8)
}

impl Catalog for Memory {
    async fn first_use(&self, _service: &str) {}

    fn instances(&self, service: &str, _tag: Option<&str>) -> Option<Vec<Endpoint>> {
        let services = self.services.lock().unwrap();
        services
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(service))
            .map(|(_, instances)| instances.clone())
    }

    fn vip(&self, service: &str, _tag: Option<&str>) -> Option<Ipv4Addr> {
        Some(vip_of(service))
    }

    fn node(&self, name: &str) -> Option<NodeRecord> {
        name.eq_ignore_ascii_case("node-a").then(|| NodeRecord {
            name: "node-a".to_string(),
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            meta: BTreeMap::new(),
        })
    }

    fn owner(&self, ip: IpAddr) -> Option<Owner> {
        let services = self.services.lock().unwrap();
        services
            .keys()
            .find(|s| IpAddr::V4(vip_of(s)) == ip)
            .map(|service| Owner::Service {
                service: service.clone(),
                tag: None,
            })
    }

    fn generation(&self) -> u64 {
        *self.generation.lock().unwrap()
    }
}

fn instance(last: u8, port: u16, health: Health) -> Endpoint {
    Endpoint {
        node: format!("node-{last}"),
        address: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))),
        service_address: true,
        port,
        health,
        weights: Weights::default(),
    }
}

fn handler(answer: AnswerMode, only_passing: bool) -> (Handler<Memory>, Arc<Memory>) {
    let memory = Arc::new(Memory::default());
    memory.set(
        "web",
        vec![
            instance(1, 8080, Health::Passing),
            instance(2, 8081, Health::Warning),
            instance(3, 8082, Health::Critical),
        ],
    );
    let settings = Settings {
        config: DnsConfig {
            answer,
            only_passing,
            ..DnsConfig::default()
        },
        datacenter: "dc1".to_string(),
        recursors: Vec::new(),
    };
    let handler = Handler::new(settings, memory.clone(), Arc::new(DnsMetrics::default())).unwrap();
    (handler, memory)
}

async fn ask(handler: &Handler<Memory>, name: &str, rtype: RecordType) -> Message {
    let mut query = Message::query();
    query.metadata.id = 7;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let bytes = handler
        .answer_bytes(query.to_vec().unwrap(), src, false)
        .await
        .unwrap();
    let response = Message::from_vec(&bytes).unwrap();
    assert_eq!(response.metadata.id, 7);
    response
}

fn addresses(response: &Message) -> BTreeSet<IpAddr> {
    response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn ips(list: &[[u8; 4]]) -> BTreeSet<IpAddr> {
    list.iter()
        .map(|o| IpAddr::V4(Ipv4Addr::from(*o)))
        .collect()
}

#[tokio::test]
async fn vip_mode_answers_the_stable_vip_whatever_the_case() {
    let (handler, _) = handler(AnswerMode::Vip, false);
    for name in ["web.service.internal.", "WEB.Service.Internal."] {
        let response = ask(&handler, name, RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&response), ips(&[[127, 77, 0, 3]]), "{name}");
    }
}

#[tokio::test]
async fn instances_mode_leaves_out_critical_and_with_only_passing_warning_ones() {
    let (handler, memory) = handler(AnswerMode::Instances, false);
    let response = ask(&handler, "web.service.internal.", RecordType::A).await;
    assert_eq!(
        addresses(&response),
        ips(&[[10, 0, 0, 1], [10, 0, 0, 2]]),
        "critical left out"
    );
    let (strict, _) = self::handler(AnswerMode::Instances, true);
    let response = ask(&strict, "web.service.internal.", RecordType::A).await;
    assert_eq!(
        addresses(&response),
        ips(&[[10, 0, 0, 1]]),
        "warning left out"
    );
    // A change of health is answered at once.
    memory.set("web", vec![instance(3, 8082, Health::Passing)]);
    let response = ask(&handler, "web.service.internal.", RecordType::A).await;
    assert_eq!(addresses(&response), ips(&[[10, 0, 0, 3]]));
}

#[tokio::test]
async fn srv_names_each_healthy_instance_with_its_port_and_an_address_target() {
    let (handler, _) = handler(AnswerMode::Instances, false);
    let response = ask(&handler, "web.service.internal.", RecordType::SRV).await;
    let mut ports: Vec<(u16, String)> = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.port, srv.target.to_ascii())),
            _ => None,
        })
        .collect();
    ports.sort();
    // A service's own address is named by its hex form under addr.
    assert_eq!(
        ports,
        [
            (8080, "0a000001.addr.dc1.internal.".to_string()),
            (8081, "0a000002.addr.dc1.internal.".to_string())
        ]
    );
    // The targets resolve in the same answer (glue).
    let glue: BTreeSet<IpAddr> = response
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    assert_eq!(glue, ips(&[[10, 0, 0, 1], [10, 0, 0, 2]]));
}

#[tokio::test]
async fn vips_and_nodes_resolve_both_ways() {
    let (handler, _) = handler(AnswerMode::Vip, false);
    let response = ask(&handler, "3.0.77.127.in-addr.arpa.", RecordType::PTR).await;
    let names: Vec<String> = response
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(ptr) => Some(ptr.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["web.service.internal."]);
    let response = ask(&handler, "node-a.node.internal.", RecordType::A).await;
    assert_eq!(addresses(&response), ips(&[[10, 0, 0, 1]]));
}

#[tokio::test]
async fn unknown_names_under_the_domain_are_nxdomain_with_the_soa() {
    let (handler, _) = handler(AnswerMode::Vip, false);
    for name in [
        "nope.service.internal.",
        "nobody.node.internal.",
        "what.internal.",
    ] {
        let response = ask(&handler, name, RecordType::A).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
        assert!(response.answers.is_empty(), "{name}");
        assert!(
            response
                .authorities
                .iter()
                .any(|r| r.record_type() == RecordType::SOA),
            "{name}: the SOA says how long to cache the absence"
        );
    }
}

#[tokio::test]
async fn reconfigured_settings_answer_from_the_next_query_on() {
    let (handler, _) = handler(AnswerMode::Vip, false);
    let response = ask(&handler, "web.service.internal.", RecordType::A).await;
    assert_eq!(response.answers[0].ttl, 5, "the default dns.ttl");

    let settings = Settings {
        config: DnsConfig {
            domain: "consul".to_string(),
            answer: AnswerMode::Instances,
            ttl: std::time::Duration::from_secs(42),
            ..DnsConfig::default()
        },
        datacenter: "dc1".to_string(),
        recursors: Vec::new(),
    };
    handler.reconfigure(settings).unwrap();
    let response = ask(&handler, "web.service.consul.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        addresses(&response),
        ips(&[[10, 0, 0, 1], [10, 0, 0, 2]]),
        "instances, not the VIP"
    );
    assert!(response.answers.iter().all(|r| r.ttl == 42));
    // The old domain is no longer ours: forwarded, and with no
    // recursors refused.
    let response = ask(&handler, "web.service.internal.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);
}
