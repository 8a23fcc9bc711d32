//! Running under systemd (`Type=notify`): the readiness message, the file
//! descriptor store that keeps the listening sockets open while systemd
//! restarts the agent (`systemctl restart`, or `Restart=on-failure` after
//! a crash: the old process is gone before the new one starts, so there
//! is nobody to hand them over), and what a SIGTERM is part of.
//!
//! - [`notify`]: the one sender of `$NOTIFY_SOCKET` messages, with
//!   sockets attached (`SCM_RIGHTS`) when it stores them.
//! - [`FdStore`]: every socket the agent serves is kept in systemd's
//!   store under its name (`FDSTORE=1`), and dropped from it when no
//!   longer served (`FDSTOREREMOVE=1`), through
//!   [`signpost_core::sockets::Sockets`].
//! - [`listen`]: the sockets systemd passes back at start
//!   (`LISTEN_FDS`, as `sd_listen_fds(3)` reads them).
//! - [`jobs`]: the unit this process runs in, and whether the SIGTERM it
//!   got is part of a restart of that unit.

pub(crate) mod jobs;
pub(crate) mod listen;

use std::ffi::{OsStr, OsString};
use std::io::IoSlice;
use std::os::fd::{AsRawFd as _, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`).
const MAX_FDS_PER_MESSAGE: usize = 253;

/// The longest `FDNAME=` systemd takes.
const MAX_FDNAME: usize = 255;

/// How long a message may wait for room in systemd's queue.
const SEND_WAIT: Duration = Duration::from_secs(1);

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) that this process
/// serves and is the unit's main process now, when run under it.
pub(crate) fn notify_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    if let Err(error) = notify(&socket, &message, &[]) {
        tracing::warn!(%error, "cannot notify systemd that the agent is ready");
    }
}

/// Sends `message` to the notification socket `socket` (a path, or
/// `@name` in the abstract namespace), with `fds` attached.
pub(crate) fn notify(socket: &OsStr, message: &str, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None => UnixAddr::new(bytes),
    }
    .map_err(std::io::Error::from)?;
    let sender = UnixDatagram::unbound()?;
    sender.set_write_timeout(Some(SEND_WAIT))?;
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg(
        sender.as_raw_fd(),
        &[IoSlice::new(message.as_bytes())],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        Some(&addr),
    )
    .map_err(std::io::Error::from)?;
    if sent != message.len() {
        return Err(std::io::Error::other("the message was cut short"));
    }
    Ok(())
}

/// systemd's file descriptor store for this unit (`FileDescriptorStoreMax=`
/// in the unit): what is kept there is passed to the unit's next process
/// (`LISTEN_FDS`), until the unit is stopped for good.
#[derive(Debug)]
pub(crate) struct FdStore {
    socket: OsString,
    /// Whether systemd took a socket (it says nothing when the store is
    /// off or full: see [`jobs::stopping`]).
    sent: AtomicBool,
}

impl FdStore {
    /// The store, when run under systemd (`$NOTIFY_SOCKET`).
    pub(crate) fn from_env() -> Option<FdStore> {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
        Some(FdStore {
            socket,
            sent: AtomicBool::new(false),
        })
    }

    /// Whether a socket was sent to the store.
    pub(crate) fn used(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }
}

impl signpost_core::sockets::Store for FdStore {
    fn keep(&self, name: &str, fds: &[BorrowedFd<'_>]) {
        let Some(fdname) = encode_name(name) else {
            tracing::warn!(
                socket = name,
                "a socket name systemd cannot store: not kept across a restart by systemd"
            );
            return;
        };
        // FDPOLL=0: systemd would drop a socket on an error it polls; the
        // agent says itself when one is no longer served.
        let message = format!("FDSTORE=1\nFDNAME={fdname}\nFDPOLL=0\n");
        for part in fds.chunks(MAX_FDS_PER_MESSAGE) {
            match notify(&self.socket, &message, part) {
                Ok(()) => self.sent.store(true, Ordering::Release),
                Err(error) => {
                    tracing::warn!(socket = name, %error, "cannot keep the socket in systemd's file descriptor store: a restart by systemd would bind it anew");
                }
            }
        }
    }

    fn forget(&self, name: &str) {
        let Some(fdname) = encode_name(name) else {
            return;
        };
        let message = format!("FDSTOREREMOVE=1\nFDNAME={fdname}\n");
        if let Err(error) = notify(&self.socket, &message, &[]) {
            tracing::warn!(socket = name, %error, "cannot drop the socket from systemd's file descriptor store");
        }
    }
}

/// A socket's name as systemd stores it (`FDNAME=`): printable ASCII
/// without ':' (its separator in `LISTEN_FDNAMES`), at most 255
/// characters. The agent's names (`vip 127.77.0.9:80`, `vip [::1]:80`)
/// have ':' and never '_', so ':' is written '_'; a name with '_' or
/// anything systemd refuses has no stored form.
pub(crate) fn encode_name(name: &str) -> Option<String> {
    let storable = name.len() <= MAX_FDNAME
        && !name.is_empty()
        && name.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'_');
    storable.then(|| name.replace(':', "_"))
}

/// The socket name a stored name stands for (see [`encode_name`]).
pub(crate) fn decode_name(fdname: &str) -> String {
    fdname.replace('_', ":")
}

/// Tests of the stored names and of the messages systemd receives.
#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, OwnedFd};

    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    use signpost_core::sockets::{Store as _, vip_name};

    use super::*;

    #[test]
    fn names_go_to_systemd_and_back() {
        let v4 = vip_name("127.77.0.9:80".parse().unwrap());
        let v6 = vip_name("[fd00::1:2]:8080".parse().unwrap());
        for name in ["api", "dns/udp", "dns/tcp", "liveness", "inbound", &v4, &v6] {
            let stored = encode_name(name).unwrap();
            assert!(
                !stored.contains(':') && stored.len() <= MAX_FDNAME,
                "{stored}"
            );
            assert_eq!(decode_name(&stored), name);
        }
        assert_eq!(encode_name(&v4).unwrap(), "vip 127.77.0.9_80");
        assert_eq!(encode_name(&v6).unwrap(), "vip [fd00__1_2]_8080");
        // No stored form: it would not come back as itself, or systemd
        // refuses it.
        for name in ["with_underscore", "tab\there", "é", "", &"x".repeat(256)] {
            assert_eq!(encode_name(name), None, "{name}");
        }
    }

    /// One message as systemd reads it: the text, and the descriptors.
    fn receive(socket: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        use std::os::fd::FromRawFd as _;
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: installed in this process by this message.
                #[allow(unsafe_code)]
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        (String::from_utf8_lossy(&buf[..len]).into_owned(), fds)
    }

    #[test]
    fn sockets_are_stored_by_name_in_messages_of_at_most_253() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        let store = FdStore {
            socket: path.into_os_string(),
            sent: AtomicBool::new(false),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let many = vec![listener.as_fd(); 300];
        store.keep("vip 127.0.0.1:80", &many);
        assert!(store.used());
        let (first, fds) = receive(&systemd);
        assert_eq!(first, "FDSTORE=1\nFDNAME=vip 127.0.0.1_80\nFDPOLL=0\n");
        assert_eq!(fds.len(), 253);
        let (second, fds) = receive(&systemd);
        assert_eq!(second, first);
        assert_eq!(fds.len(), 47);
        store.forget("vip 127.0.0.1:80");
        let (removal, fds) = receive(&systemd);
        assert_eq!(removal, "FDSTOREREMOVE=1\nFDNAME=vip 127.0.0.1_80\n");
        assert!(fds.is_empty());
    }

    #[test]
    fn a_store_nobody_listens_on_is_a_warning() {
        let store = FdStore {
            socket: OsString::from("/nonexistent/notify"),
            sent: AtomicBool::new(false),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        store.keep("api", &[listener.as_fd()]);
        store.forget("api");
        assert!(!store.used());
    }
}
