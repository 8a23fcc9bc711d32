//! Between a query's bytes and the [`Handler`], for both transports: the
//! query parsed (or answered FORMERR when it cannot be), the answer
//! encoded as the transport allows.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hickory_server::net::NetError;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, ResponseCode};
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::{BinDecodable, BinEncodable, BinEncoder};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;

use crate::Catalog;
use crate::answer::{Handler, Outcome, rcode_label};

/// A DNS header's length: the ID, the flags and four counts.
pub(crate) const HEADER_LEN: usize = 12;

/// What [`answer`] produced.
pub(crate) struct Answered {
    /// The response to send.
    pub(crate) bytes: Vec<u8>,
    /// The parsed query and what the handler did with it; `None` when the
    /// query could not be parsed (the response is then a FORMERR).
    pub(crate) handled: Option<(Request, Outcome)>,
}

/// Answers the query in `raw` (at least [`HEADER_LEN`] bytes) from `src`;
/// `None` when there is nothing to send.
pub(crate) async fn answer<C: Catalog>(
    handler: &Handler<C>,
    raw: Vec<u8>,
    src: SocketAddr,
    protocol: Protocol,
) -> Option<Answered> {
    let header = Header::from_bytes(raw.get(..HEADER_LEN)?).ok()?;
    let request = match Request::from_bytes(raw, src, protocol) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, %src, "undecodable DNS query");
            let mut metadata = Metadata::response_from_request(&header.metadata);
            metadata.response_code = ResponseCode::FormErr;
            let mut bytes = Vec::with_capacity(HEADER_LEN);
            let reply = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            reply.emit(&mut BinEncoder::new(&mut bytes)).ok()?;
            handler.metrics().answered(
                "other",
                rcode_label(ResponseCode::FormErr),
                protocol == Protocol::Tcp,
            );
            return Some(Answered {
                bytes,
                handled: None,
            });
        }
    };
    let encoded = Encoded {
        bytes: Arc::default(),
        tcp: protocol == Protocol::Tcp,
    };
    let outcome = handler.respond(&request, encoded.clone()).await;
    let bytes = lock(&encoded.bytes).take()?;
    Some(Answered {
        bytes,
        handled: Some((request, outcome)),
    })
}

impl<C: Catalog> Handler<C> {
    /// Answers one query given as bytes, as the UDP loop (`tcp: false`)
    /// or a TCP connection would: the response's bytes, or `None` when
    /// nothing would be sent. What the fuzz harnesses call.
    pub async fn answer_bytes(
        &self,
        query: Vec<u8>,
        src: SocketAddr,
        tcp: bool,
    ) -> Option<Vec<u8>> {
        let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
        answer(self, query, src, protocol).await.map(|a| a.bytes)
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a map operation; the data stays usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Encodes the response as hickory's server would and keeps the bytes:
/// over UDP at most 512 bytes, or the client's EDNS size, with TC set when
/// it does not fit; over TCP up to a message's limit of 65,535.
#[derive(Clone)]
struct Encoded {
    bytes: Arc<Mutex<Option<Vec<u8>>>>,
    tcp: bool,
}

#[async_trait::async_trait]
impl ResponseHandler for Encoded {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (id, op_code) = (response.metadata().id, response.metadata().op_code);
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(if self.tcp {
            u16::MAX
        } else {
            response.edns().map_or(512, Edns::max_payload)
        });
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(error) => {
                // What hickory's own server sends then: a bare SERVFAIL.
                tracing::warn!(%error, "cannot encode a DNS answer");
                bytes.clear();
                let mut metadata = Metadata::new(id, MessageType::Response, op_code);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header.emit(&mut BinEncoder::new(&mut bytes))?;
                ResponseInfo::from(header)
            }
        };
        *lock(&self.bytes) = Some(bytes);
        Ok(info)
    }
}
