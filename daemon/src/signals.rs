//! How a daemon is asked to stop, or to re-read its configuration.

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A token cancelled by SIGTERM or Ctrl-C (SIGINT), which starts the
/// daemon's graceful shutdown; a second signal exits at once with 130.
/// Must be called within a tokio runtime. When SIGTERM cannot be listened
/// for, Ctrl-C still works and the reason is printed after `program`.
pub fn shutdown_on_signal(program: &'static str) -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(SignalKind::terminate()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("{program}: cannot listen for SIGTERM: {e}");
                None
            }
        };
        next(&mut term).await;
        trigger.cancel();
        next(&mut term).await;
        eprintln!("{program}: second signal, exiting now");
        std::process::exit(130);
    });
    token
}

/// Notified on every SIGHUP, which asks the daemon to re-read its
/// configuration (`systemctl reload`); signals that arrive during a reload
/// make one more. From this call on SIGHUP no longer ends the process.
/// Must be called within a tokio runtime. When SIGHUP cannot be listened
/// for, the reason is printed after `program` and nothing is notified.
pub fn reload_on_signal(program: &'static str) -> Arc<Notify> {
    let reload = Arc::new(Notify::new());
    match tokio::signal::unix::signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            let notify = reload.clone();
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    notify.notify_one();
                }
            });
        }
        Err(e) => eprintln!("{program}: cannot listen for SIGHUP: {e}"),
    }
    reload
}

/// The next SIGTERM or Ctrl-C.
async fn next(term: &mut Option<Signal>) {
    match term {
        Some(term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
