//! The agent's DNS server, asked like applications and `dig` ask it:
//! service names answer with the service's stable VIP or its healthy
//! instances, nodes, addresses and VIPs resolve both ways, unknown names
//! are NXDOMAIN, big answers truncate over UDP and come whole over TCP,
//! a service of another host answers on the first lookup, and every other
//! name goes to the upstream resolvers (cached, with fail-over).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a test failure

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{RData, Record, RecordType};
use serde_json::json;
use signpost_tests::dns::{self, Transport};
use signpost_tests::{AGENT_TOKEN, Agent, ControlPlane, free_addr};

mod forwarding;
mod instances;

const BOTH: [Transport; 2] = [Transport::Udp, Transport::Tcp];

/// DNS on, names outside the domain refused (no test reaches the
/// host's real resolvers).
const NO_RECURSORS: &str = "dns:\n  recursors: []\n";

async fn ask(agent: &Agent, name: &str, rtype: RecordType, over: Transport) -> Message {
    dns::query(agent.dns_addr(), name, rtype, over).await
}

/// Waits until every service id in `ids` is registered.
async fn wait_services(agent: &Agent, ids: &[&str]) {
    agent
        .eventually(&format!("services {ids:?} registered"), || async {
            let services = agent.get("/v1/agent/services").await.json();
            ids.iter()
                .all(|id| services.get(id).is_some())
                .then_some(())
        })
        .await
}

/// Reports `status` for TTL check `id` and waits until the agent shows it.
async fn set_check(agent: &Agent, id: &str, status: &str) {
    let verb = match status {
        "passing" => "pass",
        "warning" => "warn",
        "critical" => "fail",
        other => panic!("no such status {other}"),
    };
    let r = agent
        .put(&format!("/v1/agent/check/{verb}/{id}"), None)
        .await;
    assert!(r.status.is_success(), "{verb} {id}: {}", r.text);
    agent.wait_check(id, status).await;
}

/// Waits until `series` in the agent's `/metrics` reaches `at_least`
/// (the DNS counters move right after the answer is sent).
async fn wait_metric(agent: &Agent, series: &str, at_least: f64) -> f64 {
    agent
        .eventually(&format!("{series} >= {at_least}"), || async {
            let v = agent.metric(series).await;
            (v >= at_least).then_some(v)
        })
        .await
}

fn ipv4s(records: &[Record]) -> Vec<Ipv4Addr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// The A records of the answer section, in order.
fn a_answers(m: &Message) -> Vec<Ipv4Addr> {
    ipv4s(&m.answers)
}

/// The A records for `name` in the additional section.
fn glue(m: &Message, name: &str) -> Vec<Ipv4Addr> {
    let name = dns::name(name);
    let records: Vec<Record> = m
        .additionals
        .iter()
        .filter(|r| r.name == name)
        .cloned()
        .collect();
    ipv4s(&records)
}

/// The SRV answers as (priority, weight, port, target), sorted.
fn srv_answers(m: &Message) -> Vec<(u16, u16, u16, String)> {
    let mut srv: Vec<_> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_string())),
            _ => None,
        })
        .collect();
    srv.sort();
    srv
}

fn ptr_answers(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_string()),
            _ => None,
        })
        .collect()
}

fn soa_of(records: &[Record]) -> Option<(String, SOA)> {
    records.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some((r.name.to_string(), soa.clone())),
        _ => None,
    })
}

/// An authoritative NOERROR answer.
fn assert_answered(m: &Message, what: &str) {
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NoError,
        "{what}:\n{m}"
    );
    assert!(m.metadata.authoritative, "{what}: AA not set:\n{m}");
}

/// NXDOMAIN, authoritative, with the domain's SOA in AUTHORITY (so that
/// resolvers cache the miss).
fn assert_nxdomain(m: &Message, what: &str) {
    assert_nxdomain_in(m, what, "internal");
}

fn assert_nxdomain_in(m: &Message, what: &str, domain: &str) {
    assert_eq!(
        m.metadata.response_code,
        ResponseCode::NXDomain,
        "{what}:\n{m}"
    );
    assert!(m.metadata.authoritative, "{what}: AA not set:\n{m}");
    assert!(m.answers.is_empty(), "{what}:\n{m}");
    let (owner, soa) = soa_of(&m.authorities).unwrap_or_else(|| panic!("{what}: no SOA:\n{m}"));
    assert_eq!(owner, format!("{domain}."), "{what}");
    assert_eq!(soa.mname.to_string(), format!("ns.{domain}."), "{what}");
}

fn in_vip_range(ip: Ipv4Addr) -> bool {
    matches!(ip.octets(), [127, 77, _, _])
}

/// The one A answer of `m`, which must be a VIP.
fn the_vip(m: &Message, what: &str) -> Ipv4Addr {
    assert_answered(m, what);
    match a_answers(m)[..] {
        [vip] if in_vip_range(vip) => vip,
        _ => panic!("{what}: expected one VIP in 127.77.0.0/16:\n{m}"),
    }
}

/// The reverse-lookup name of `ip`.
fn arpa(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
}

fn agent_ip(agent: &Agent) -> Ipv4Addr {
    match agent.addr.ip() {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => panic!("agents run on IPv4 loopback, not {v6}"),
    }
}

/// Two `web` instances on ports 8080 and 9090; web-1 is tagged `v2` and
/// its TTL check is critical (it starts so).
const WEB: &str = "services:
  - name: web
    id: web-1
    port: 8080
    tags: [v2]
    checks:
      - ttl: 10m
  - name: web
    id: web-2
    port: 9090
";

async fn agent_with_web() -> Agent {
    let agent = Agent::start(NO_RECURSORS).await;
    agent.write_service_file("web.yaml", WEB);
    wait_services(&agent, &["web-1", "web-2"]).await;
    agent.wait_check("service:web-1", "critical").await;
    agent
}

/// In the default VIP mode every query form answers over UDP and TCP:
/// the service name gives one stable VIP whatever the instances' health,
/// a tag its own VIP, SRV the ports with the VIP as glue; nodes, hex
/// addresses and VIPs resolve both ways; the apex has SOA and NS; every
/// answer is authoritative and EDNS is echoed only when sent.
#[tokio::test]
async fn vip_mode_answers_every_query_form_over_udp_and_tcp() {
    // web-1 is critical and the only one tagged v2: VIP mode answers
    // for a known service whatever its health (the proxy picks).
    let agent = agent_with_web().await;
    let me = agent_ip(&agent);
    let mut vips: Option<(Ipv4Addr, Ipv4Addr)> = None;
    for over in BOTH {
        let q = async |name: &str, rtype: RecordType| ask(&agent, name, rtype, over).await;
        let what = |name: &str| format!("{name} over {over:?}");

        // The service and its tag: one VIP each, the same every time.
        let m = q("web.service.internal", RecordType::A).await;
        let vip = the_vip(&m, &what("web.service.internal"));
        assert!(m.edns.is_some(), "EDNS not echoed:\n{m}");
        assert_eq!(m.answers[0].name, dns::name("web.service.internal"));
        let again = q("web.service.internal", RecordType::A).await;
        assert_eq!(the_vip(&again, "web again"), vip);
        let tagged = q("v2.web.service.internal", RecordType::A).await;
        let tag_vip = the_vip(&tagged, &what("v2.web.service.internal"));
        assert_ne!(tag_vip, vip, "a tag has its own VIP");
        match vips {
            None => vips = Some((vip, tag_vip)),
            Some(first) => assert_eq!(first, (vip, tag_vip), "VIPs changed between UDP and TCP"),
        }
        assert_nxdomain(
            &q("v9.web.service.internal", RecordType::A).await,
            &what("unknown tag"),
        );

        // Same VIP through `.virtual.` and with this datacenter named.
        for name in [
            "web.virtual.internal",
            "web.service.dc1.internal",
            "web.service.dc1.dc.internal",
            "WEB.Service.Internal",
        ] {
            assert_eq!(the_vip(&q(name, RecordType::A).await, &what(name)), vip);
        }
        assert_nxdomain(
            &q("web.service.dc2.internal", RecordType::A).await,
            &what("another datacenter"),
        );

        // SRV: one record per port, the VIP as glue; both RFC 2782 forms.
        for name in ["_web._tcp.service.internal", "_web._tcp.internal"] {
            let m = q(name, RecordType::SRV).await;
            assert_answered(&m, &what(name));
            let target = "web.service.internal.".to_string();
            assert_eq!(
                srv_answers(&m),
                vec![(1, 1, 8080, target.clone()), (1, 1, 9090, target)],
                "{}",
                what(name)
            );
            assert_eq!(glue(&m, "web.service.internal"), vec![vip], "{m}");
        }
        let m = q("_web._v2.service.internal", RecordType::SRV).await;
        assert_answered(&m, &what("_web._v2"));
        assert_eq!(
            srv_answers(&m),
            vec![(1, 1, 8080, "v2.web.service.internal.".to_string())]
        );
        assert_eq!(glue(&m, "v2.web.service.internal"), vec![tag_vip], "{m}");

        // No IPv6 VIP: NODATA, with the SOA for negative caching.
        let m = q("web.service.internal", RecordType::AAAA).await;
        assert_answered(&m, &what("AAAA"));
        assert!(m.answers.is_empty(), "{m}");
        assert!(soa_of(&m.authorities).is_some(), "no SOA in NODATA:\n{m}");

        // Nodes and hex addresses.
        let m = q("test-node.node.internal", RecordType::A).await;
        assert_answered(&m, &what("node"));
        assert_eq!(a_answers(&m), vec![me]);
        let m = q("7f000005.addr.internal", RecordType::A).await;
        assert_answered(&m, &what("addr A"));
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(127, 0, 0, 5)]);
        let m = q(
            "20010db8000000000000000000000001.addr.internal",
            RecordType::AAAA,
        )
        .await;
        assert_answered(&m, &what("addr AAAA"));
        let six: Vec<Ipv6Addr> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect();
        assert_eq!(six, vec!["2001:db8::1".parse::<Ipv6Addr>().unwrap()]);

        // Reverse lookups of the VIPs and of the node's address.
        for (ip, owner) in [
            (vip, "web.service.internal."),
            (tag_vip, "v2.web.service.internal."),
            (me, "test-node.node.internal."),
        ] {
            let m = q(&arpa(ip), RecordType::PTR).await;
            assert_answered(&m, &what(&arpa(ip)));
            assert_eq!(ptr_answers(&m), vec![owner.to_string()], "{m}");
        }

        // The apex: SOA and NS, and the name server's address.
        let m = q("internal", RecordType::SOA).await;
        assert_answered(&m, &what("SOA"));
        let (owner, soa) = soa_of(&m.answers).unwrap_or_else(|| panic!("no SOA:\n{m}"));
        assert_eq!(
            (owner.as_str(), soa.mname.to_string().as_str()),
            ("internal.", "ns.internal.")
        );
        let m = q("internal", RecordType::NS).await;
        assert_answered(&m, &what("NS"));
        let ns: Vec<String> = m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::NS(ns) => Some(ns.0.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(ns, vec!["ns.internal.".to_string()]);
        assert_eq!(glue(&m, "ns.internal"), vec![me]);
        let m = q("ns.internal", RecordType::A).await;
        assert_answered(&m, &what("ns"));
        assert_eq!(a_answers(&m), vec![me]);
    }

    // A query without EDNS gets the same answer, without EDNS.
    let (vip, _) = vips.unwrap();
    for over in BOTH {
        let request = dns::request("web.service.internal", RecordType::A, None);
        let (m, _) = dns::exchange(agent.dns_addr(), &request, over).await;
        assert_eq!(the_vip(&m, "without EDNS"), vip);
        assert!(
            m.edns.is_none(),
            "EDNS in the answer to a query without:\n{m}"
        );
    }
}

/// A VIP handed out once never changes: after a restart of the agent
/// the service and its tag resolve to the same addresses, even when they
/// are asked for in the other order. (The VIP range has room for two:
/// `web` and `v2.web` hash to the same slot, so the second one asked gets
/// the other address unless the agent remembers who had which.)
#[tokio::test]
async fn vips_survive_an_agent_restart() {
    let mut agent = Agent::start(&format!(
        "{NO_RECURSORS}proxy:\n  vip_range: 127.77.200.0/30\n"
    ))
    .await;
    agent.write_service_file("web.yaml", WEB);
    wait_services(&agent, &["web-1", "web-2"]).await;
    let udp = Transport::Udp;
    let vip = the_vip(
        &ask(&agent, "web.service.internal", RecordType::A, udp).await,
        "web",
    );
    let tag_vip = the_vip(
        &ask(&agent, "v2.web.service.internal", RecordType::A, udp).await,
        "v2.web",
    );
    assert_ne!(vip, tag_vip);

    agent.restart().await;
    wait_services(&agent, &["web-1", "web-2"]).await;
    for over in BOTH {
        let m = ask(&agent, "v2.web.service.internal", RecordType::A, over).await;
        assert_eq!(the_vip(&m, "v2.web after restart"), tag_vip);
        let m = ask(&agent, "web.service.internal", RecordType::A, over).await;
        assert_eq!(the_vip(&m, "web after restart"), vip);
        let m = ask(&agent, &arpa(vip), RecordType::PTR, over).await;
        assert_eq!(ptr_answers(&m), vec!["web.service.internal.".to_string()]);
        let m = ask(&agent, &arpa(tag_vip), RecordType::PTR, over).await;
        assert_eq!(
            ptr_answers(&m),
            vec!["v2.web.service.internal.".to_string()]
        );
    }
}

/// `api`: four instances with TTL checks, api-4 on api-1's address;
/// `strict`: two, under `only_passing`.
const API: &str = "services:
  - { name: api, id: api-1, address: 127.0.0.11, port: 8001, checks: [{ ttl: 10m }] }
  - { name: api, id: api-2, address: 127.0.0.12, port: 8002, checks: [{ ttl: 10m }] }
  - { name: api, id: api-3, address: 127.0.0.13, port: 8003, checks: [{ ttl: 10m }] }
  - { name: api, id: api-4, address: 127.0.0.11, port: 8004, checks: [{ ttl: 10m }] }
  - { name: strict, id: strict-1, address: 127.0.0.21, port: 8001, checks: [{ ttl: 10m }] }
  - { name: strict, id: strict-2, address: 127.0.0.22, port: 8002, checks: [{ ttl: 10m }] }
";

/// Names under the domain that name nothing known are NXDOMAIN with the
/// SOA in AUTHORITY, whatever their form.
#[tokio::test]
async fn unknown_names_under_the_domain_are_nxdomain_with_the_soa() {
    let agent = agent_with_web().await;
    for over in BOTH {
        for (name, rtype) in [
            ("nope.service.internal", RecordType::A),
            ("v2.nope.service.internal", RecordType::A),
            ("_nope._tcp.service.internal", RecordType::SRV),
            ("nope.virtual.internal", RecordType::A),
            ("nobody.node.internal", RecordType::A),
            ("zzzzzzzz.addr.internal", RecordType::A),
            ("7f0001.addr.internal", RecordType::A),
            ("web.query.internal", RecordType::A),
            ("a.b.c.internal", RecordType::A),
            ("garbage.internal", RecordType::A),
            ("service.internal", RecordType::A),
        ] {
            let m = ask(&agent, name, rtype, over).await;
            assert_nxdomain(&m, &format!("{name} {rtype} over {over:?}"));
        }
    }
}

/// With `dns.domain` and `datacenter` set, names live under that domain
/// (written in any case, with a final dot or not), a datacenter label
/// must name this datacenter, SRV targets carry it, and `internal` is
/// no longer ours.
#[tokio::test]
async fn a_custom_domain_and_datacenter_are_served() {
    let agent = Agent::start(
        "datacenter: eu1\ndns:\n  domain: Consul.\n  answer: instances\n  recursors: []\n",
    )
    .await;
    agent.write_service_file(
        "web.yaml",
        "services:
  - { name: web, id: web-1, port: 80 }
  - { name: api, id: api-1, address: 127.0.0.41, port: 81 }
",
    );
    wait_services(&agent, &["web-1", "api-1"]).await;
    let me = agent_ip(&agent);
    for over in BOTH {
        for name in [
            "web.service.consul",
            "web.service.eu1.consul",
            "WEB.SERVICE.CONSUL",
        ] {
            let m = ask(&agent, name, RecordType::A, over).await;
            assert_answered(&m, name);
            assert_eq!(a_answers(&m), vec![me], "{name}");
        }
        let m = ask(&agent, "web.service.dc1.consul", RecordType::A, over).await;
        assert_nxdomain_in(&m, "the default datacenter", "consul");
        let m = ask(&agent, "nope.service.consul", RecordType::A, over).await;
        assert_nxdomain_in(&m, "unknown service", "consul");

        let m = ask(&agent, "_web._tcp.service.consul", RecordType::SRV, over).await;
        assert_answered(&m, "web SRV");
        assert_eq!(
            srv_answers(&m),
            vec![(1, 1, 80, "test-node.node.eu1.consul.".to_string())]
        );
        assert_eq!(glue(&m, "test-node.node.eu1.consul"), vec![me]);
        let m = ask(&agent, "_api._tcp.service.consul", RecordType::SRV, over).await;
        assert_eq!(
            srv_answers(&m),
            vec![(1, 1, 81, "7f000029.addr.eu1.consul.".to_string())]
        );

        let m = ask(&agent, &arpa(me), RecordType::PTR, over).await;
        assert_eq!(ptr_answers(&m), vec!["test-node.node.consul.".to_string()]);
        let m = ask(&agent, "consul", RecordType::SOA, over).await;
        assert_answered(&m, "SOA");
        let (owner, soa) = soa_of(&m.answers).unwrap_or_else(|| panic!("no SOA:\n{m}"));
        assert_eq!(
            (owner, soa.mname.to_string()),
            ("consul.".to_string(), "ns.consul.".to_string())
        );

        let m = ask(&agent, "web.service.internal", RecordType::A, over).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{m}");
    }
}

/// 100 instances do not fit a 512-byte UDP answer: a client without EDNS
/// gets TC set with the records that fit (and retries over TCP, which
/// gives all 100); a client advertising 4096 bytes gets more over UDP.
/// The truncation is counted.
#[tokio::test]
async fn big_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let agent = Agent::start("dns:\n  answer: instances\n  recursors: []\n").await;
    let mut file = String::from("services:\n");
    for i in 1..=100 {
        file.push_str(&format!(
            "  - {{ name: big, id: big-{i}, address: 127.0.1.{i}, port: 80 }}\n"
        ));
    }
    agent.write_service_file("big.yaml", &file);
    let ids: Vec<String> = (1..=100).map(|i| format!("big-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_services(&agent, &ids).await;
    let all: BTreeSet<Ipv4Addr> = (1..=100).map(|i| Ipv4Addr::new(127, 0, 1, i)).collect();
    let truncated = "signpost_agent_dns_truncated_total";
    let truncated_before = agent.metric(truncated).await;
    let addr = agent.dns_addr();

    let classic = dns::request("big.service.internal", RecordType::A, None);
    let (small, size) = dns::exchange(addr, &classic, Transport::Udp).await;
    assert_answered(&small, "UDP without EDNS");
    assert!(small.metadata.truncation, "TC not set:\n{small}");
    assert!(size <= 512, "{size} bytes over UDP without EDNS");
    let fitted = a_answers(&small);
    assert!(
        !fitted.is_empty() && fitted.len() < 100,
        "{} answers in 512 bytes",
        fitted.len()
    );
    assert!(fitted.iter().all(|ip| all.contains(ip)), "{small}");
    wait_metric(&agent, truncated, truncated_before + 1.0).await;

    let (whole, _) = dns::exchange(addr, &classic, Transport::Tcp).await;
    assert_answered(&whole, "TCP");
    assert!(!whole.metadata.truncation, "TC over TCP:\n{whole}");
    let over_tcp = a_answers(&whole);
    assert_eq!(over_tcp.len(), 100);
    assert_eq!(over_tcp.into_iter().collect::<BTreeSet<_>>(), all);

    let big_buffer = dns::request("big.service.internal", RecordType::A, Some(4096));
    let (large, size) = dns::exchange(addr, &big_buffer, Transport::Udp).await;
    assert_answered(&large, "UDP with EDNS 4096");
    assert!(size <= 4096, "{size} bytes");
    assert!(
        a_answers(&large).len() > fitted.len(),
        "EDNS 4096 gave {} answers, 512 bytes {}",
        a_answers(&large).len(),
        fitted.len()
    );
    assert_eq!(large.edns.as_ref().map(Edns::max_payload), Some(4096));
}

/// The queries counter counts answers by type, response code and
/// protocol.
#[tokio::test]
async fn answered_queries_are_counted_by_type_rcode_and_protocol() {
    let agent = agent_with_web().await;
    let ok_udp = r#"signpost_agent_dns_queries_total{type="A",rcode="NOERROR",protocol="udp"}"#;
    let nx_tcp = r#"signpost_agent_dns_queries_total{type="A",rcode="NXDOMAIN",protocol="tcp"}"#;
    let srv_tcp = r#"signpost_agent_dns_queries_total{type="SRV",rcode="NOERROR",protocol="tcp"}"#;
    let before = [
        agent.metric(ok_udp).await,
        agent.metric(nx_tcp).await,
        agent.metric(srv_tcp).await,
    ];
    for _ in 0..3 {
        let m = ask(
            &agent,
            "web.service.internal",
            RecordType::A,
            Transport::Udp,
        )
        .await;
        the_vip(&m, "web");
    }
    for _ in 0..2 {
        let m = ask(
            &agent,
            "nope.service.internal",
            RecordType::A,
            Transport::Tcp,
        )
        .await;
        assert_nxdomain(&m, "nope");
    }
    let m = ask(
        &agent,
        "_web._tcp.service.internal",
        RecordType::SRV,
        Transport::Tcp,
    )
    .await;
    assert_answered(&m, "SRV");

    wait_metric(&agent, ok_udp, before[0] + 3.0).await;
    // TCP queries are never re-sent: those counts are exact.
    wait_metric(&agent, nx_tcp, before[1] + 2.0).await;
    wait_metric(&agent, srv_tcp, before[2] + 1.0).await;
    assert_eq!(agent.metric(nx_tcp).await, before[1] + 2.0);
    assert_eq!(agent.metric(srv_tcp).await, before[2] + 1.0);
}

const EXAMPLE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// Runs `dig @<agent> -p 8600 <args>` and returns its output.
async fn dig(agent: &Agent, args: &[&str]) -> String {
    let server = format!("@{}", agent.dns_addr().ip());
    let port = agent.dns_addr().port().to_string();
    let out = tokio::process::Command::new("dig")
        .arg(&server)
        .args(["-p", &port, "+time=5", "+tries=3"])
        .args(args)
        .output()
        .await
        .expect("cannot run dig (install dnsutils)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The real `dig` gets what a user expects: the VIP over UDP and TCP,
/// the SRV record, the PTR of the VIP, and NXDOMAIN with AA and the SOA.
#[tokio::test]
#[ignore = "needs dig (dnsutils)"]
async fn dig_gets_the_expected_answers() {
    let agent = agent_with_web().await;
    let vip = dig(&agent, &["+short", "web.service.internal"]).await;
    let vip: Ipv4Addr = vip
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not one address: {vip:?}"));
    assert!(in_vip_range(vip), "{vip}");
    let over_tcp = dig(&agent, &["+short", "+tcp", "web.service.internal"]).await;
    assert_eq!(over_tcp.trim(), vip.to_string());

    let srv = dig(&agent, &["+short", "_web._v2.service.internal", "SRV"]).await;
    assert_eq!(srv.trim(), "1 1 8080 v2.web.service.internal.");
    let srv = dig(&agent, &["+short", "_web._tcp.service.internal", "SRV"]).await;
    let mut lines: Vec<&str> = srv.lines().collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "1 1 8080 web.service.internal.",
            "1 1 9090 web.service.internal."
        ]
    );

    let ptr = dig(&agent, &["+short", "-x", &vip.to_string()]).await;
    assert_eq!(ptr.trim(), "web.service.internal.");

    let full = dig(&agent, &["nope.service.internal"]).await;
    assert!(full.contains("status: NXDOMAIN"), "{full}");
    assert!(full.contains("flags: qr aa"), "{full}");
    assert!(full.contains("AUTHORITY SECTION:"), "{full}");
    assert!(
        full.contains("SOA\tns.internal. hostmaster.internal."),
        "{full}"
    );
}
