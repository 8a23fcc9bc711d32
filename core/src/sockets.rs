//! Listening sockets that outlive the process serving them: on a restart
//! or an upgrade, the new process takes the old one's sockets (the same
//! kernel sockets, with the connections and datagrams already queued on
//! them) instead of binding new ones, so no connection is refused and no
//! query lost while the two change places.
//!
//! Every part that listens asks [`Sockets`] first for what the previous
//! process handed over under the socket's name (`api`, `dns/udp`,
//! `vip 127.77.0.9:80`…), and records what it serves from, so that a
//! successor can be handed those in turn.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The most sockets one name may carry (a VIP listener has one per
/// proxy thread, the DNS one per DNS thread).
pub const MAX_PER_NAME: usize = 256;

/// The sockets handed over by the previous process, and those served now.
#[derive(Debug, Default)]
pub struct Sockets {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    inherited: HashMap<String, Vec<OwnedFd>>,
    serving: HashMap<String, Vec<OwnedFd>>,
}

impl Sockets {
    /// The registry of a process that inherited `inherited` (name and
    /// socket; a name may come several times).
    pub fn new(inherited: Vec<(String, OwnedFd)>) -> Self {
        let mut by_name: HashMap<String, Vec<OwnedFd>> = HashMap::new();
        for (name, fd) in inherited {
            by_name.entry(name).or_default().push(fd);
        }
        Sockets {
            inner: Mutex::new(Inner {
                inherited: by_name,
                serving: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The TCP listeners inherited as `name` when they listen on `want`
    /// (port 0: any port of that address), else none: a socket bound
    /// elsewhere (the configuration changed) is not served (and is
    /// closed by [`Sockets::drop_unclaimed`]).
    pub fn take_tcp(&self, name: &str, want: SocketAddr) -> Vec<std::net::TcpListener> {
        self.take(name, want, socket2::Type::STREAM)
            .into_iter()
            .map(std::net::TcpListener::from)
            .collect()
    }

    /// The UDP sockets inherited as `name` when bound to `want`, as
    /// [`Sockets::take_tcp`].
    pub fn take_udp(&self, name: &str, want: SocketAddr) -> Vec<std::net::UdpSocket> {
        self.take(name, want, socket2::Type::DGRAM)
            .into_iter()
            .map(std::net::UdpSocket::from)
            .collect()
    }

    fn take(&self, name: &str, want: SocketAddr, kind: socket2::Type) -> Vec<OwnedFd> {
        let mut inner = self.lock();
        let usable = inner.inherited.get(name).is_some_and(|fds| {
            fds.iter().all(|fd| {
                let socket = socket2::SockRef::from(fd);
                let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
                socket.r#type().is_ok_and(|t| t == kind)
                    && bound.is_some_and(|bound| matches(bound, want))
            })
        });
        // One bound elsewhere (the configuration changed) stays for
        // another address to take, or for `drop_unclaimed`.
        let fds = match inner.inherited.remove(name) {
            Some(fds) if usable => fds,
            Some(fds) => {
                inner.inherited.insert(name.to_string(), fds);
                return Vec::new();
            }
            None => return Vec::new(),
        };
        drop(inner);
        for fd in &fds {
            if let Err(error) = socket2::SockRef::from(fd).set_nonblocking(true) {
                tracing::warn!(socket = name, %error, "cannot make an inherited socket non-blocking");
                return Vec::new();
            }
        }
        fds
    }

    /// Records that `name` is served from `sockets` (replacing what it
    /// was served from), for a successor.
    pub fn serving<S: AsFd>(&self, name: &str, sockets: &[S]) -> std::io::Result<()> {
        let fds = sockets
            .iter()
            .map(|s| s.as_fd().try_clone_to_owned())
            .collect::<std::io::Result<Vec<_>>>()?;
        self.lock().serving.insert(name.to_string(), fds);
        Ok(())
    }

    /// `name` is no longer served.
    pub fn closed(&self, name: &str) {
        self.lock().serving.remove(name);
    }

    /// Copies of every socket served now, by name, for a successor.
    pub fn for_successor(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let inner = self.lock();
        let mut all = Vec::new();
        for (name, fds) in &inner.serving {
            for fd in fds {
                all.push((name.clone(), fd.try_clone()?));
            }
        }
        Ok(all)
    }

    /// Closes what was inherited and not taken, and says what it was.
    pub fn drop_unclaimed(&self) -> Vec<String> {
        let mut inner = self.lock();
        let mut names: Vec<String> = inner.inherited.drain().map(|(name, _)| name).collect();
        names.sort();
        names
    }
}

/// Whether a socket bound to `bound` serves an address configured as
/// `want`.
fn matches(bound: SocketAddr, want: SocketAddr) -> bool {
    bound == want || (want.port() == 0 && bound.ip() == want.ip())
}

/// The name of the VIP listener on `addr`.
pub fn vip_name(addr: SocketAddr) -> String {
    format!("vip {addr}")
}

/// Tests of [`Sockets`].
#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn a_served_socket_is_handed_over_and_taken_with_its_queue() {
        let old = Sockets::default();
        let first = listener();
        let addr = first.local_addr().unwrap();
        old.serving("api", &[&first]).unwrap();
        // A client connects before the successor takes over: it waits in
        // the socket's queue.
        let client = std::net::TcpStream::connect(addr).unwrap();
        let handed = old.for_successor().unwrap();
        drop(first);
        let new = Sockets::new(handed);
        let taken = new.take_tcp("api", SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(taken.len(), 1);
        taken[0].set_nonblocking(false).unwrap();
        let (_, peer) = taken[0].accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(new.drop_unclaimed().is_empty());
    }

    #[test]
    fn a_socket_bound_elsewhere_or_of_another_kind_is_not_taken() {
        let first = listener();
        let addr = first.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let new = Sockets::new(vec![
            ("api".to_string(), OwnedFd::from(first)),
            ("dns/udp".to_string(), OwnedFd::from(udp)),
            ("vip 127.0.0.1:9".to_string(), OwnedFd::from(listener())),
        ]);
        let elsewhere = SocketAddr::from(([127, 0, 0, 1], addr.port().wrapping_add(1)));
        assert!(new.take_tcp("api", elsewhere).is_empty());
        // Still there for the address it is bound to.
        assert_eq!(new.take_tcp("api", addr).len(), 1);
        assert!(
            new.take_tcp("dns/udp", SocketAddr::from(([127, 0, 0, 1], 0)))
                .is_empty()
        );
        // What nothing took is closed, and named.
        assert_eq!(
            new.drop_unclaimed(),
            vec!["dns/udp".to_string(), "vip 127.0.0.1:9".to_string()]
        );
    }
}
