//! systemd as the agent deals with it, for machines where it does not run
//! (PID 1 is not systemd): the notification socket (`$NOTIFY_SOCKET`)
//! with the unit's file descriptor store, a `systemctl` that answers the
//! questions the agent asks, a cgroup named like a service unit, and a
//! start of the agent's process as systemd makes it (the stored sockets
//! at descriptors 3, 4, … with `LISTEN_FDS`, `LISTEN_FDNAMES` and
//! `LISTEN_PID`).
//!
//! The agent finds its unit in `/proc/self/cgroup`, as under systemd: the
//! emulation makes a real cgroup named `signpost-e2e-<n>.service` (cgroup
//! v2, or v1's `name=systemd` hierarchy, as systemd does) and its
//! processes start in it, so the agent's own lookup is what is tested,
//! rather than a variable that would tell it its unit (which the agent
//! would then have to trust outside tests too). That needs root and a
//! writable cgroup hierarchy.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

use crate::Launcher;

/// One descriptor in the store.
pub struct Stored {
    /// Its `FDNAME=`, as sent.
    pub name: String,
    /// The socket's inode: the same socket sent twice is kept once, as
    /// systemd does.
    pub inode: u64,
    fd: OwnedFd,
}

#[derive(Default)]
struct State {
    store: Vec<Stored>,
    /// Every message, as received.
    messages: Vec<String>,
    /// The `MAINPID=` of every `READY=1`.
    ready: Vec<u32>,
}

/// An emulated systemd for one unit; what it made goes when dropped
/// (drop it after the agent, whose processes must be gone by then).
pub struct Systemd {
    /// The unit's name (`….service`).
    pub unit: String,
    dir: tempfile::TempDir,
    cgroup: PathBuf,
    state: Arc<Mutex<State>>,
    done: Arc<AtomicBool>,
    receiver: Option<std::thread::JoinHandle<()>>,
}

impl Systemd {
    /// Listens for notifications, and makes the unit's cgroup and its
    /// `systemctl`, which lists no job until [`Systemd::queue_restart`].
    pub fn start() -> Systemd {
        let unit = format!("signpost-e2e-{}.service", rand::random::<u32>());
        let dir = tempfile::tempdir().unwrap();
        let socket = UnixDatagram::bind(dir.path().join("notify")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let files = dir.path().display().to_string();
        std::fs::write(
            bin.join("systemctl"),
            format!(
                "#!/bin/sh\n# systemctl as the agent asks it, answered from files the test writes.\necho \"$*\" >> '{files}/calls'\ncase \"$1\" in\nlist-jobs) cat '{files}/jobs' ;;\nshow) cat '{files}/n-fd-store' ;;\n*) echo \"emulated systemctl: $1 is not emulated\" >&2; exit 1 ;;\nesac\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            bin.join("systemctl"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let cgroup = make_cgroup(&unit);
        let state = Arc::new(Mutex::new(State::default()));
        let done = Arc::new(AtomicBool::new(false));
        let (for_thread, stop, count) =
            (state.clone(), done.clone(), dir.path().join("n-fd-store"));
        std::fs::write(&count, "0\n").unwrap();
        let receiver = std::thread::spawn(move || receive(&socket, &for_thread, &stop, &count));
        let systemd = Systemd {
            unit,
            dir,
            cgroup,
            state,
            done,
            receiver: Some(receiver),
        };
        systemd.queue_restart(false);
        systemd
    }

    /// `systemctl list-jobs` lists a restart job for the unit, or
    /// nothing.
    pub fn queue_restart(&self, queued: bool) {
        let jobs = if queued {
            format!("4242 {} restart running\n", self.unit)
        } else {
            String::new()
        };
        std::fs::write(self.dir.path().join("jobs"), jobs).unwrap();
    }

    /// The arguments the agent ran `systemctl` with, one call a line.
    pub fn systemctl_calls(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default()
    }

    /// The store: each descriptor's name and socket inode, in order.
    pub fn stored(&self) -> Vec<(String, u64)> {
        let state = self.state.lock().unwrap();
        state
            .store
            .iter()
            .map(|s| (s.name.clone(), s.inode))
            .collect()
    }

    /// Every notification received so far.
    pub fn messages(&self) -> Vec<String> {
        self.state.lock().unwrap().messages.clone()
    }

    /// The `MAINPID=` of every `READY=1` so far.
    pub fn ready(&self) -> Vec<u32> {
        self.state.lock().unwrap().ready.clone()
    }

    /// Starts the agent's program as systemd starts the unit's: in its
    /// cgroup, with `$NOTIFY_SOCKET`, the emulated `systemctl` first in
    /// `PATH`, and what the store holds at descriptors 3, 4, … named by
    /// `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID` (the pid of the
    /// process that execs the program: `sh`'s `$$`).
    pub fn launcher(&self) -> Launcher {
        let (state, dir, cgroup) = (
            self.state.clone(),
            self.dir.path().to_path_buf(),
            self.cgroup.clone(),
        );
        Arc::new(move |program: &Path| {
            let (names, fds): (Vec<String>, Vec<OwnedFd>) = {
                let state = state.lock().unwrap();
                state
                    .store
                    .iter()
                    .map(|s| (s.name.clone(), s.fd.try_clone().unwrap()))
                    .unzip()
            };
            let listen = if fds.is_empty() { "" } else { "LISTEN_PID=$$ " };
            let script = format!(
                "echo $$ > '{}/cgroup.procs' && {listen}exec \"$0\" \"$@\"",
                cgroup.display()
            );
            let mut command = Command::new("sh");
            command.args(["-c", &script]).arg(program);
            let path = std::env::var("PATH").unwrap_or_default();
            command
                .env("NOTIFY_SOCKET", dir.join("notify"))
                .env("PATH", format!("{}:{path}", dir.join("bin").display()));
            if !fds.is_empty() {
                command
                    .env("LISTEN_FDS", fds.len().to_string())
                    .env("LISTEN_FDNAMES", names.join(":"));
                pass_at_3(&mut command, fds);
            }
            command
        })
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(receiver) = self.receiver.take() {
            receiver.join().ok();
        }
        // The processes that were in it may take a moment to be gone.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cannot remove the cgroup {}", self.cgroup.display());
    }
}

/// Makes the cgroup `unit` where the agent's lookup finds it: cgroup
/// v2's hierarchy, else v1's `name=systemd` one.
fn make_cgroup(unit: &str) -> PathBuf {
    for root in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup",
    ] {
        let root = Path::new(root);
        if !root.join("cgroup.procs").exists() {
            continue;
        }
        let dir = root.join(unit);
        if std::fs::create_dir(&dir).is_ok() {
            return dir;
        }
    }
    panic!(
        "cannot make the cgroup {unit}: emulating systemd needs root and a writable cgroup v2 or name=systemd hierarchy"
    );
}

/// Has `command`'s process receive `fds` at descriptors 3, 4, … (open
/// across exec), as systemd passes them.
fn pass_at_3(command: &mut Command, fds: Vec<OwnedFd>) {
    let sources: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let count = RawFd::try_from(sources.len()).unwrap();
    // Copies above every source and target first, so that placing one
    // never closes another still to be placed.
    let above = sources.iter().copied().max().unwrap_or(0).max(3 + count) + 1;
    let mut copies: Vec<RawFd> = vec![-1; sources.len()];
    // SAFETY: between fork and exec the closure only duplicates
    // descriptors (async-signal-safe system calls, into memory allocated
    // before the fork); `fds` (moved in) keeps the sources open until
    // the command is dropped.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            let _keep = &fds;
            for (copy, &source) in copies.iter_mut().zip(&sources) {
                let borrowed = std::os::fd::BorrowedFd::borrow_raw(source);
                *copy = nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(above))?;
            }
            for (target, &copy) in (3..).zip(&copies) {
                let borrowed = std::os::fd::BorrowedFd::borrow_raw(copy);
                // Not closed here: the program owns it (dup2 leaves it
                // open across exec).
                let placed = nix::unistd::dup2_raw(borrowed, target)?;
                std::mem::forget(placed);
            }
            Ok(())
        });
    }
}

/// Receives notifications until `done`, applying them to `state` as
/// systemd does, and writes the store's size to `count` (for
/// `systemctl show -p NFileDescriptorStore`).
fn receive(socket: &UnixDatagram, state: &Mutex<State>, done: &AtomicBool, count: &Path) {
    while !done.load(Ordering::SeqCst) {
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 253]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => msg,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => panic!("emulated systemd: cannot receive: {e}"),
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel installed them in this process for
                // this message: nothing else owns them.
                #[allow(unsafe_code)]
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        let fields: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .collect();
        let field = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let mut state = state.lock().unwrap();
        if field("READY") == Some("1")
            && let Some(pid) = field("MAINPID").and_then(|p| p.parse().ok())
        {
            state.ready.push(pid);
        }
        let name = field("FDNAME").unwrap_or("stored").to_string();
        if field("FDSTORE") == Some("1") {
            for fd in fds {
                let inode = inode(&fd);
                if !state.store.iter().any(|s| s.inode == inode) {
                    state.store.push(Stored {
                        name: name.clone(),
                        inode,
                        fd,
                    });
                }
            }
        }
        if field("FDSTOREREMOVE") == Some("1") {
            state.store.retain(|s| s.name != name);
        }
        state.messages.push(text);
        std::fs::write(count, format!("{}\n", state.store.len())).unwrap();
    }
}

/// The inode of the socket `fd` is.
pub fn inode(fd: &impl AsFd) -> u64 {
    let file = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap());
    file.metadata().unwrap().ino()
}

/// The socket inodes process `pid` has open.
pub fn socket_inodes(pid: i32) -> Vec<u64> {
    let mut inodes = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(link) = std::fs::read_link(entry.unwrap().path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        if let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.push(inode);
        }
    }
    inodes
}
