//! Names outside the domain: forwarded to the upstream resolvers,
//! cached, failed over, or refused without any.

use super::*;

/// A fake upstream resolver on a loopback address: `example.test. A` is
/// 192.0.2.7 (TTL 300), every other name NXDOMAIN with the `test.` SOA.
/// It records the questions it gets as (name, message id): a resolver
/// re-sending a slow query keeps its id, a new lookup takes a new one.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<Mutex<BTreeSet<(String, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let socket = bound_udp().await;
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(BTreeSet::new()));
        let log = asked.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(q) = query.queries.first() {
                    let name = q.name().to_ascii().to_lowercase();
                    log.lock().unwrap().insert((name, query.metadata.id));
                }
                let reply = upstream_answer(&query);
                socket.send_to(&reply.to_vec().unwrap(), from).await.ok();
            }
        });
        Upstream { addr, asked, task }
    }

    /// How many lookups of `name` (fully qualified) reached it.
    fn asked(&self, name: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP socket on a free loopback address.
async fn bound_udp() -> tokio::net::UdpSocket {
    loop {
        if let Ok(socket) = tokio::net::UdpSocket::bind(free_addr()).await {
            return socket;
        }
    }
}

fn upstream_answer(query: &Message) -> Message {
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
    }
    let Some(q) = query.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    let example = dns::name("example.test");
    if q.name().eq_ignore_root_case(&example) && q.query_type() == RecordType::A {
        reply.add_answer(Record::from_rdata(
            q.name().clone(),
            300,
            RData::A(A(EXAMPLE_IP)),
        ));
    } else {
        reply.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(
            dns::name("ns.test"),
            dns::name("hostmaster.test"),
            1,
            3600,
            600,
            86400,
            60,
        );
        reply.add_authority(Record::from_rdata(dns::name("test"), 60, RData::SOA(soa)));
    }
    reply
}

fn recursors(list: &[SocketAddr]) -> String {
    let list: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "dns:\n  recursors: [{}]\n  recursor_timeout: 1s\n",
        list.join(", ")
    )
}

/// Names outside the domain are answered by the upstream resolver, with
/// RA set and not authoritative; a repeated question, positive or
/// negative, is answered from the cache without asking upstream again.
#[tokio::test]
async fn other_names_are_forwarded_and_cached() {
    let upstream = Upstream::start().await;
    let agent = Agent::start(&recursors(&[upstream.addr])).await;
    let hit = r#"signpost_agent_dns_forward_cache_total{result="hit"}"#;
    let miss = r#"signpost_agent_dns_forward_cache_total{result="miss"}"#;

    let m = ask(&agent, "example.test", RecordType::A, Transport::Udp).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m}");
    assert!(m.metadata.recursion_available, "RA not set:\n{m}");
    assert!(!m.metadata.authoritative, "AA on a forwarded answer:\n{m}");
    assert_eq!(a_answers(&m), vec![EXAMPLE_IP]);
    assert!(m.answers.iter().all(|r| r.ttl <= 300 && r.ttl > 0), "{m}");
    assert_eq!(upstream.asked("example.test."), 1);
    assert_eq!(agent.metric(miss).await, 1.0);
    let hits_before = agent.metric(hit).await;

    for over in BOTH {
        let m = ask(&agent, "example.test", RecordType::A, over).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m}");
        assert!(m.metadata.recursion_available, "{m}");
        assert_eq!(
            a_answers(&m),
            vec![EXAMPLE_IP],
            "cached answer over {over:?}"
        );
    }
    assert_eq!(upstream.asked("example.test."), 1, "asked upstream again");
    wait_metric(&agent, hit, hits_before + 2.0).await;

    // NXDOMAIN comes through with upstream's SOA, and is cached too.
    for _ in 0..2 {
        let m = ask(&agent, "missing.test", RecordType::A, Transport::Udp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{m}");
        assert!(m.metadata.recursion_available, "{m}");
        assert!(!m.metadata.authoritative, "{m}");
        let (owner, _) = soa_of(&m.authorities).unwrap_or_else(|| panic!("no SOA:\n{m}"));
        assert_eq!(owner, "test.");
    }
    assert_eq!(upstream.asked("missing.test."), 1);
}

/// With the first recursor dead, the next one answers; with every
/// recursor dead, the client gets SERVFAIL (not silence).
#[tokio::test]
async fn forwarding_fails_over_and_servfails_when_no_recursor_answers() {
    let upstream = Upstream::start().await;
    // Bound and never read: queries sent there get no answer.
    let dead = bound_udp().await;
    let dead_too = bound_udp().await;
    let dead_addr = dead.local_addr().unwrap();

    let agent = Agent::start(&recursors(&[dead_addr, upstream.addr])).await;
    for over in BOTH {
        let m = ask(&agent, "example.test", RecordType::A, over).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m}");
        assert_eq!(a_answers(&m), vec![EXAMPLE_IP]);
    }
    assert!(upstream.asked("example.test.") >= 1);

    let hopeless = Agent::start(&recursors(&[dead_addr, dead_too.local_addr().unwrap()])).await;
    let m = ask(&hopeless, "example.test", RecordType::A, Transport::Udp).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "{m}");
    assert!(m.answers.is_empty(), "{m}");
    // The domain is still served locally.
    let m = ask(
        &hopeless,
        "test-node.node.internal",
        RecordType::A,
        Transport::Udp,
    )
    .await;
    assert_answered(&m, "node with dead recursors");
}

/// With `recursors: []` the agent serves only its domain: other names
/// are REFUSED (recursion not offered), local names still answer.
#[tokio::test]
async fn without_recursors_other_names_are_refused() {
    let agent = agent_with_web().await;
    for over in BOTH {
        for (name, rtype) in [
            ("example.test", RecordType::A),
            ("example.com", RecordType::AAAA),
            // A PTR for an address that is not ours.
            ("7.2.0.192.in-addr.arpa", RecordType::PTR),
        ] {
            let m = ask(&agent, name, rtype, over).await;
            assert_eq!(
                m.metadata.response_code,
                ResponseCode::Refused,
                "{name}:\n{m}"
            );
            assert!(!m.metadata.recursion_available, "{m}");
            assert!(m.answers.is_empty(), "{m}");
        }
        let m = ask(&agent, "web.service.internal", RecordType::A, over).await;
        the_vip(&m, "web without recursors");
    }
}
