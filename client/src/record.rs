//! A record and its deterministic merge.
//!
//! A record is a map of fields; every field carries the stamp of its last
//! write: (hybrid-logical-clock time, device id). A delete is a tombstone with
//! its own stamp. Merging two states keeps, per field, the write with the
//! greater stamp (ties between equal stamps, which one device never produces
//! for two values, go to the greater value's canonical JSON), and the greater
//! tombstone. Merge is a join: commutative, associative and idempotent, so
//! replicas that have seen the same changes hold the same state, whatever the
//! order and however often each change arrived.
//!
//! Fields written on different devices both survive. A delete that races an
//! edit: the later of the tombstone and the record's latest field write wins
//! for the whole record, on every device. A later edit brings the record back
//! with all its fields, so nothing disappears silently.

use std::{cmp::Ordering, collections::BTreeMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The field that names a record's parent record (folders, lists, …): `check`
/// reports records whose parent is gone.
pub const PARENT_FIELD: &str = "parent";
/// Where `check --fix` moves orphans.
pub const UNFILED: &str = "unfiled";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: u64,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub value: Value,
    pub stamp: Stamp,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RecordState {
    #[serde(default)]
    pub fields: BTreeMap<String, Field>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Stamp>,
}

fn wins(incoming: &Field, current: &Field) -> bool {
    match incoming.stamp.cmp(&current.stamp) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => {
            let (incoming, current) = (incoming.value.to_string(), current.value.to_string());
            incoming > current
        }
    }
}

impl RecordState {
    /// Joins `other` into `self`. Returns whether `self` changed.
    pub fn merge(&mut self, other: &RecordState) -> bool {
        let mut changed = false;
        for (name, incoming) in &other.fields {
            match self.fields.get_mut(name) {
                Some(current) if !wins(incoming, current) => {}
                Some(current) => {
                    *current = incoming.clone();
                    changed = true;
                }
                None => {
                    self.fields.insert(name.clone(), incoming.clone());
                    changed = true;
                }
            }
        }
        if other.deleted > self.deleted {
            self.deleted = other.deleted.clone();
            changed = true;
        }
        changed
    }

    /// Writes `fields` with `stamp` (a local edit). A `null` value removes the field.
    pub fn set(&mut self, fields: &Map<String, Value>, stamp: &Stamp) {
        for (name, value) in fields {
            self.fields.insert(name.clone(), Field { value: value.clone(), stamp: stamp.clone() });
        }
    }

    /// Deletes the record with `stamp` (a local delete).
    pub fn delete(&mut self, stamp: &Stamp) {
        if Some(stamp) > self.deleted.as_ref() {
            self.deleted = Some(stamp.clone());
        }
    }

    /// The stamp of the latest field write.
    pub fn latest_write(&self) -> Option<&Stamp> {
        self.fields.values().map(|field| &field.stamp).max()
    }

    /// The greatest clock value anywhere in the state.
    pub fn max_hlc(&self) -> u64 {
        let fields = self.latest_write().map_or(0, |stamp| stamp.hlc);
        fields.max(self.deleted.as_ref().map_or(0, |stamp| stamp.hlc))
    }

    /// Deleted: a tombstone later than every field write.
    pub fn is_deleted(&self) -> bool {
        match (&self.deleted, self.latest_write()) {
            (Some(deleted), Some(written)) => deleted > written,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    pub fn is_live(&self) -> bool {
        !self.is_deleted() && self.fields.values().any(|field| !field.value.is_null())
    }

    /// What the user sees: the non-null fields, or `None` for a deleted record.
    pub fn visible(&self) -> Option<Map<String, Value>> {
        if self.is_deleted() {
            return None;
        }
        Some(
            self.fields
                .iter()
                .filter(|(_, field)| !field.value.is_null())
                .map(|(name, field)| (name.clone(), field.value.clone()))
                .collect(),
        )
    }

    /// The parent record id, if the record names one.
    pub fn parent(&self) -> Option<&str> {
        self.fields.get(PARENT_FIELD).and_then(|field| field.value.as_str())
    }
}

/// Why a plaintext is not a change this client can apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not a change payload at all: it will never apply.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A payload from a newer client: it applies once this client reads that version.
    #[error("payload version {found} is not supported (this client reads {supported})")]
    UnknownVersion { found: u32, supported: u32 },
}

/// Reads a decrypted change. [`ChangePayload::decode`] by default; pluggable
/// (`Store::set_payload_reader`) so that an upgraded reader can be tested.
pub type PayloadReader = fn(&[u8]) -> Result<ChangePayload, PayloadError>;

/// What one change carries inside its ciphertext: the pushing device's whole
/// state of the record, so that applying any subset of changes in any order
/// is a join of states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangePayload {
    pub v: u32,
    pub state: RecordState,
}

impl ChangePayload {
    pub const VERSION: u32 = 1;

    pub fn new(state: RecordState) -> Self {
        Self { v: Self::VERSION, state }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record state always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, PayloadError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        // The version first: a newer payload may not parse as this version's state.
        let version: Version =
            serde_json::from_slice(bytes).map_err(|error| PayloadError::Malformed(error.to_string()))?;
        if version.v != Self::VERSION {
            return Err(PayloadError::UnknownVersion { found: version.v, supported: Self::VERSION });
        }
        serde_json::from_slice(bytes).map_err(|error| PayloadError::Malformed(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn stamp(hlc: u64, device: &str) -> Stamp {
        Stamp { hlc, device: device.into() }
    }

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn later_writer_wins_per_field_and_new_fields_survive() {
        let mut base = RecordState::default();
        base.set(&fields(json!({"password": "old", "site": "example.org"})), &stamp(1, "phone"));
        let mut phone = base.clone();
        phone.set(&fields(json!({"password": "from phone", "note": "phone note"})), &stamp(5, "phone"));
        let mut laptop = base.clone();
        laptop.set(&fields(json!({"password": "from laptop", "tags": ["work"]})), &stamp(7, "laptop"));
        let mut a = phone.clone();
        a.merge(&laptop);
        let mut b = laptop.clone();
        b.merge(&phone);
        assert_eq!(a, b);
        assert_eq!(
            a.visible().unwrap(),
            fields(json!({"password": "from laptop", "site": "example.org", "note": "phone note", "tags": ["work"]}))
        );
    }

    #[test]
    fn ties_go_to_the_device_id_then_the_value() {
        let mut a = RecordState::default();
        a.set(&fields(json!({"x": 1})), &stamp(5, "a"));
        let mut b = RecordState::default();
        b.set(&fields(json!({"x": 2})), &stamp(5, "b"));
        let mut ab = a.clone();
        ab.merge(&b);
        assert_eq!(ab.visible().unwrap()["x"], json!(2));
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
    }

    #[test]
    fn delete_races_edit_by_stamp() {
        let mut record = RecordState::default();
        record.set(&fields(json!({"title": "t", "body": "b"})), &stamp(1, "a"));
        let mut deleted = record.clone();
        deleted.delete(&stamp(10, "a"));
        let mut edited = record.clone();
        edited.set(&fields(json!({"title": "t2"})), &stamp(9, "b"));
        let mut merged = edited.clone();
        merged.merge(&deleted);
        assert!(merged.is_deleted(), "the delete is later");
        let mut later_edit = record.clone();
        later_edit.set(&fields(json!({"title": "t3"})), &stamp(11, "b"));
        merged.merge(&later_edit);
        assert_eq!(merged.visible().unwrap(), fields(json!({"title": "t3", "body": "b"})), "back with all fields");
    }

    #[test]
    fn payload_round_trips_and_rejects_other_versions() {
        let mut state = RecordState::default();
        state.set(&fields(json!({"a": 1})), &stamp(3, "d"));
        let payload = ChangePayload::new(state);
        assert_eq!(ChangePayload::decode(&payload.encode()).unwrap(), payload);
        assert_eq!(
            ChangePayload::decode(br#"{"v":2,"state":{"shape":"new"}}"#),
            Err(PayloadError::UnknownVersion { found: 2, supported: 1 })
        );
        assert!(matches!(ChangePayload::decode(b"nonsense"), Err(PayloadError::Malformed(_))));
    }
}
