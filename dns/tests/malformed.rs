//! A malformed packet never crashes or stalls the server.
//!
//! The fuzz loop feeds random packets and mutations of valid queries
//! through the path of the UDP loop (hickory's decoder, then our handler,
//! then the encoder with a UDP size limit; FORMERR when it does not
//! decode; every fourth over TCP) and checks that every query gets a
//! well-formed response with its id within the transport's size. See
//! `signpost-fuzz` for the dose. Then the real server gets garbage over
//! UDP and TCP and must still answer a good query.

#![allow(clippy::unwrap_used)] // test helpers: a panic is a test failure

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RecordType};
use hickory_server::server::Request;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use signpost_core::config::{AnswerMode, DnsConfig};
use signpost_core::model::{Health, Weights};
use signpost_dns::{
    Catalog, DnsMetrics, DnsServer, Endpoint, Handler, NodeRecord, Owner, Settings,
};
use signpost_fuzz::Dose;

/// A catalog with a few services, one of them large enough to truncate.
struct Fixed;

impl Catalog for Fixed {
    async fn first_use(&self, _service: &str) {}

    fn instances(&self, service: &str, _tag: Option<&str>) -> Option<Vec<Endpoint>> {
        let n = match service {
            "web" => 3,
            "big" => 200,
            _ => return None,
        };
        Some(
            (0..n)
                .map(|i| Endpoint {
                    node: format!("node-{i}"),
                    // Every tenth one has a host name for an address.
                    address: (i % 10 != 9).then(|| {
                        IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8))
                    }),
                    service_address: i % 2 == 0,
                    port: 8000 + i as u16,
                    health: if i % 3 == 0 {
                        Health::Warning
                    } else {
                        Health::Passing
                    },
                    weights: Weights::default(),
                })
                .collect(),
        )
    }

    fn vip(&self, _service: &str, tag: Option<&str>) -> Option<Ipv4Addr> {
        Some(Ipv4Addr::new(127, 77, 0, if tag.is_some() { 2 } else { 1 }))
    }

    fn node(&self, name: &str) -> Option<NodeRecord> {
        (name == "node-1").then(|| NodeRecord {
            name: name.to_string(),
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            meta: BTreeMap::from([("rack".to_string(), "r1".to_string())]),
        })
    }

    fn owner(&self, ip: IpAddr) -> Option<Owner> {
        (ip == IpAddr::V4(Ipv4Addr::new(127, 77, 0, 1))).then(|| Owner::Service {
            service: "web".to_string(),
            tag: None,
        })
    }

    fn generation(&self) -> u64 {
        0
    }
}

fn settings(instances: bool) -> Settings {
    let config = DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        answer: if instances {
            AnswerMode::Instances
        } else {
            AnswerMode::Vip
        },
        ..DnsConfig::default()
    };
    Settings {
        config,
        datacenter: "dc1".to_string(),
        recursors: Vec::new(),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let names = [
        "web.service.internal.",
        "v2.web.service.internal.",
        "_web._tcp.service.internal.",
        "big.service.internal.",
        "big.service.dc1.internal.",
        "node-1.node.internal.",
        "0a000001.addr.internal.",
        "web.virtual.internal.",
        "internal.",
        "ns.internal.",
        "1.0.77.127.in-addr.arpa.",
        "nope.service.internal.",
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::ANY,
        RecordType::TXT,
        RecordType::PTR,
        RecordType::SOA,
        RecordType::NS,
    ];
    let mut seeds = Vec::new();
    for (i, name) in names.iter().enumerate() {
        for (j, rtype) in types.iter().enumerate() {
            let mut m = Message::query();
            m.metadata.id = (i * 16 + j) as u16;
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), *rtype));
            if (i + j) % 2 == 0 {
                let mut edns = Edns::new();
                edns.set_max_payload(1232);
                m.edns = Some(edns);
            }
            seeds.push(m.to_vec().unwrap());
        }
    }
    seeds
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut p = seed.to_vec();
    match rng.random_range(0..6) {
        0 => {
            // Flip some bits.
            for _ in 0..rng.random_range(1..8) {
                let at = rng.random_range(0..p.len());
                p[at] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            // Overwrite bytes, header counts included.
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
            }
        }
        2 => p.truncate(rng.random_range(0..p.len())),
        3 => p.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
        4 => {
            // A label length pointing past the end, or a compression loop.
            let at = rng.random_range(12.min(p.len() - 1)..p.len());
            p[at] = if rng.random() { 0xc0 } else { 63 };
            if at + 1 < p.len() {
                p[at + 1] = rng.random_range(0..p.len()) as u8;
            }
        }
        _ => {
            p = (0..rng.random_range(0..600))
                .map(|_| rng.random())
                .collect();
        }
    }
    p
}

#[tokio::test]
async fn random_and_mutated_packets_always_get_a_well_formed_answer() {
    let mut dose = Dose::from_env(20_000);
    let handlers = [
        Handler::new(
            settings(false),
            Arc::new(Fixed),
            Arc::new(DnsMetrics::default()),
        )
        .unwrap(),
        Handler::new(
            settings(true),
            Arc::new(Fixed),
            Arc::new(DnsMetrics::default()),
        )
        .unwrap(),
    ];
    let seeds = seeds();
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let mut decoded = 0;
    while dose.another() {
        let i = dose.done() - 1;
        let packet = if i < seeds.len() {
            seeds[i].clone()
        } else {
            let pick = dose.rng().random_range(0..seeds.len());
            mutate(dose.rng(), &seeds[pick])
        };
        // What the UDP loop drops before answering: too short for a
        // header, or a response.
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            continue;
        }
        // Every fourth over TCP: no size limit but the message's.
        let tcp = i % 4 == 3;
        let handler = &handlers[i % 2];
        let bytes = handler
            .answer_bytes(packet.clone(), src, tcp)
            .await
            .unwrap_or_else(|| panic!("{}: no answer to {packet:02x?}", dose.at()));
        let response = Message::from_vec(&bytes)
            .unwrap_or_else(|e| panic!("{}: undecodable answer ({e}) to {packet:02x?}", dose.at()));
        assert_eq!(
            response.metadata.id,
            u16::from_be_bytes([packet[0], packet[1]]),
            "{}",
            dose.at()
        );
        assert_eq!(response.metadata.message_type, MessageType::Response);
        // A query that decodes reaches the handler; one that does not is
        // answered FORMERR.
        let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
        let max = match Request::from_bytes(packet.clone(), src, protocol) {
            Ok(request) => {
                decoded += 1;
                if tcp { u16::MAX } else { request.max_payload() }
            }
            Err(_) => {
                assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
                512
            }
        };
        assert!(bytes.len() <= usize::from(max), "{}", dose.at());
    }
    // The mutations must reach the handler, not only the decoder.
    assert!(
        decoded > dose.done() / 4,
        "only {decoded} of {} decoded",
        dose.done()
    );
}

#[tokio::test]
async fn the_server_keeps_answering_after_garbage() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = DnsServer::bind(
        settings(false),
        Arc::new(Fixed),
        Arc::new(DnsMetrics::default()),
        Vec::new(),
    )
    .await
    .unwrap();
    let addr = server.local_addr();
    let stop = shutdown_signal();
    let running = tokio::spawn(server.run_until(stop.1));

    let mut rng = StdRng::seed_from_u64(7);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let seeds = seeds();
    for _ in 0..2_000 {
        let pick = rng.random_range(0..seeds.len());
        let packet = mutate(&mut rng, &seeds[pick]);
        udp.send_to(&packet, addr).await.unwrap();
    }
    // TCP: a bad length prefix, a half-sent message, then a hang-up.
    for garbage in [
        &[0xff, 0xff, 1, 2, 3][..],
        &[0x00, 0x20, 0xde, 0xad][..],
        &[0][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(garbage).await.unwrap();
        drop(tcp);
    }

    // A good query still gets its answer, over UDP and over TCP.
    let mut query = Message::query();
    query.metadata.id = 4242;
    query.metadata.op_code = OpCode::Query;
    query.add_query(Query::query(
        Name::from_ascii("web.service.internal.").unwrap(),
        RecordType::A,
    ));
    let wire = query.to_vec().unwrap();
    let mut buf = vec![0u8; 65535];
    let answer = loop {
        udp.send_to(&wire, addr).await.unwrap();
        let (n, _) = udp.recv_from(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        // Answers to the garbage may still be queued; skip them.
        if m.metadata.id == 4242 {
            break m;
        }
    };
    assert_eq!(answer.answers.len(), 1);

    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&(wire.len() as u16).to_be_bytes())
        .await
        .unwrap();
    tcp.write_all(&wire).await.unwrap();
    let len = tcp.read_u16().await.unwrap();
    let mut body = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut body).await.unwrap();
    let m = Message::from_vec(&body).unwrap();
    assert_eq!((m.metadata.id, m.answers.len()), (4242, 1));

    stop.0.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// A shutdown signal: the sender, and the future `run_until` waits on.
fn shutdown_signal() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}
