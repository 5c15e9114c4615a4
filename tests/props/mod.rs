//! Properties of the pure parsers and of the extents merge, shared by the
//! proptest suite (`tests/properties.rs`, part of `make test`) and the
//! cargo-fuzz targets (`fuzz/fuzz_targets/*`, `make fuzz`). Each `check_*`
//! takes raw bytes, must never panic on its own account, and panics with a
//! message when a property is violated.
#![allow(dead_code)]

use cloudstack_image_server::config::BackendConfig;
use cloudstack_image_server::config::TransferConfig;
use cloudstack_image_server::extents::{self, DirtyExtent, Extent};
use cloudstack_image_server::http::patch_op::{parse_patch_json, PatchOp};
use cloudstack_image_server::http::range::{parse_content_range, parse_range, RangeSpec};
use cloudstack_image_server::nbd;

/// `Range:` and `Content-Range:` parsing of arbitrary text, and resolving
/// the parsed range against a few image sizes.
pub fn check_range(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = parse_range(text) {
        if let RangeSpec::Suffix(n) = spec {
            assert!(n > 0, "{text:?}: zero suffix accepted");
        }
        for size in [0u64, 1, 2, 100, 1 << 20, u64::MAX] {
            if let Ok((a, b)) = spec.for_read(size) {
                assert!(a <= b && b < size, "{text:?} read {size}: {a}-{b}");
            }
            if let Ok((a, b)) = spec.for_write(size) {
                assert!(a <= b && b < size, "{text:?} write {size}: {a}-{b}");
                if let RangeSpec::FromTo(x, y) = spec {
                    assert_eq!((a, b), (x, y), "{text:?}: a write range was clamped");
                }
            }
        }
    }
    if let Ok((a, b)) = parse_content_range(text) {
        assert!(a <= b, "{text:?}: {a}-{b}");
    }
}

/// A well-formed range round-trips.
pub fn check_range_roundtrip(a: u64, b: u64) {
    assert_eq!(
        parse_range(&format!("bytes={a}-{b}")),
        Ok(RangeSpec::FromTo(a, b))
    );
    assert_eq!(parse_range(&format!("bytes={a}-")), Ok(RangeSpec::From(a)));
    if a > 0 {
        assert_eq!(
            parse_range(&format!("bytes=-{a}")),
            Ok(RangeSpec::Suffix(a))
        );
    }
    let (lo, hi) = (a.min(b), a.max(b));
    assert_eq!(
        parse_content_range(&format!("bytes {lo}-{hi}/*")),
        Ok((lo, hi))
    );
    assert_eq!(
        parse_content_range(&format!("bytes {lo}-{hi}/{b}")),
        Ok((lo, hi))
    );
}

/// PATCH JSON bodies: every failure is a 400; a zero op has size > 0; a
/// valid op re-serialised parses to the same op.
pub fn check_patch_json(data: &[u8]) {
    match parse_patch_json(data) {
        Err(e) => assert_eq!(e.status().as_u16(), 400, "{e}"),
        Ok(op) => {
            if let PatchOp::Zero { size, .. } = op {
                assert!(size > 0);
            }
            assert_eq!(parse_patch_json(patch_json(op).as_bytes()), Ok(op));
        }
    }
}

pub fn patch_json(op: PatchOp) -> String {
    match op {
        PatchOp::Flush => r#"{"op":"flush"}"#.to_string(),
        PatchOp::Zero {
            offset,
            size,
            flush,
        } => format!(r#"{{"op":"zero","offset":{offset},"size":{size},"flush":{flush}}}"#),
    }
}

/// Transfer configs: an accepted config names absolute, normalised paths
/// outside the denied trees, with no NUL anywhere.
pub fn check_config(data: &[u8]) {
    let Ok(cfg) = TransferConfig::parse(data) else {
        return;
    };
    let path = match &cfg.backend {
        BackendConfig::Nbd {
            socket,
            export,
            export_bitmap,
        } => {
            assert!(!matches!(export.as_deref(), Some(e) if e.is_empty() || e.contains('\0')));
            assert!(!matches!(export_bitmap.as_deref(), Some(b) if b.contains('\0')));
            socket
        }
        BackendConfig::File { path } => path,
    };
    let s = path.to_str().expect("paths come from JSON strings");
    assert!(s.starts_with('/'), "{s:?}");
    assert!(!s.contains('\0') && !s.contains("//"), "{s:?}");
    assert!(!s.split('/').any(|c| c == "." || c == ".."), "{s:?}");
    for denied in ["/etc", "/proc", "/sys", "/dev"] {
        assert!(!path.starts_with(denied), "{s:?}");
    }
    assert!(cfg.idle_timeout.as_secs() >= 1);
}

/// Decodes bytes into (allocation extents, dirty block status, size): two
/// partitions of ranges near `size`, possibly short or long; the extents
/// with gaps, the block status (`(length, flags)` from 0) with touching
/// pairs of equal flags, like a server's replies could be.
pub fn extents_from_bytes(data: &[u8]) -> (Vec<Extent>, Vec<(u64, u32)>, u64) {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let size = match (next(), next()) {
        (Some(a), Some(b)) => u64::from(u16::from_le_bytes([a, b])),
        _ => return (Vec::new(), Vec::new(), 0),
    };
    let mut alloc = Vec::new();
    let mut pos = 0u64;
    // Byte: low 7 bits length (0 = gap of 8), high bit the flag; 0xFF ends.
    while let Some(b) = next() {
        if b == 0xFF {
            break;
        }
        let len = u64::from(b & 0x7F);
        if len == 0 {
            pos += 8;
            continue;
        }
        alloc.push(Extent {
            start: pos,
            length: len * 7,
            zero: b & 0x80 != 0,
            // A hole is always zero; the merge ignores it.
            hole: b & 0x80 != 0 && len % 2 == 0,
        });
        pos += len * 7;
    }
    let mut dirty = Vec::new();
    while let Some(b) = next() {
        let len = u64::from(b & 0x7F);
        if len == 0 {
            dirty.push((5, 0));
            continue;
        }
        let mut flags = if b & 0x80 != 0 { nbd::STATE_DIRTY } else { 0 };
        flags |= u32::from(b & 2);
        dirty.push((len * 3, flags));
    }
    (alloc, dirty, size)
}

fn alloc_zero_at(alloc: &[Extent], p: u64) -> bool {
    alloc
        .iter()
        .find(|e| e.start <= p && p < e.start + e.length)
        .is_some_and(|e| e.zero)
}

/// Block status pairs `(length, flags)` from 0 as `(offset, length, flags)`.
fn spans(status: &[(u64, u32)]) -> Vec<(u64, u64, u32)> {
    let mut at = 0;
    status
        .iter()
        .map(|&(l, f)| {
            at += l;
            (at - l, l, f)
        })
        .collect()
}

fn dirty_at(dirty: &[(u64, u32)], p: u64) -> bool {
    spans(dirty)
        .into_iter()
        .find(|&(o, l, _)| o <= p && p < o + l)
        .is_some_and(|(_, _, f)| f & nbd::STATE_DIRTY != 0)
}

/// `merge_dirty`: covers 0..size exactly, in order, no empty extents,
/// neighbours differ in flags, and every extent agrees with both inputs at
/// its start and at every input boundary inside it (the inputs are constant
/// between their boundaries, so it agrees everywhere).
pub fn check_merge(alloc: &[Extent], dirty: &[(u64, u32)], size: u64) {
    let merged = extents::merge_dirty(alloc, dirty, size);
    let mut pos = 0;
    let mut prev: Option<DirtyExtent> = None;
    let mut bounds: Vec<u64> = alloc
        .iter()
        .flat_map(|e| [e.start, e.start + e.length])
        .chain(spans(dirty).into_iter().flat_map(|(o, l, _)| [o, o + l]))
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    for e in &merged {
        assert_eq!(e.start, pos, "gap or overlap at {pos}: {merged:?}");
        assert!(e.length > 0, "empty extent {e:?}");
        if let Some(p) = prev {
            assert!(
                p.dirty != e.dirty || p.zero != e.zero,
                "neighbours with equal flags: {p:?} {e:?}"
            );
        }
        let end = e.start + e.length;
        let inner = bounds.iter().copied().filter(|&b| b > e.start && b < end);
        for p in std::iter::once(e.start).chain(inner) {
            assert_eq!(e.zero, alloc_zero_at(alloc, p), "zero at {p}: {e:?}");
            assert_eq!(e.dirty, dirty_at(dirty, p), "dirty at {p}: {e:?}");
        }
        pos = end;
        prev = Some(*e);
    }
    assert_eq!(pos, size, "merged extents end at {pos}, not {size}");
}

pub fn check_merge_bytes(data: &[u8]) {
    let (alloc, dirty, size) = extents_from_bytes(data);
    check_merge(&alloc, &dirty, size);
}
