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
    /// Registers `listener` with the current thread's reactor; must run
    /// on a runtime.
    pub(crate) fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
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

/// The most a direct read takes at once: it zeroes the space first.
const DIRECT_READ: usize = 16 * 1024;

impl ClientStream {
    /// Whether the connection has had to wait (it is then registered).
    pub(crate) fn is_registered(&self) -> bool {
        matches!(self.0, State::Registered(_))
    }

    /// The stream registered with this thread's reactor, after a direct
    /// read or write would have blocked.
    fn registered(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if matches!(self.0, State::Direct(_))
            && let State::Direct(stream) = std::mem::replace(&mut self.0, State::Closed)
        {
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
            // would block, as reads go to tokio's stream after it. Direct
            // reads and writes spend none of tokio's cooperative budget;
            // hyper and the L4 copy yield on their own.
            let len = buf.remaining().min(DIRECT_READ);
            match retry_interrupted(|| (&*stream).read(buf.initialize_unfilled_to(len))) {
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
            // As tokio's: a connection the client reset is shut already.
            |stream| match stream.shutdown(Shutdown::Write) {
                Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
                done => done,
            },
            |stream, cx| stream.poll_shutdown(cx),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (ClientStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::new(listener).unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, from) = listener.accept().await.unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        (accepted, client)
    }

    /// `io`, or a failure where a lost wake-up would hang the test.
    async fn within<T>(io: impl Future<Output = io::Result<T>>) -> T {
        tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .expect("no wake-up in 10 s")
            .unwrap()
    }

    /// Waits (blocking) until the unregistered socket has something to
    /// read, or an error; what `peek` says.
    fn wait_for_input(stream: &ClientStream) -> io::Result<usize> {
        let State::Direct(socket) = &stream.0 else {
            panic!("registered already");
        };
        socket.set_nonblocking(false).unwrap();
        let peeked = socket.peek(&mut [0; 64]);
        socket.set_nonblocking(true).unwrap();
        peeked
    }

    /// A request that is there when read, and an answer: no registration.
    #[tokio::test]
    async fn a_short_exchange_is_never_registered() {
        let (mut accepted, mut client) = pair().await;
        client.write_all(b"ping").await.unwrap();
        // As on a new connection's first read, mostly.
        wait_for_input(&accepted).unwrap();
        let mut read = [0; 4];
        let mut got = 0;
        while got < 4 {
            got += within(accepted.read(&mut read[got..])).await;
        }
        assert_eq!(&read, b"ping");
        within(accepted.write_all(b"pong")).await;
        within(accepted.shutdown()).await;
        let mut answer = Vec::new();
        within(client.read_to_end(&mut answer)).await;
        assert_eq!(answer, b"pong");
        assert!(!accepted.is_registered());
    }

    /// A read with nothing there waits (registered) and gets what comes.
    #[tokio::test]
    async fn a_read_that_would_block_waits_for_the_bytes() {
        let (mut accepted, mut client) = pair().await;
        let reader = tokio::spawn(async move {
            let mut read = [0; 5];
            within(accepted.read_exact(&mut read)).await;
            (read, accepted)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.write_all(b"hello").await.unwrap();
        let (read, accepted) = reader.await.unwrap();
        assert_eq!(&read, b"hello");
        assert!(accepted.is_registered());
    }

    /// Bytes that arrived before the registration are read after it: the
    /// reactor learns of them when the socket is added.
    #[tokio::test]
    async fn bytes_there_before_the_registration_are_read() {
        let (mut accepted, mut client) = pair().await;
        client.write_all(b"early").await.unwrap();
        wait_for_input(&accepted).unwrap();
        accepted.registered().unwrap();
        let mut read = [0; 5];
        within(accepted.read_exact(&mut read)).await;
        assert_eq!(&read, b"early");
    }

    /// A write larger than the socket's buffers waits for the client to
    /// read and loses nothing.
    #[tokio::test]
    async fn a_write_that_would_block_waits_for_room() {
        let (mut accepted, mut client) = pair().await;
        let sent: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            within(accepted.write_all(&sent)).await;
            within(accepted.shutdown()).await;
            accepted
        });
        let mut received = Vec::new();
        within(client.read_to_end(&mut received)).await;
        let accepted = writer.await.unwrap();
        assert!(
            received == expected,
            "{} bytes of {}",
            received.len(),
            expected.len()
        );
        assert!(accepted.is_registered());
    }

    /// Shutting down a connection the client reset succeeds, as with
    /// tokio's stream (hyper and the L4 copy treat a failure as an error).
    #[tokio::test]
    async fn shutting_down_a_reset_connection_succeeds() {
        let (mut accepted, client) = pair().await;
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        let reset = wait_for_input(&accepted).unwrap_err();
        assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);
        within(accepted.shutdown()).await;
        assert!(!accepted.is_registered());
    }
}
