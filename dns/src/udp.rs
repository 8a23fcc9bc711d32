//! The UDP side of the DNS server: one receive loop per serving thread in
//! front of the [`Handler`], with a small cache of encoded answers.
//!
//! A host asks for the same few names over and over, and an answer from
//! the catalog depends only on the query's bytes (after the ID) and on the
//! catalog's [`Catalog::generation`]. So an answer the handler marks
//! [`reusable`](crate::answer::Outcome::reusable) is kept as bytes, and an
//! identical query is answered by copying them and patching the ID: no
//! parsing, no encoding, no task. Everything else (the first query for a
//! name, a query after a catalog change, a forwarded name, a shuffled
//! instance list) goes through hickory's parser and encoder and the
//! handler, on a task of its own so that a slow upstream never holds up
//! the loop. `bench/RESULTS.md` has what this saves.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::net::xfer::Protocol;
use prometheus_client::metrics::counter::Counter;
use tokio::net::UdpSocket;
use tokio_util::task::TaskTracker;

use crate::Catalog;
use crate::answer::{Handler, rcode_label};
use crate::wire::{self, HEADER_LEN, lock};

/// Longest a cached answer is reused, even with an unchanged generation.
/// It must stay below the shortest `control_plane.subscription_idle`
/// (1 s): every recomputation marks the service as used, so a name in
/// steady use is never unsubscribed. It also keeps the SOA serial (the
/// time) current.
const MAX_AGE: Duration = Duration::from_millis(250);

/// Cached answers per serving thread; when full, the cache starts over.
const MAX_ENTRIES: usize = 4096;

/// Larger answers are not cached, which bounds the cache to about 2.5 MB
/// per thread.
const MAX_ANSWER: usize = 512;

/// The largest datagram; a longer one would arrive cut and fail to parse.
const RECEIVE_BUFFER: usize = 65_535;

/// Answers queries on `socket` until `stop` completes, then lets the
/// queries in flight finish.
pub(crate) async fn serve<C: Catalog>(
    handler: Arc<Handler<C>>,
    socket: UdpSocket,
    stop: impl Future<Output = ()>,
) {
    let socket = Arc::new(socket);
    let cache = Arc::new(Mutex::new(AnswerCache::default()));
    let tasks = TaskTracker::new();
    let mut buf = vec![0u8; RECEIVE_BUFFER];
    let mut out = Vec::with_capacity(MAX_ANSWER);
    let (hits, misses) = handler.metrics().answer_cache();
    tokio::pin!(stop);
    loop {
        let (len, src) = tokio::select! {
            biased;
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "cannot receive a DNS query");
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let packet = &buf[..len];
        // Shorter than a header, a response (answering those would let
        // anyone bounce traffic off us), or from an address no answer can
        // go to: dropped, as hickory does.
        if len < HEADER_LEN || packet[2] & 0x80 != 0 || !answerable(src) {
            continue;
        }
        let hit = lock(&cache).answer(&packet[2..], handler.generation(), &mut out);
        if let Some(truncated) = hit {
            hits.inc();
            out[..2].copy_from_slice(&packet[..2]);
            if truncated {
                handler.metrics().truncated();
            }
            send(&socket, &out, src).await;
            continue;
        }
        misses.inc();
        let raw = packet.to_vec();
        let (handler, socket, cache) = (handler.clone(), socket.clone(), cache.clone());
        tasks.spawn(async move { answer(&handler, &socket, &cache, raw, src).await });
    }
    tasks.close();
    tasks.wait().await;
}

/// A query the cache could not answer: parsed and answered by the
/// handler, and the answer kept if it may be reused.
async fn answer<C: Catalog>(
    handler: &Handler<C>,
    socket: &UdpSocket,
    cache: &Mutex<AnswerCache>,
    raw: Vec<u8>,
    src: SocketAddr,
) {
    // Read first: a change while answering then makes the entry stale.
    let generation = handler.generation();
    let Some(answered) = wire::answer(handler, raw, src, Protocol::Udp).await else {
        return;
    };
    send(socket, &answered.bytes, src).await;
    if let Some((request, outcome)) = answered.handled
        && outcome.reusable
        && answered.bytes.len() <= MAX_ANSWER
    {
        let rcode = rcode_label(outcome.info.response_code);
        let cached = Cached {
            bytes: answered.bytes.into_boxed_slice(),
            generation,
            born: Instant::now(),
            counter: handler.metrics().query_counter(outcome.qtype, rcode, false),
            truncated: outcome.info.truncation,
        };
        lock(cache).insert(&request.as_slice()[2..], cached);
    }
}

fn answerable(src: SocketAddr) -> bool {
    let ip_ok = match src.ip() {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
        IpAddr::V6(v6) => !v6.is_unspecified(),
    };
    src.port() != 0 && ip_ok
}

async fn send(socket: &UdpSocket, bytes: &[u8], src: SocketAddr) {
    if let Err(error) = socket.send_to(bytes, src).await {
        tracing::debug!(%error, %src, "cannot send the DNS response");
    }
}

/// Encoded answers of one serving thread, by query bytes after the ID.
#[derive(Default)]
struct AnswerCache {
    entries: HashMap<Box<[u8]>, Cached>,
}

struct Cached {
    bytes: Box<[u8]>,
    /// The catalog generation the answer was computed under.
    generation: u64,
    born: Instant,
    /// The `signpost_dns_queries_total` series the answer counts in.
    counter: Counter,
    truncated: bool,
}

impl AnswerCache {
    /// Copies the answer to `query` (the bytes after the ID) into `out`
    /// and counts it, if one was computed under `generation` and is young
    /// enough; then returns whether it is truncated.
    fn answer(&self, query: &[u8], generation: u64, out: &mut Vec<u8>) -> Option<bool> {
        let cached = self.entries.get(query)?;
        if cached.generation != generation || cached.born.elapsed() > MAX_AGE {
            return None;
        }
        cached.counter.inc();
        out.clear();
        out.extend_from_slice(&cached.bytes);
        Some(cached.truncated)
    }

    fn insert(&mut self, query: &[u8], cached: Cached) {
        match self.entries.get(query) {
            // Computed under a later generation by a concurrent query.
            Some(newer) if newer.generation > cached.generation => return,
            Some(_) => {}
            None if self.entries.len() >= MAX_ENTRIES => self.entries.clear(),
            None => {}
        }
        self.entries.insert(query.into(), cached);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(bytes: &[u8], generation: u64, counter: &Counter) -> Cached {
        Cached {
            bytes: bytes.into(),
            generation,
            born: Instant::now(),
            counter: counter.clone(),
            truncated: false,
        }
    }

    #[test]
    fn an_answer_is_reused_only_for_the_same_query_and_generation() {
        let counter = Counter::default();
        let mut cache = AnswerCache::default();
        cache.insert(b"query-a", cached(b"answer-a", 7, &counter));
        let mut out = Vec::new();
        assert_eq!(cache.answer(b"query-a", 7, &mut out), Some(false));
        assert_eq!(out, b"answer-a");
        assert_eq!(counter.get(), 1, "a reused answer is counted");
        assert_eq!(cache.answer(b"query-a", 8, &mut out), None);
        assert_eq!(cache.answer(b"query-b", 7, &mut out), None);
        assert_eq!(counter.get(), 1);

        // An answer computed under an older generation never replaces a
        // newer one.
        cache.insert(b"query-a", cached(b"answer-new", 9, &counter));
        cache.insert(b"query-a", cached(b"answer-old", 8, &counter));
        assert_eq!(cache.answer(b"query-a", 9, &mut out), Some(false));
        assert_eq!(out, b"answer-new");
    }

    #[test]
    fn an_old_answer_is_not_reused() {
        let counter = Counter::default();
        let mut cache = AnswerCache::default();
        let mut old = cached(b"answer", 1, &counter);
        old.born = Instant::now() - MAX_AGE - Duration::from_millis(1);
        cache.insert(b"query", old);
        assert_eq!(cache.answer(b"query", 1, &mut Vec::new()), None);
    }

    #[test]
    fn a_full_cache_starts_over() {
        let counter = Counter::default();
        let mut cache = AnswerCache::default();
        for n in 0..MAX_ENTRIES {
            cache.insert(n.to_string().as_bytes(), cached(b"x", 1, &counter));
        }
        assert_eq!(cache.entries.len(), MAX_ENTRIES);
        // Replacing a key keeps the others.
        cache.insert(b"0", cached(b"y", 1, &counter));
        assert_eq!(cache.entries.len(), MAX_ENTRIES);
        cache.insert(b"new", cached(b"z", 1, &counter));
        assert_eq!(cache.entries.len(), 1);
        assert_eq!(cache.answer(b"new", 1, &mut Vec::new()), Some(false));
    }
}
