//! A client connection's first bytes: read once to tell HTTP/2 with prior
//! knowledge (h2c) from HTTP/1.1, then handed to hyper ahead of the rest
//! of the stream. One read does both, where peeking at the HTTP/2 preface
//! alone would cost a read of its own on every connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;

use crate::accept::ClientStream;

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most the first read takes: a whole request head, usually.
const FIRST_READ: usize = 2048;

/// A client connection whose first bytes were read already.
pub(crate) struct Prefixed {
    first: Bytes,
    inner: TokioIo<ClientStream>,
}

/// Reads the first bytes of `stream`; true if the client speaks HTTP/2.
pub(crate) async fn sniff(mut stream: ClientStream) -> io::Result<(Prefixed, bool)> {
    let mut first = BytesMut::with_capacity(FIRST_READ);
    let http2 = loop {
        let read = stream.read_buf(&mut first).await?;
        let len = first.len().min(H2_PREFACE.len());
        if first[..len] != H2_PREFACE[..len] || read == 0 {
            break false;
        }
        if len == H2_PREFACE.len() {
            break true;
        }
    };
    let io = Prefixed {
        first: first.freeze(),
        inner: TokioIo::new(stream),
    };
    Ok((io, http2))
}

impl Read for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if self.first.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.first.len().min(buf.remaining());
        buf.put_slice(&self.first[..n]);
        self.first.advance(n);
        if self.first.is_empty() {
            // Frees the buffer rather than keep it for the connection's life.
            self.first = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl Write for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::accept::Listener;

    /// What `sniff` says of a client that sends `chunks` one at a time.
    async fn sniffed(chunks: &[&'static [u8]]) -> (bool, Vec<u8>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::new(listener, crate::accept::Acks::Quick).unwrap();
        let chunks = chunks.to_vec();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            for chunk in chunks {
                stream.write_all(chunk).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
        let (stream, _) = listener.accept().await.unwrap();
        let (io, http2) = sniff(stream).await.unwrap();
        client.await.unwrap();
        (http2, io.first.to_vec())
    }

    #[tokio::test]
    async fn the_preface_means_http2_even_in_pieces() {
        let (http2, first) = sniffed(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]).await;
        assert!(http2);
        assert_eq!(first, H2_PREFACE, "nothing read is lost");
    }

    #[tokio::test]
    async fn anything_else_is_http1_and_kept_for_hyper() {
        let request: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let (http2, first) = sniffed(&[request]).await;
        assert!(!http2);
        assert_eq!(first, request);
        // A client that starts like the preface and then differs.
        let (http2, first) = sniffed(&[b"PRI", b" / HTTP/1.1\r\n"]).await;
        assert!(!http2);
        assert_eq!(first, b"PRI / HTTP/1.1\r\n");
    }
}
