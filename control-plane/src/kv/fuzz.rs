//! Fuzz harnesses (see `signpost-fuzz`) for what clients send the KV
//! store: key names and `/v1/txn` bodies, mutated from valid seeds.
//! A refused input says what is wrong and stores nothing; an accepted
//! one leaves only well-formed keys in the store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the finding

use std::sync::Arc;

use signpost_core::kv::{MAX_KEY, check_key, parse_txn};
use signpost_fuzz::Dose;

use super::Kv;
use super::file::FileBackend;

fn sound(key: &str) -> bool {
    key.len() <= MAX_KEY
        && !key.starts_with('/')
        && !key.chars().any(char::is_control)
        && key.split('/').enumerate().all(|(i, s)| {
            s != "." && s != ".." && (!s.is_empty() || i == key.split('/').count() - 1)
        })
}

#[test]
fn key_names_are_accepted_only_when_sound() {
    let seeds: Vec<Vec<u8>> = [
        "config/web/timeout",
        "a",
        "dir/",
        "ünï/ç",
        "a.b/c..d",
        "x/y/z/",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut dose = Dose::from_env(50_000);
    while dose.another() {
        let bytes = dose.mutation(&seeds);
        let Ok(key) = std::str::from_utf8(&bytes) else {
            continue;
        };
        match check_key(key, false) {
            Ok(()) => assert!(sound(key), "{}: accepted {key:?}", dose.at()),
            Err(e) => assert!(
                !e.to_string().is_empty() && !sound(key) || key.is_empty(),
                "{}: refused {key:?}: {e}",
                dose.at()
            ),
        }
    }
}

#[tokio::test]
async fn transactions_store_nothing_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let kv = Kv::new(backend.mirror(), Arc::new(backend));
    let seeds: Vec<Vec<u8>> = [
        r#"[{"KV": {"Verb": "set", "Key": "a/b", "Value": "aGk=", "Flags": 1}}]"#,
        r#"[{"KV": {"Verb": "cas", "Key": "a/c", "Index": 0}}, {"KV": {"Verb": "get-tree", "Key": "a/"}}]"#,
        r#"[{"KV": {"Verb": "delete-tree", "Key": "a/"}}, {"KV": {"Verb": "check-not-exists", "Key": "a/b"}}]"#,
        r#"[{"kv": {"verb": "check-index", "key": "a/b", "index": 3}}, {"KV": {"Verb": "delete-cas", "Key": "a/b", "Index": 4}}]"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut dose = Dose::from_env(5_000);
    while dose.another() {
        let bytes = dose.mutation(&seeds);
        let before = kv.mirror().applied();
        match parse_txn(&bytes) {
            Err(e) => {
                assert!(!e.is_empty(), "{}: an error without a message", dose.at());
                assert_eq!(
                    kv.mirror().applied(),
                    before,
                    "{}: a refused body stored something",
                    dose.at()
                );
            }
            Ok(ops) => {
                let (outcome, index) = kv.txn(&ops).await.unwrap();
                if outcome.is_err() {
                    assert_eq!(index, None, "{}: a failed transaction committed", dose.at());
                    assert_eq!(kv.mirror().applied(), before);
                }
            }
        }
        let (_, keys) = kv.mirror().keys("");
        for key in keys {
            assert!(sound(&key), "{}: stored an unsound key {key:?}", dose.at());
        }
    }
}
