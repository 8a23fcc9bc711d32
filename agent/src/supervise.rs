//! Background tasks that are never lost silently: each runs under
//! [`supervise`], which starts it again, with a logged error, a metric and
//! a back-off, when it ends or panics before its stop token fires.
//!
//! The file watcher, the reaper, the state writer, the fleet view's writer,
//! the sync with the control plane, the liveness listener and every check
//! runner live this way: a bug or an exhausted resource in one of them costs
//! a restart of that one task, visible in `/metrics`
//! (`signpost_agent_task_restarts_total{task}`) and in the log, never a
//! piece of the agent that quietly stopped working.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The first wait before a restart; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A task that ran this long before it stopped starts again at once.
const STEADY: Duration = Duration::from_secs(60);

/// Runs the task `make` builds until `stop` fires; every time it ends (or
/// panics) before that, it is logged as `task`, counted, and started again
/// after a back-off.
pub(crate) async fn supervise<F, Fut>(
    task: &'static str,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        // Spawned, so that a panic ends this run and not the supervisor.
        let ended = tokio::spawn(make()).await;
        if stop.is_cancelled() {
            return;
        }
        match ended {
            Ok(Ok(())) => tracing::error!(task, "background task stopped; starting it again"),
            Ok(Err(error)) => tracing::error!(
                task,
                error = format!("{error:#}"),
                "background task failed; starting it again"
            ),
            Err(error) => tracing::error!(
                task,
                error = %error,
                "background task panicked; starting it again"
            ),
        }
        metrics.task_restart(task);
        if started.elapsed() >= STEADY {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_fails_or_panics_is_started_again_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (r, s) = (runs.clone(), stop.clone());
        let supervisor = tokio::spawn(supervise(
            "test",
            metrics.clone(),
            stop.clone(),
            move || {
                let (runs, stop) = (r.clone(), s.clone());
                async move {
                    match runs.fetch_add(1, Ordering::SeqCst) {
                        0 => anyhow::bail!("no such directory"),
                        1 => panic!("a bug"),
                        2 => Ok(()),
                        _ => {
                            stop.cancelled().await;
                            Ok(())
                        }
                    }
                }
            },
        ));
        // Back-offs of 1 s, 2 s and 4 s (time is paused: they pass at once).
        while runs.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.cancel();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        let node = crate::state::NodeInfo {
            name: "n".into(),
            id: "i".into(),
            address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            zone: "z".into(),
            meta: Default::default(),
            mesh: false,
            connect_by_default: false,
        };
        let text = metrics.render(&crate::state::LocalState::new(node));
        assert!(
            text.contains("signpost_agent_task_restarts_total{task=\"test\"} 3"),
            "{text}"
        );
    }
}
