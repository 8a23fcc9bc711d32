//! How a daemon is asked to stop.

use tokio::signal::unix::{Signal, SignalKind};
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
