//! Client connections are accepted without the reactor: a connection is
//! registered with its thread's reactor (an `epoll_ctl` to add it, one to
//! remove it at the end, and an allocation) only when a read or a write
//! on it would block. A short connection, whose request arrived with it
//! and whose answer fits in the socket's buffer (`Connection: close`), is
//! served without ever being registered, as HAProxy does: it reads a new
//! connection before it polls it. A connection not yet registered also
//! moves to another thread for free.
//!
//! On an HTTP listener the kernel acknowledges a request with its answer
//! instead of in a packet of its own, as on HAProxy's: TCP_QUICKACK is
//! off on the listening socket, which its connections inherit. A
//! connection that then has to wait for more of what the client sends
//! (the rest of a request, a body) turns it back on, so that a client
//! holding back its next bytes until the last ones are acknowledged
//! (Nagle's algorithm) is not kept waiting for the delayed ACK.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A listening socket, registered with the reactor of the thread that
/// accepts on it.
pub(crate) struct Listener {
    socket: AsyncFd<mio::net::TcpListener>,
    acks: Acks,
}

/// When the kernel acknowledges what a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acks {
    /// By its own rules (at once on a new connection).
    Quick,
    /// With the answer, until the connection waits for more bytes after
    /// some came (`read`): for a protocol where the server answers each
    /// request (HTTP).
    Delayed { read: bool },
}

impl Listener {
    /// Registers `listener` (listening already) with the current
    /// thread's reactor; must run on a runtime. Sets TCP_NODELAY on it,
    /// and for `Acks::Delayed` TCP_QUICKACK off, which Linux copies to
    /// every connection it accepts (TCP_QUICKACK only once it listens):
    /// a proxy must not hold back small writes, and one `setsockopt` per
    /// listener is none per connection.
    pub(crate) fn new(listener: std::net::TcpListener, acks: Acks) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        let socket = socket2::SockRef::from(&listener);
        socket.set_tcp_nodelay(true)?;
        if acks != Acks::Quick {
            socket.set_tcp_quickack(false)?;
        }
        let listener = mio::net::TcpListener::from_std(listener);
        // tokio's own listener would register every accepted connection;
        // `AsyncFd` is how a socket is polled without that.
        // SAFETY: the `AsyncFd` owns the listener, which owns its file
        // descriptor: it stays open until the `AsyncFd` is dropped, and
        // `as_raw_fd` always returns it (`get_mut` is never used).
        #[allow(unsafe_code)]
        let registered = unsafe { AsyncFd::register(listener) };
        let socket = registered.map_err(io::Error::from)?;
        Ok(Listener { socket, acks })
    }

    /// The next connection: non-blocking, with the listener's TCP_NODELAY
    /// and TCP_QUICKACK, and not registered.
    pub(crate) async fn accept(&self) -> io::Result<(ClientStream, SocketAddr)> {
        loop {
            let mut ready = self.socket.readable().await?;
            // One `accept4` gives a non-blocking socket.
            if let Ok(accepted) = ready.try_io(|listener| listener.get_ref().accept()) {
                let (stream, client) = accepted?;
                let stream = std::net::TcpStream::from(stream);
                let stream = ClientStream {
                    state: State::Direct(stream),
                    acks: self.acks,
                };
                return Ok((stream, client));
            }
        }
    }
}

/// A client connection, registered with the reactor of the thread that
/// serves it when it first has to wait.
#[derive(Debug)]
pub(crate) struct ClientStream {
    state: State,
    acks: Acks,
}

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
        matches!(self.state, State::Registered(_))
    }

    /// The stream registered with this thread's reactor, after a direct
    /// read or write would have blocked.
    fn registered(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        if matches!(self.state, State::Direct(_))
            && let State::Direct(stream) = std::mem::replace(&mut self.state, State::Closed)
        {
            self.state = State::Registered(TcpStream::from_std(stream)?);
        }
        match &mut self.state {
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
        if let State::Direct(stream) = &self.state {
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

    /// `bytes` came from the client.
    fn has_read(&mut self, bytes: usize) {
        if bytes > 0
            && let Acks::Delayed { read } = &mut self.acks
        {
            *read = true;
        }
    }

    /// The connection waits for more of what the client sends, after some
    /// came: the kernel acknowledges it at once from now on (what came
    /// too), by its own rules again, so that a client waiting for that
    /// ACK to send the rest does not wait for the delayed one.
    fn waits_for_more(&mut self) {
        if self.acks != (Acks::Delayed { read: true }) {
            return;
        }
        self.acks = Acks::Quick;
        if let Some(socket) = self.socket()
            && let Err(error) = socket.set_tcp_quickack(true)
        {
            tracing::debug!(%error, "cannot set TCP_QUICKACK");
        }
    }

    /// The connection's socket, registered or not; none once closed.
    fn socket(&self) -> Option<socket2::SockRef<'_>> {
        match &self.state {
            State::Direct(stream) => Some(stream.into()),
            State::Registered(stream) => Some(stream.into()),
            State::Closed => None,
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
        let filled = buf.filled().len();
        if let State::Direct(stream) = &this.state {
            // Zeroes what the read may fill (reading into uninitialised
            // memory takes unsafe code): only until the first read that
            // would block, as reads go to tokio's stream after it. Direct
            // reads and writes spend none of tokio's cooperative budget;
            // hyper and the L4 copy yield on their own.
            let len = buf.remaining().min(DIRECT_READ);
            match retry_interrupted(|| (&*stream).read(buf.initialize_unfilled_to(len))) {
                Ok(read) => {
                    buf.advance(read);
                    this.has_read(read);
                    return Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        let polled = match this.registered() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(error) => return Poll::Ready(Err(error)),
        };
        match polled {
            Poll::Ready(Ok(())) => this.has_read(buf.filled().len() - filled),
            Poll::Ready(Err(_)) => {}
            Poll::Pending => this.waits_for_more(),
        }
        polled
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

    /// An accepted connection with `acks`, and its client.
    async fn pair_with(acks: Acks) -> (ClientStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::new(listener, acks).unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (accepted, from) = listener.accept().await.unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        (accepted, client)
    }

    async fn pair() -> (ClientStream, TcpStream) {
        pair_with(Acks::Quick).await
    }

    /// TCP segments the connection's socket has sent since the handshake
    /// (TCP_INFO; the SYN-ACK is the listener's).
    fn segments_sent(stream: &ClientStream) -> u32 {
        use std::os::fd::AsRawFd;
        let fd = stream.socket().unwrap().as_raw_fd();
        // SAFETY: `tcp_info` is integers only, so all zeroes is a valid
        // value, and TCP_INFO writes at most `len` bytes into it.
        #[allow(unsafe_code)]
        let (done, info) = unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            let done = libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            );
            (done, info)
        };
        assert_eq!(done, 0, "TCP_INFO: {}", io::Error::last_os_error());
        info.tcpi_segs_out
    }

    /// Accepted connections send small writes at once (TCP_NODELAY, set
    /// on the listener only).
    #[tokio::test]
    async fn accepted_connections_do_not_hold_back_small_writes() {
        let (accepted, _client) = pair().await;
        assert!(accepted.socket().unwrap().tcp_nodelay().unwrap());
    }

    /// A request read whole and answered at once, on a connection with
    /// `acks`: the segments the proxy's side sent by the time the client
    /// has the answer.
    async fn exchange(acks: Acks) -> u32 {
        let (mut accepted, mut client) = pair_with(acks).await;
        let request = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n";
        client.write_all(request).await.unwrap();
        wait_for_input(&accepted).unwrap();
        let mut read = vec![0; request.len()];
        within(accepted.read_exact(&mut read)).await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        within(accepted.write_all(answer)).await;
        let mut got = vec![0; answer.len()];
        within(client.read_exact(&mut got)).await;
        assert!(!accepted.is_registered());
        segments_sent(&accepted)
    }

    /// With delayed ACKs (HTTP listeners) the request's ACK goes with the
    /// answer: one packet fewer each way than with the kernel's quick ACK
    /// of a new connection's first bytes.
    #[tokio::test]
    async fn a_request_answered_at_once_is_acknowledged_with_its_answer() {
        // The request's ACK, the answer.
        assert_eq!(exchange(Acks::Quick).await, 2);
        // The answer, with the ACK. On a loaded machine the
        // delayed ACK's timer (40 ms) may fire before the answer is
        // written: the fewest over a few exchanges.
        let mut fewest = u32::MAX;
        for _ in 0..5 {
            fewest = fewest.min(exchange(Acks::Delayed { read: false }).await);
            if fewest == 1 {
                break;
            }
        }
        assert_eq!(fewest, 1);
    }

    /// A connection with delayed ACKs that waits for the rest of what the
    /// client sends acknowledges what came at once (and quick ACKs are
    /// back on): a client that holds back its next bytes until then
    /// (Nagle's algorithm) is not kept waiting.
    #[tokio::test]
    async fn waiting_for_more_acknowledges_what_came() {
        let (mut accepted, mut client) = pair_with(Acks::Delayed { read: false }).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        wait_for_input(&accepted).unwrap();
        let mut part = [0; 16];
        within(accepted.read_exact(&mut part)).await;
        let mut rest = [0; 19];
        let mut buf = ReadBuf::new(&mut rest);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = Pin::new(&mut accepted).poll_read(&mut cx, &mut buf);
        assert!(polled.is_pending());
        // The ACK.
        assert_eq!(segments_sent(&accepted), 1);
        assert!(accepted.socket().unwrap().tcp_quickack().unwrap());
        client.write_all(b"host: web\r\n\r\n").await.unwrap();
        let mut rest = [0; 13];
        within(accepted.read_exact(&mut rest)).await;
        assert_eq!(&rest, b"host: web\r\n\r\n");
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
        let State::Direct(socket) = &stream.state else {
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
