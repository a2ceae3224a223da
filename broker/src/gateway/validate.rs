//! Input checks for pushed changes. A batch with any malformed change is
//! rejected whole, before anything is written, with a message that names the
//! change and the field.

use lockstep_proto::v1::{Change, Op};

use crate::{error::ApiError, settings::LimitsSettings};

pub const MAX_CHANGE_ID_CHARS: usize = 64;
pub const MAX_RECORD_ID_CHARS: usize = 128;
pub const MAX_COLLECTION_CHARS: usize = 64;
pub const NONCE_BYTES: std::ops::RangeInclusive<usize> = 12..=32;

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn collection_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
}

/// Checks a client-chosen identifier: present, not too long, allowed characters only.
pub fn check_id(
    field: &str,
    value: &str,
    max_chars: usize,
    allowed: fn(char) -> bool,
    what: &str,
) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is missing"));
    }
    if value.len() > max_chars {
        return Err(format!("{field} is {} characters long; at most {max_chars} are allowed", value.len()));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(format!("{field} contains {bad:?}; only {what} are allowed"));
    }
    Ok(())
}

pub fn validate_change(change: &Change, limits: &LimitsSettings) -> Result<(), String> {
    const ID_CHARS: &str = "ASCII letters, digits and . _ : -";
    check_id("change_id", &change.change_id, MAX_CHANGE_ID_CHARS, id_char, ID_CHARS)?;
    check_id("record_id", &change.record_id, MAX_RECORD_ID_CHARS, id_char, ID_CHARS)?;
    check_id(
        "collection",
        &change.collection,
        MAX_COLLECTION_CHARS,
        collection_char,
        "lowercase ASCII letters, digits and . _ -",
    )?;
    match Op::try_from(change.op) {
        Ok(Op::Upsert | Op::Delete) => {}
        _ => return Err(format!("op {} is not OP_UPSERT or OP_DELETE", change.op)),
    }
    if change.hlc == 0 {
        return Err("hlc is missing".into());
    }
    if change.hlc > i64::MAX as u64 {
        return Err(format!("hlc {} is out of range", change.hlc));
    }
    if !NONCE_BYTES.contains(&change.nonce.len()) {
        return Err(format!(
            "nonce is {} bytes; it must be {} to {} bytes",
            change.nonce.len(),
            NONCE_BYTES.start(),
            NONCE_BYTES.end()
        ));
    }
    if change.ciphertext.is_empty() {
        return Err("ciphertext is empty".into());
    }
    if change.ciphertext.len() > limits.max_ciphertext_bytes as usize {
        return Err(format!(
            "ciphertext is {} bytes; at most {} are allowed",
            change.ciphertext.len(),
            limits.max_ciphertext_bytes
        ));
    }
    Ok(())
}

pub fn validate_batch(changes: &[Change], limits: &LimitsSettings) -> Result<(), ApiError> {
    if changes.is_empty() {
        return Err(ApiError::InvalidArgument("a push needs at least one change".into()));
    }
    if changes.len() > limits.max_changes_per_push as usize {
        return Err(ApiError::InvalidArgument(format!(
            "a push may carry at most {} changes; this one has {}",
            limits.max_changes_per_push,
            changes.len()
        )));
    }
    let mut seen = std::collections::HashMap::with_capacity(changes.len());
    for (index, change) in changes.iter().enumerate() {
        validate_change(change, limits)
            .map_err(|problem| ApiError::InvalidArgument(format!("changes[{index}]: {problem}")))?;
        if let Some(first) = seen.insert(change.change_id.as_str(), index) {
            return Err(ApiError::InvalidArgument(format!(
                "changes[{index}]: change_id {} repeats changes[{first}]",
                change.change_id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Change {
        Change {
            change_id: "0192f1c2-7d3a-7c4e-8a1b-3f2e1d0c9b8a".into(),
            record_id: "rec-1".into(),
            collection: "passwords".into(),
            op: Op::Upsert as i32,
            hlc: 1 << 20,
            key_epoch: 1,
            nonce: vec![7u8; 24].into(),
            ciphertext: vec![1u8; 100].into(),
        }
    }

    fn problem(change: Change) -> String {
        validate_batch(&[change], &LimitsSettings::default()).unwrap_err().to_string()
    }

    #[test]
    fn accepts_a_well_formed_change() {
        assert!(validate_batch(&[good()], &LimitsSettings::default()).is_ok());
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        assert!(problem(Change { record_id: String::new(), ..good() }).contains("changes[0]: record_id is missing"));
        assert!(problem(Change { record_id: "x".repeat(129), ..good() }).contains("129 characters"));
        assert!(problem(Change { record_id: "a/b".into(), ..good() }).contains("'/'"));
        assert!(problem(Change { collection: "Passwords".into(), ..good() }).contains("collection contains 'P'"));
        assert!(problem(Change { op: 0, ..good() }).contains("op 0"));
        assert!(problem(Change { op: 9, ..good() }).contains("op 9"));
        assert!(problem(Change { hlc: 0, ..good() }).contains("hlc is missing"));
        assert!(problem(Change { hlc: u64::MAX, ..good() }).contains("out of range"));
        assert!(problem(Change { nonce: vec![0u8; 4].into(), ..good() }).contains("nonce is 4 bytes"));
        assert!(problem(Change { ciphertext: Default::default(), ..good() }).contains("ciphertext is empty"));
        let big = vec![0u8; 256 * 1024 + 1];
        assert!(problem(Change { ciphertext: big.into(), ..good() }).contains("at most 262144"));
    }

    #[test]
    fn batch_limits() {
        let limits = LimitsSettings { max_changes_per_push: 2, ..Default::default() };
        assert!(validate_batch(&[], &limits).unwrap_err().to_string().contains("at least one"));
        let three: Vec<Change> = (0..3).map(|index| Change { change_id: format!("c{index}"), ..good() }).collect();
        assert!(validate_batch(&three, &limits).unwrap_err().to_string().contains("at most 2 changes"));
        let twice = vec![good(), good()];
        assert!(validate_batch(&twice, &limits).unwrap_err().to_string().contains("repeats changes[0]"));
    }
}
