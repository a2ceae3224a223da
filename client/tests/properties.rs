//! Property tests: merge is a join (commutative, associative, idempotent);
//! replicas that receive the same changes in any order, with any duplication,
//! interleaved with their own edits, converge; encryption round-trips and
//! any flipped bit of ciphertext, nonce or associated data is detected.

use std::time::Duration;

use lockstep_client::{
    crypto::{AccountKey, Binding},
    record::{ChangePayload, Field, RecordState, Stamp},
    store::{Account, Incoming, Store},
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

fn stamp() -> impl Strategy<Value = Stamp> {
    (0u64..12, prop::sample::select(vec!["a", "b", "c"])).prop_map(|(hlc, device)| Stamp { hlc, device: device.into() })
}

fn state() -> impl Strategy<Value = RecordState> {
    let field = (stamp(), prop_oneof![Just(Value::Null), (0i64..4).prop_map(|n| json!(n))])
        .prop_map(|(stamp, value)| Field { value, stamp });
    (prop::collection::btree_map(prop::sample::select(vec!["x", "y", "z"]), field, 0..4), prop::option::of(stamp()))
        .prop_map(|(fields, deleted)| RecordState {
            fields: fields.into_iter().map(|(name, field)| (name.to_string(), field)).collect(),
            deleted,
        })
}

fn join(a: &RecordState, b: &RecordState) -> RecordState {
    let mut merged = a.clone();
    merged.merge(b);
    merged
}

proptest! {
    #[test]
    fn merge_is_a_join(a in state(), b in state(), c in state()) {
        prop_assert_eq!(join(&a, &b), join(&b, &a));
        prop_assert_eq!(join(&join(&a, &b), &c), join(&a, &join(&b, &c)));
        prop_assert_eq!(join(&a, &a), a.clone());
        let ab = join(&a, &b);
        prop_assert_eq!(join(&ab, &b), ab.clone(), "absorbs what it already holds");
        prop_assert_eq!(ab.is_deleted(), join(&b, &a).is_deleted());
    }

    #[test]
    fn encryption_round_trips_and_detects_any_flip(
        plaintext in prop::collection::vec(any::<u8>(), 0..512),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        part in 0usize..5,
    ) {
        let key = AccountKey::generate();
        let binding = Binding { user_id: "user-1", record_id: "record-1", collection: "notes", op: 1, key_epoch: 3 };
        let (nonce, ciphertext) = key.seal(&binding, &plaintext);
        let opened = key.open(&binding, &nonce, &ciphertext).unwrap();
        prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        let flipped = |bytes: &[u8]| {
            let mut bytes = bytes.to_vec();
            let at = flip.index(bytes.len());
            bytes[at] ^= 1 << bit;
            bytes
        };
        let text = |s: &str| String::from_utf8_lossy(&flipped(s.as_bytes())).into_owned();
        let result = match part {
            0 => key.open(&binding, &nonce, &flipped(&ciphertext)),
            1 => key.open(&binding, &flipped(&nonce), &ciphertext),
            2 => key.open(&Binding { user_id: &text("user-1"), ..binding }, &nonce, &ciphertext),
            3 => key.open(&Binding { record_id: &text("record-1"), ..binding }, &nonce, &ciphertext),
            _ => key.open(&Binding { collection: &text("notes"), ..binding }, &nonce, &ciphertext),
        };
        prop_assert!(result.is_err());
    }
}

#[derive(Debug, Clone)]
enum Step {
    Put {
        replica: usize,
        record: usize,
        field: usize,
        value: i64,
    },
    Delete {
        replica: usize,
        record: usize,
    },
    /// Deliver the change at this index (modulo what was published) to a replica.
    Deliver {
        replica: usize,
        change: prop::sample::Index,
    },
}

fn step(replicas: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..replicas, 0usize..3, 0usize..3, 0i64..100)
            .prop_map(|(replica, record, field, value)| Step::Put { replica, record, field, value }),
        1 => (0..replicas, 0usize..3).prop_map(|(replica, record)| Step::Delete { replica, record }),
        4 => (0..replicas, any::<prop::sample::Index>()).prop_map(|(replica, change)| Step::Deliver { replica, change }),
    ]
}

struct Replica {
    store: Store,
    _dir: tempfile::TempDir,
    next_offset: i64,
}

fn replica(index: usize) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("client.db"), Duration::from_secs(3600)).unwrap();
    store
        .save_account(&Account {
            server: "http://127.0.0.1:1".into(),
            user_id: "user".into(),
            device_id: format!("device-{index}"),
            device_name: format!("replica {index}"),
            token: Zeroizing::new("token".into()),
            key: AccountKey::generate(),
            key_epoch: 1,
            epoch_keys: Default::default(),
        })
        .unwrap();
    Replica { store, _dir: dir, next_offset: 0 }
}

fn deliver(replica: &mut Replica, change: &(String, ChangePayload)) {
    // Offsets only need to grow per replica here; the cursor is not under test.
    let incoming = Incoming {
        offset: replica.next_offset,
        record_id: change.0.clone(),
        collection: "items".into(),
        origin_device_id: "x".into(),
        content: Ok(change.1.clone()),
        sealed: None,
    };
    replica.next_offset += 1;
    replica.store.apply(&[incoming]).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_whatever_the_order_and_duplication(
        steps in prop::collection::vec(step(3), 1..40),
        order in any::<prop::sample::Index>(),
        duplicates in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut replicas: Vec<Replica> = (0..3).map(replica).collect();
        let mut published: Vec<(String, ChangePayload)> = Vec::new();
        for step in &steps {
            match step {
                Step::Put { replica, record, field, value } => {
                    let mut fields = Map::new();
                    fields.insert(["x", "y", "z"][*field].into(), json!(value));
                    let id = format!("record-{record}");
                    replicas[*replica].store.put("items", Some(&id), &fields).unwrap();
                }
                Step::Delete { replica, record } => {
                    let _ = replicas[*replica].store.delete(&format!("record-{record}"));
                }
                Step::Deliver { replica, change } => {
                    if !published.is_empty() {
                        let change = published[change.index(published.len())].clone();
                        deliver(&mut replicas[*replica], &change);
                    }
                }
            }
            // What a replica queued is published (pushed to the log).
            for replica in &mut replicas {
                let entries = replica.store.outbox_batch(100).unwrap();
                let seqs: Vec<i64> = entries.iter().map(|entry| entry.seq).collect();
                published.extend(entries.into_iter().map(|entry| (entry.record_id, entry.payload)));
                replica.store.outbox_done(&seqs).unwrap();
            }
        }
        // Finally every replica receives every change: rotated, with duplicates.
        for (index, replica) in replicas.iter_mut().enumerate() {
            let n = published.len();
            if n == 0 {
                continue;
            }
            let start = (order.index(n) + index) % n;
            for i in 0..n {
                deliver(replica, &published[(start + i * (index + 1)) % n]);
            }
            for i in 0..n {
                deliver(replica, &published[(start + i) % n]);
            }
            for duplicate in &duplicates {
                deliver(replica, &published[duplicate.index(n)]);
            }
        }
        let digests: Vec<String> = replicas.iter().map(|replica| replica.store.digest().unwrap()).collect();
        prop_assert!(digests.windows(2).all(|pair| pair[0] == pair[1]), "{:?}", digests);
        // And the state is the join of every published change.
        let mut expected: std::collections::BTreeMap<String, RecordState> = Default::default();
        for (id, payload) in &published {
            expected.entry(id.clone()).or_default().merge(&payload.state);
        }
        for (id, state) in expected {
            let held = replicas[0].store.get(&id).unwrap().unwrap();
            prop_assert_eq!(held.state.visible(), state.visible(), "{}", id);
        }
    }
}
