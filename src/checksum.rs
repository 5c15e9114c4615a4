//! Image checksums as ovirt-imageio computes them (its `blkhash`), so that a
//! checksum from `GET /images/{id}/checksum` equals the one
//! `ovirt_imageio.client.checksum()` computes for a local copy.
//!
//! The image is split into `block_size` blocks (the last one may be
//! shorter); each block is hashed on its own, and the block digests, in
//! order, are hashed again: `H(H(block0) || H(block1) || …)`. blake2b and
//! blake2s use a 32-byte digest for both levels (imageio's `digest_size`);
//! every other algorithm its default size. A block that reads as zeroes is
//! never read: the extents say so (`base:allocation` zero flag), and its
//! digest is that of `len` zero bytes, computed once per request for full
//! blocks. Data blocks that turn out to be all zeroes take the same path.
//!
//! Reading (NBD commands on the caller's async worker, file reads on the
//! blocking pool) and hashing (on a blocking thread) overlap, with two buffers of [`PIECE`] bytes in turn: a data
//! block is read and hashed piece by piece (a block digest takes its bytes
//! in any number of updates), so a checksum holds 4 MiB of buffers whatever
//! the block size, within a data request's budget (see `crate::ops`).

use std::fmt::LowerHex;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2s256};
use digest::{Digest, Output};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::spawn_blocking;

use crate::backend::{BackendError, Opened};
use crate::extents::Extent;
use crate::zeroes::{is_zero, ZEROES};

const MIB: u64 = 1024 * 1024;
/// imageio's default block size.
pub(crate) const DEFAULT_BLOCK_SIZE: u64 = 4 * MIB;
/// Smallest and largest block size accepted (imageio's limits).
pub(crate) const MIN_BLOCK_SIZE: u64 = DEFAULT_BLOCK_SIZE / 4;
pub(crate) const MAX_BLOCK_SIZE: u64 = DEFAULT_BLOCK_SIZE * 4;
/// Block sizes must be multiples of this.
pub(crate) const BLOCK_ALIGNMENT: u64 = 4096;
/// Buffers per request: one being read while the other is hashed.
const BUFFERS: usize = 2;
/// Bytes per buffer: a block is read in pieces of at most this.
pub(crate) const PIECE: usize = 2 * 1024 * 1024;
/// The most a checksum request holds in buffers.
pub(crate) const MAX_BUFFERED: usize = BUFFERS * PIECE;
// Within a data request's budget (see `crate::ops`), whatever the block size.
const _: () = assert!(MAX_BUFFERED <= 4 * 1024 * 1024);

/// The algorithms we offer: Python's `hashlib.algorithms_guaranteed` less
/// `shake_128`/`shake_256` (their digests need a length, which imageio
/// cannot pass). imageio offers whatever its Python and OpenSSL have; these
/// are the ones every imageio client has too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Algorithm {
    Blake2b,
    Blake2s,
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha3_224,
    Sha3_256,
    Sha3_384,
    Sha3_512,
    Sha512,
}

impl Algorithm {
    /// Every algorithm, sorted by name (the order of the algorithms list).
    pub(crate) const ALL: [Algorithm; 12] = [
        Algorithm::Blake2b,
        Algorithm::Blake2s,
        Algorithm::Md5,
        Algorithm::Sha1,
        Algorithm::Sha224,
        Algorithm::Sha256,
        Algorithm::Sha384,
        Algorithm::Sha3_224,
        Algorithm::Sha3_256,
        Algorithm::Sha3_384,
        Algorithm::Sha3_512,
        Algorithm::Sha512,
    ];

    /// imageio's default.
    pub(crate) const DEFAULT: Algorithm = Algorithm::Blake2b;

    /// The name as Python's hashlib spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Algorithm::Blake2b => "blake2b",
            Algorithm::Blake2s => "blake2s",
            Algorithm::Md5 => "md5",
            Algorithm::Sha1 => "sha1",
            Algorithm::Sha224 => "sha224",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha3_224 => "sha3_224",
            Algorithm::Sha3_256 => "sha3_256",
            Algorithm::Sha3_384 => "sha3_384",
            Algorithm::Sha3_512 => "sha3_512",
            Algorithm::Sha512 => "sha512",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Algorithm> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Every name, sorted.
    pub(crate) fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|a| a.name()).collect()
    }
}

/// What a checksum request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    pub algorithm: Algorithm,
    pub block_size: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            algorithm: Algorithm::DEFAULT,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// At most this much of a client's value is echoed in an error.
const MAX_ECHO: usize = 64;

fn echo(value: &str) -> String {
    value.chars().take(MAX_ECHO).collect()
}

impl Params {
    /// Validates the query parameters `algorithm` and `block_size` (absent:
    /// imageio's defaults) in imageio's order and with its messages; the
    /// error is the message of a 400.
    pub(crate) fn parse(
        algorithm: Option<&str>,
        block_size: Option<&str>,
    ) -> Result<Params, String> {
        let algorithm = match algorithm {
            None => Algorithm::DEFAULT,
            Some(a) => Algorithm::from_name(a).ok_or_else(|| {
                format!(
                    "Unsupported value {:?} for \"algorithm\", expecting one of {:?}",
                    echo(a),
                    Algorithm::names()
                )
            })?,
        };
        let block_size = match block_size {
            None => DEFAULT_BLOCK_SIZE,
            Some(b) => match b.trim().parse::<i64>() {
                Ok(n) => u64::try_from(n).unwrap_or(0),
                Err(_) => return Err(format!("Invalid block size: {:?}", echo(b))),
            },
        };
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(format!(
                "Block size out of allowed range: {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}"
            ));
        }
        if block_size % BLOCK_ALIGNMENT != 0 {
            return Err(format!("Block size is not aligned to {BLOCK_ALIGNMENT}"));
        }
        Ok(Params {
            algorithm,
            block_size,
        })
    }
}

/// The reply, field for field as imageio sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Checksum {
    pub algorithm: &'static str,
    pub block_size: u64,
    pub checksum: String,
}

/// One block of the image: `len` bytes at `start`; `zero` when the extents
/// say all of it reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    start: u64,
    len: usize,
    zero: bool,
}

/// The blocks of an image of `size` bytes, in order, from its extents: a
/// block is zero when extents with `zero` cover all of it (imageio's
/// `blkhash.split`, which merges extents into whole blocks the same way).
struct Blocks<'a> {
    extents: &'a [Extent],
    i: usize,
    pos: u64,
    size: u64,
    block_size: u64,
}

impl Iterator for Blocks<'_> {
    type Item = Block;

    fn next(&mut self) -> Option<Block> {
        if self.pos >= self.size {
            return None;
        }
        let start = self.pos;
        let end = start.saturating_add(self.block_size).min(self.size);
        let ext = self.extents;
        while self.i < ext.len() && ext[self.i].start.saturating_add(ext[self.i].length) <= start {
            self.i += 1;
        }
        let mut covered = start;
        let mut zero = true;
        for e in ext[self.i..].iter().take_while(|e| e.start < end) {
            if !e.zero || e.start > covered {
                zero = false;
                break;
            }
            covered = e.start.saturating_add(e.length);
        }
        if covered < end {
            zero = false;
        }
        self.pos = end;
        Some(Block {
            start,
            len: (end - start) as usize,
            zero,
        })
    }
}

/// imageio's `blkhash.Hash`: the digest of the block digests. A data block
/// comes in pieces ([`BlockHash::piece`], then [`BlockHash::end_block`]);
/// while its pieces are all zeroes nothing is hashed, and a block that was
/// all zeroes takes the zero path.
struct BlockHash<D: Digest> {
    outer: D,
    block_size: usize,
    zero_block: Option<Output<D>>,
    /// The digest of the block being hashed.
    current: D,
    /// Bytes of the current block so far, all zeroes, not yet hashed.
    zeros: usize,
    /// Whether the current block had a non-zero piece.
    data: bool,
}

fn update_zeroes<D: Digest>(d: &mut D, len: usize) {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROES.len());
        d.update(&ZEROES[..n]);
        left -= n;
    }
}

impl<D: Digest> BlockHash<D> {
    fn new(block_size: usize) -> Self {
        BlockHash {
            outer: D::new(),
            block_size,
            zero_block: None,
            current: D::new(),
            zeros: 0,
            data: false,
        }
    }

    fn zeroes_digest(len: usize) -> Output<D> {
        let mut d = D::new();
        update_zeroes(&mut d, len);
        d.finalize()
    }

    fn zero(&mut self, len: usize) {
        if len == self.block_size {
            let d = self
                .zero_block
                .get_or_insert_with(|| Self::zeroes_digest(len));
            self.outer.update(&*d);
        } else {
            let d = Self::zeroes_digest(len);
            self.outer.update(&d);
        }
    }

    /// The next piece of the current data block.
    fn piece(&mut self, piece: &[u8]) {
        if !self.data {
            if is_zero(piece) {
                self.zeros += piece.len();
                return;
            }
            update_zeroes(&mut self.current, self.zeros);
            self.data = true;
        }
        self.current.update(piece);
    }

    /// Ends the current data block: its digest, or the zero path when all
    /// of it was zeroes.
    fn end_block(&mut self) {
        if self.data {
            let d = std::mem::replace(&mut self.current, D::new()).finalize();
            self.outer.update(&d);
        } else {
            self.zero(self.zeros);
        }
        self.zeros = 0;
        self.data = false;
    }

    /// Hashes a whole data block.
    #[cfg(test)]
    fn data(&mut self, block: &[u8]) {
        self.piece(block);
        self.end_block();
    }

    /// Lower-case hex, like Python's `hexdigest()`; every digest's output
    /// (a `GenericArray`) formats so.
    fn hexdigest(self) -> String
    where
        Output<D>: LowerHex,
    {
        format!("{:x}", self.outer.finalize())
    }
}

enum Job {
    /// A block the extents say reads as zeroes, of this length.
    Zero(usize),
    /// A piece of a data block in the buffer's first bytes; true when it
    /// ends the block.
    Piece(Vec<u8>, usize, bool),
}

/// Reads the data blocks of `handle` and hashes every block on a blocking
/// thread, in order: the reads run where the backend does them (NBD on
/// this async worker, a file on the blocking pool), the hashing (CPU-bound)
/// never on an async worker.
async fn run<D: Digest + Send + 'static>(
    handle: &mut Opened,
    extents: &[Extent],
    size: u64,
    block_size: usize,
) -> Result<String, BackendError>
where
    Output<D>: LowerHex,
{
    let blocks = Blocks {
        extents,
        i: 0,
        pos: 0,
        size,
        block_size: block_size as u64,
    };
    let (jobs, mut job_rx) = mpsc::channel::<Job>(1);
    let (free_tx, mut free) = mpsc::unbounded_channel::<Vec<u8>>();
    let hasher = spawn_blocking(move || {
        let mut h = BlockHash::<D>::new(block_size);
        while let Some(job) = job_rx.blocking_recv() {
            match job {
                Job::Zero(len) => h.zero(len),
                Job::Piece(buf, len, last) => {
                    h.piece(&buf[..len]);
                    if last {
                        h.end_block();
                    }
                    let _ = free_tx.send(buf);
                }
            }
        }
        h.hexdigest()
    });
    let mut allocated = 0;
    let piece = PIECE.min(block_size);
    let mut result = Ok(());
    'blocks: for b in blocks {
        if b.zero {
            if jobs.send(Job::Zero(b.len)).await.is_err() {
                break;
            }
            continue;
        }
        let mut done = 0;
        while done < b.len {
            let n = piece.min(b.len - done);
            let buf = match free.try_recv() {
                Ok(buf) => buf,
                Err(_) if allocated < BUFFERS => {
                    allocated += 1;
                    vec![0; piece]
                }
                Err(_) => match free.recv().await {
                    Some(buf) => buf,
                    None => break 'blocks, // the hasher is gone (panicked)
                },
            };
            let buf = match handle.read_at(buf, n, b.start + done as u64).await {
                Ok(buf) => buf,
                Err(e) => {
                    result = Err(e);
                    break 'blocks;
                }
            };
            done += n;
            if jobs.send(Job::Piece(buf, n, done == b.len)).await.is_err() {
                break 'blocks;
            }
        }
    }
    drop(jobs);
    let digest = hasher.await;
    result?;
    digest.map_err(|_| BackendError::Io("checksum thread panicked".into()))
}

/// The checksum of the whole image behind `handle`. Memory:
/// [`MAX_BUFFERED`] bytes of buffers, and the image's zero extents. On
/// error the handle is marked not reusable.
pub(crate) async fn compute(
    handle: &mut Opened,
    params: &Params,
) -> Result<Checksum, BackendError> {
    let result = async {
        let size = handle.size();
        let extents = handle.reads_as_zero_extents().await?;
        let bs = usize::try_from(params.block_size)
            .map_err(|_| BackendError::Io("block size too large".into()))?;
        let (h, e) = (&mut *handle, &extents);
        match params.algorithm {
            Algorithm::Blake2b => run::<Blake2b<U32>>(h, e, size, bs).await,
            Algorithm::Blake2s => run::<Blake2s256>(h, e, size, bs).await,
            Algorithm::Md5 => run::<md5::Md5>(h, e, size, bs).await,
            Algorithm::Sha1 => run::<sha1::Sha1>(h, e, size, bs).await,
            Algorithm::Sha224 => run::<sha2::Sha224>(h, e, size, bs).await,
            Algorithm::Sha256 => run::<sha2::Sha256>(h, e, size, bs).await,
            Algorithm::Sha384 => run::<sha2::Sha384>(h, e, size, bs).await,
            Algorithm::Sha512 => run::<sha2::Sha512>(h, e, size, bs).await,
            Algorithm::Sha3_224 => run::<sha3::Sha3_224>(h, e, size, bs).await,
            Algorithm::Sha3_256 => run::<sha3::Sha3_256>(h, e, size, bs).await,
            Algorithm::Sha3_384 => run::<sha3::Sha3_384>(h, e, size, bs).await,
            Algorithm::Sha3_512 => run::<sha3::Sha3_512>(h, e, size, bs).await,
        }
    }
    .await;
    match result {
        Ok(checksum) => Ok(Checksum {
            algorithm: params.algorithm.name(),
            block_size: params.block_size,
            checksum,
        }),
        Err(e) => {
            handle.discard();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, zero: bool) -> Extent {
        Extent {
            start,
            length,
            zero,
            hole: false,
        }
    }

    fn blocks(extents: &[Extent], size: u64, bs: u64) -> Vec<(u64, usize, bool)> {
        Blocks {
            extents,
            i: 0,
            pos: 0,
            size,
            block_size: bs,
        }
        .map(|b| (b.start, b.len, b.zero))
        .collect()
    }

    #[test]
    fn blocks_are_zero_only_when_covered_by_zero_extents() {
        // |data 3|zero 9      |data 2|zero 6  | in blocks of 4, size 20
        let e = [
            ext(0, 3, false),
            ext(3, 9, true),
            ext(12, 2, false),
            ext(14, 6, true),
        ];
        assert_eq!(
            blocks(&e, 20, 4),
            vec![
                (0, 4, false),
                (4, 4, true),
                (8, 4, true),
                (12, 4, false),
                (16, 4, true)
            ]
        );
        // Unaligned end: the last block is short.
        assert_eq!(
            blocks(&[ext(0, 10, true)], 10, 4),
            vec![(0, 4, true), (4, 4, true), (8, 2, true)]
        );
        // A gap counts as data; no extents: all data.
        assert_eq!(
            blocks(&[ext(0, 2, true), ext(3, 5, true)], 8, 4),
            vec![(0, 4, false), (4, 4, true)]
        );
        assert_eq!(blocks(&[], 5, 4), vec![(0, 4, false), (4, 1, false)]);
        assert_eq!(blocks(&[], 0, 4), vec![]);
    }

    /// The definition, spelled out: H(H(b0) || H(b1) || …).
    fn reference<D: Digest>(data: &[u8], bs: usize) -> String
    where
        Output<D>: LowerHex,
    {
        let mut outer = D::new();
        for block in data.chunks(bs) {
            outer.update(D::digest(block));
        }
        format!("{:x}", outer.finalize())
    }

    #[test]
    fn zero_path_equals_hashing_the_zeroes() {
        let bs = 8192;
        let mut data = vec![0u8; 3 * bs + 100];
        data[bs + 5] = 7;
        let mut h = BlockHash::<Blake2b<U32>>::new(bs);
        for block in data.chunks(bs) {
            h.data(block);
        }
        assert_eq!(h.hexdigest(), reference::<Blake2b<U32>>(&data, bs));
        let mut h = BlockHash::<sha2::Sha256>::new(bs);
        h.zero(bs);
        h.zero(bs);
        h.zero(100);
        assert_eq!(
            h.hexdigest(),
            reference::<sha2::Sha256>(&vec![0; 2 * bs + 100], bs)
        );
    }

    #[test]
    fn a_block_hashed_in_pieces_equals_the_definition() {
        // Blocks of 4 pieces: data, zero then data, all zero, a short one.
        let piece = 4096;
        let bs = 4 * piece;
        let mut data = pattern(bs);
        let mut second = vec![0u8; bs];
        second[2 * piece + 1] = 9;
        data.extend_from_slice(&second);
        data.extend_from_slice(&vec![0u8; bs]);
        data.extend_from_slice(&pattern(piece + 10));
        for_each_algorithm_check(&data, bs, piece);
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 1) as u8).collect()
    }

    fn for_each_algorithm_check(data: &[u8], bs: usize, piece: usize) {
        fn check<D: Digest>(data: &[u8], bs: usize, piece: usize)
        where
            Output<D>: LowerHex,
        {
            let mut h = BlockHash::<D>::new(bs);
            for block in data.chunks(bs) {
                for p in block.chunks(piece) {
                    h.piece(p);
                }
                h.end_block();
            }
            assert_eq!(h.hexdigest(), reference::<D>(data, bs));
        }
        check::<Blake2b<U32>>(data, bs, piece);
        check::<sha2::Sha256>(data, bs, piece);
        check::<md5::Md5>(data, bs, piece);
    }

    #[test]
    fn known_digest_of_an_empty_image() {
        // No blocks: the digest of nothing, 32-byte blake2b.
        let h = BlockHash::<Blake2b<U32>>::new(4096);
        assert_eq!(
            h.hexdigest(),
            "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"
        );
    }

    #[test]
    fn params_like_imageio() {
        assert_eq!(Params::parse(None, None), Ok(Params::default()));
        assert_eq!(
            Params::parse(Some("sha256"), Some("1048576")),
            Ok(Params {
                algorithm: Algorithm::Sha256,
                block_size: MIB
            })
        );
        assert_eq!(
            Params::parse(Some("shake_128"), None).unwrap_err(),
            "Unsupported value \"shake_128\" for \"algorithm\", expecting one of \
             [\"blake2b\", \"blake2s\", \"md5\", \"sha1\", \"sha224\", \"sha256\", \"sha384\", \
             \"sha3_224\", \"sha3_256\", \"sha3_384\", \"sha3_512\", \"sha512\"]"
        );
        assert_eq!(
            Params::parse(None, Some("4M")).unwrap_err(),
            "Invalid block size: \"4M\""
        );
        for bad in ["0", "-4096", "1044480", "16781312", "99999999999999999"] {
            let e = Params::parse(None, Some(bad));
            assert_eq!(
                e.as_ref().map_err(String::as_str),
                Err("Block size out of allowed range: 1048576-16777216"),
                "{bad}"
            );
        }
        assert_eq!(
            Params::parse(None, Some("1048577")).unwrap_err(),
            "Block size is not aligned to 4096"
        );
        let mut names = Algorithm::names();
        names.sort();
        assert_eq!(names, Algorithm::names());
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(a.name()), Some(a));
        }
    }
}
