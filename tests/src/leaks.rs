//! Whether bytes someone other than the user's devices can read (trace
//! spans, event records) hold anything of a pushed change: its record id,
//! its change id, or any 12-byte window of its ciphertext or nonce.
//!
//! A scan only means something if the needles cannot match by chance:
//! record ids like `r0` occur in any text, so [`content_in`] refuses changes
//! whose record id is shorter than [`MIN_RECORD_ID_CHARS`]; tests push
//! [`traceable_changes`] instead.

use lockstep_proto::v1::Change;

/// Record ids shorter than this may occur in any text by chance.
pub const MIN_RECORD_ID_CHARS: usize = 16;
/// Ciphertext and nonce are looked for as every window of this many bytes.
pub const WINDOW_BYTES: usize = 12;

/// `count` changes of `size` ciphertext bytes whose record ids are unique
/// and long enough to be found if they leak.
pub fn traceable_changes(count: usize, size: usize) -> Vec<Change> {
    (0..count).map(|_| crate::device::change(&format!("record-{}", uuid::Uuid::new_v4().simple()), size)).collect()
}

/// What of `change` occurs in `haystack` ("record id", "change id",
/// "ciphertext", "nonce"); empty when nothing does.
///
/// # Panics
/// If the change's record id is too short to be looked for (the scan could not fail).
pub fn content_in(haystack: &[u8], change: &Change) -> Vec<&'static str> {
    assert!(
        change.record_id.len() >= MIN_RECORD_ID_CHARS,
        "record id {:?} is too short to look for (at least {MIN_RECORD_ID_CHARS} characters): use traceable_changes",
        change.record_id
    );
    let mut found = Vec::new();
    if contains(haystack, change.record_id.as_bytes()) {
        found.push("record id");
    }
    if contains(haystack, change.change_id.as_bytes()) {
        found.push("change id");
    }
    for (name, secret) in [("ciphertext", &change.ciphertext), ("nonce", &change.nonce)] {
        if secret.windows(WINDOW_BYTES).any(|window| contains(haystack, window)) {
            found.push(name);
        }
    }
    // Text formats (JSON spans) may carry bytes as hex.
    for (name, secret) in [("ciphertext", &change.ciphertext), ("nonce", &change.nonce)] {
        let hex = hex::encode(secret);
        if !found.contains(&name) && hex.as_bytes().windows(2 * WINDOW_BYTES).any(|window| contains(haystack, window)) {
            found.push(name);
        }
    }
    found
}

/// Whether `needle` (not empty) occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_haystack_holds_nothing() {
        let change = &traceable_changes(1, 64)[0];
        let spans = br#"{"name":"lockstep.push","attributes":{"messaging.batch.message_count":"3"}}"#;
        assert!(content_in(spans, change).is_empty());
    }

    #[test]
    fn each_kind_of_content_is_found() {
        let change = &traceable_changes(1, 64)[0];
        let with = |inner: &[u8]| [b"{\"x\":\"".as_slice(), inner, b"\"}"].concat();
        assert_eq!(content_in(&with(change.record_id.as_bytes()), change), ["record id"]);
        assert_eq!(content_in(&with(change.change_id.as_bytes()), change), ["change id"]);
        assert_eq!(content_in(&with(&change.ciphertext[20..32]), change), ["ciphertext"]);
        assert_eq!(content_in(&with(hex::encode(&change.ciphertext[3..15]).as_bytes()), change), ["ciphertext"]);
        assert_eq!(content_in(&with(&change.nonce[..12]), change), ["nonce"]);
        // Eleven bytes are not a window: random data would match them by chance too often.
        assert!(content_in(&with(&change.ciphertext[..11]), change).is_empty());
    }

    #[test]
    #[should_panic(expected = "too short to look for")]
    fn short_record_ids_are_refused_not_excused() {
        // The old traces check: `r0` is in almost any text, so it was excused, so it could not fail.
        let change = crate::device::change("r0", 64);
        content_in(b"r0", &change);
    }
}
