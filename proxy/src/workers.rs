//! The threads connections run on: one current-thread runtime each. A
//! connection stays on one thread for its whole life, with the pooled
//! connections to instances that this thread made, so a request and its
//! forwarding never cross threads (on a work-stealing runtime the wake-ups
//! between the client's and the instance's connection cost more CPU than
//! the proxying itself).

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::ClientStream;

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
        self.get(current())
    }

    /// Worker `n`'s.
    pub(crate) fn get(&self, n: usize) -> &T {
        &self.0[n % self.0.len()].0
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

/// A connection counted on the worker that serves it, until dropped.
struct Serving {
    counts: Arc<PerWorker<AtomicUsize>>,
    worker: usize,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.counts.get(self.worker).fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) struct Workers {
    handles: Vec<Handle>,
    /// How many connections each worker serves.
    serving: Arc<PerWorker<AtomicUsize>>,
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
            serving: Arc::new(PerWorker::new(handles.len(), AtomicUsize::default)),
            handles,
            threads: std::sync::Mutex::new(threads),
            stop,
        })
    }

    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `serve` on a connection accepted on this thread: here, unless
    /// another worker serves at least two fewer connections (HAProxy hands
    /// its accepted connections to the least loaded thread too). Each
    /// worker accepts on its own socket and the kernel spreads new
    /// connections over them by address, which can leave long connections
    /// unevenly spread: with 32 kept-alive client connections, one thread
    /// did up to 61 % of the work when connections moved only to a worker
    /// serving half as many. Accepted connections are not registered
    /// with a reactor yet (`accept`): one handed over is registered with
    /// its new thread's, so its I/O never crosses threads.
    pub(crate) fn spawn_connection<S, F>(
        &self,
        tracker: &TaskTracker,
        stream: ClientStream,
        serve: S,
    ) where
        S: FnOnce(ClientStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        debug_assert!(!stream.is_registered(), "a connection as accepted");
        let here = current();
        let local = self.serving.get(here).load(Ordering::Relaxed);
        let mut least = (here, local);
        for (n, serving) in self.serving.iter().enumerate() {
            let count = serving.load(Ordering::Relaxed);
            if count < least.1 {
                least = (n, count);
            }
        }
        // A hand-over costs a wake-up of the other thread: only worth it
        // when one more connection here would leave this thread two ahead.
        let worker = if least.1 + 1 < local { least.0 } else { here };
        self.serving.get(worker).fetch_add(1, Ordering::Relaxed);
        let serving = Serving {
            counts: self.serving.clone(),
            worker,
        };
        // Boxed: tokio allocates a task 128-byte aligned, and an
        // allocator serves a small aligned block from its free lists, where
        // a task holding the connection's whole state (kilobytes) takes its
        // slow path.
        let task = Box::pin(async move {
            let _serving = serving;
            serve(stream).await;
        });
        if worker == here {
            tracker.spawn(task);
        } else {
            self.spawn_on(worker, tracker.track_future(task));
        }
    }

    /// Runs `task` on worker `n`.
    pub(crate) fn spawn_on<F>(&self, n: usize, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handles[n % self.handles.len()].spawn(task);
    }

    /// How many connections each worker serves.
    #[cfg(test)]
    pub(crate) fn serving(&self) -> Vec<usize> {
        self.serving
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops the threads; tasks still running on them are dropped.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *crate::lock(&self.threads));
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Connections accepted on one thread are spread over both, each
    /// served by the thread it runs on (registered with that thread's
    /// reactor: it answers while the other thread is blocked), and
    /// counted until it ends.
    #[tokio::test]
    async fn connections_accepted_on_one_thread_are_spread() {
        let workers = Arc::new(Workers::start(2).unwrap());
        let tracker = TaskTracker::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let release = CancellationToken::new();
        let (ran, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let (accepted, all_accepted) = tokio::sync::oneshot::channel();
        let (w, t, r) = (workers.clone(), tracker.clone(), release.clone());
        // Every connection is accepted on worker 0.
        workers.spawn_on(0, async move {
            let listener =
                crate::accept::Listener::new(listener, crate::accept::Acks::Quick).unwrap();
            for _ in 0..10 {
                let (stream, _) = listener.accept().await.unwrap();
                let (r, ran) = (r.clone(), ran.clone());
                w.spawn_connection(&t, stream, move |mut stream| async move {
                    ran.send(current()).unwrap();
                    // Waits for the client (registered here), answers
                    // with this thread's number.
                    let mut byte = [0];
                    stream.read_exact(&mut byte).await.unwrap();
                    stream.write_all(&[current() as u8]).await.unwrap();
                    r.cancelled().await;
                    drop(stream);
                });
            }
            accepted.send(()).unwrap();
        });
        all_accepted.await.unwrap();
        let mut ran_on = [0_usize; 2];
        for _ in 0..10 {
            ran_on[runs.recv().await.unwrap()] += 1;
        }
        assert!(
            ran_on[1] > 0 && ran_on[0].abs_diff(ran_on[1]) <= 2,
            "{ran_on:?}"
        );
        assert_eq!(workers.serving(), ran_on.to_vec());

        // Worker 0's thread blocks: the connections on worker 1 answer
        // all the same, then worker 0's once it is released.
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (blocked, worker_0_blocked) = tokio::sync::oneshot::channel();
        let b = barrier.clone();
        workers.spawn_on(0, async move {
            blocked.send(()).unwrap();
            b.wait();
        });
        worker_0_blocked.await.unwrap();
        let (answer, mut answers) = tokio::sync::mpsc::unbounded_channel();
        for mut client in clients {
            let answer = answer.clone();
            tokio::spawn(async move {
                client.write_all(b"?").await.unwrap();
                let mut worker = [0];
                client.read_exact(&mut worker).await.unwrap();
                answer.send(usize::from(worker[0])).unwrap();
                client
            });
        }
        let wait = std::time::Duration::from_secs(10);
        for _ in 0..ran_on[1] {
            let worker = tokio::time::timeout(wait, answers.recv()).await;
            assert_eq!(worker, Ok(Some(1)), "only worker 1 runs");
        }
        barrier.wait();
        for _ in 0..ran_on[0] {
            let worker = tokio::time::timeout(wait, answers.recv()).await;
            assert_eq!(worker, Ok(Some(0)));
        }

        release.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(workers.serving(), vec![0, 0]);
        workers.stop().await;
    }
}
