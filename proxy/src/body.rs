//! The body of a request the proxy sends to an instance, and what a retry
//! can send again: a body held whole, or the client's streamed with a copy
//! of what went by while that stays within [`MAX_KEPT`].

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Request bodies up to this size are kept for a retry (Linkerd's 64 KiB,
/// Envoy's default buffer); a longer one is sent once.
pub(crate) const MAX_KEPT: u64 = 64 * 1024;

/// A request body the proxy sends. No box on the usual paths, so no
/// allocation per message.
#[derive(Debug)]
pub(crate) enum ProxyBody {
    /// Held whole (kept for retries).
    Whole(Full<Bytes>),
    /// The client's, streamed.
    Streamed(Incoming),
    /// The client's, streamed with a copy kept as it goes.
    Copied(Box<Copied>),
}

/// A request's body across its attempts.
pub(crate) enum Payload {
    /// Held whole: each attempt sends it.
    Kept(Bytes),
    /// The client's, read as it is sent: the first attempt takes it. A
    /// later one gets it back if it was never sent (no connection to the
    /// instance), or the copy, if that holds all of it.
    Streamed {
        body: Option<Incoming>,
        copy: Option<Arc<Mutex<Recording>>>,
    },
}

impl Payload {
    /// The client's streamed body; with `keep`, what it sends is copied
    /// for a retry.
    pub(crate) fn streamed(body: Incoming, keep: bool) -> Payload {
        Payload::Streamed {
            body: Some(body),
            copy: keep.then(Arc::default),
        }
    }

    /// The body for the next attempt; `None` when none can be sent again.
    pub(crate) fn next(&mut self) -> Option<ProxyBody> {
        match self {
            Payload::Kept(bytes) => Some(ProxyBody::Whole(Full::new(bytes.clone()))),
            Payload::Streamed { body, copy } => {
                if let Some(body) = body.take() {
                    return Some(match copy {
                        Some(copy) => ProxyBody::Copied(Box::new(Copied {
                            body,
                            copy: copy.clone(),
                        })),
                        None => ProxyBody::Streamed(body),
                    });
                }
                let whole = crate::lock(copy.as_ref()?).whole()?;
                *self = Payload::Kept(whole.clone());
                Some(ProxyBody::Whole(Full::new(whole)))
            }
        }
    }

    /// Can another attempt send the body?
    pub(crate) fn can_resend(&self) -> bool {
        match self {
            Payload::Kept(_) | Payload::Streamed { body: Some(_), .. } => true,
            Payload::Streamed { copy, .. } => {
                copy.as_ref().is_some_and(|c| crate::lock(c).is_whole())
            }
        }
    }

    /// Takes back a body that was never sent, for the next attempt.
    pub(crate) fn unsent(&mut self, sent: ProxyBody) {
        if let Payload::Streamed { body, .. } = self {
            match sent {
                ProxyBody::Streamed(sent) => *body = Some(sent),
                ProxyBody::Copied(sent) => *body = Some(sent.body),
                ProxyBody::Whole(_) => {}
            }
        }
    }
}

/// The client's body on its way to an instance, copied as it goes.
#[derive(Debug)]
pub(crate) struct Copied {
    body: Incoming,
    copy: Arc<Mutex<Recording>>,
}

/// What a streamed body has passed on so far.
#[derive(Debug, Default)]
pub(crate) struct Recording {
    data: Vec<Bytes>,
    len: u64,
    ended: bool,
    /// Longer than [`MAX_KEPT`], with trailers, or cut short: it cannot
    /// be sent again.
    lost: bool,
}

impl Recording {
    /// Did it end, with all of it kept?
    fn is_whole(&self) -> bool {
        self.ended && !self.lost
    }

    /// The whole body, once it ended and all of it was kept.
    fn whole(&self) -> Option<Bytes> {
        if !self.is_whole() {
            return None;
        }
        let mut whole = BytesMut::with_capacity(usize::try_from(self.len).ok()?);
        for chunk in &self.data {
            whole.extend_from_slice(chunk);
        }
        Some(whole.freeze())
    }

    fn saw(&mut self, frame: Option<&Result<Frame<Bytes>, hyper::Error>>) {
        if self.lost {
            return;
        }
        match frame {
            None => self.ended = true,
            Some(Ok(frame)) => match frame.data_ref() {
                Some(data) if self.len + data.len() as u64 <= MAX_KEPT => {
                    self.len += data.len() as u64;
                    self.data.push(data.clone());
                }
                // Too long, or trailers (rare in requests): not kept.
                _ => self.lost(),
            },
            Some(Err(_)) => self.lost(),
        }
    }

    fn lost(&mut self) {
        self.lost = true;
        self.data = Vec::new();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Whole(whole) => Pin::new(whole)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ProxyBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Copied(copied) => {
                let frame = std::task::ready!(Pin::new(&mut copied.body).poll_frame(cx));
                let mut copy = crate::lock(&copied.copy);
                copy.saw(frame.as_ref());
                // HTTP/2 flags the last frame, and then hyper polls no more.
                copy.ended |= copied.body.is_end_stream();
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Whole(whole) => whole.is_end_stream(),
            ProxyBody::Streamed(body) => body.is_end_stream(),
            ProxyBody::Copied(copied) => copied.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Whole(whole) => whole.size_hint(),
            ProxyBody::Streamed(body) => body.size_hint(),
            ProxyBody::Copied(copied) => copied.body.size_hint(),
        }
    }
}

/// Tests of [`Recording`]: which bodies can be sent again.
#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Option<Result<Frame<Bytes>, hyper::Error>> {
        Some(Ok(Frame::data(Bytes::from(vec![b'x'; n]))))
    }

    #[test]
    fn a_body_that_ended_within_the_limit_is_whole() {
        let mut copy = Recording::default();
        copy.saw(data(10).as_ref());
        assert_eq!(copy.whole(), None, "not ended yet");
        copy.saw(data(20).as_ref());
        copy.saw(None);
        assert_eq!(copy.whole(), Some(Bytes::from(vec![b'x'; 30])));
    }

    #[test]
    fn a_body_over_the_limit_or_with_trailers_is_lost() {
        let mut copy = Recording::default();
        copy.saw(data(MAX_KEPT as usize).as_ref());
        copy.saw(data(1).as_ref());
        copy.saw(None);
        assert_eq!(copy.whole(), None);
        assert!(copy.data.is_empty(), "nothing held once lost");

        let mut copy = Recording::default();
        copy.saw(data(1).as_ref());
        let trailers = Some(Ok(Frame::trailers(http::HeaderMap::new())));
        copy.saw(trailers.as_ref());
        copy.saw(None);
        assert_eq!(copy.whole(), None);
    }
}
