//! A DNS client for an agent's DNS server ([`Agent::dns_addr`]): hickory's
//! client for queries as resolvers make them, and raw messages over plain
//! sockets where a test needs control over the exact packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::PATIENCE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// `name` as a fully qualified DNS name (a final dot is optional).
pub fn name(name: &str) -> Name {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    Name::from_ascii(&fqdn).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"))
}

/// Asks the server at `addr` for `name`/`rtype` with hickory's client,
/// as a stub resolver does: RD set, and EDNS with a UDP size of 1232
/// bytes (the client's default). Fails the test if no answer comes.
pub async fn query(addr: SocketAddr, name: &str, rtype: RecordType, over: Transport) -> Message {
    let qname = self::name(name);
    let provider = TokioRuntimeProvider::default();
    let response = match over {
        Transport::Udp => {
            // Re-sent only after 5s of silence: a slow answer is not
            // asked for twice (which would skew counts in tests).
            let stream = UdpClientStream::builder(addr, provider)
                .with_timeout(Some(PATIENCE))
                .with_retry_interval_floor(5_000)
                .build();
            let (mut client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
            tokio::spawn(background);
            client.query(qname, DNSClass::IN, rtype).await
        }
        Transport::Tcp => {
            let (connect, sender) = TcpClientStream::new(addr, None, Some(PATIENCE), provider);
            let stream = connect
                .await
                .unwrap_or_else(|e| panic!("cannot connect to the DNS server {addr}: {e}"));
            let (mut client, background) =
                Client::<TokioRuntimeProvider>::with_timeout(stream, sender, PATIENCE);
            tokio::spawn(background);
            client.query(qname, DNSClass::IN, rtype).await
        }
    };
    response
        .unwrap_or_else(|e| panic!("no answer to {name} {rtype} over {over:?} from {addr}: {e}"))
        .into_message()
}

/// A query for `name`/`rtype` with RD set, advertising a UDP size of
/// `edns` bytes when given; without EDNS the classic 512-byte limit
/// applies.
pub fn request(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(self::name(name), rtype));
    if let Some(size) = edns {
        let mut opt = Edns::new();
        opt.set_max_payload(size);
        message.set_edns(opt);
    }
    message
}

/// Sends `request` exactly as built (UDP: re-sent every 5s until
/// answered, as resolvers do; TCP: with its 2-byte length prefix) and
/// returns the answer and its size on the wire.
pub async fn exchange(addr: SocketAddr, request: &Message, over: Transport) -> (Message, usize) {
    let wire = request.to_vec().unwrap();
    let id = request.metadata.id;
    let bytes = match over {
        Transport::Udp => {
            let any = match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let socket = tokio::net::UdpSocket::bind((any, 0)).await.unwrap();
            let deadline = Instant::now() + PATIENCE;
            let mut buf = vec![0u8; 65535];
            'send: loop {
                assert!(Instant::now() < deadline, "no UDP answer from {addr}");
                socket.send_to(&wire, addr).await.unwrap();
                let resend = Instant::now() + Duration::from_secs(5);
                loop {
                    let left = resend.saturating_duration_since(Instant::now());
                    let Ok(got) = tokio::time::timeout(left, socket.recv_from(&mut buf)).await
                    else {
                        continue 'send;
                    };
                    let (n, from) = got.unwrap();
                    if from == addr && n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                        break 'send buf[..n].to_vec();
                    }
                }
            }
        }
        Transport::Tcp => tokio::time::timeout(PATIENCE, async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let len = u16::try_from(wire.len()).unwrap();
            tcp.write_all(&len.to_be_bytes()).await.unwrap();
            tcp.write_all(&wire).await.unwrap();
            let len = tcp.read_u16().await.unwrap();
            let mut body = vec![0u8; usize::from(len)];
            tcp.read_exact(&mut body).await.unwrap();
            body
        })
        .await
        .unwrap_or_else(|_| panic!("no TCP answer from {addr}")),
    };
    let message = Message::from_vec(&bytes)
        .unwrap_or_else(|e| panic!("undecodable answer from {addr} ({e}): {bytes:02x?}"));
    (message, bytes.len())
}
