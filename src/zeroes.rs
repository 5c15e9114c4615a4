//! Zero bytes: telling a buffer of them, and a static supply of them.
//! Below both `ops` (sparse uploads) and `checksum` (zero blocks), and the
//! NBD backend's writes of zeroes.

/// Zero bytes to write or hash without allocating a buffer of them.
pub(crate) static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// True when every byte is zero. ORs 4 KiB blocks (which vectorises) and
/// stops at the first block with data.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4099]));
        assert!(is_zero(&ZEROES));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
        v[17] = 0;
        v[0] = 9;
        assert!(!is_zero(&v));
    }
}
