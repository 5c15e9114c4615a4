//! The one parser of byte ranges: `Range: bytes=…` (GET, PATCH) and
//! `Content-Range: bytes a-b/…` (PUT).

/// A single `Range: bytes=` spec, before it is applied to an image size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (inclusive end)
    FromTo(u64, u64),
    /// `bytes=a-`
    From(u64),
    /// `bytes=-n`: the last n bytes
    Suffix(u64),
}

/// Why a range cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// Malformed, several ranges, or another unit: 400.
    Invalid(&'static str),
    /// Well formed but outside the image: 416.
    Unsatisfiable,
}

/// Parses digits only (no sign, no spaces inside); a number too large for
/// u64 saturates, which every caller then treats as beyond the image.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// Parses `Range: bytes=a-b | a- | -n` (one range only).
pub fn parse_range(header: &str) -> Result<RangeSpec, RangeError> {
    if header.contains(',') {
        return Err(RangeError::Invalid("multiple ranges not supported"));
    }
    let spec = header
        .strip_prefix("bytes=")
        .ok_or(RangeError::Invalid("only bytes ranges supported"))?
        .trim();
    let (left, right) = spec
        .split_once('-')
        .ok_or(RangeError::Invalid("invalid bytes range"))?;
    let (left, right) = (left.trim(), right.trim());
    if left.is_empty() {
        let n = number(right).ok_or(RangeError::Invalid("invalid suffix length"))?;
        if n == 0 {
            return Err(RangeError::Invalid("invalid suffix length"));
        }
        return Ok(RangeSpec::Suffix(n));
    }
    let start = number(left).ok_or(RangeError::Invalid("invalid range start"))?;
    if right.is_empty() {
        return Ok(RangeSpec::From(start));
    }
    let end = number(right).ok_or(RangeError::Invalid("invalid range end"))?;
    Ok(RangeSpec::FromTo(start, end))
}

impl RangeSpec {
    /// For reading `size` bytes: `(start, end_inclusive)`, the end clamped
    /// to the last byte; start ≥ size or end < start is unsatisfiable.
    pub fn for_read(self, size: u64) -> Result<(u64, u64), RangeError> {
        if size == 0 {
            return Err(RangeError::Unsatisfiable);
        }
        match self {
            RangeSpec::Suffix(n) => Ok((size - n.min(size), size - 1)),
            RangeSpec::From(a) if a < size => Ok((a, size - 1)),
            RangeSpec::FromTo(a, b) if a < size && b >= a => Ok((a, b.min(size - 1))),
            _ => Err(RangeError::Unsatisfiable),
        }
    }

    /// For writing into an image of `size` bytes: `(start, end_inclusive)`
    /// without clamping: any byte past the end is unsatisfiable.
    pub fn for_write(self, size: u64) -> Result<(u64, u64), RangeError> {
        let (a, b) = match self {
            RangeSpec::Suffix(n) if n <= size => (size - n, size - 1),
            RangeSpec::From(a) if a < size => (a, size - 1),
            RangeSpec::FromTo(a, b) if b < a => return Err(RangeError::Unsatisfiable),
            RangeSpec::FromTo(a, b) => (a, b),
            _ => return Err(RangeError::Unsatisfiable),
        };
        if a >= size || b >= size {
            return Err(RangeError::Unsatisfiable);
        }
        Ok((a, b))
    }
}

/// Parses `Content-Range: bytes a-b/*` or `bytes a-b/size` into `(a, b)`.
pub fn parse_content_range(header: &str) -> Result<(u64, u64), &'static str> {
    let rest = header
        .trim()
        .strip_prefix("bytes")
        .ok_or("invalid Content-Range")?;
    if !rest.starts_with([' ', '\t']) {
        return Err("invalid Content-Range");
    }
    let (span, total) = rest
        .trim_start()
        .split_once('/')
        .ok_or("invalid Content-Range")?;
    if total != "*" && number(total).is_none() {
        return Err("invalid Content-Range");
    }
    let (a, b) = span.split_once('-').ok_or("invalid Content-Range")?;
    let (a, b) = (
        number(a).ok_or("invalid Content-Range")?,
        number(b).ok_or("invalid Content-Range")?,
    );
    if b < a {
        return Err("invalid Content-Range range");
    }
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeError::*;

    #[test]
    fn parses_single_ranges() {
        assert_eq!(
            parse_range("bytes=0-1048575"),
            Ok(RangeSpec::FromTo(0, 1048575))
        );
        assert_eq!(parse_range("bytes= 5 - 9 "), Ok(RangeSpec::FromTo(5, 9)));
        assert_eq!(parse_range("bytes=7-"), Ok(RangeSpec::From(7)));
        assert_eq!(parse_range("bytes=-100"), Ok(RangeSpec::Suffix(100)));
        assert_eq!(
            parse_range("bytes=99999999999999999999999-"),
            Ok(RangeSpec::From(u64::MAX))
        );
    }

    #[test]
    fn rejects_garbage() {
        for h in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=-0",
            "bytes=a-b",
            "bytes=1-2,3-4",
            "items=0-1",
            "Bytes=0-1",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes=-1-2",
            "bytes=0x10-",
            "bytes=1_000-",
        ] {
            assert!(matches!(parse_range(h), Err(Invalid(_))), "{h:?}");
        }
    }

    #[test]
    fn read_resolution() {
        let r = |h: &str, size| parse_range(h).unwrap().for_read(size);
        assert_eq!(r("bytes=0-9", 100), Ok((0, 9)));
        assert_eq!(r("bytes=90-200", 100), Ok((90, 99)));
        assert_eq!(r("bytes=99-", 100), Ok((99, 99)));
        assert_eq!(r("bytes=-10", 100), Ok((90, 99)));
        assert_eq!(r("bytes=-1000", 100), Ok((0, 99)));
        assert_eq!(r("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=100-200", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=5-4", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=0-", 0), Err(Unsatisfiable));
        assert_eq!(r("bytes=-5", 0), Err(Unsatisfiable));
        assert_eq!(r("bytes=18446744073709551615-", 100), Err(Unsatisfiable));
        assert_eq!(r("bytes=0-99999999999999999999999", 100), Ok((0, 99)));
    }

    #[test]
    fn write_resolution_never_clamps() {
        let w = |h: &str, size| parse_range(h).unwrap().for_write(size);
        assert_eq!(w("bytes=0-1048575", 1 << 21), Ok((0, 1048575)));
        assert_eq!(w("bytes=0-1048576", 1 << 20), Err(Unsatisfiable));
        assert_eq!(w("bytes=10-", 100), Ok((10, 99)));
        assert_eq!(w("bytes=-10", 100), Ok((90, 99)));
        assert_eq!(w("bytes=-101", 100), Err(Unsatisfiable));
        assert_eq!(w("bytes=100-100", 100), Err(Unsatisfiable));
        assert_eq!(w("bytes=5-4", 100), Err(Unsatisfiable));
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-1048575/*"), Ok((0, 1048575)));
        assert_eq!(
            parse_content_range(" bytes 1048576-2097151/52428800 "),
            Ok((1048576, 2097151))
        );
        for h in [
            "bytes 0-1/",
            "bytes 0-1",
            "bytes=0-1/*",
            "bytes 1-0/*",
            "bytes -1/*",
            "bytes 0-/*",
            "bytes0-1/*",
            "bytes 0-1/x",
            "bits 0-1/*",
            "",
        ] {
            assert!(parse_content_range(h).is_err(), "{h:?}");
        }
    }
}
