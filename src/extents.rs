//! Extent lists as the HTTP API returns them, built from NBD block status
//! (the `(length, flags)` pairs of `nbd::Connection::block_status`), and
//! the linear-time merge of allocation and dirty-bitmap extents. The one
//! place where block status flags are read and touching extents merged.

use serde::Serialize;

use crate::nbd;

/// `{"start","length","zero","hole"}`: one allocation extent. `hole`: the
/// range is allocated in no layer of the image (qcow2 clusters that would
/// expose a backing file), as `qemu:allocation-depth` 0 tells; false when
/// the export does not offer that context (raw images never have holes in
/// this sense).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub zero: bool,
    pub hole: bool,
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
pub(crate) fn whole(size: u64, zero: bool) -> Vec<Extent> {
    if size == 0 {
        Vec::new()
    } else {
        vec![Extent {
            start: 0,
            length: size,
            zero,
            hole: false,
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

/// Allocation extents covering `0..size` from `base:allocation` block
/// status (zero = hole or zero flag) and, when the export offers it,
/// `qemu:allocation-depth` (hole = depth 0), both from offset 0, merged on
/// common boundaries in one linear pass; touching extents with the same
/// flags are merged.
pub(crate) fn from_allocation(
    alloc: &[(u64, u32)],
    depth: Option<&[(u64, u32)]>,
    size: u64,
) -> Vec<Extent> {
    let depth = depth.unwrap_or(&[]);
    let mut out = Vec::with_capacity(alloc.len() + depth.len());
    let mut a = status_cursor(alloc, |f| f & (nbd::STATE_HOLE | nbd::STATE_ZERO) != 0);
    let mut d = status_cursor(depth, |f| f == 0);
    let mut pos = 0;
    while pos < size {
        let (zero, a_next) = a.at(pos);
        let (hole, d_next) = d.at(pos);
        let next = a_next.min(d_next).min(size);
        push(
            &mut out,
            Extent {
                start: pos,
                length: next - pos,
                zero,
                hole,
            },
            |x, y| x.zero == y.zero && x.hole == y.hole,
        );
        pos = next;
    }
    out
}

/// Extents covering `0..size` from `base:allocation` block status (from
/// offset 0) where `zero` means only what the NBD spec guarantees: the
/// range reads as zeroes (`STATE_ZERO`); a hole without that flag may read
/// as anything. Past the end of the list counts as data. Used where a wrong
/// `zero` would give a wrong result (checksums), not for the `/extents` API.
pub(crate) fn reads_as_zero(alloc: &[(u64, u32)], size: u64) -> Vec<Extent> {
    let mut out = Vec::with_capacity(alloc.len());
    let mut a = status_cursor(alloc, |f| f & nbd::STATE_ZERO != 0);
    let mut pos = 0;
    while pos < size {
        let (zero, next) = a.at(pos);
        let next = next.min(size);
        push(
            &mut out,
            Extent {
                start: pos,
                length: next - pos,
                zero,
                hole: false,
            },
            |x, y| x.zero == y.zero,
        );
        pos = next;
    }
    out
}

/// Whole-list fallback for `context=dirty` without a bitmap: every
/// allocation extent reported dirty (those that differ only in `hole`
/// merged, as dirty extents have no hole).
pub(crate) fn all_dirty(alloc: &[Extent]) -> Vec<DirtyExtent> {
    let mut out = Vec::with_capacity(alloc.len());
    for e in alloc {
        push(
            &mut out,
            DirtyExtent {
                start: e.start,
                length: e.length,
                dirty: true,
                zero: e.zero,
            },
            |x, y| x.zero == y.zero,
        );
    }
    out
}

/// A cursor over sorted, non-overlapping spans `(start, length, flag)`.
struct Cursor<I: Iterator<Item = (u64, u64, bool)>> {
    spans: std::iter::Peekable<I>,
}

/// A cursor over block status pairs `(length, flags)` from offset 0, with
/// the flag `flag` tells from their flags.
fn status_cursor<'a>(
    list: &'a [(u64, u32)],
    flag: impl Fn(u32) -> bool + 'a,
) -> Cursor<impl Iterator<Item = (u64, u64, bool)> + 'a> {
    let spans = list.iter().scan(0u64, move |at, &(length, flags)| {
        let start = *at;
        *at = at.saturating_add(length);
        Some((start, length, flag(flags)))
    });
    Cursor {
        spans: spans.peekable(),
    }
}

impl<I: Iterator<Item = (u64, u64, bool)>> Cursor<I> {
    /// The flag at `pos` (false in a gap or past the end) and where that
    /// value next may change. `pos` never goes back.
    fn at(&mut self, pos: u64) -> (bool, u64) {
        while self
            .spans
            .next_if(|&(s, l, _)| s.saturating_add(l) <= pos)
            .is_some()
        {}
        match self.spans.peek() {
            Some(&(s, l, f)) if s <= pos => (f, s.saturating_add(l)),
            Some(&(s, _, _)) => (false, s),
            None => (false, u64::MAX),
        }
    }
}

/// Merges allocation extents with dirty-bitmap block status (from offset
/// 0) into one list on common boundaries covering exactly `0..size`, in
/// one linear pass. Where a list has a gap or ends early its flag is false.
/// Touching results with equal flags are merged.
pub fn merge_dirty(alloc: &[Extent], dirty: &[(u64, u32)], size: u64) -> Vec<DirtyExtent> {
    let mut out = Vec::with_capacity(alloc.len() + dirty.len());
    let mut a = Cursor {
        spans: alloc.iter().map(|e| (e.start, e.length, e.zero)).peekable(),
    };
    let mut d = status_cursor(dirty, |f| f & nbd::STATE_DIRTY != 0);
    let mut pos = 0;
    while pos < size {
        let (zero, a_next) = a.at(pos);
        let (is_dirty, d_next) = d.at(pos);
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

    fn de(start: u64, length: u64, dirty: bool, zero: bool) -> DirtyExtent {
        DirtyExtent {
            start,
            length,
            dirty,
            zero,
        }
    }

    fn ex(start: u64, length: u64, zero: bool, hole: bool) -> Extent {
        Extent {
            start,
            length,
            zero,
            hole,
        }
    }

    #[test]
    fn allocation_flags_and_merging() {
        let alloc = [(10, 0), (5, 1), (5, 3), (5, 2), (5, 0)];
        assert_eq!(
            from_allocation(&alloc, None, 30),
            vec![
                ex(0, 10, false, false),
                ex(10, 15, true, false),
                ex(25, 5, false, false)
            ]
        );
        assert_eq!(whole(0, false), vec![]);
        assert_eq!(from_allocation(&[], None, 0), vec![]);
    }

    #[test]
    fn allocation_depth_marks_holes() {
        // qcow2: data, an allocated zero cluster, unallocated clusters.
        let alloc = [(10, 0), (30, 3)];
        let depth = [(20, 1), (15, 0), (5, 2)];
        assert_eq!(
            from_allocation(&alloc, Some(&depth), 40),
            vec![
                ex(0, 10, false, false),
                ex(10, 10, true, false),
                ex(20, 15, true, true),
                ex(35, 5, true, false),
            ]
        );
        // A depth list that stops early: no hole where it says nothing.
        assert_eq!(
            from_allocation(&alloc, Some(&[(10, 0)]), 40),
            vec![ex(0, 10, false, true), ex(10, 30, true, false)]
        );
    }

    #[test]
    fn all_dirty_merges_what_only_holes_split() {
        let alloc = [
            ex(0, 10, false, false),
            ex(10, 10, true, true),
            ex(20, 10, true, false),
            ex(30, 10, false, false),
        ];
        assert_eq!(
            all_dirty(&alloc),
            vec![
                de(0, 10, true, false),
                de(10, 20, true, true),
                de(30, 10, true, false)
            ]
        );
    }

    #[test]
    fn merge_on_common_boundaries() {
        let alloc = from_allocation(&[(100, 0), (100, 3)], None, 200);
        // Touching pairs with equal flags (replies of two queries) merge.
        let dirty = [(50, 0), (60, 1), (40, 1), (50, 0)];
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
        let alloc = vec![ex(0, 40, true, false)];
        let dirty = [(60, 0), (20, 1)];
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
        let alloc: Vec<Extent> = (0..n).map(|i| ex(i * 2, 2, i % 2 == 0, false)).collect();
        let dirty: Vec<(u64, u32)> = (0..n * 2).map(|i| (1, (i % 2) as u32)).collect();
        let got = merge_dirty(&alloc, &dirty, n * 2);
        assert_eq!(got.len() as u64, n * 2);
        assert_eq!(got[3], de(3, 1, true, false));
    }
}
