//! Restarts and upgrades that drop nothing: a new agent process takes the
//! listening sockets (DNS, API, liveness, mesh inbound, every VIP
//! listener) from the running one over `data_dir/handover.sock`, as
//! HAProxy's seamless reload and Envoy's hot restart do, instead of
//! binding new ones.
//!
//! The exchange, one 256-byte record at a time (a kind byte, a length
//! byte, a name):
//! 1. the new process asks (`T`, its pid);
//! 2. the old one writes its state to disk (so the new one starts from
//!    it) and sends a copy of each socket with its name (`S`, the socket
//!    passed as `SCM_RIGHTS`), then `E`;
//! 3. the new one starts serving from them and says so (`R`).
//!
//! Until `R` both processes accept from the same sockets, so nothing
//! waits; a successor that fails before `R` leaves the old one serving as
//! if nothing happened. After `R` the old one stops accepting, lets its
//! connections finish (`drain_timeout`) and exits, writing nothing more
//! to `data_dir`: the files are the new process's now.
//!
//! A restart by systemd (`systemctl restart`) cannot go this way: the old
//! process exits before the new one starts. The sockets then come from
//! systemd's file descriptor store (see `systemd`).

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use signpost_core::sockets::{MAX_PER_NAME, Sockets};
use tokio_util::sync::CancellationToken;

const SOCKET_FILE: &str = "handover.sock";
const RECORD: usize = 256;
/// The most sockets one handover carries.
const MAX_SOCKETS: usize = 16 * MAX_PER_NAME;
/// How long the old process waits for the new one to say it serves.
const READY_WAIT: Duration = Duration::from_secs(120);
/// How long either side waits for the next record otherwise.
const RECORD_WAIT: Duration = Duration::from_secs(30);

const ASK: u8 = b'T';
const SOCKET: u8 = b'S';
const END: u8 = b'E';
const READY: u8 = b'R';
const REFUSED: u8 = b'X';

pub(crate) fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// Sockets with their names.
pub(crate) type Named = Vec<(String, OwnedFd)>;

/// The running agent this process takes over from.
pub(crate) struct Predecessor {
    stream: UnixStream,
    pid: String,
}

impl Predecessor {
    /// Tells the previous process that this one serves: it stops
    /// accepting and drains.
    pub(crate) fn serving(mut self) {
        match write_record(&mut self.stream, READY, "", None) {
            Ok(()) => {
                tracing::info!(previous = %self.pid, "took over from the previous agent process; it drains and exits")
            }
            Err(error) => {
                tracing::warn!(previous = %self.pid, %error, "cannot tell the previous agent process that this one serves")
            }
        }
    }
}

/// The sockets of the agent running on `data_dir`, if one is: taken
/// before this process reads its state, which the running one writes
/// first. No running agent: nothing, and `None`.
pub(crate) fn take_over(data_dir: &Path) -> anyhow::Result<(Named, Option<Predecessor>)> {
    let path = path(data_dir);
    let mut stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok((Vec::new(), None));
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot reach the running agent at {}", path.display()));
        }
    };
    stream.set_read_timeout(Some(RECORD_WAIT))?;
    stream.set_write_timeout(Some(RECORD_WAIT))?;
    let pid = std::process::id().to_string();
    write_record(&mut stream, ASK, &pid, None)
        .context("cannot ask the running agent for its sockets")?;
    let mut sockets = Vec::new();
    let previous = loop {
        let (kind, name, fd) = read_record(&mut stream).with_context(|| {
            format!("the running agent at {} stopped answering", path.display())
        })?;
        match (kind, fd) {
            (SOCKET, Some(fd)) if sockets.len() < MAX_SOCKETS => sockets.push((name, fd)),
            (SOCKET, _) => anyhow::bail!(
                "the running agent sent a socket record without a socket, or too many"
            ),
            (END, _) => break name,
            (REFUSED, _) => anyhow::bail!("the running agent refused to hand over: {name}"),
            (other, _) => anyhow::bail!(
                "unexpected record {:?} from the running agent",
                other as char
            ),
        }
    };
    tracing::info!(previous = %previous, sockets = sockets.len(), "taking over from the running agent process");
    Ok((
        sockets,
        Some(Predecessor {
            stream,
            pid: previous,
        }),
    ))
}

/// Serves `data_dir/handover.sock` on a thread of its own: a successor
/// that asks gets `sockets` once `prepare` (on `runtime`) has written the
/// state; when it serves, `handed_over` is called, once.
pub(crate) fn listen<F, Fut, H>(
    data_dir: &Path,
    sockets: Arc<Sockets>,
    runtime: tokio::runtime::Handle,
    prepare: F,
    handed_over: H,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
    H: FnOnce() + Send + 'static,
{
    let path = path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    std::thread::Builder::new()
        .name("signpost-handover".to_string())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept on the handover socket");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match hand_over(stream, &sockets, &runtime, &prepare) {
                    Ok(()) => {
                        sockets.handed_over();
                        handed_over();
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "a new agent process did not take over: this one goes on serving"
                        );
                    }
                }
            }
        })
        .context("cannot start the handover thread")?;
    Ok(())
}

/// One successor's request, up to its `R`.
fn hand_over<F, Fut>(
    mut stream: UnixStream,
    sockets: &Sockets,
    runtime: &tokio::runtime::Handle,
    prepare: &F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    stream.set_read_timeout(Some(RECORD_WAIT))?;
    stream.set_write_timeout(Some(RECORD_WAIT))?;
    let (kind, pid, _) = read_record(&mut stream).context("no request")?;
    anyhow::ensure!(kind == ASK, "unexpected record {:?}", kind as char);
    tracing::info!(successor = %pid, "a new agent process asks to take over: writing the state and handing over the sockets");
    runtime.block_on(prepare());
    let handed = match sockets.for_successor() {
        Ok(handed) => handed,
        Err(error) => {
            let reason = format!("cannot copy the sockets: {error}");
            write_record(&mut stream, REFUSED, &reason, None)?;
            anyhow::bail!(reason);
        }
    };
    for (name, fd) in &handed {
        write_record(&mut stream, SOCKET, name, Some(fd.as_raw_fd()))
            .with_context(|| format!("cannot send socket {name}"))?;
    }
    write_record(&mut stream, END, &std::process::id().to_string(), None)?;
    drop(handed);
    stream.set_read_timeout(Some(READY_WAIT))?;
    let (kind, _, _) = read_record(&mut stream).context("it stopped before serving")?;
    anyhow::ensure!(kind == READY, "unexpected record {:?}", kind as char);
    tracing::info!(successor = %pid, "the new agent process serves: this one stops accepting and drains");
    Ok(())
}

/// One restart at a time.
static RESTARTING: AtomicBool = AtomicBool::new(false);

/// How long a restart waits for the new process to take over.
const RESTART_WAIT: Duration = Duration::from_secs(150);

/// Why a restart did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RestartError {
    #[error("a restart is already under way")]
    Busy,
    #[error("cannot start {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("the new process ({exe}) ended before taking over: {status}")]
    Ended { exe: String, status: String },
    #[error("the new process ({exe}, pid {pid}) did not take over within {wait:?}: stopped it")]
    Stuck {
        exe: String,
        pid: u32,
        wait: Duration,
    },
}

/// Restarts the agent without dropping anything: starts the program at
/// this process's path (the new version after an upgrade) with the same
/// arguments, which takes over the sockets (see [`take_over`]). Returns
/// the new process's pid once it serves (`taken_over` fired); this one
/// then drains. A new process that fails leaves this one serving.
pub(crate) async fn restart(taken_over: &CancellationToken) -> Result<u32, RestartError> {
    if RESTARTING.swap(true, Ordering::AcqRel) {
        return Err(RestartError::Busy);
    }
    let result = spawn_successor(taken_over).await;
    RESTARTING.store(false, Ordering::Release);
    result
}

async fn spawn_successor(taken_over: &CancellationToken) -> Result<u32, RestartError> {
    let exe = program();
    let shown = exe.display().to_string();
    tracing::info!(program = %shown, "restarting: starting a new agent process to take over");
    // The sockets systemd passed this process are handed over, not
    // passed again: the variables that name them are not the child's.
    let mut child = tokio::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .spawn()
        .map_err(|source| RestartError::Spawn {
            exe: shown.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or_default();
    tokio::select! {
        () = taken_over.cancelled() => Ok(pid),
        status = child.wait() => Err(RestartError::Ended {
            exe: shown,
            status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
        }),
        () = tokio::time::sleep(RESTART_WAIT) => {
            if let Err(error) = child.start_kill() {
                tracing::warn!(pid, %error, "cannot stop the new process that did not take over");
            }
            Err(RestartError::Stuck { exe: shown, pid, wait: RESTART_WAIT })
        }
    }
}

/// This process's program file: after a package upgrade replaced it,
/// the kernel names the running one "… (deleted)"; the new one is at the
/// same path.
fn program() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("signpost"));
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

/// Writes one record, with `fd` passed along.
fn write_record(
    stream: &mut UnixStream,
    kind: u8,
    name: &str,
    fd: Option<RawFd>,
) -> std::io::Result<()> {
    let bytes = name.as_bytes();
    let len = u8::try_from(bytes.len())
        .ok()
        .filter(|&n| usize::from(n) <= RECORD - 2)
        .ok_or_else(|| std::io::Error::other(format!("name too long: {name}")))?;
    let mut record = [0u8; RECORD];
    record[0] = kind;
    record[1] = len;
    record[2..2 + bytes.len()].copy_from_slice(bytes);
    let Some(fd) = fd else {
        return stream.write_all(&record);
    };
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&record)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    // A short write sent the socket with its first part; the rest is
    // plain bytes.
    stream.write_all(&record[sent..])
}

/// Reads one record, and the socket that came with it.
fn read_record(stream: &mut UnixStream) -> std::io::Result<(u8, String, Option<OwnedFd>)> {
    let mut record = [0u8; RECORD];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut record)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                fds.extend(received);
            }
        }
        (msg.bytes, fds)
    };
    // SAFETY: the kernel just installed these descriptors in this process
    // for this message (SCM_RIGHTS): nothing else owns them.
    #[allow(unsafe_code)]
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    stream.read_exact(&mut record[got..])?;
    let len = usize::from(record[1]).min(RECORD - 2);
    let name = String::from_utf8_lossy(&record[2..2 + len]).into_owned();
    if owned.len() > 1 {
        return Err(std::io::Error::other("more than one socket in a record"));
    }
    Ok((record[0], name, owned.pop()))
}

/// Tests of the exchange, between two threads of this process.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_cross_with_their_names_and_the_old_side_hears_ready() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let old = Arc::new(Sockets::default());
        let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        old.serving("api", &[&api]).unwrap();
        old.serving("dns/udp", &[&udp]).unwrap();
        let prepared = Arc::new(AtomicBool::new(false));
        let flag = prepared.clone();
        let done = CancellationToken::new();
        let cancel = done.clone();
        listen(
            dir.path(),
            old,
            runtime.handle().clone(),
            move || {
                let flag = flag.clone();
                async move { flag.store(true, Ordering::SeqCst) }
            },
            move || cancel.cancel(),
        )
        .unwrap();
        let (sockets, predecessor) = take_over(dir.path()).unwrap();
        assert!(
            prepared.load(Ordering::SeqCst),
            "the state is written before the sockets go"
        );
        let mut names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["api", "dns/udp"]);
        let new = Sockets::new(sockets);
        let taken = new.take_tcp("api", api.local_addr().unwrap());
        assert_eq!(taken[0].local_addr().unwrap(), api.local_addr().unwrap());
        assert!(!done.is_cancelled());
        predecessor.unwrap().serving();
        runtime.block_on(done.cancelled());
    }

    #[test]
    fn nobody_running_means_nothing_to_take() {
        let dir = tempfile::tempdir().unwrap();
        let (sockets, predecessor) = take_over(dir.path()).unwrap();
        assert!(sockets.is_empty() && predecessor.is_none());
        // A socket file left by a process that is gone: the same.
        drop(UnixListener::bind(path(dir.path())).unwrap());
        let (sockets, predecessor) = take_over(dir.path()).unwrap();
        assert!(sockets.is_empty() && predecessor.is_none());
    }
}
