//! Files a daemon keeps (state, caches, tokens, commands) are replaced
//! whole or not at all, and are on disk when the write returns.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How the temporary files of [`write_atomic`] are named: a crash can
/// leave one behind, which [`remove_temporaries`] takes away.
const TEMPORARY_PREFIX: &str = ".signpost-write-";

/// Replaces `path` with `bytes`: written to a new temporary file in the
/// same directory (created if missing; the file is readable by its owner
/// only), synced, renamed over `path`, and the directory synced, so that
/// a crash leaves the old file or the new one, never a mix, and a
/// returned `Ok` means the new one is on disk. Writers of one file never
/// share a temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMPORARY_PREFIX)
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes from `dir` the temporary files of writes a crash interrupted;
/// returns how many. For start-up, before anything writes there.
pub fn remove_temporaries(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(TEMPORARY_PREFIX)
            && entry.file_type()?.is_file()
        {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Moves a corrupt file out of the way, to `<name>.corrupt-<unix ms>`
/// (never over an earlier copy, which may be the one worth looking at),
/// so that what is written next does not destroy the evidence; returns
/// where it went.
pub fn move_aside(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{ms}"));
    let mut aside = std::path::PathBuf::from(&name);
    // Two in the same millisecond: a suffix.
    let mut n = 1;
    while aside.exists() {
        aside = std::path::PathBuf::from(format!("{}-{n}", name.to_string_lossy()));
        n += 1;
    }
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// [`remove_temporaries`] at start-up, logged; a failure is only logged
/// (the files are clutter, nothing reads them).
pub fn clean_up(dir: &Path) {
    match remove_temporaries(dir) {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(dir = %dir.display(), files = n, "removed the temporary files of interrupted writes")
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the temporary files of interrupted writes")
        }
    }
}

/// For a writer that keeps a file in step with what `changes` announces:
/// waits for a change, then `coalesce` more for the changes that come
/// with it, so that a burst is written once. `false` at shutdown, or when
/// nothing can change any more: the writer then writes one last time and
/// stops.
pub async fn next_write<T>(
    changes: &mut watch::Receiver<T>,
    coalesce: Duration,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => return false,
        changed = changes.changed() => if changed.is_err() { return false },
    }
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(coalesce) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("state.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["state.json"], "no temporary file is left behind");
    }

    #[test]
    fn what_an_interrupted_write_left_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("state.json"), b"kept").unwrap();
        std::fs::write(dir.path().join(".signpost-write-abc123"), b"half").unwrap();
        std::fs::write(dir.path().join(".other"), b"theirs").unwrap();
        assert_eq!(remove_temporaries(dir.path()).unwrap(), 1);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".other", "state.json"]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"old").unwrap();
        assert!(
            write_atomic(&path, b"new").is_err(),
            "a directory is not replaced"
        );
        assert_eq!(std::fs::read(path.join("inside")).unwrap(), b"old");
    }

    #[tokio::test]
    async fn a_writer_wakes_for_a_change_and_stops_at_shutdown_or_when_nothing_can_change() {
        let coalesce = Duration::from_millis(5);
        let (tx, mut changes) = watch::channel(0);
        let shutdown = CancellationToken::new();
        tx.send_replace(1);
        assert!(next_write(&mut changes, coalesce, &shutdown).await);
        shutdown.cancel();
        tx.send_replace(2);
        assert!(!next_write(&mut changes, coalesce, &shutdown).await);
        // A writer whose source is gone, with nothing left unseen.
        let (tx, mut changes) = watch::channel(0);
        drop(tx);
        let running = CancellationToken::new();
        assert!(!next_write(&mut changes, coalesce, &running).await);
    }
}
