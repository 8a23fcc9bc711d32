//! The sockets systemd passes at start: what the previous process kept in
//! the unit's file descriptor store, as descriptors 3, 4, … with
//! `LISTEN_FDS` (how many), `LISTEN_PID` (for which process: a child
//! that inherited the variables is not meant) and `LISTEN_FDNAMES` (their
//! names, ':'-separated), as `sd_listen_fds_with_names(3)` reads them.
//!
//! The variables stay in the environment (changing it in a process with
//! threads is not safe); the agent's own children are started without
//! them (see `handover::restart`), and `LISTEN_PID` tells any other
//! program they are not its.

use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use signpost_core::sockets::is_known;

use super::decode_name;

/// The first descriptor passed (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The most descriptors taken: the unit's `FileDescriptorStoreMax=`.
const MAX_FDS: usize = 8192;

/// The passed sockets are taken once per process.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Why the variables cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ListenError {
    #[error("LISTEN_FDS={0:?} is not a number of descriptors (at most {MAX_FDS})")]
    Count(String),
}

/// The sockets systemd passed this process, by name; a socket without a
/// name is closed, and what is not a socket left alone. Nothing when the
/// variables are not for this process, and on every call after the first.
pub(crate) fn take() -> Vec<(String, OwnedFd)> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Vec::new();
    }
    let var = |name| std::env::var(name).ok();
    let passed = match parse(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    ) {
        Ok(passed) => passed,
        Err(error) => {
            tracing::warn!(%error, "the sockets systemd passed are not used");
            return Vec::new();
        }
    };
    let mut sockets = Vec::with_capacity(passed.len());
    for (fd, name) in passed {
        let Some(fd) = own(fd) else {
            tracing::warn!(fd, "systemd named a descriptor that is not open: skipped");
            continue;
        };
        let socket = socket2::SockRef::from(&fd);
        if let Err(error) = socket.set_cloexec(true) {
            tracing::warn!(?fd, %error, "cannot mark a passed descriptor close-on-exec");
        }
        if socket.r#type().is_err() {
            // Left open, not closed: a descriptor this process cannot
            // tell is its own (LISTEN_FDS counted wrong) may be in use.
            tracing::warn!(name = ?name, "systemd passed a descriptor that is not a socket: ignored");
            let _: RawFd = std::os::fd::IntoRawFd::into_raw_fd(fd);
            continue;
        }
        match name {
            // Taken by no part, it is closed and dropped from the store
            // with what this configuration no longer serves (a listening
            // socket kept there would hold its port and queue
            // connections nobody accepts).
            Some(name) if !is_known(&name) => {
                tracing::warn!(socket = %name, "systemd passed a socket under a name this agent does not serve: ignored");
                sockets.push((name, fd));
            }
            Some(name) => sockets.push((name, fd)),
            None => {
                tracing::warn!("systemd passed a socket without a name: closed");
            }
        }
    }
    if !sockets.is_empty() {
        tracing::info!(
            sockets = sockets.len(),
            "taking the listening sockets kept in systemd's file descriptor store"
        );
    }
    sockets
}

/// Takes ownership of descriptor `fd`, if it is open.
fn own(fd: RawFd) -> Option<OwnedFd> {
    // What /proc cannot say (not mounted) the protocol does: systemd
    // passed it open.
    match std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        _ => {}
    }
    // SAFETY: `LISTEN_PID` names this process, so descriptors
    // FIRST_FD..FIRST_FD+LISTEN_FDS were passed to it by systemd for it to
    // own (sd_listen_fds(3)), and `TAKEN` makes sure they are taken once:
    // nothing else in this process owns this open descriptor.
    #[allow(unsafe_code)]
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The descriptors the variables pass to process `own_pid`, with their
/// names (decoded; none when systemd gave no usable one): none when
/// `LISTEN_PID` is not set or names another process.
pub(crate) fn parse(
    pid: Option<&str>,
    fds: Option<&str>,
    names: Option<&str>,
    own_pid: u32,
) -> Result<Vec<(RawFd, Option<String>)>, ListenError> {
    if pid.and_then(|p| p.trim().parse::<u32>().ok()) != Some(own_pid) {
        return Ok(Vec::new());
    }
    let Some(fds) = fds else {
        return Ok(Vec::new());
    };
    let count = fds
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n <= MAX_FDS)
        .ok_or_else(|| ListenError::Count(fds.to_string()))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    // systemd sends one name per descriptor; other lists name none
    // (sd_listen_fds_with_names(3) refuses them).
    let names: Vec<Option<String>> = match names.map(|n| n.split(':').collect::<Vec<_>>()) {
        Some(list) if list.len() == count => list
            .into_iter()
            .map(|n| (!n.is_empty()).then(|| decode_name(n)))
            .collect(),
        Some(list) => {
            tracing::warn!(
                names = list.len(),
                descriptors = count,
                "LISTEN_FDNAMES does not name each passed descriptor: none is used"
            );
            vec![None; count]
        }
        None => vec![None; count],
    };
    Ok((FIRST_FD..).zip(names).collect())
}

/// Tests of the variables' reading.
#[cfg(test)]
mod tests {
    use super::*;

    fn named(list: &[(RawFd, Option<&str>)]) -> Vec<(RawFd, Option<String>)> {
        list.iter()
            .map(|(fd, n)| (*fd, n.map(str::to_string)))
            .collect()
    }

    #[test]
    fn descriptors_from_3_with_their_decoded_names() {
        let passed = parse(
            Some("42"),
            Some("4"),
            Some("api:dns/udp:vip 127.77.0.9_80:vip [__1]_53"),
            42,
        )
        .unwrap();
        assert_eq!(
            passed,
            named(&[
                (3, Some("api")),
                (4, Some("dns/udp")),
                (5, Some("vip 127.77.0.9:80")),
                (6, Some("vip [::1]:53")),
            ])
        );
    }

    #[test]
    fn variables_for_another_process_are_not_used() {
        assert!(
            parse(Some("41"), Some("2"), Some("a:b"), 42)
                .unwrap()
                .is_empty()
        );
        assert!(parse(None, Some("2"), Some("a:b"), 42).unwrap().is_empty());
        assert!(parse(Some("x"), Some("2"), None, 42).unwrap().is_empty());
        assert!(parse(Some("42"), None, None, 42).unwrap().is_empty());
    }

    #[test]
    fn names_that_do_not_match_the_count_name_nothing() {
        assert_eq!(
            parse(Some("42"), Some("2"), Some("api"), 42).unwrap(),
            named(&[(3, None), (4, None)])
        );
        assert_eq!(
            parse(Some("42"), Some("2"), None, 42).unwrap(),
            named(&[(3, None), (4, None)])
        );
        // An empty name is no name.
        assert_eq!(
            parse(Some("42"), Some("2"), Some(":api"), 42).unwrap(),
            named(&[(3, None), (4, Some("api"))])
        );
        assert_eq!(parse(Some("42"), Some("0"), Some(""), 42).unwrap(), []);
    }

    #[test]
    fn a_bad_count_is_an_error() {
        for bad in ["-1", "many", "8193", ""] {
            assert_eq!(
                parse(Some("42"), Some(bad), None, 42),
                Err(ListenError::Count(bad.to_string())),
                "{bad}"
            );
        }
    }
}
