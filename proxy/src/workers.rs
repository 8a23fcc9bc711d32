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
fn current() -> usize {
    WORKER.with(Cell::get)
}

/// One `T` per worker thread, each alone on its cache lines (128 bytes:
/// two lines, as CPUs fetch them in pairs), so that what one worker
/// writes on every request never evicts what another one reads. Threads
/// that are not workers use the first.
pub(crate) struct PerWorker<T>(Box<[Padded<T>]>);

#[repr(align(128))]
struct Padded<T>(T);

impl<T> PerWorker<T> {
    /// `count` items (at least one), each from `make`.
    pub(crate) fn new(count: usize, mut make: impl FnMut() -> T) -> PerWorker<T> {
        PerWorker((0..count.max(1)).map(|_| Padded(make())).collect())
    }

    /// The current worker's.
    pub(crate) fn local(&self) -> &T {
        &self.0[current() % self.0.len()].0
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|padded| &padded.0)
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for PerWorker<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
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
