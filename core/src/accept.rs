//! What every accept loop (the proxy's listeners, DNS over TCP, the HTTP
//! APIs) does when accepting fails, mostly because the process is out of
//! file descriptors: wait instead of spinning, and say so once in a while
//! instead of on every attempt.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Failures are logged at most this often.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Failed accepts in a row: each waits twice as long as the last, from
/// 10 ms to 1 s, and they are logged once a period with their count
/// rather than each.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    in_a_row: u32,
    unlogged: u32,
    logged_at: Option<Instant>,
}

impl AcceptBackoff {
    /// Notes a failure; how long to wait before accepting again.
    pub fn failed(&mut self, addr: SocketAddr, error: &std::io::Error) -> Duration {
        self.in_a_row = self.in_a_row.saturating_add(1);
        self.unlogged = self.unlogged.saturating_add(1);
        if self.logged_at.is_none_or(|at| at.elapsed() >= LOG_PERIOD) {
            tracing::warn!(%addr, %error, failures = self.unlogged, "cannot accept connections; backing off");
            self.unlogged = 0;
            self.logged_at = Some(Instant::now());
        }
        Duration::from_millis(10)
            .saturating_mul(1 << self.in_a_row.min(7))
            .min(Duration::from_secs(1))
    }

    /// Accepting works again.
    pub fn recovered(&mut self, addr: SocketAddr) {
        if self.in_a_row > 0 {
            tracing::info!(%addr, failures = self.in_a_row, "accepting connections again");
            *self = AcceptBackoff::default();
        }
    }
}

/// Something refused over and over (connections over a cap, anonymous
/// requests without a token): logged once a period with how many there
/// were since, so a flood cannot flood the log.
#[derive(Debug, Default)]
pub struct Tally {
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl Tally {
    /// Counts one; `Some(count)` when it is time to log `count` of them
    /// (this one included).
    pub fn note(&mut self) -> Option<u64> {
        self.unlogged = self.unlogged.saturating_add(1);
        if self.logged_at.is_some_and(|at| at.elapsed() < LOG_PERIOD) {
            return None;
        }
        self.logged_at = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_accepts_back_off_to_a_second_and_start_over_once_one_works() {
        let addr = SocketAddr::from(([127, 77, 0, 9], 80));
        let emfile = std::io::Error::from_raw_os_error(24);
        let mut failing = AcceptBackoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| failing.failed(addr, &emfile)).collect();
        assert_eq!(waits[0], Duration::from_millis(20));
        assert_eq!(waits[1], Duration::from_millis(40));
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(waits[9], Duration::from_secs(1));
        assert_eq!(failing.unlogged, 9, "logged once, the rest counted");
        failing.recovered(addr);
        assert_eq!(failing.failed(addr, &emfile), Duration::from_millis(20));
    }

    #[test]
    fn a_tally_logs_the_first_and_then_counts() {
        let mut tally = Tally::default();
        assert_eq!(tally.note(), Some(1));
        assert_eq!(tally.note(), None);
        assert_eq!(tally.note(), None);
        tally.logged_at = Some(Instant::now() - LOG_PERIOD);
        assert_eq!(tally.note(), Some(3), "the two unlogged and this one");
    }
}
