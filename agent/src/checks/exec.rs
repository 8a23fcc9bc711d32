//! Exec checks: run a program; exit 0 passes, 1 warns, anything else (a
//! signal, a timeout) is critical. The program runs in its own process
//! group so that a timeout kills whatever it started too.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use signpost_core::model::Health;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{Outcome, truncate_output};

pub(crate) struct ExecProbe {
    args: Vec<String>,
    timeout: Duration,
    max_output: usize,
}

impl ExecProbe {
    pub(crate) fn new(args: Vec<String>, timeout: Duration, max_output: usize) -> Self {
        ExecProbe {
            args,
            timeout,
            max_output,
        }
    }

    pub(crate) async fn run(&self) -> Outcome {
        let Some((program, rest)) = self.args.split_first() else {
            return Outcome::new(Health::Critical, "no program to run");
        };
        let mut child = match Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                return Outcome::new(
                    Health::Critical,
                    format!("failed to start {program:?}: {e}"),
                );
            }
        };
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let max = self.max_output;
        let run = async {
            let (out, err, status) = tokio::join!(
                read_capped(stdout, max),
                read_capped(stderr, max),
                child.wait()
            );
            (out, err, status)
        };
        match tokio::time::timeout(self.timeout, run).await {
            Ok((out, err, status)) => {
                let (mut text, total) = out;
                let (err_text, err_total) = err;
                text.push_str(&err_text);
                let total = total + err_total;
                let output = if total > text.len() && text.len() >= max {
                    format!(
                        "Captured {} of {total} bytes\n...\n{}",
                        max,
                        truncate_output(text, max)
                    )
                } else {
                    truncate_output(text, max)
                };
                let status = match status {
                    Ok(status) => match status.code() {
                        Some(0) => Health::Passing,
                        Some(1) => Health::Warning,
                        _ => Health::Critical,
                    },
                    Err(e) => {
                        return Outcome::new(
                            Health::Critical,
                            format!("failed to wait for {program:?}: {e}"),
                        );
                    }
                };
                Outcome::new(status, output)
            }
            Err(_) => {
                if let Some(pgid) = pgid
                    && let Err(e) = killpg(pgid, Signal::SIGKILL)
                {
                    tracing::warn!(program = %program, error = %e, "could not kill timed-out check");
                }
                Outcome::new(
                    Health::Critical,
                    format!(
                        "Timed out ({}) running check",
                        signpost_core::duration::format(self.timeout)
                    ),
                )
            }
        }
    }
}

/// Reads a pipe to its end, keeping the first `max` bytes; returns them
/// and how many bytes there were in all.
async fn read_capped<R: AsyncRead + Unpin>(pipe: Option<R>, max: usize) -> (String, usize) {
    let Some(mut pipe) = pipe else {
        return (String::new(), 0);
    };
    let mut kept = Vec::new();
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, timeout: Duration) -> ExecProbe {
        ExecProbe::new(
            vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout,
            4096,
        )
    }

    #[tokio::test]
    async fn exit_codes_map_to_statuses() {
        let t = Duration::from_secs(5);
        let ok = sh("echo fine", t).run().await;
        assert_eq!(ok, Outcome::new(Health::Passing, "fine\n"));
        assert_eq!(
            sh("echo meh >&2; exit 1", t).run().await.status,
            Health::Warning
        );
        let bad = sh("echo broken; exit 2", t).run().await;
        assert_eq!(bad, Outcome::new(Health::Critical, "broken\n"));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let out = sh(&script, Duration::from_millis(300)).run().await;
        assert_eq!(out.status, Health::Critical);
        assert!(
            out.output.starts_with("Timed out (300ms)"),
            "{}",
            out.output
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "a grandchild survived the timeout");
    }

    #[tokio::test]
    async fn output_is_capped() {
        let out = sh(
            "head -c 10000 /dev/zero | tr '\\0' x",
            Duration::from_secs(5),
        )
        .run()
        .await;
        assert!(
            out.output
                .starts_with("Captured 4096 of 10000 bytes\n...\n"),
            "{}",
            &out.output[..40]
        );
        assert!(out.output.len() < 4200);
    }

    #[tokio::test]
    async fn missing_program_is_critical() {
        let out = ExecProbe::new(
            vec!["/nonexistent/check".into()],
            Duration::from_secs(1),
            4096,
        )
        .run()
        .await;
        assert_eq!(out.status, Health::Critical);
        assert!(out.output.contains("/nonexistent/check"), "{}", out.output);
    }
}
