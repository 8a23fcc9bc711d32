//! Client connections are accepted without the reactor: a connection is
//! registered with its thread's reactor (an `epoll_ctl` to add it, one to
//! remove it at the end, and an allocation) only when a read or a write
//! on it would block. A short connection, whose request arrived with it
//! and whose answer fits in the socket's buffer (`Connection: close`), is
//! served without ever being registered, as HAProxy does: it reads a new
//! connection before it polls it. A connection not yet registered also
//! moves to another thread for free.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A listening socket, registered with the reactor of the thread that
/// accepts on it.
pub(crate) struct Listener(AsyncFd<mio::net::TcpListener>);

impl Listener {
    /// Registers `listener` (non-blocking) with the current thread's
    /// reactor; must run on a runtime.
    pub(crate) fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        let listener = mio::net::TcpListener::from_std(listener);
        // tokio's own listener would register every accepted connection;
        // `AsyncFd` is how a socket is polled without that.
        // SAFETY: the `AsyncFd` owns the listener, which owns its file
        // descriptor: it stays open until the `AsyncFd` is dropped, and
        // `as_raw_fd` always returns it (`get_mut` is never used).
        #[allow(unsafe_code)]
        let registered = unsafe { AsyncFd::register(listener) };
        registered.map(Listener).map_err(io::Error::from)
    }

    /// The next connection: non-blocking, with TCP_NODELAY (a proxy must
    /// not hold back small writes), and not registered.
    pub(crate) async fn accept(&self) -> io::Result<(ClientStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            // One `accept4` gives a non-blocking socket.
            if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
                let (stream, client) = accepted?;
                let stream = std::net::TcpStream::from(stream);
                crate::nodelay(&stream);
                return Ok((ClientStream(State::Direct(stream)), client));
            }
        }
    }
}

/// A client connection, registered with the reactor of the thread that
/// serves it when it first has to wait.
#[derive(Debug)]
pub(crate) struct ClientStream(State);

#[derive(Debug)]
enum State {
    /// Not registered: reads and writes go straight to the socket.
    Direct(std::net::TcpStream),
    Registered(TcpStream),
    /// The registration failed and closed the socket.
    Closed,
}

impl ClientStream {
    /// The stream registered with this thread's reactor, after a direct
    /// read or write would have blocked.
    fn registered(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if let State::Direct(_) = self.0 {
            let State::Direct(stream) = std::mem::replace(&mut self.0, State::Closed) else {
                return Err(io::ErrorKind::NotConnected.into());
            };
            self.0 = State::Registered(TcpStream::from_std(stream)?);
        }
        match &mut self.0 {
            State::Registered(stream) => Ok(Pin::new(stream)),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// `direct` on the socket while it is not registered, unless it would
    /// block: then `registered` on the registered stream.
    fn poll_io<R>(
        &mut self,
        cx: &mut Context<'_>,
        direct: impl Fn(&std::net::TcpStream) -> io::Result<R>,
        registered: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if let State::Direct(stream) = &self.0 {
            match retry_interrupted(|| direct(stream)) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
        match self.registered() {
            Ok(stream) => registered(stream, cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

fn retry_interrupted<R>(mut op: impl FnMut() -> io::Result<R>) -> io::Result<R> {
    loop {
        match op() {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Direct(stream) = &this.0 {
            // Zeroes what the read may fill (reading into uninitialised
            // memory takes unsafe code): only until the first read that
            // would block, as reads go to tokio's stream after it.
            match retry_interrupted(|| (&*stream).read(buf.initialize_unfilled())) {
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        match this.registered() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(
            cx,
            |mut stream| stream.write(buf),
            |stream, cx| stream.poll_write(cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(
            cx,
            |mut stream| stream.write_vectored(bufs),
            |stream, cx| stream.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket, registered or not.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_io(
            cx,
            |stream| stream.shutdown(Shutdown::Write),
            |stream, cx| stream.poll_shutdown(cx),
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (ClientStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::new(listener).unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, from) = listener.accept().await.unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        (accepted, client)
    }

    fn is_registered(stream: &ClientStream) -> bool {
        matches!(stream.0, State::Registered(_))
    }

    /// A request that is there when read, and an answer: no registration.
    #[tokio::test]
    async fn a_short_exchange_is_never_registered() {
        let (mut accepted, mut client) = pair().await;
        client.write_all(b"ping").await.unwrap();
        // Until the bytes are there, as they are on a new connection's
        // first read, mostly.
        let State::Direct(socket) = &accepted.0 else {
            panic!("registered before any read");
        };
        socket.set_nonblocking(false).unwrap();
        socket.peek(&mut [0; 4]).unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut read = [0; 4];
        let mut got = 0;
        while got < 4 {
            got += accepted.read(&mut read[got..]).await.unwrap();
        }
        assert_eq!(&read, b"ping");
        accepted.write_all(b"pong").await.unwrap();
        accepted.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");
        assert!(!is_registered(&accepted));
    }

    /// A read with nothing there waits (registered) and gets what comes.
    #[tokio::test]
    async fn a_read_that_would_block_waits_for_the_bytes() {
        let (mut accepted, mut client) = pair().await;
        let reader = tokio::spawn(async move {
            let mut read = [0; 5];
            accepted.read_exact(&mut read).await.unwrap();
            (read, accepted)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        client.write_all(b"hello").await.unwrap();
        let (read, accepted) = reader.await.unwrap();
        assert_eq!(&read, b"hello");
        assert!(is_registered(&accepted));
    }

    /// A write larger than the socket's buffers waits for the client to
    /// read and loses nothing.
    #[tokio::test]
    async fn a_write_that_would_block_waits_for_room() {
        let (mut accepted, mut client) = pair().await;
        let sent: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            accepted.write_all(&sent).await.unwrap();
            accepted.shutdown().await.unwrap();
            accepted
        });
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        let accepted = writer.await.unwrap();
        assert!(
            received == expected,
            "{} bytes of {}",
            received.len(),
            expected.len()
        );
        assert!(is_registered(&accepted));
    }
}
