//! Extent lists as the HTTP API returns them, built from NBD block status,
//! and the linear-time merge of allocation and dirty-bitmap extents.

use serde::Serialize;

use crate::nbd;

/// `{"start","length","zero"}`: one allocation extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub zero: bool,
}

/// `{"start","length","dirty","zero"}`: one extent of `context=dirty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirtyExtent {
    pub start: u64,
    pub length: u64,
    pub dirty: bool,
    pub zero: bool,
}

/// One extent covering `0..size` (none for an empty image).
pub fn whole(size: u64, zero: bool) -> Vec<Extent> {
    if size == 0 {
        Vec::new()
    } else {
        vec![Extent {
            start: 0,
            length: size,
            zero,
        }]
    }
}

fn push<T, F>(out: &mut Vec<T>, item: T, same: F)
where
    F: Fn(&T, &T) -> bool,
    T: Spanned,
{
    if item.len() == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.end() == item.begin() && same(last, &item) {
            last.grow(item.len());
            return;
        }
    }
    out.push(item);
}

trait Spanned {
    fn begin(&self) -> u64;
    fn len(&self) -> u64;
    fn grow(&mut self, by: u64);
    fn end(&self) -> u64 {
        self.begin() + self.len()
    }
}

macro_rules! spanned {
    ($($t:ty),*) => {$(
        impl Spanned for $t {
            fn begin(&self) -> u64 {
                self.start
            }
            fn len(&self) -> u64 {
                self.length
            }
            fn grow(&mut self, by: u64) {
                self.length += by;
            }
        }
    )*};
}

spanned!(Extent, DirtyExtent);

/// Allocation extents from `base:allocation` block status: zero = hole or
/// zero flag; touching extents with the same value are merged.
pub fn from_allocation(list: &[nbd::Extent]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        push(
            &mut out,
            Extent {
                start: e.offset,
                length: e.length,
                zero: e.flags & (nbd::STATE_HOLE | nbd::STATE_ZERO) != 0,
            },
            |a, b| a.zero == b.zero,
        );
    }
    out
}

/// Whole-list fallback for `context=dirty` without a bitmap: every
/// allocation extent reported dirty.
pub fn all_dirty(alloc: &[Extent]) -> Vec<DirtyExtent> {
    alloc
        .iter()
        .map(|e| DirtyExtent {
            start: e.start,
            length: e.length,
            dirty: true,
            zero: e.zero,
        })
        .collect()
}

/// A cursor over a sorted, non-overlapping list of spans with a flag.
struct Cursor<'a, T> {
    list: &'a [T],
    i: usize,
}

impl<'a, T: Copy> Cursor<'a, T> {
    /// The flag at `pos` (false in a gap) and where that value next may change.
    fn at(&mut self, pos: u64, span: impl Fn(&T) -> (u64, u64, bool)) -> (bool, u64) {
        while self.i < self.list.len() && {
            let (s, l, _) = span(&self.list[self.i]);
            s.saturating_add(l) <= pos
        } {
            self.i += 1;
        }
        match self.list.get(self.i).map(&span) {
            Some((s, l, f)) if s <= pos => (f, s.saturating_add(l)),
            Some((s, _, _)) => (false, s),
            None => (false, u64::MAX),
        }
    }
}

/// Merges allocation extents with dirty-bitmap extents into one list on
/// common boundaries covering exactly `0..size`, in one linear pass. Where
/// a list has a gap its flag is false. Touching results with equal flags
/// are merged.
pub fn merge_dirty(alloc: &[Extent], dirty: &[nbd::Extent], size: u64) -> Vec<DirtyExtent> {
    let mut out = Vec::with_capacity(alloc.len() + dirty.len());
    let mut a = Cursor { list: alloc, i: 0 };
    let mut d = Cursor { list: dirty, i: 0 };
    let mut pos = 0;
    while pos < size {
        let (zero, a_next) = a.at(pos, |e| (e.start, e.length, e.zero));
        let (is_dirty, d_next) = d.at(pos, |e| {
            (e.offset, e.length, e.flags & nbd::STATE_DIRTY != 0)
        });
        let next = a_next.min(d_next).min(size);
        push(
            &mut out,
            DirtyExtent {
                start: pos,
                length: next - pos,
                dirty: is_dirty,
                zero,
            },
            |x, y| x.dirty == y.dirty && x.zero == y.zero,
        );
        pos = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne(offset: u64, length: u64, flags: u32) -> nbd::Extent {
        nbd::Extent {
            offset,
            length,
            flags,
        }
    }

    fn de(start: u64, length: u64, dirty: bool, zero: bool) -> DirtyExtent {
        DirtyExtent {
            start,
            length,
            dirty,
            zero,
        }
    }

    #[test]
    fn allocation_flags_and_merging() {
        let got = from_allocation(&[
            ne(0, 10, 0),
            ne(10, 5, 1),
            ne(15, 5, 3),
            ne(20, 5, 2),
            ne(25, 5, 0),
        ]);
        assert_eq!(
            got,
            vec![
                Extent {
                    start: 0,
                    length: 10,
                    zero: false
                },
                Extent {
                    start: 10,
                    length: 15,
                    zero: true
                },
                Extent {
                    start: 25,
                    length: 5,
                    zero: false
                },
            ]
        );
        assert_eq!(whole(0, false), vec![]);
    }

    #[test]
    fn merge_on_common_boundaries() {
        let alloc = from_allocation(&[ne(0, 100, 0), ne(100, 100, 3)]);
        let dirty = [ne(0, 50, 0), ne(50, 100, 1), ne(150, 50, 0)];
        assert_eq!(
            merge_dirty(&alloc, &dirty, 200),
            vec![
                de(0, 50, false, false),
                de(50, 50, true, false),
                de(100, 50, true, true),
                de(150, 50, false, true),
            ]
        );
    }

    #[test]
    fn merge_handles_gaps_and_short_lists() {
        let alloc = vec![Extent {
            start: 0,
            length: 40,
            zero: true,
        }];
        let dirty = [ne(60, 20, 1)];
        assert_eq!(
            merge_dirty(&alloc, &dirty, 100),
            vec![
                de(0, 40, false, true),
                de(40, 20, false, false),
                de(60, 20, true, false),
                de(80, 20, false, false),
            ]
        );
        assert_eq!(merge_dirty(&[], &[], 0), vec![]);
    }

    #[test]
    fn merge_is_linear_on_many_extents() {
        // 200k alternating extents each: quadratic code would take minutes.
        let n = 200_000u64;
        let alloc: Vec<Extent> = (0..n)
            .map(|i| Extent {
                start: i * 2,
                length: 2,
                zero: i % 2 == 0,
            })
            .collect();
        let dirty: Vec<nbd::Extent> = (0..n * 2).map(|i| ne(i, 1, (i % 2) as u32)).collect();
        let got = merge_dirty(&alloc, &dirty, n * 2);
        assert_eq!(got.len() as u64, n * 2);
        assert_eq!(got[3], de(3, 1, true, false));
    }
}
