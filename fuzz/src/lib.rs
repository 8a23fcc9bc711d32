//! What Signpost's fuzz harnesses share: how long a run lasts and the
//! mutations of valid inputs. The harnesses themselves are tests in the
//! crates whose parsers they drive (service files and configuration in
//! `core`, API bodies in `agent`, DNS messages in `dns`, HTTP requests in
//! `proxy`, agents' messages in `control-plane`), on the stable toolchain:
//! each starts from valid seeds and feeds the real code mutations of
//! them, checking that nothing panics and that what is accepted is sound.
//!
//! A run is a [`Dose`]: by default a short, fixed one (what CI runs);
//! `SIGNPOST_FUZZ_SECONDS=600` makes each harness run for ten minutes
//! (`bench/fuzz.sh`), `SIGNPOST_FUZZ_ITERATIONS` sets a count and
//! `SIGNPOST_FUZZ_SEED` another seed. A failure names its seed and
//! iteration, so that it can be replayed and kept as a regression test;
//! an iteration that hangs has its input printed by a watchdog.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// An iteration that takes longer than this is a hang: the watchdog
/// prints its input and ends the process.
const HANG: Duration = Duration::from_secs(20);

/// How long a harness runs, and its random source.
pub struct Dose {
    rng: StdRng,
    seed: u64,
    done: usize,
    iterations: usize,
    until: Option<Instant>,
    /// The current iteration's start and input, for the watchdog.
    current: Arc<Mutex<(Instant, usize, Vec<u8>)>>,
}

impl Dose {
    /// The dose from the environment; `default_iterations` when it names
    /// none (each harness picks what runs in a few seconds).
    pub fn from_env(default_iterations: usize) -> Dose {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let seed = var("SIGNPOST_FUZZ_SEED").unwrap_or(0x5157_0057);
        let until = var("SIGNPOST_FUZZ_SECONDS").map(|s| Instant::now() + Duration::from_secs(s));
        let iterations = match (var("SIGNPOST_FUZZ_ITERATIONS"), until) {
            (Some(n), _) => usize::try_from(n).unwrap_or(usize::MAX),
            (None, Some(_)) => usize::MAX,
            (None, None) => default_iterations,
        };
        let current = Arc::new(Mutex::new((Instant::now(), 0, Vec::new())));
        let watched = Arc::downgrade(&current);
        std::thread::spawn(move || {
            while let Some(current) = watched.upgrade() {
                let stuck = {
                    let c = current.lock().unwrap_or_else(PoisonError::into_inner);
                    (c.0.elapsed() > HANG).then(|| (c.1, c.2.clone()))
                };
                if let Some((iteration, input)) = stuck {
                    eprintln!(
                        "SIGNPOST_FUZZ_SEED={seed} iteration {iteration} has run for over {HANG:?} on this input:\n{:?}",
                        String::from_utf8_lossy(&input)
                    );
                    std::process::exit(101);
                }
                drop(current);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Dose {
            rng: StdRng::seed_from_u64(seed),
            seed,
            done: 0,
            iterations,
            until,
            current,
        }
    }

    /// Whether to run another iteration; counts it.
    pub fn another(&mut self) -> bool {
        let more =
            self.done < self.iterations && self.until.is_none_or(|until| Instant::now() < until);
        if more {
            self.done += 1;
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            *current = (Instant::now(), self.done, Vec::new());
        }
        more
    }

    /// The iterations run so far (the current one included).
    pub fn done(&self) -> usize {
        self.done
    }

    /// Where the current iteration is, for a failure message.
    pub fn at(&self) -> String {
        format!("SIGNPOST_FUZZ_SEED={} iteration {}", self.seed, self.done)
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// One of `seeds`, mutated (and kept for the watchdog).
    pub fn mutation(&mut self, seeds: &[Vec<u8>]) -> Vec<u8> {
        let pick = self.rng.random_range(0..seeds.len());
        let input = mutate(&mut self.rng, &seeds[pick], seeds);
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .2 = input.clone();
        input
    }
}

impl Drop for Dose {
    fn drop(&mut self) {
        // What bench/fuzz.sh records (shown with --nocapture).
        if !std::thread::panicking() {
            eprintln!(
                "fuzz: {} iterations, SIGNPOST_FUZZ_SEED={}",
                self.done, self.seed
            );
        }
    }
}

/// Text that breaks parsers: numbers and durations at and past their
/// limits, odd Unicode, control characters, YAML and JSON syntax.
const TOKENS: &[&str] = &[
    "0",
    "-1",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "NaN",
    "3000000000000000h",
    "2562047h47m16s",
    "9223372036854775807ns",
    "-5s",
    "0.0000001ms",
    "\u{0}",
    "\n",
    "\r\n",
    "\t",
    "\u{1b}[31m",
    "\u{202e}",
    "é",
    "😀",
    "null",
    "true",
    "[]",
    "{}",
    "\"",
    "'",
    ":",
    "- ",
    "&a",
    "*a",
    "!!binary",
    "<<: *a",
    "%0A",
    "../",
    "//",
    "\\",
    "127.0.0.1",
    "::1",
    "0.0.0.0",
    "255.255.255.255",
    "65535",
    "65536",
    "%",
    "{{",
    "}}",
    ",",
    "#",
];

/// A mutation of `seed`: bits flipped, bytes overwritten, cut, grown,
/// a token spliced in, a piece of another seed spliced in, or noise.
pub fn mutate(rng: &mut StdRng, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut p = seed.to_vec();
    let at = |rng: &mut StdRng, p: &[u8]| rng.random_range(0..=p.len());
    // Several mutations in a row now and then.
    for _ in 0..rng.random_range(1..=3) {
        match rng.random_range(0..8) {
            0 if !p.is_empty() => {
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..p.len());
                    p[i] ^= 1 << rng.random_range(0..8);
                }
            }
            1 if !p.is_empty() => {
                for _ in 0..rng.random_range(1..6) {
                    let i = rng.random_range(0..p.len());
                    p[i] = rng.random();
                }
            }
            2 => {
                let i = at(rng, &p);
                p.truncate(i);
            }
            3 => {
                let i = at(rng, &p);
                let n = rng.random_range(1..64);
                let noise: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                p.splice(i..i, noise);
            }
            4 | 5 => {
                // A token in place of a word (or anywhere).
                let token = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
                let start = at(rng, &p);
                let end = p[start..]
                    .iter()
                    .position(|b| !b.is_ascii_alphanumeric())
                    .map_or(p.len(), |n| start + n);
                p.splice(start..end, token.iter().copied());
            }
            6 if !others.is_empty() => {
                let other = &others[rng.random_range(0..others.len())];
                let from = rng.random_range(0..=other.len());
                let to = rng.random_range(from..=other.len());
                let i = at(rng, &p);
                p.splice(i..i, other[from..to].iter().copied());
            }
            7 => {
                // A piece repeated (deep nesting, long lists).
                let from = at(rng, &p);
                let to = rng.random_range(from..=p.len().min(from + 32));
                let piece = p[from..to].to_vec();
                for _ in 0..rng.random_range(1..50) {
                    p.splice(from..from, piece.iter().copied());
                }
            }
            _ => {
                p = (0..rng.random_range(0..600))
                    .map(|_| rng.random())
                    .collect();
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dose_is_reproducible_and_mutations_vary() {
        let seeds = vec![b"service:\n  name: web\n  port: 80\n".to_vec()];
        let run = || {
            let mut dose = Dose::from_env(50);
            let mut out = Vec::new();
            while dose.another() {
                out.push(dose.mutation(&seeds));
            }
            out
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b, "the same seed gives the same run");
        let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().collect();
        assert!(distinct.len() > 40, "{} distinct of 50", distinct.len());
    }
}
