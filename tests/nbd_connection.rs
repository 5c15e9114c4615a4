//! Integration tests of the safe libnbd wrapper (`nbd::Connection`) against
//! real `qemu-nbd` exports on temporary Unix sockets. Nothing is mocked: every
//! test starts its own qemu-nbd (or, for the failure cases, its own misbehaving
//! Unix socket peer) and checks exact bytes, extents and errnos.
//!
//! The reads, writes, zeroes, flushes and block status are the blocking
//! calls of `common::Blocking`: each runs on an `nbd::Pipeline`, the
//! server's one NBD engine, until its commands retired.
//!
//! Where possible the results are cross-checked with tools that do not go
//! through our wrapper: `nbdcopy` for the bytes of an export and `nbdinfo
//! --map` for block status.

pub mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use cloudstack_image_server::nbd::*;
use common::*;

const KIB: u64 = 1024;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;
/// What qemu-nbd advertises as its maximum block size.
const QEMU_MAX_BLOCK: u64 = 32 * MIB;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for a call that must not hang before calling it hung.
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// An image served by qemu-nbd from its own temporary directory.
struct Export {
    // Declared first so qemu-nbd is stopped before the directory goes away.
    nbd: QemuNbd,
    image: PathBuf,
    _dir: TempDir,
}

impl Export {
    /// Creates a sparse image of `size`, lets `prepare` modify it (qemu-io,
    /// bitmaps) while nothing has it open, then serves it with `opts`.
    fn start(tag: &str, size: u64, opts: NbdOpts, prepare: impl FnOnce(&Path)) -> Export {
        let dir = TempDir::new(tag);
        let image = dir.join(&format!("disk.{}", opts.format));
        create_image(&image, &opts.format, size);
        prepare(&image);
        let nbd = QemuNbd::start(&image, &dir.join("nbd.sock"), opts);
        Export {
            nbd,
            image,
            _dir: dir,
        }
    }

    fn new(tag: &str, size: u64, opts: NbdOpts) -> Export {
        Self::start(tag, size, opts, |_| {})
    }

    fn connect(&self, contexts: &[&str]) -> Blocking {
        Connection::connect_unix(&ConnectOptions {
            socket: &self.nbd.socket,
            export: self.nbd.opts.export_name.as_deref(),
            meta_contexts: contexts,
            timeout: CONNECT_TIMEOUT,
            command_timeout: None,
        })
        .unwrap_or_else(|e| panic!("connect to {}: {e}", self.nbd.uri()))
        .into()
    }

    /// Every byte of the export, read by nbdcopy (not through our wrapper).
    fn bytes(&self) -> Vec<u8> {
        run(Command::new("nbdcopy").arg(self.nbd.uri()).arg("-")).stdout
    }
}

fn opts_for(format: &str) -> NbdOpts {
    match format {
        "raw" => NbdOpts::raw(),
        "qcow2" => NbdOpts::qcow2(),
        f => panic!("unknown format {f}"),
    }
}

fn connect_to(socket: &Path, export: Option<&str>, timeout: Duration) -> Result<Connection> {
    Connection::connect_unix(&ConnectOptions {
        socket,
        export,
        meta_contexts: &[],
        timeout,
        command_timeout: None,
    })
}

/// Runs `f` on another thread and fails the test if it does not finish within
/// [`HANG`] (so a wrapper that hangs fails instead of blocking the suite).
fn no_hang<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG) {
        Ok(v) => v,
        // The closure panicked: report its panic, not a hang.
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("worker ended without sending"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: did not return within {HANG:?}"),
    }
}

#[track_caller]
fn expect_err<T>(r: Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: expected an error, got Ok"),
        Err(e) => e,
    }
}

/// Compares two byte buffers and reports the first difference (never dumps
/// megabytes into the test output).
#[track_caller]
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if actual != expected {
        let i = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap();
        let n = actual[i..]
            .iter()
            .zip(&expected[i..])
            .take_while(|(a, b)| a != b)
            .count();
        panic!(
            "{what}: first difference at byte {i} (run of {n} differing bytes): got {:02x?}, expected {:02x?}",
            &actual[i..(i + 8).min(actual.len())],
            &expected[i..(i + 8).min(expected.len())]
        );
    }
}

/// What the image should contain: it starts as zeroes and the operations are
/// applied in order. Lets tests check windows of huge sparse images without
/// holding the whole image in memory.
#[derive(Default)]
struct Model {
    ops: Vec<(u64, Option<Vec<u8>>, u64)>,
}

impl Model {
    fn data(&mut self, offset: u64, data: &[u8]) {
        self.ops
            .push((offset, Some(data.to_vec()), data.len() as u64));
    }
    fn zero(&mut self, offset: u64, len: u64) {
        self.ops.push((offset, None, len));
    }
    fn expected(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let end = offset + len;
        for (o, data, l) in &self.ops {
            let from = (*o).max(offset);
            let to = (o + l).min(end);
            if from >= to {
                continue;
            }
            let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(from - o) as usize..(to - o) as usize]),
                None => dst.fill(0),
            }
        }
        out
    }
}

/// Writes through the connection and records the write in the model.
fn write(conn: &mut Blocking, model: &mut Model, offset: u64, data: &[u8]) {
    conn.pwrite(data, offset)
        .unwrap_or_else(|e| panic!("pwrite {}@{offset}: {e}", data.len()));
    model.data(offset, data);
}

/// Reads `len` bytes at `offset` and compares them with the model.
#[track_caller]
fn check_window(conn: &mut Blocking, model: &Model, offset: u64, len: u64) {
    let mut buf = vec![0xA5u8; len as usize];
    conn.pread_into(&mut buf, offset)
        .unwrap_or_else(|e| panic!("pread {len}@{offset}: {e}"));
    assert_same(
        &buf,
        &model.expected(offset, len),
        &format!("{len}@{offset}"),
    );
}

/// A block status list (`(length, flags)` from `offset`) as `(offset,
/// length, flags)`, touching entries of equal flags merged (block status
/// leaves them apart where two queries meet).
fn tuples(list: &[(u64, u32)], offset: u64) -> Vec<(u64, u64, u32)> {
    let mut at = offset;
    merge_map(
        list.iter()
            .map(|&(l, f)| {
                at += l;
                (at - l, l, f)
            })
            .collect(),
    )
}

/// The part of a map inside `offset..offset+len`.
fn clip(map: &[(u64, u64, u32)], offset: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let end = offset + len;
    map.iter()
        .filter_map(|&(o, l, t)| {
            let from = o.max(offset);
            let to = (o + l).min(end);
            (from < to).then(|| (from, to - from, t))
        })
        .collect()
}

/// A block status list must cover `offset..offset+len` exactly, with no
/// empty entries.
#[track_caller]
fn assert_covers(list: &[(u64, u32)], offset: u64, len: u64) {
    for (i, &(l, _)) in list.iter().enumerate() {
        assert!(l > 0, "empty entry {i} in {list:?}");
    }
    let total: u64 = list.iter().map(|&(l, _)| l).sum();
    assert_eq!(total, len, "{list:?} does not cover {len}@{offset}");
}

/// The flags at `at` of a block status list from offset 0.
fn flags_at(list: &[(u64, u32)], at: u64) -> u32 {
    tuples(list, 0)
        .into_iter()
        .find(|&(o, l, _)| o <= at && at < o + l)
        .unwrap_or_else(|| panic!("no entry contains {at} in {list:?}"))
        .2
}

/// `nbdinfo --json URI` of the (single) export.
fn nbdinfo(uri: &str) -> serde_json::Value {
    let out = run(Command::new("nbdinfo").arg("--json").arg(uri));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo json");
    v["exports"][0].clone()
}

/// Adds `write -z` (allocated zeroes) or other qemu-io commands.
fn qemu_io(path: &Path, format: &str, command: &str) {
    run(Command::new("qemu-io")
        .args(["-f", format, "-c", command])
        .arg(path));
}

fn bitmap_granularity(image: &Path, name: &str) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(image));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img info json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .expect("bitmaps")
        .iter()
        .find(|b| b["name"] == name)
        .expect("bitmap present")["granularity"]
        .as_u64()
        .expect("granularity")
}

// ---------------------------------------------------------------------------
// reads and writes
// ---------------------------------------------------------------------------

/// pread_into / pwrite with a request larger than max_request (split into
/// several NBD commands) at unaligned offsets and lengths, checked byte for
/// byte through the wrapper and independently with nbdcopy.
fn round_trip(format: &str) {
    let size = 48 * MIB;
    let ex = Export::new(&format!("rt-{format}"), size, opts_for(format));
    let mut c = ex.connect(&[]);
    assert_eq!(c.size(), size);
    assert_eq!(c.max_request(), QEMU_MAX_BLOCK);

    let mut model = Model::default();
    // A fresh image reads as zeroes.
    check_window(&mut c, &model, 0, MIB);

    // 33 MiB + 3 bytes starting 1 byte before a 4 KiB boundary: split into
    // a 32 MiB and a 1 MiB + 3 request, neither end aligned.
    let big = pattern_bytes((33 * MIB + 3) as usize, 1);
    let off = 3 * MIB + 4095;
    write(&mut c, &mut model, off, &big);
    let mut back = vec![0u8; big.len()];
    c.pread_into(&mut back, off).unwrap();
    assert_same(&back, &big, "33 MiB read back");

    // Small unaligned writes, one overwriting the internal split point of
    // the big write, one the very last byte of the export.
    write(
        &mut c,
        &mut model,
        off + QEMU_MAX_BLOCK - 5,
        &pattern_bytes(11, 2),
    );
    write(&mut c, &mut model, 12345, &pattern_bytes(513, 3));
    write(&mut c, &mut model, size - 1, &[0x5A]);
    write(&mut c, &mut model, size - 4097, &pattern_bytes(4000, 4));

    // Unaligned windows across every edge.
    for (o, l) in [
        (0, 1),
        (12340, 520),
        (off - 7, 20),
        (off + QEMU_MAX_BLOCK - 9, 19),
        (off + big.len() as u64 - 3, 10),
        (size - 4100, 4100),
        (size - 1, 1),
        (5, 33 * MIB + 17),
    ] {
        check_window(&mut c, &model, o, l);
    }
    // Whole export through the wrapper (48 MiB: 32 + 16 MiB requests) ...
    check_window(&mut c, &model, 0, size);
    c.flush().unwrap();
    // ... and through nbdcopy, so symmetric read/write bugs cannot hide.
    assert_same(
        &ex.bytes(),
        &model.expected(0, size),
        "nbdcopy of the export",
    );
}

#[test]
fn raw_pread_pwrite_round_trip_large_and_unaligned() {
    round_trip("raw");
}

#[test]
fn qcow2_pread_pwrite_round_trip_large_and_unaligned() {
    round_trip("qcow2");
}

/// The pipelined calls with many requests in flight on one handle, including
/// request sizes outside the allowed range (clamped to 4 KiB and max_request).
fn pipelined(format: &str) {
    let size = 40 * MIB;
    let ex = Export::new(&format!("pipe-{format}"), size, opts_for(format));
    let mut c = ex.connect(&[]);
    let mut model = Model::default();
    // One pattern, written in different slices at different offsets.
    let pattern = pattern_bytes((33 * MIB + 1234) as usize, 5);

    // 9 MiB + 1234 bytes in 256 KiB requests: 37 commands in flight.
    let data = &pattern[..(9 * MIB + 1234) as usize];
    let off = 777;
    c.pwrite_pipelined(data, off, 256 * KIB as usize).unwrap();
    model.data(off, data);

    // 64 KiB requests: 147 reads in flight, more than qemu-nbd serves at once.
    let mut back = vec![0u8; data.len()];
    c.pread_pipelined(&mut back, off, 64 * KIB as usize)
        .unwrap();
    assert_same(&back, data, "pipelined read back");
    check_window(&mut c, &model, 0, 10 * MIB);

    // request_size 1 is clamped to 4 KiB: 640 commands for 2.5 MiB.
    let small = &pattern[1000..(1000 + 5 * MIB / 2 - 3) as usize];
    c.pwrite_pipelined(small, 20 * MIB + 1, 1).unwrap();
    model.data(20 * MIB + 1, small);
    // request_size above max_request is clamped to it (qemu-nbd refuses
    // requests over 32 MiB).
    let large = &pattern[..(33 * MIB) as usize];
    c.pwrite_pipelined(large, 5 * MIB - 1, 64 * MIB as usize)
        .unwrap();
    model.data(5 * MIB - 1, large);

    let mut all = vec![0u8; size as usize];
    c.pread_pipelined(&mut all, 0, usize::MAX).unwrap();
    assert_same(&all, &model.expected(0, size), "pipelined max reads of all");
    // Unaligned windows in odd request sizes, and in 4 KiB requests.
    let mut w = vec![0u8; 3 * MIB as usize + 11];
    c.pread_pipelined(&mut w, 20 * MIB - 5, 100_000).unwrap();
    assert_same(&w, &model.expected(20 * MIB - 5, w.len() as u64), "window");
    c.pread_pipelined(&mut w, 20 * MIB - 5, 1).unwrap();
    assert_same(
        &w,
        &model.expected(20 * MIB - 5, w.len() as u64),
        "4 KiB window",
    );
    // Empty buffers are fine and send nothing.
    c.pread_pipelined(&mut [], size, 4096).unwrap();
    c.pwrite_pipelined(&[], size, 4096).unwrap();

    c.flush().unwrap();
    assert_same(
        &ex.bytes(),
        &model.expected(0, size),
        "nbdcopy of the export",
    );
}

#[test]
fn raw_pipelined_round_trip() {
    pipelined("raw");
}

#[test]
fn qcow2_pipelined_round_trip() {
    pipelined("qcow2");
}

#[test]
fn pipelined_with_thousands_of_requests_in_flight() {
    let size = 16 * MIB;
    let ex = Export::new("pipe-many", size, NbdOpts::raw());
    let mut c = ex.connect(&[]);
    let data = pattern_bytes(size as usize, 8);
    // 4096 commands of 4 KiB each way, all submitted before the first wait.
    let back = no_hang("4096 pipelined requests", move || {
        c.pwrite_pipelined(&data, 0, 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        c.pread_pipelined(&mut back, 0, 4096).unwrap();
        assert_same(&back, &data, "read back");
        back
    });
    assert_same(&ex.bytes(), &back, "nbdcopy of the export");
}

#[test]
fn size_matches_image_for_odd_sizes() {
    // A raw image whose size is not a multiple of 4 KiB, and a qcow2.
    for (format, size) in [("raw", 10 * MIB + 512), ("qcow2", 3 * GIB + 64 * KIB)] {
        let ex = Export::new("size", size, opts_for(format));
        let mut c = ex.connect(&[]);
        assert_eq!(c.size(), size, "{format}");
        // The last bytes are reachable, one past is not.
        let mut model = Model::default();
        write(&mut c, &mut model, size - 3, b"end");
        check_window(&mut c, &model, size - 4096, 4096);
        let e = expect_err(c.pwrite(b"xy", size - 1), "write past the end");
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
    }
}

#[test]
fn requests_beyond_the_end_are_einval_and_leave_the_connection_usable() {
    let size = 4 * MIB;
    let ex = Export::new("bounds", size, NbdOpts::qcow2());
    let mut c = ex.connect(&[CONTEXT_BASE_ALLOCATION]);
    let mut buf = [0u8; 2];
    let errors = [
        expect_err(c.pread_into(&mut buf, size - 1), "pread"),
        expect_err(c.pread_into(&mut buf, u64::MAX), "pread overflow"),
        expect_err(c.pwrite(&buf, size), "pwrite"),
        expect_err(
            c.pread_pipelined(&mut buf, size - 1, 4096),
            "pread_pipelined",
        ),
        expect_err(
            c.pwrite_pipelined(&buf, u64::MAX - 1, 4096),
            "pwrite_pipelined",
        ),
        expect_err(c.zero(size - 1, 2), "zero"),
        expect_err(c.zero(1, u64::MAX), "zero overflow"),
        expect_err(
            c.block_status(size, 1, &[CONTEXT_BASE_ALLOCATION]),
            "block_status",
        ),
    ];
    for e in errors {
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert!(e.message().contains("beyond the end"), "{e}");
    }
    assert!(!c.is_dead());
    // Zero-length requests at the very end are valid and do nothing.
    c.pread_into(&mut [], size).unwrap();
    c.pwrite(&[], size).unwrap();
    c.zero(size, 0).unwrap();
    assert_eq!(
        c.block_status(size, 0, &[CONTEXT_BASE_ALLOCATION]).unwrap(),
        vec![Vec::<(u64, u32)>::new()]
    );
    assert_eq!(
        c.block_status(0, size, &[]).unwrap(),
        Vec::<Vec<(u64, u32)>>::new()
    );
    c.pread_into(&mut buf, size - 2).unwrap();
    assert_eq!(buf, [0, 0]);
}

// ---------------------------------------------------------------------------
// zero and flush
// ---------------------------------------------------------------------------

#[test]
fn zero_reads_back_zeroes_and_leaves_neighbours_untouched() {
    for format in ["raw", "qcow2"] {
        let size = 8 * MIB;
        let ex = Export::new(&format!("zero-{format}"), size, opts_for(format));
        let mut c = ex.connect(&[]);
        assert!(c.can_zero().unwrap());
        let mut model = Model::default();
        write(
            &mut c,
            &mut model,
            0,
            &pattern_bytes((5 * MIB) as usize, 11),
        );
        // Unaligned ranges, inside a cluster, across cluster boundaries and
        // up to the end of the written data.
        for (o, l) in [
            (4096 + 7, 100_000),
            (2 * MIB - 3, 64 * KIB + 6),
            (3 * MIB + 1, 1),
            (5 * MIB - 10, 3 * MIB + 10),
        ] {
            c.zero(o, l)
                .unwrap_or_else(|e| panic!("{format}: zero {l}@{o}: {e}"));
            model.zero(o, l);
        }
        check_window(&mut c, &model, 0, size);
        c.flush().unwrap();
        assert_same(&ex.bytes(), &model.expected(0, size), format);
    }
}

#[test]
fn zero_of_3_gib_on_sparse_qcow2_is_split_and_exact() {
    let size = 4 * GIB;
    let ex = Export::new("zero-big", size, NbdOpts::qcow2());
    let mut c = ex.connect(&[]);
    let mut model = Model::default();
    let start = 512;
    let len = 3 * GIB;
    // Data straddling the start, every 1 GiB split point (counted from the
    // start of the range), the end of the range, and the end of the image.
    write(&mut c, &mut model, 0, &pattern_bytes(64 * KIB as usize, 21));
    for k in 1..=3 {
        let at = start + k * GIB - 4096;
        write(&mut c, &mut model, at, &pattern_bytes(8192, 21 + k));
    }
    write(&mut c, &mut model, size - 4096, &pattern_bytes(4096, 25));

    c.zero(start, len).unwrap();
    model.zero(start, len);

    check_window(&mut c, &model, 0, 128 * KIB);
    for k in 1..=3 {
        check_window(&mut c, &model, start + k * GIB - 8192, 16384);
    }
    check_window(&mut c, &model, size - 8192, 8192);
    // The range reads as zero across its whole length (spot checks in each GiB).
    for k in 0..3 {
        check_window(&mut c, &model, start + k * GIB + GIB / 2, 4096);
    }
    c.flush().unwrap();
}

// ---------------------------------------------------------------------------
// capability flags
// ---------------------------------------------------------------------------

#[test]
fn writable_export_flags_match_nbdinfo() {
    let ex = Export::new("flags-rw", MIB, NbdOpts::raw());
    let c = ex.connect(&[]);
    assert!(!c.is_read_only().unwrap());
    assert!(c.can_flush().unwrap());
    assert!(c.can_zero().unwrap());
    let info = nbdinfo(&ex.nbd.uri());
    assert_eq!(info["is_read_only"], c.is_read_only().unwrap());
    assert_eq!(info["can_flush"], c.can_flush().unwrap());
    assert_eq!(info["can_zero"], c.can_zero().unwrap());
    assert_eq!(info["can_multi_conn"], c.can_multi_conn().unwrap());
    assert_eq!(info["block_size_maximum"], c.max_request());
    assert_eq!(info["export-size"], c.size());
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let opts = NbdOpts {
        read_only: true,
        ..NbdOpts::raw()
    };
    let ex = Export::start("flags-ro", MIB, opts, |img| {
        qemu_io_write(img, "raw", 0, MIB, 0x5a)
    });
    let mut c = ex.connect(&[]);
    assert!(c.is_read_only().unwrap());
    let info = nbdinfo(&ex.nbd.uri());
    assert_eq!(info["is_read_only"], true);
    assert_eq!(info["can_zero"], c.can_zero().unwrap());
    assert_eq!(info["can_flush"], c.can_flush().unwrap());

    // libnbd refuses writes on a read-only export itself, before sending.
    let e = expect_err(c.pwrite(&[1, 2, 3], 10), "pwrite on read-only");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert!(e.message().contains("does not support write"), "{e}");
    let e = expect_err(c.pwrite_pipelined(&[7; 8192], 0, 4096), "pwrite_pipelined");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    // qemu-nbd does not advertise WRITE_ZEROES on a read-only export, and
    // libnbd 1.14 checks that before read-only-ness: EINVAL, not EPERM.
    assert!(!c.can_zero().unwrap());
    let e = expect_err(c.zero(0, 4096), "zero on read-only");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(e.message().contains("does not support zero"), "{e}");

    // Nothing was written and the connection is still good.
    assert!(!c.is_dead());
    let mut buf = vec![0u8; MIB as usize];
    c.pread_into(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    if c.can_flush().unwrap() {
        c.flush().unwrap();
    }
}

// ---------------------------------------------------------------------------
// block status
// ---------------------------------------------------------------------------

/// Data at the start, inside one cluster, a multi-cluster run, an unaligned
/// small write, allocated zeroes, and data up to the end of the image.
fn allocation_layout(img: &Path, format: &str) {
    qemu_io_write(img, format, 0, 64 * KIB, 0x11);
    qemu_io_write(img, format, MIB + 4096, 8 * KIB, 0x22);
    qemu_io_write(img, format, 10 * MIB, 3 * MIB, 0x33);
    qemu_io_write(img, format, 30 * MIB + 123, 1000, 0x44);
    qemu_io(img, format, "write -z 40M 2M");
    qemu_io_write(img, format, 63 * MIB, MIB, 0x55);
}

#[test]
fn block_status_base_allocation_matches_nbdinfo() {
    for format in ["qcow2", "raw"] {
        let size = 64 * MIB;
        let ex = Export::start(&format!("bs-{format}"), size, opts_for(format), |img| {
            allocation_layout(img, format)
        });
        let mut c = ex.connect(&[CONTEXT_BASE_ALLOCATION]);
        assert!(c.can_meta_context(CONTEXT_BASE_ALLOCATION).unwrap());
        let reference = merge_map(nbdinfo_map(&ex.nbd.uri(), None));

        let lists = c.block_status(0, size, &[CONTEXT_BASE_ALLOCATION]).unwrap();
        assert_eq!(lists.len(), 1);
        let full = &lists[0];
        assert_covers(full, 0, size);
        assert_eq!(tuples(full, 0), reference, "{format}: whole export");
        // Not a trivial map: written data is data, the gaps are holes.
        for at in [0, MIB + 4096, 11 * MIB, 30 * MIB + 500, size - 1] {
            assert_eq!(flags_at(full, at), 0, "{format}: data at {at}");
        }
        for at in [5 * MIB, 20 * MIB, 50 * MIB] {
            assert_eq!(
                flags_at(full, at),
                STATE_HOLE | STATE_ZERO,
                "{format}: hole at {at}"
            );
        }
        assert_ne!(
            flags_at(full, 41 * MIB) & STATE_ZERO,
            0,
            "{format}: write -z"
        );

        // Sub-ranges starting and ending inside extents of either kind.
        for (o, l) in [
            (MIB + 100, 20 * MIB + 7),
            (10 * MIB + 1, 1),
            (0, 1),
            (5 * MIB, 40 * MIB),
            (63 * MIB - 5, MIB + 5),
            (size - 1, 1),
        ] {
            let got = c.block_status(o, l, &[CONTEXT_BASE_ALLOCATION]).unwrap();
            assert_covers(&got[0], o, l);
            assert_eq!(
                tuples(&got[0], o),
                clip(&reference, o, l),
                "{format}: {l}@{o}"
            );
        }
    }
}

#[test]
fn block_status_of_1_tib_sparse_qcow2_covers_the_range_exactly() {
    let size = TIB;
    // The wrapper asks for at most 4 GiB - 1 MiB at a time; put data across
    // that boundary, far out, and at the very end.
    let step = 4 * GIB - MIB;
    let data = [
        (0, MIB),
        (step - 64 * KIB, 128 * KIB),
        (100 * GIB + 3 * MIB, 2 * MIB),
        (512 * GIB, 64 * KIB),
        (size - 64 * KIB, 64 * KIB),
    ];
    let ex = Export::start("bs-1t", size, NbdOpts::qcow2(), |img| {
        for (i, (o, l)) in data.iter().enumerate() {
            qemu_io_write(img, "qcow2", *o, *l, i as u8 + 1);
        }
    });
    // All data is cluster aligned, so the map is known exactly.
    let mut expected: Vec<(u64, u64, u32)> = Vec::new();
    let mut at = 0;
    for (o, l) in data {
        if o > at {
            expected.push((at, o - at, STATE_HOLE | STATE_ZERO));
        }
        expected.push((o, l, 0));
        at = o + l;
    }
    assert_eq!(at, size);

    let mut c = ex.connect(&[CONTEXT_BASE_ALLOCATION]);
    assert_eq!(c.size(), size);
    let lists = c.block_status(0, size, &[CONTEXT_BASE_ALLOCATION]).unwrap();
    assert_covers(&lists[0], 0, size);
    assert_eq!(tuples(&lists[0], 0), expected);
    assert_eq!(expected, merge_map(nbdinfo_map(&ex.nbd.uri(), None)));

    for (o, l) in [
        (3 * GIB + 5, 600 * GIB),
        (step - 1, 2),
        (512 * GIB + 1, size - 512 * GIB - 1),
    ] {
        let got = c.block_status(o, l, &[CONTEXT_BASE_ALLOCATION]).unwrap();
        assert_covers(&got[0], o, l);
        assert_eq!(tuples(&got[0], o), clip(&expected, o, l), "{l}@{o}");
    }
}

#[test]
fn dirty_bitmap_and_allocation_in_one_call_match_nbdinfo() {
    let size = 64 * MIB;
    let dirty_ctx = format!("{CONTEXT_DIRTY_BITMAP_PREFIX}bm0");
    let opts = NbdOpts {
        bitmap: Some("bm0".into()),
        ..NbdOpts::qcow2()
    };
    let mut granularity = 0;
    let ex = Export::start("dirty", size, opts, |img| {
        // Allocated before the bitmap exists: data, but not dirty.
        qemu_io_write(img, "qcow2", 8 * MIB, MIB, 0x11);
        add_bitmap(img, "bm0");
        granularity = bitmap_granularity(img, "bm0");
    });
    assert!(granularity >= 512, "granularity {granularity}");

    let contexts = [CONTEXT_BASE_ALLOCATION, dirty_ctx.as_str()];
    let mut c = ex.connect(&contexts);
    assert!(c.can_meta_context(CONTEXT_BASE_ALLOCATION).unwrap());
    assert!(c.can_meta_context(&dirty_ctx).unwrap());
    assert!(!c.can_meta_context(CONTEXT_ALLOCATION_DEPTH).unwrap());
    assert!(!c.can_meta_context("qemu:dirty-bitmap:other").unwrap());

    // Nothing is dirty yet.
    let before = c.block_status(0, size, &[&dirty_ctx]).unwrap();
    assert_eq!(tuples(&before[0], 0), vec![(0, size, 0)]);

    let writes = [
        (0, 4096),
        (5 * MIB + 123, 1000),
        (20 * MIB - 10, 20),
        (5 * MIB + 2 * granularity, 1),
        (63 * MIB, MIB),
    ];
    let mut model = Model::default();
    for (i, (o, l)) in writes.iter().enumerate() {
        write(
            &mut c,
            &mut model,
            *o,
            &pattern_bytes(*l as usize, 40 + i as u64),
        );
    }
    // Expected dirty map: every write rounded out to the bitmap granularity.
    let mut dirty: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(o, l)| {
            let from = o / granularity * granularity;
            let to = (o + l).div_ceil(granularity) * granularity;
            (from, to.min(size))
        })
        .collect();
    dirty.sort();
    let mut expected_dirty = Vec::new();
    let mut at = 0;
    for (from, to) in dirty {
        if from > at {
            expected_dirty.push((at, from - at, 0));
        }
        expected_dirty.push((from, to - from, STATE_DIRTY));
        at = to;
    }
    if at < size {
        expected_dirty.push((at, size - at, 0));
    }
    let expected_dirty = merge_map(expected_dirty);

    let lists = c.block_status(0, size, &contexts).unwrap();
    assert_eq!(lists.len(), 2);
    assert_covers(&lists[0], 0, size);
    assert_covers(&lists[1], 0, size);
    assert_eq!(tuples(&lists[1], 0), expected_dirty);
    let uri = ex.nbd.uri();
    assert_eq!(
        tuples(&lists[1], 0),
        merge_map(nbdinfo_map(&uri, Some(&dirty_ctx)))
    );
    assert_eq!(tuples(&lists[0], 0), merge_map(nbdinfo_map(&uri, None)));
    // The pre-bitmap data is allocated but clean; the new writes are data.
    assert_eq!(flags_at(&lists[0], 8 * MIB), 0);
    assert_eq!(flags_at(&lists[1], 8 * MIB), 0);
    assert_eq!(flags_at(&lists[0], 20 * MIB), 0);
    assert_eq!(flags_at(&lists[1], 20 * MIB), STATE_DIRTY);

    // Lists come back in the order the contexts are given.
    let reversed = c
        .block_status(0, size, &[&dirty_ctx, CONTEXT_BASE_ALLOCATION])
        .unwrap();
    assert_eq!(reversed, vec![lists[1].clone(), lists[0].clone()]);
    // A sub-range of one context.
    let (o, l) = (5 * MIB + 1, 15 * MIB);
    let sub = c.block_status(o, l, &[&dirty_ctx]).unwrap();
    assert_eq!(tuples(&sub[0], o), clip(&expected_dirty, o, l));

    c.flush().unwrap();
    for (o, l) in writes {
        check_window(&mut c, &model, o, l);
    }
}

#[test]
fn block_status_for_a_context_not_negotiated_is_einval() {
    let size = 4 * MIB;
    // No -B: qemu-nbd has no dirty bitmap context to offer.
    let ex = Export::start("bs-noctx", size, NbdOpts::qcow2(), |img| {
        qemu_io_write(img, "qcow2", 0, MIB, 1)
    });
    let dirty_ctx = format!("{CONTEXT_DIRTY_BITMAP_PREFIX}bm0");
    let mut c = ex.connect(&[CONTEXT_BASE_ALLOCATION, &dirty_ctx]);
    assert!(c.can_meta_context(CONTEXT_BASE_ALLOCATION).unwrap());
    assert!(!c.can_meta_context(&dirty_ctx).unwrap());

    for contexts in [
        vec![dirty_ctx.as_str()],
        vec![CONTEXT_BASE_ALLOCATION, dirty_ctx.as_str()],
        vec![CONTEXT_ALLOCATION_DEPTH],
    ] {
        let e = expect_err(c.block_status(0, size, &contexts), "not negotiated");
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        let missing = contexts[contexts.len() - 1];
        assert_eq!(
            e.message(),
            format!("meta context {missing} was not negotiated with the NBD server")
        );
    }
    // The connection is fine, and a context may be asked for twice.
    let expected = vec![(0, MIB, 0), (MIB, size - MIB, STATE_HOLE | STATE_ZERO)];
    let twice = c
        .block_status(0, size, &[CONTEXT_BASE_ALLOCATION, CONTEXT_BASE_ALLOCATION])
        .unwrap();
    assert_eq!(twice.len(), 2);
    assert_eq!(tuples(&twice[0], 0), expected);
    assert_eq!(tuples(&twice[1], 0), expected);
}

// ---------------------------------------------------------------------------
// connecting: export names, bad sockets, bad peers
// ---------------------------------------------------------------------------

#[test]
fn export_name_selects_the_export_and_a_wrong_name_is_enoent() {
    let opts = NbdOpts {
        export_name: Some("vda".into()),
        ..NbdOpts::qcow2()
    };
    let ex = Export::new("names", 2 * MIB, opts);
    let c = connect_to(&ex.nbd.socket, Some("vda"), CONNECT_TIMEOUT).unwrap();
    assert_eq!(c.size(), 2 * MIB);
    drop(c);

    let e = expect_err(
        connect_to(&ex.nbd.socket, Some("wrong"), CONNECT_TIMEOUT),
        "wrong export",
    );
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(
        e.message().contains("no export named 'wrong'"),
        "message should name the export: {e}"
    );
    // No name means the default export "", which this server does not have.
    let e = expect_err(
        connect_to(&ex.nbd.socket, None, CONNECT_TIMEOUT),
        "default export",
    );
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    assert!(e.message().contains("no export named ''"), "{e}");
}

#[test]
fn missing_or_unusable_socket_paths_are_errors() {
    let dir = TempDir::new("nosock");
    let e = expect_err(
        connect_to(&dir.join("missing.sock"), None, CONNECT_TIMEOUT),
        "missing socket",
    );
    assert_eq!(e.errno(), libc::ENOENT, "{e}");
    // A regular file is not listening.
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let e = expect_err(connect_to(&file, None, CONNECT_TIMEOUT), "regular file");
    assert_eq!(e.errno(), libc::ECONNREFUSED, "{e}");
    // A path longer than sun_path.
    let long = dir.join(&"x".repeat(200));
    let e = expect_err(connect_to(&long, None, CONNECT_TIMEOUT), "long path");
    assert_eq!(e.errno(), libc::ENAMETOOLONG, "{e}");
}

/// A Unix socket at `path` whose peer accepts one connection and calls `serve`.
fn fake_peer(path: &Path, serve: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static) {
    let listener = UnixListener::bind(path).expect("bind fake peer");
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            serve(stream);
        }
    });
}

#[test]
fn silent_peer_times_out_with_etimedout() {
    let dir = TempDir::new("silent");
    let sock = dir.join("silent.sock");
    // Accepts, never says anything, and reports when the client goes away.
    let (closed_tx, closed_rx) = mpsc::channel();
    fake_peer(&sock, move |mut s| {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        let _ = closed_tx.send(sink.len());
    });
    let e = no_hang("connect to a silent peer", move || {
        connect_to(&sock, None, Duration::from_millis(700)).err()
    })
    .expect("a silent peer must not give a connection");
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert_eq!(e.message(), "NBD connect timed out after 0.7 s");
    // The failed handle was closed, not leaked: the peer sees EOF (and the
    // client never sent anything, since the server speaks first in NBD).
    assert_eq!(closed_rx.recv_timeout(HANG), Ok(0));
}

#[test]
fn garbage_speaking_peer_is_an_error_not_a_hang() {
    // libnbd 1.14 records these handshake failures without an errno.
    let cases: [(&[u8], &str); 4] = [
        (b"", "server disconnected unexpectedly"),
        (b"xyz", "server disconnected unexpectedly"),
        (
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            "did not send expected NBD magic",
        ),
        (
            b"NBDMAGIC\x01\x02\x03\x04\x05\x06\x07\x08",
            "not either an oldstyle or fixed newstyle",
        ),
    ];
    let dir = TempDir::new("garbage");
    for (i, (garbage, message)) in cases.into_iter().enumerate() {
        let sock = dir.join(&format!("g{i}.sock"));
        fake_peer(&sock, move |mut s| {
            // Let the client get past connect(2) into the handshake first.
            std::thread::sleep(Duration::from_millis(200));
            let _ = s.write_all(garbage);
            // dropped: the peer closes
        });
        let e = no_hang("connect to a garbage peer", move || {
            connect_to(&sock, None, HANG).err()
        })
        .unwrap_or_else(|| panic!("{garbage:?}: a garbage peer must not give a connection"));
        assert!(e.message().contains(message), "{garbage:?}: {e}");
        assert_eq!(e.errno(), 0, "{garbage:?}: {e}");
    }
}

#[test]
fn peer_that_hangs_up_at_once_is_reported_as_a_disconnect() {
    // A peer that closes right after accept(2) can hang up before libnbd has
    // seen the connect complete. libnbd 1.14's own nbd_poll then fails with
    // "external event 0 is invalid in state CONNECT.START" (EINVAL) on a
    // fraction of the attempts; the wrapper must report the disconnect.
    let dir = TempDir::new("hangup");
    let sock = dir.join("hangup.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let attempts = 300;
    let acceptor = std::thread::spawn(move || {
        for _ in 0..attempts {
            drop(listener.accept().expect("accept"));
        }
    });
    let messages = no_hang("connect to peers that hang up", move || {
        (0..attempts)
            .map(|_| {
                let e = expect_err(connect_to(&sock, None, HANG), "hang-up");
                // Without libnbd's "nbd_aio_notify_read: " / "..._write: ".
                let (_, reason) = e.message().split_once(": ").unwrap_or_default();
                (e.errno(), reason.to_string())
            })
            .collect::<std::collections::BTreeSet<_>>()
    });
    acceptor.join().unwrap();
    assert_eq!(
        messages.into_iter().collect::<Vec<_>>(),
        vec![(0, "recv: server disconnected unexpectedly".to_string())]
    );
}

// ---------------------------------------------------------------------------
// server failures
// ---------------------------------------------------------------------------

/// blkdebug (a qemu block filter) makes every data write of the image fail
/// with EIO from `offset` on; qemu-nbd answers those writes with an error
/// reply and keeps the connection.
fn failing_writes_export(offset: u64) -> Export {
    let dir = TempDir::new("eio");
    let image = dir.join("disk.raw");
    create_image(&image, "raw", 4 * MIB);
    let spec = blkdebug_spec(&dir, &image, offset, "write_aio");
    let nbd = QemuNbd::start(&spec, &dir.join("nbd.sock"), NbdOpts::raw());
    Export {
        nbd,
        image,
        _dir: dir,
    }
}

#[test]
fn server_side_write_errors_are_eio_and_all_pipelined_requests_complete() {
    let bad = MIB;
    let ex = failing_writes_export(bad);
    let mut c = ex.connect(&[]);

    let e = expect_err(c.pwrite(&[1; 4096], bad), "pwrite onto the bad sector");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(!c.is_dead());

    // 64 requests in flight, one of which fails: the error is reported only
    // after every request has finished, and the others did their work.
    let data = pattern_bytes((4 * MIB) as usize, 31);
    let e = expect_err(
        c.pwrite_pipelined(&data, 0, 64 * KIB as usize),
        "pipelined writes over the bad sector",
    );
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(!c.is_dead());
    let mut back = vec![0u8; data.len()];
    c.pread_into(&mut back, 0).unwrap();
    let bad_chunk = (bad as usize)..(bad + 64 * KIB) as usize;
    assert!(back[bad_chunk.clone()].iter().all(|&b| b == 0));
    assert_same(&back[..bad_chunk.start], &data[..bad_chunk.start], "before");
    assert_same(&back[bad_chunk.end..], &data[bad_chunk.end..], "after");
    // The image file agrees: every good chunk reached the disk.
    c.flush().ok();
    let on_disk = std::fs::read(&ex.image).unwrap();
    assert_same(&on_disk, &back, "image file");
}

#[test]
fn operations_after_the_server_stops_fail_and_mark_the_connection_dead() {
    let mut ex = Export::new("stopped", 4 * MIB, NbdOpts::qcow2());
    let mut c = ex.connect(&[CONTEXT_BASE_ALLOCATION]);
    let mut c2 = ex.connect(&[]);
    let mut buf = vec![0u8; 4096];
    c.pwrite(&pattern_bytes(4096, 51), 0).unwrap();
    c.pread_into(&mut buf, 0).unwrap();
    c2.pread_into(&mut buf, 0).unwrap();
    assert!(!c.is_dead());
    assert!(!c2.is_dead());

    ex.nbd.stop();

    let e = expect_err(c.pread_into(&mut buf, 0), "pread after stop");
    assert_eq!(e.errno(), libc::ENOTCONN, "{e}");
    assert!(c.is_dead());
    // The handle dies while a pipelined call is still submitting: the later
    // submissions are refused by libnbd, and that is reported as ENOTCONN too.
    let data = vec![3u8; MIB as usize];
    let e = no_hang("pipelined write to a stopped server", move || {
        let e = expect_err(c2.pwrite_pipelined(&data, 0, 4096), "pwrite_pipelined");
        assert!(c2.is_dead());
        e
    });
    assert_eq!(e.errno(), libc::ENOTCONN, "{e}");

    // Every further operation fails the same way, without hanging or panicking.
    let mut c = no_hang("operations on a dead connection", move || {
        let mut buf = vec![0u8; 8192];
        let errors = [
            expect_err(c.pread_into(&mut buf, 0), "pread"),
            expect_err(c.pwrite(&buf, 0), "pwrite"),
            expect_err(c.pread_pipelined(&mut buf, 0, 4096), "pread_pipelined"),
            expect_err(c.pwrite_pipelined(&buf, 0, 4096), "pwrite_pipelined"),
            expect_err(c.zero(0, 4096), "zero"),
            expect_err(c.flush(), "flush"),
            expect_err(
                c.block_status(0, 4096, &[CONTEXT_BASE_ALLOCATION]),
                "block_status",
            ),
        ];
        for e in errors {
            assert_eq!(e.errno(), libc::ENOTCONN, "{e}");
            assert!(e.message().contains("connection is dead"), "{e}");
        }
        c
    });
    assert!(c.is_dead());
    assert_eq!(c.size(), 4 * MIB);
    let _ = c.pread_into(&mut buf, 0);
    drop(c);
}

#[test]
fn server_dying_with_requests_in_flight_fails_them_with_enotconn() {
    let mut ex = Export::new("inflight", 16 * MIB, NbdOpts::raw());
    let mut c = ex.connect(&[]);
    // A stopped qemu-nbd answers nothing, so the reads stay in flight until
    // it is killed (and if the kill comes first, the outcome is the same).
    run(Command::new("kill")
        .arg("-STOP")
        .arg(ex.nbd.pid().to_string()));
    let (started_tx, started_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * MIB as usize];
        started_tx.send(()).unwrap();
        let r = c.pread_pipelined(&mut buf, 0, 64 * KIB as usize);
        let _ = done_tx.send((r.err(), c.is_dead()));
    });
    started_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    ex.nbd.stop_with(libc::SIGKILL);
    let (err, dead) = done_rx
        .recv_timeout(HANG)
        .expect("pread_pipelined hung after the server died");
    let e = err.expect("reads from a killed server must fail");
    assert_eq!(e.errno(), libc::ENOTCONN, "{e}");
    assert!(dead);
}

// ---------------------------------------------------------------------------
// threads
// ---------------------------------------------------------------------------

#[test]
fn connection_is_send_and_works_on_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Connection>();

    let size = 8 * MIB;
    let ex = Export::new("send", size, NbdOpts::qcow2());
    // Created here, used there, handed back, used here, dropped there.
    let c = ex.connect(&[CONTEXT_BASE_ALLOCATION]);
    let data = pattern_bytes((MIB + 3) as usize, 61);
    let expected = data.clone();
    let mut c = std::thread::spawn(move || {
        let mut c = c;
        c.pwrite(&data, 4097).unwrap();
        let mut back = vec![0u8; data.len()];
        c.pread_pipelined(&mut back, 4097, 64 * KIB as usize)
            .unwrap();
        assert_same(&back, &data, "on the other thread");
        c.flush().unwrap();
        c
    })
    .join()
    .expect("worker thread");

    let mut back = vec![0u8; expected.len()];
    c.pread_into(&mut back, 4097).unwrap();
    assert_same(&back, &expected, "back on the test thread");
    let map = c.block_status(0, size, &[CONTEXT_BASE_ALLOCATION]).unwrap();
    assert_covers(&map[0], 0, size);
    assert_eq!(flags_at(&map[0], 4097), 0);

    std::thread::spawn(move || drop(c)).join().unwrap();
    // The export is still fine for a new connection.
    let mut c2 = ex.connect(&[]);
    c2.pread_into(&mut back, 4097).unwrap();
    assert_same(&back, &expected, "new connection");
}
