//! Sets of address ranges (sorted, disjoint, merged `[start, end)` pairs): which memory a
//! harvest scans, which pages a parent image holds, which VMAs are tracked. Pure; every
//! operation is linear in the number of ranges.

use serde::{Deserialize, Serialize};

/// A set of addresses as sorted, disjoint, non-adjacent half-open ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet(Vec::new())
    }

    /// From ranges in any order, overlapping or not; empty ranges are dropped.
    pub fn from_ranges(mut v: Vec<(u64, u64)>) -> RangeSet {
        v.retain(|(s, e)| s < e);
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet(out)
    }

    /// From ranges already sorted by start (merging overlaps and neighbours).
    pub fn from_sorted(v: impl IntoIterator<Item = (u64, u64)>) -> RangeSet {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, e) in v {
            if s >= e {
                continue;
            }
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet(out)
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether `[start, end)` lies wholly inside one range of the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 < end);
        self.0.get(i).is_some_and(|r| r.0 <= start && end <= r.1)
    }

    /// Whether `addr` is in the set.
    pub fn contains(&self, addr: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 <= addr);
        self.0.get(i).is_some_and(|r| r.0 <= addr)
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut v = Vec::with_capacity(self.0.len() + other.0.len());
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() || j < other.0.len() {
            let take_a = match (self.0.get(i), other.0.get(j)) {
                (Some(a), Some(b)) => a.0 <= b.0,
                (Some(_), None) => true,
                _ => false,
            };
            if take_a {
                v.push(self.0[i]);
                i += 1;
            } else {
                v.push(other.0[j]);
                j += 1;
            }
        }
        RangeSet::from_sorted(v)
    }

    pub fn intersect(&self, other: &RangeSet) -> RangeSet {
        let mut v = Vec::new();
        let (mut i, mut j) = (0, 0);
        while let (Some(a), Some(b)) = (self.0.get(i), other.0.get(j)) {
            let s = a.0.max(b.0);
            let e = a.1.min(b.1);
            if s < e {
                v.push((s, e));
            }
            if a.1 < b.1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        RangeSet(v)
    }

    /// `self` without `other`.
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut v = Vec::new();
        let mut j = 0;
        for &(s, e) in &self.0 {
            let mut cur = s;
            while let Some(&(os, oe)) = other.0.get(j) {
                if oe <= cur {
                    j += 1;
                    continue;
                }
                if os >= e {
                    break;
                }
                if os > cur {
                    v.push((cur, os));
                }
                cur = cur.max(oe);
                if oe >= e {
                    break;
                }
                j += 1;
            }
            if cur < e {
                v.push((cur, e));
            }
        }
        RangeSet(v)
    }

    /// The part of the set inside `[start, end)`.
    pub fn clip(&self, start: u64, end: u64) -> RangeSet {
        self.intersect(&RangeSet(vec![(start, end)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(v: &[(u64, u64)]) -> RangeSet {
        RangeSet::from_ranges(v.to_vec())
    }

    #[test]
    fn builds_merged_sets() {
        assert_eq!(
            rs(&[(5, 7), (1, 3), (3, 4), (6, 9), (10, 10)]).ranges(),
            &[(1, 4), (5, 9)]
        );
        assert_eq!(
            RangeSet::from_sorted([(1, 2), (2, 3), (5, 6)]).ranges(),
            &[(1, 3), (5, 6)]
        );
        assert!(rs(&[]).is_empty());
        assert_eq!(rs(&[(0, 10), (20, 25)]).len_bytes(), 15);
    }

    #[test]
    fn membership() {
        let s = rs(&[(10, 20), (30, 40)]);
        assert!(s.contains(10) && s.contains(19) && !s.contains(20) && !s.contains(9));
        assert!(s.covers(10, 20) && s.covers(31, 35) && !s.covers(15, 35) && !s.covers(5, 12));
        assert!(!s.covers(40, 41));
    }

    #[test]
    fn set_operations() {
        let a = rs(&[(0, 10), (20, 30), (40, 50)]);
        let b = rs(&[(5, 25), (45, 60)]);
        assert_eq!(a.union(&b).ranges(), &[(0, 30), (40, 60)]);
        assert_eq!(a.intersect(&b).ranges(), &[(5, 10), (20, 25), (45, 50)]);
        assert_eq!(a.subtract(&b).ranges(), &[(0, 5), (25, 30), (40, 45)]);
        assert_eq!(b.subtract(&a).ranges(), &[(10, 20), (50, 60)]);
        assert_eq!(a.subtract(&rs(&[])).ranges(), a.ranges());
        assert!(a.subtract(&rs(&[(0, 100)])).is_empty());
        // One range of `other` splitting one of `self` in three.
        assert_eq!(
            rs(&[(0, 100)])
                .subtract(&rs(&[(10, 20), (30, 40)]))
                .ranges(),
            &[(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(a.clip(8, 42).ranges(), &[(8, 10), (20, 30), (40, 42)]);
    }
}
