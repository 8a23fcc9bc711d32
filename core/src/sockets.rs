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
//!
//! The previous process hands them over itself while both run, or leaves
//! them with a [`Store`] that outlives it (systemd's file descriptor
//! store, for a restart where the old process exits before the new one
//! starts): every socket recorded as served is also kept there, and
//! removed from there when no longer served.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The most sockets one name may carry (a VIP listener has one per
/// proxy thread, the DNS one per DNS thread).
pub const MAX_PER_NAME: usize = 256;

/// The API's listener.
pub const API: &str = "api";
/// The DNS server's UDP sockets, one per DNS thread.
pub const DNS_UDP: &str = "dns/udp";
/// The DNS server's TCP listeners, one per DNS thread.
pub const DNS_TCP: &str = "dns/tcp";
/// The peer liveness listener.
pub const LIVENESS: &str = "liveness";
/// The mesh's inbound listener.
pub const INBOUND: &str = "inbound";

/// Where the served sockets are also kept beyond this process, so that
/// the next one finds them even when it starts only after this one
/// exited: systemd's file descriptor store. Told of every change in the
/// order made; it reports its own failures (which never stop serving).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Keep `fds` as `name`, besides what is kept under it already (the
    /// same socket twice is kept once).
    fn keep(&self, name: &str, fds: &[BorrowedFd<'_>]);
    /// Drop every socket kept as `name`.
    fn forget(&self, name: &str);
}

/// The sockets handed over by the previous process, and those served now.
#[derive(Debug, Default)]
pub struct Sockets {
    inner: Mutex<Inner>,
    store: Option<Arc<dyn Store>>,
}

#[derive(Debug, Default)]
struct Inner {
    inherited: HashMap<String, Vec<OwnedFd>>,
    serving: HashMap<String, Vec<OwnedFd>>,
    /// What the store holds under each name, as far as this process
    /// knows: what it inherited, then what it serves.
    kept: HashMap<String, Vec<Identity>>,
    /// A successor serves from these sockets now: the store keeps them.
    handed_over: bool,
}

impl Sockets {
    /// The registry of a process that inherited `inherited` (name and
    /// socket; a name may come several times).
    pub fn new(inherited: Vec<(String, OwnedFd)>) -> Self {
        Self::with_store(inherited, Vec::new(), None)
    }

    /// The registry of a process that was handed `handed` by a running
    /// predecessor and found `stored` in `store` at its start. A name
    /// both give is served from what was handed over (the same sockets,
    /// unless the predecessor changed them since it stored them).
    pub fn with_store(
        handed: Vec<(String, OwnedFd)>,
        stored: Vec<(String, OwnedFd)>,
        store: Option<Arc<dyn Store>>,
    ) -> Self {
        let mut by_name: HashMap<String, Vec<OwnedFd>> = HashMap::new();
        let mut kept: HashMap<String, Vec<Identity>> = HashMap::new();
        // A predecessor that had a store kept what it handed over there.
        let track = store.is_some();
        for (name, fd) in handed {
            if track && let Some(id) = Identity::of(fd.as_fd()) {
                kept.entry(name.clone()).or_default().push(id);
            }
            by_name.entry(name).or_default().push(fd);
        }
        let handed_names: HashSet<String> = by_name.keys().cloned().collect();
        for (name, fd) in stored {
            if track && let Some(id) = Identity::of(fd.as_fd()) {
                let ids = kept.entry(name.clone()).or_default();
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            if !handed_names.contains(&name) {
                by_name.entry(name).or_default().push(fd);
            }
        }
        Sockets {
            inner: Mutex::new(Inner {
                inherited: by_name,
                serving: HashMap::new(),
                kept,
                handed_over: false,
            }),
            store,
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
    /// was served from), for a successor, and keeps them in the store.
    pub fn serving<S: AsFd>(&self, name: &str, sockets: &[S]) -> std::io::Result<()> {
        let fds = sockets
            .iter()
            .map(|s| s.as_fd().try_clone_to_owned())
            .collect::<std::io::Result<Vec<_>>>()?;
        let Some(store) = &self.store else {
            self.lock().serving.insert(name.to_string(), fds);
            return Ok(());
        };
        let ids: Vec<Identity> = fds
            .iter()
            .filter_map(|fd| Identity::of(fd.as_fd()))
            .collect();
        let replaced = {
            let mut inner = self.lock();
            inner.serving.insert(name.to_string(), fds);
            let before = inner.kept.insert(name.to_string(), ids.clone());
            before.is_some_and(|before| before.iter().any(|id| !ids.contains(id)))
        };
        // What the store holds beyond these (sockets bound elsewhere
        // before a configuration change) goes: the store can only drop a
        // name whole.
        if replaced {
            store.forget(name);
        }
        let borrowed: Vec<BorrowedFd<'_>> = sockets.iter().map(AsFd::as_fd).collect();
        if !borrowed.is_empty() {
            store.keep(name, &borrowed);
        }
        Ok(())
    }

    /// `name` is no longer served (nor kept in the store).
    pub fn closed(&self, name: &str) {
        let forget = {
            let mut inner = self.lock();
            inner.serving.remove(name);
            inner.kept.remove(name).is_some() && !inner.handed_over
        };
        if let Some(store) = self.store.as_ref().filter(|_| forget) {
            store.forget(name);
        }
    }

    /// A successor serves from these sockets now: nothing this process
    /// still does removes them from the store.
    pub fn handed_over(&self) {
        self.lock().handed_over = true;
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

    /// How many distinct sockets are served now.
    pub fn served(&self) -> usize {
        let inner = self.lock();
        let ids: HashSet<Identity> = inner
            .serving
            .values()
            .flatten()
            .filter_map(|fd| Identity::of(fd.as_fd()))
            .collect();
        ids.len()
    }

    /// Closes what was inherited and not taken, removes what no part
    /// serves from the store, and says what was inherited and not taken.
    pub fn drop_unclaimed(&self) -> Vec<String> {
        let (mut names, forget) = {
            let mut inner = self.lock();
            let names: Vec<String> = inner.inherited.drain().map(|(name, _)| name).collect();
            let mut forget: Vec<String> = inner
                .kept
                .keys()
                .chain(&names)
                .filter(|name| !inner.serving.contains_key(*name))
                .cloned()
                .collect::<HashSet<String>>()
                .into_iter()
                .collect();
            for name in &forget {
                inner.kept.remove(name);
            }
            if inner.handed_over {
                forget.clear();
            }
            forget.sort();
            (names, forget)
        };
        if let Some(store) = &self.store {
            for name in &forget {
                store.forget(name);
            }
        }
        names.sort();
        names
    }
}

/// Which kernel object a descriptor refers to, whatever its number: two
/// descriptors of one socket (a copy received from elsewhere) are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Identity {
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(fd: BorrowedFd<'_>) -> Option<Identity> {
        let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let meta = file.metadata().ok()?;
        Some(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Whether a socket bound to `bound` serves an address configured as
/// `want`.
fn matches(bound: SocketAddr, want: SocketAddr) -> bool {
    bound == want || (want.port() == 0 && bound.ip() == want.ip())
}

/// The name of the VIP listener on `addr`.
pub fn vip_name(addr: SocketAddr) -> String {
    format!("{VIP_PREFIX}{addr}")
}

const VIP_PREFIX: &str = "vip ";

/// Whether `name` is one a part of the agent serves a socket by.
pub fn is_known(name: &str) -> bool {
    [API, DNS_UDP, DNS_TCP, LIVENESS, INBOUND].contains(&name)
        || name
            .strip_prefix(VIP_PREFIX)
            .is_some_and(|addr| addr.parse::<SocketAddr>().is_ok())
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

    /// What a [`Store`] was told, in order.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Store for Recorder {
        fn keep(&self, name: &str, fds: &[BorrowedFd<'_>]) {
            let mut told = self.0.lock().unwrap();
            told.push(format!("keep {name} {}", fds.len()));
        }
        fn forget(&self, name: &str) {
            self.0.lock().unwrap().push(format!("forget {name}"));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn recorder() -> (Arc<Recorder>, Arc<dyn Store>) {
        let recorder = Arc::new(Recorder::default());
        let store: Arc<dyn Store> = recorder.clone();
        (recorder, store)
    }

    #[test]
    fn what_is_served_is_kept_and_what_closes_is_forgotten() {
        let (told, store) = recorder();
        let sockets = Sockets::with_store(Vec::new(), Vec::new(), Some(store));
        let (a, b) = (listener(), listener());
        sockets.serving("vip 127.0.0.1:80", &[&a, &b]).unwrap();
        // The same sockets again: nothing to forget.
        sockets.serving("vip 127.0.0.1:80", &[&a, &b]).unwrap();
        assert_eq!(sockets.served(), 2);
        sockets.closed("vip 127.0.0.1:80");
        sockets.closed("never served");
        assert_eq!(
            told.take(),
            [
                "keep vip 127.0.0.1:80 2",
                "keep vip 127.0.0.1:80 2",
                "forget vip 127.0.0.1:80"
            ]
        );
        // Other sockets under a name: the old ones go first.
        sockets.serving("api", &[&a]).unwrap();
        sockets.serving("api", &[&b]).unwrap();
        assert_eq!(told.take(), ["keep api 1", "forget api", "keep api 1"]);
    }

    #[test]
    fn the_handover_wins_over_the_store_and_unclaimed_names_are_forgotten() {
        let (told, store) = recorder();
        let (api, other_api, dns) = (listener(), listener(), listener());
        let stale = listener();
        let sockets = Sockets::with_store(
            vec![("api".to_string(), OwnedFd::from(api.try_clone().unwrap()))],
            vec![
                // The store had another socket for the API: the handover's
                // is served, the store's only named to be dropped.
                ("api".to_string(), OwnedFd::from(other_api)),
                (
                    "dns/tcp".to_string(),
                    OwnedFd::from(dns.try_clone().unwrap()),
                ),
                ("vip 127.0.0.1:9".to_string(), OwnedFd::from(stale)),
            ],
            Some(store),
        );
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let taken = sockets.take_tcp("api", any);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].local_addr().unwrap(), api.local_addr().unwrap());
        sockets.serving("api", &taken).unwrap();
        let taken = sockets.take_tcp("dns/tcp", any);
        assert_eq!(taken[0].local_addr().unwrap(), dns.local_addr().unwrap());
        sockets.serving("dns/tcp", &taken).unwrap();
        assert_eq!(sockets.drop_unclaimed(), ["vip 127.0.0.1:9"]);
        assert_eq!(
            told.take(),
            [
                "forget api",
                "keep api 1",
                "keep dns/tcp 1",
                "forget vip 127.0.0.1:9"
            ]
        );
    }

    #[test]
    fn after_a_handover_nothing_is_forgotten() {
        let (told, store) = recorder();
        let sockets = Sockets::with_store(Vec::new(), Vec::new(), Some(store));
        let first = listener();
        sockets.serving("vip 127.0.0.1:80", &[&first]).unwrap();
        sockets.handed_over();
        sockets.closed("vip 127.0.0.1:80");
        assert!(sockets.drop_unclaimed().is_empty());
        assert_eq!(told.take(), ["keep vip 127.0.0.1:80 1"]);
    }

    #[test]
    fn known_names() {
        for name in ["api", "dns/udp", "dns/tcp", "liveness", "inbound"] {
            assert!(is_known(name), "{name}");
        }
        assert!(is_known(&vip_name(SocketAddr::from(([127, 77, 0, 9], 80)))));
        assert!(is_known(&vip_name("[::1]:8080".parse().unwrap())));
        for name in ["stored", "vip", "vip 127.0.0.1", "vip x:80", "API", ""] {
            assert!(!is_known(name), "{name}");
        }
    }
}
