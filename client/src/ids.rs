//! Ids generated offline: UUIDv7 (48-bit Unix milliseconds, then random bits),
//! globally unique without coordination and sortable by creation time. The
//! `uuid` crate keeps ids from one process strictly increasing, also within a
//! millisecond.

pub fn new_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

/// The maximum length and alphabet the server accepts for ids.
pub fn validate_record_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("record id {id:?} must have 1 to 128 characters"));
    }
    if !id.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(&byte)) {
        return Err(format!("record id {id:?} may only contain A-Z a-z 0-9 . _ : -"));
    }
    Ok(())
}

pub fn validate_collection(collection: &str) -> Result<(), String> {
    if collection.is_empty() || collection.len() > 64 {
        return Err(format!("collection {collection:?} must have 1 to 64 characters"));
    }
    if !collection.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"._-".contains(&byte)) {
        return Err(format!("collection {collection:?} may only contain a-z 0-9 . _ -"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_sortable_and_accepted_by_the_server() {
        let ids: Vec<String> = (0..10_000).map(|_| new_id()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "strictly increasing in creation order");
        validate_record_id(&ids[0]).unwrap();
        assert!(validate_record_id("a b").is_err());
        assert!(validate_collection("Passwords").is_err());
        validate_collection("passwords").unwrap();
    }
}
