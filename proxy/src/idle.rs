//! Closing client connections left idle. Each worker thread lists its
//! HTTP client connections, and one sweeper task per thread walks the
//! list once per `client_idle_timeout` (only while it holds any): a
//! connection that started no request since the last walk is told to
//! close. A connection costs an insert and a removal, a request one store,
//! and neither has a timer of its own: a timer per connection, polled
//! with its connection at every wake-up, cost 400 instructions a request.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Waker;
use std::time::Duration;

use slab::Slab;

/// What a connection and its thread's sweeper share.
#[derive(Default)]
pub(crate) struct Activity {
    /// A request started since the last walk.
    busy: AtomicBool,
    /// No request for a whole period: the connection should close.
    idle: AtomicBool,
}

impl Activity {
    /// A request starts.
    pub(crate) fn request(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }
}

/// A connection's shared state, as the sweeper sees it.
type Entry = (Arc<dyn AsRef<Activity> + Send + Sync>, Waker);

#[derive(Default)]
struct Watched {
    connections: Slab<Entry>,
    /// A sweeper task runs on this thread.
    sweeping: bool,
}

thread_local! {
    static WATCHED: RefCell<Watched> = RefCell::default();
}

/// Watches a connection (its state, and the waker of the task that polls
/// it) until the guard drops; nothing when `period` is zero. Call it from
/// the task that serves the connection, on a runtime that never moves
/// tasks between threads.
pub(crate) fn watch(
    connection: Arc<dyn AsRef<Activity> + Send + Sync>,
    waker: Waker,
    period: Duration,
) -> Option<Watch> {
    if period.is_zero() {
        return None;
    }
    WATCHED
        .try_with(|watched| {
            let mut watched = watched.borrow_mut();
            let key = watched.connections.insert((connection.clone(), waker));
            if !watched.sweeping {
                watched.sweeping = true;
                tokio::spawn(sweep(period));
            }
            Watch { key, connection }
        })
        .ok()
}

/// Removes its connection from the list when dropped.
pub(crate) struct Watch {
    key: usize,
    connection: Arc<dyn AsRef<Activity> + Send + Sync>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = WATCHED.try_with(|watched| {
            let mut watched = watched.borrow_mut();
            // The sweeper may have removed it (and the key gone to
            // another connection since).
            let ours = watched
                .connections
                .get(self.key)
                .is_some_and(|(c, _)| Arc::ptr_eq(c, &self.connection));
            if ours {
                watched.connections.remove(self.key);
            }
        });
    }
}

/// Walks this thread's list once a `period` until it is empty.
async fn sweep(period: Duration) {
    /// Lets the next connection start a sweeper, however this one ends.
    struct Sweeping;
    impl Drop for Sweeping {
        fn drop(&mut self) {
            let _ = WATCHED.try_with(|watched| watched.borrow_mut().sweeping = false);
        }
    }
    let _sweeping = Sweeping;
    loop {
        tokio::time::sleep(period).await;
        let empty = WATCHED.try_with(|watched| {
            let mut watched = watched.borrow_mut();
            watched.connections.retain(|_, (connection, waker)| {
                let activity = (**connection).as_ref();
                if activity.busy.swap(false, Ordering::Relaxed) {
                    return true;
                }
                activity.idle.store(true, Ordering::Relaxed);
                waker.wake_by_ref();
                false
            });
            watched.connections.is_empty()
        });
        if empty.unwrap_or(true) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    struct Conn(Activity, AtomicUsize);

    impl AsRef<Activity> for Conn {
        fn as_ref(&self) -> &Activity {
            &self.0
        }
    }

    struct Wakes(Arc<Conn>);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn watched(period: Duration) -> (Arc<Conn>, Option<Watch>) {
        let conn = Arc::new(Conn(Activity::default(), AtomicUsize::new(0)));
        let waker = Waker::from(Arc::new(Wakes(conn.clone())));
        let watch = watch(conn.clone(), waker, period);
        (conn, watch)
    }

    /// A period passes (the sweeper runs on this test's paused clock).
    async fn period() {
        tokio::time::sleep(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_requests_for_a_whole_period_is_told_to_close() {
        let (quiet, _w1) = watched(Duration::from_secs(10));
        let (active, _w2) = watched(Duration::from_secs(10));
        active.0.request();
        period().await;
        assert!(quiet.0.is_idle());
        assert_eq!(quiet.1.load(Ordering::SeqCst), 1, "its task was woken");
        assert!(!active.0.is_idle(), "it started a request in the period");
        active.0.request();
        period().await;
        assert!(!active.0.is_idle());
        period().await;
        assert!(active.0.is_idle(), "no request in the last period");
        assert_eq!(quiet.1.load(Ordering::SeqCst), 1, "told once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_connection_leaves_the_list_and_the_sweeper_stops() {
        let (_conn, watch) = watched(Duration::from_secs(10));
        let (_other, other) = watched(Duration::from_secs(10));
        assert_eq!(WATCHED.with(|w| w.borrow().connections.len()), 2);
        drop(watch);
        assert_eq!(WATCHED.with(|w| w.borrow().connections.len()), 1);
        drop(other);
        period().await;
        assert!(
            !WATCHED.with(|w| w.borrow().sweeping),
            "nothing left to watch"
        );
        let (_none, nothing) = watched(Duration::ZERO);
        assert!(nothing.is_none(), "a zero period watches nothing");
    }
}
