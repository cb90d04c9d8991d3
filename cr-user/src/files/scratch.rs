//! State the kinds of open file keep between their calls.

use std::any::{Any, TypeId};
use std::collections::HashMap;

/// State kinds keep between calls, one value per type (per process, or per tree).
#[derive(Default)]
pub struct Scratch(HashMap<TypeId, Box<dyn Any>>);

impl Scratch {
    /// The `T` of this scratch, made with `T::default()` the first time.
    pub fn get<T: Default + 'static>(&mut self) -> &mut T {
        self.0
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()))
            .downcast_mut()
            .expect("a scratch value is stored under its own type")
    }

    /// Takes the `T` out (to use it while borrowing the rest); [`Scratch::put`] it back.
    pub fn take<T: Default + 'static>(&mut self) -> T {
        std::mem::take(self.get::<T>())
    }

    pub fn put<T: 'static>(&mut self, v: T) {
        self.0.insert(TypeId::of::<T>(), Box::new(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_values_by_type() {
        let mut s = Scratch::default();
        s.get::<Vec<u32>>().push(1);
        *s.get::<u64>() += 5;
        let mut v = s.take::<Vec<u32>>();
        v.push(2);
        assert!(s.get::<Vec<u32>>().is_empty());
        s.put(v);
        assert_eq!(s.get::<Vec<u32>>(), &vec![1, 2]);
        assert_eq!(*s.get::<u64>(), 5);
    }
}
