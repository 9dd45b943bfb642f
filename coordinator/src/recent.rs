//! A map bounded to the entries inserted most recently: past its bound, the oldest is forgotten first.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// At most `bound` entries; inserting a new key past it forgets the key inserted first. Replacing the
/// value of a key already there keeps its place.
#[derive(Debug)]
pub(crate) struct Recent<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    bound: usize,
}

impl<K: Hash + Eq + Clone, V> Recent<K, V> {
    pub(crate) fn new(bound: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bound,
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.bound {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_key_goes_first_and_a_replaced_value_keeps_its_place() {
        let mut r = Recent::new(2);
        r.insert("a", 1);
        r.insert("b", 2);
        r.insert("a", 3);
        assert_eq!(r.get("a"), Some(&3));
        r.insert("c", 4);
        assert_eq!(
            (r.get("a"), r.get("b"), r.get("c")),
            (None, Some(&2), Some(&4))
        );
        assert_eq!(r.len(), 2);
    }
}
