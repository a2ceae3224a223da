//! Slots counted per key (a user's streams, a device's calls): at most `max`
//! held at once per key, each given back when its [`Slot`] is dropped. Only
//! keys with a slot held have an entry, so the map follows what is in use,
//! not everyone ever seen.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use lockstep_kafka::locks::lock;

#[derive(Clone)]
pub struct KeyedSlots {
    counts: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    max: u32,
}

/// One slot of a key, given back on drop.
pub struct Slot {
    counts: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    key: Arc<str>,
}

impl KeyedSlots {
    pub fn new(max: u32) -> Self {
        Self { counts: Arc::default(), max }
    }

    /// A slot of `key`, or the number held when all of its slots are.
    pub fn take(&self, key: &Arc<str>) -> Result<Slot, u32> {
        let mut counts = lock(&self.counts);
        let count = counts.entry(key.clone()).or_insert(0);
        if *count >= self.max {
            return Err(*count);
        }
        *count += 1;
        Ok(Slot { counts: self.counts.clone(), key: key.clone() })
    }

    /// Keys with a slot held.
    pub fn keys_in_use(&self) -> usize {
        lock(&self.counts).len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_per_key_given_back_on_drop() {
        let slots = KeyedSlots::new(2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let first = slots.take(&a).unwrap();
        let second = slots.take(&a).unwrap();
        assert_eq!(slots.take(&a).err(), Some(2));
        let other = slots.take(&b).unwrap();
        drop(first);
        let third = slots.take(&a).unwrap();
        assert_eq!(slots.keys_in_use(), 2);
        drop((second, third, other));
        assert_eq!(slots.keys_in_use(), 0, "no entry without a slot held");
    }
}
