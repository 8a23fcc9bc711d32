//! The threads connections run on: one current-thread runtime each. A
//! connection stays on one thread for its whole life, with the pooled
//! connections to instances that this thread made, so a request and its
//! forwarding never cross threads (on a work-stealing runtime the wake-ups
//! between the client's and the instance's connection cost more CPU than
//! the proxying itself).

use std::cell::Cell;
use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// This thread's worker number (0 on threads that are not workers).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the current thread is (0 elsewhere).
pub(crate) fn current() -> usize {
    WORKER.with(Cell::get)
}

/// The current worker's own item among per-worker `items` (never empty).
pub(crate) fn local<T>(items: &[T]) -> &T {
    &items[current() % items.len()]
}

pub(crate) struct Workers {
    handles: Vec<Handle>,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads (at least one).
    pub(crate) fn start(count: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for n in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("signpost-proxy-{n}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(n));
                    runtime.block_on(stop.cancelled());
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            threads: std::sync::Mutex::new(threads),
            stop,
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task` on worker `n`.
    pub(crate) fn spawn_on<F>(&self, n: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[n % self.handles.len()].spawn(task);
    }

    /// Stops the threads; tasks still running on them are dropped.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                if thread.join().is_err() {
                    tracing::error!("a proxy thread panicked");
                }
            }
        })
        .await;
        if let Err(error) = joined {
            tracing::error!(%error, "cannot wait for the proxy threads");
        }
    }
}
