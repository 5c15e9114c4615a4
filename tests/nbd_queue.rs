//! Direct tests of the queued NBD API (`nbd::Pipeline`) against real
//! `qemu-nbd` exports: what the HTTP path relies on, driven here without it.
//! Each test runs the pipeline on a current-thread tokio runtime (one
//! reactor, like one HTTP worker).

pub mod common;

use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudstack_image_server::nbd::*;
use common::*;

const KIB: u64 = 1024;
const GIB: u64 = 1024 * MIB;
/// Longest wait for anything that must not hang.
const HANG: Duration = Duration::from_secs(30);

struct Export {
    nbd: QemuNbd,
    image: PathBuf,
    _dir: TempDir,
}

impl Export {
    /// A raw image of `size` with `data` at 0, served by qemu-nbd.
    fn raw(tag: &str, size: u64, data: &[u8]) -> Export {
        let dir = TempDir::new(tag);
        let image = dir.join("disk.raw");
        raw_image(&image, size, 0, data);
        let nbd = QemuNbd::start(&image, &dir.join("nbd.sock"), NbdOpts::raw());
        Export {
            nbd,
            image,
            _dir: dir,
        }
    }

    /// A raw image of `size` with `data` at 0 behind blkdebug, which fails
    /// every request of `event` ("read_aio", "write_aio") touching the
    /// 512-byte sector at `bad` with EIO.
    fn failing(event: &str, size: u64, data: &[u8], bad: u64) -> Export {
        let dir = TempDir::new("q-eio");
        assert_eq!(data.len() as u64, size);
        let (image, spec) = blkdebug_image(&dir, data, bad, event);
        let nbd = QemuNbd::start(&spec, &dir.join("nbd.sock"), NbdOpts::raw());
        Export {
            nbd,
            image,
            _dir: dir,
        }
    }

    fn connect(&self, command_timeout: Option<Duration>) -> Connection {
        connect(&self.nbd.socket, command_timeout)
    }

    fn signal(&self, sig: &str) {
        run(Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.nbd.pid().to_string()));
    }
}

fn connect(socket: &Path, command_timeout: Option<Duration>) -> Connection {
    Connection::connect_unix(&ConnectOptions {
        socket,
        export: None,
        meta_contexts: &[],
        timeout: Duration::from_secs(10),
        command_timeout,
    })
    .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Retires the oldest command; fails the test if that takes longer than [`HANG`].
#[track_caller]
fn retire(rt: &tokio::runtime::Runtime, p: &mut Pipeline) -> Result<Retired> {
    rt.block_on(async {
        tokio::time::timeout(HANG, poll_fn(|cx| p.poll_oldest(cx)))
            .await
            .expect("poll_oldest hung")
    })
}

/// Retires every queued command; returns the buffers of the reads, in order.
#[track_caller]
fn drain(rt: &tokio::runtime::Runtime, p: &mut Pipeline) -> Vec<(Vec<u8>, usize)> {
    let mut reads = Vec::new();
    while p.queued() > 0 {
        if let Retired::Read(buf, n) = retire(rt, p).unwrap() {
            reads.push((buf, n));
        }
    }
    reads
}

#[track_caller]
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
fn reads_writes_and_zeroes_retire_in_order_with_exact_bytes() {
    let size = 8 * MIB;
    let data = pattern_bytes(size as usize, 1);
    let ex = Export::raw("q-order", size, &data);
    let rt = runtime();
    let _guard = rt.enter();
    let mut p = Pipeline::new(ex.connect(None)).unwrap();

    // Three reads of odd sizes, each split into 64 KiB commands; the buffer
    // comes back with the last command of its read, and only then.
    let reads = [(0u64, 300 * KIB as usize), (MIB + 7, 65_537), (5 * MIB, 1)];
    for &(off, len) in &reads {
        p.queue_read(vec![0xee; len + 10], len, off, 64 * KIB as usize)
            .unwrap();
    }
    assert_eq!(p.queued(), 5 + 2 + 1);
    let mut got = Vec::new();
    for _ in 0..8 {
        match retire(&rt, &mut p).unwrap() {
            Retired::Read(buf, n) => got.push((buf, n)),
            Retired::Done(n) => assert_eq!(n, 0, "an earlier part of a read"),
        }
    }
    assert_eq!(got.len(), 3);
    for ((buf, n), &(off, len)) in got.iter().zip(&reads) {
        assert_eq!(*n, len);
        assert_eq!(buf.len(), len + 10, "the buffer given, not a copy");
        assert_same(&buf[..len], &data[off as usize..off as usize + len], "read");
        assert!(
            buf[len..].iter().all(|&b| b == 0xee),
            "bytes past len untouched"
        );
    }

    // A write, a zero and a flush, each with the bytes it covered.
    let new = pattern_bytes((MIB + 3) as usize, 2);
    p.queue_write(Bytes::from(new.clone()), 2 * MIB, 512 * KIB as usize)
        .unwrap();
    p.queue_zero(6 * MIB, MIB).unwrap();
    p.queue_flush().unwrap();
    let done: Vec<u64> = (0..5)
        .map(|_| match retire(&rt, &mut p).unwrap() {
            Retired::Done(n) => n,
            Retired::Read(..) => panic!("no read queued"),
        })
        .collect();
    assert_eq!(done, vec![512 * KIB, 512 * KIB, 3, MIB, 0]);
    assert_eq!(p.queued(), 0);

    // Idle: the connection comes back, alive, and blocking calls see it all.
    let mut c = Blocking::from(p.into_connection().ok().expect("no command in flight"));
    assert!(!c.is_dead());
    let mut expected = data.clone();
    expected[2 * MIB as usize..][..new.len()].copy_from_slice(&new);
    expected[6 * MIB as usize..7 * MIB as usize].fill(0);
    let mut all = vec![0u8; size as usize];
    c.pread_into(&mut all, 0).unwrap();
    assert_same(&all, &expected, "blocking read after the pipeline");
    drop(c);
    assert_same(&std::fs::read(&ex.image).unwrap(), &expected, "image file");
}

#[test]
fn empty_and_maximal_requests() {
    let size = 3 * GIB;
    let head = pattern_bytes((80 * MIB) as usize, 3);
    let ex = Export::raw("q-max", size, &head);
    let rt = runtime();
    let _guard = rt.enter();
    let mut p = Pipeline::new(ex.connect(None)).unwrap();
    let max = p.connection().max_request();
    assert_eq!(max, 32 * MIB, "what qemu-nbd advertises");

    // Empty requests queue nothing, at any offset up to the end.
    p.queue_read(vec![0; 16], 0, 0, 4096).unwrap();
    p.queue_read(Vec::new(), 0, size, 4096).unwrap();
    p.queue_write(Bytes::new(), size, 4096).unwrap();
    p.queue_zero(size, 0).unwrap();
    assert_eq!(p.queued(), 0);
    // With nothing queued there is nothing to retire: an error, not a hang.
    let e = retire(&rt, &mut p).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
    assert!(!e.is_fatal());

    // Past the end, or more than the buffer holds: EINVAL, nothing queued,
    // the connection fine.
    for e in [
        p.queue_read(vec![0; 4096], 4096, size - 4095, 4096)
            .unwrap_err(),
        p.queue_read(vec![0; 10], 11, 0, 4096).unwrap_err(),
        p.queue_write(Bytes::from_static(b"x"), size, 4096)
            .unwrap_err(),
        p.queue_zero(u64::MAX, 2).unwrap_err(),
    ] {
        assert_eq!(e.errno(), libc::EINVAL, "{e}");
        assert!(!e.is_fatal(), "{e}");
    }
    assert_eq!(p.queued(), 0);

    // A read of 80 MiB asked as one piece: split at the server's maximum.
    let len = 80 * MIB as usize;
    p.queue_read(vec![0; len], len, 0, usize::MAX).unwrap();
    assert_eq!(p.queued(), 3);
    let reads = drain(&rt, &mut p);
    assert_eq!(reads.len(), 1);
    assert_same(&reads[0].0, &head, "80 MiB read");

    // The same for a write, and a zero of 2.5 GiB: 1 GiB commands.
    let tail = Bytes::from(pattern_bytes(len, 4));
    p.queue_write(tail.clone(), size - len as u64, usize::MAX)
        .unwrap();
    assert_eq!(p.queued(), 3);
    drain(&rt, &mut p);
    p.queue_zero(0, 5 * GIB / 2).unwrap();
    assert_eq!(p.queued(), 3);
    let done: Vec<Retired> = (0..3).map(|_| retire(&rt, &mut p).unwrap()).collect();
    assert!(
        matches!(done[..], [Retired::Done(GIB), Retired::Done(GIB), Retired::Done(n)] if n == GIB / 2),
        "{done:?}"
    );
    let mut c = Blocking::from(p.into_connection().ok().unwrap());
    let mut back = vec![1u8; len];
    c.pread_into(&mut back, size - len as u64).unwrap();
    assert_same(&back, &tail, "maximal write");
    c.pread_into(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0), "zeroed");
}

#[test]
fn dropping_a_pipeline_with_commands_in_flight_is_clean() {
    let size = 64 * MIB;
    let data = pattern_bytes(size as usize, 5);
    let ex = Export::raw("q-drop", size, &data);
    let rt = runtime();
    let _guard = rt.enter();
    for round in 0..3 {
        let mut p = Pipeline::new(ex.connect(None)).unwrap();
        // 64 reads of 1 MiB and writes of the same bytes back, none retired
        // (or, in round 1, some retired first).
        for i in 0..64u64 {
            p.queue_read(
                vec![0; MIB as usize],
                MIB as usize,
                i * MIB,
                256 * KIB as usize,
            )
            .unwrap();
        }
        let chunk = Bytes::from(data[..MIB as usize].to_vec());
        p.queue_write(chunk, 0, 64 * KIB as usize).unwrap();
        if round == 1 {
            for _ in 0..10 {
                retire(&rt, &mut p).unwrap();
            }
        }
        // Not given back while commands are in flight.
        let p = p.into_connection().err().expect("commands are in flight");
        assert!(p.queued() > 0);
        drop(p);
    }
    // The export serves a new connection as before; nothing was written
    // but the same bytes.
    let mut c = Blocking::from(ex.connect(None));
    let mut back = vec![0u8; size as usize];
    c.pread_into(&mut back, 0).unwrap();
    assert_same(&back, &data, "after drops");
}

/// qemu-nbd (10.0) answers a read the disk fails by disconnecting ("Failed
/// to send reply: reading from file failed"): the commands before it
/// complete, the failed one and every later call fail fatally, and nothing
/// hangs.
#[test]
fn a_read_error_in_the_middle_of_a_multi_request_read() {
    let size = 4 * MIB;
    let bad = MIB + 4096;
    let data = pattern_bytes(size as usize, 6);
    let ex = Export::failing("read_aio", size, &data, bad);
    let rt = runtime();
    let _guard = rt.enter();
    let mut p = Pipeline::new(ex.connect(None)).unwrap();

    // 16 commands of 256 KiB; the fifth covers the bad sector.
    p.queue_read(vec![0; size as usize], size as usize, 0, 256 * KIB as usize)
        .unwrap();
    p.queue_read(vec![0; 4096], 4096, 3 * MIB, 4096).unwrap();
    assert_eq!(p.queued(), 17);
    // qemu-nbd serves the commands of a connection concurrently: some
    // before the bad one may be answered before it hangs up.
    let mut ok = 0;
    let e = loop {
        match retire(&rt, &mut p) {
            Ok(Retired::Done(0)) => ok += 1,
            Ok(r) => panic!("after {ok}: {r:?}"),
            Err(e) => break e,
        }
    };
    assert!(ok < 5, "the bad command succeeded");
    assert!(e.is_fatal(), "{e}");
    assert!(
        [libc::EIO, libc::ENOTCONN, libc::ECONNRESET].contains(&e.errno()),
        "{e}"
    );
    assert!(p.connection().is_dead());
    assert_eq!(retire(&rt, &mut p).unwrap_err(), e, "sticky");
    // The rest stay queued (the failed one too when the hang-up was seen
    // before libnbd failed the commands).
    assert!(
        [16 - ok, 17 - ok].contains(&p.queued()),
        "{} queued after {ok} retired",
        p.queued()
    );
    assert!(p.into_connection().is_err());
}

/// A write the disk fails is an error reply: recoverable. Only that command
/// fails, and the connection stays usable for queued and blocking calls.
#[test]
fn a_write_error_fails_that_command_only_and_the_connection_stays_usable() {
    let size = 4 * MIB;
    let bad = MIB + 4096;
    let data = pattern_bytes(size as usize, 6);
    let ex = Export::failing("write_aio", size, &data, bad);
    let rt = runtime();
    let _guard = rt.enter();
    let mut p = Pipeline::new(ex.connect(None)).unwrap();

    // 16 writes of 256 KiB (new bytes); the fifth covers the bad sector.
    let new = pattern_bytes(size as usize, 7);
    p.queue_write(Bytes::from(new.clone()), 0, 256 * KIB as usize)
        .unwrap();
    p.queue_read(vec![0; 4096], 4096, 3 * MIB, 4096).unwrap();
    assert_eq!(p.queued(), 17);
    for i in 0..17 {
        match (i, retire(&rt, &mut p)) {
            (4, Err(e)) => {
                assert_eq!(e.errno(), libc::EIO, "{e}");
                assert!(!e.is_fatal(), "an error reply is recoverable: {e}");
            }
            (0..=15, Ok(Retired::Done(n))) if i != 4 => assert_eq!(n, 256 * KIB),
            // Commands in flight together may complete in any order: the
            // read after the writes sees the new bytes or the old ones.
            (16, Ok(Retired::Read(buf, 4096))) => {
                let at = 3 * MIB as usize;
                assert!(
                    buf[..4096] == new[at..at + 4096] || buf[..4096] == data[at..at + 4096],
                    "later read"
                );
            }
            (i, r) => panic!("{i}: {r:?}"),
        }
    }

    // The connection comes back alive and keeps working, for blocking and
    // queued calls; the bad sector fails again the same way.
    let mut c = Blocking::from(p.into_connection().ok().expect("empty"));
    assert!(!c.is_dead());
    // (Reads of the bad sector fail too once blkdebug's rule is active, and
    // qemu-nbd hangs up on a failed read: read around it.)
    let bad_cmd = MIB as usize..(MIB + 256 * KIB) as usize;
    let mut back = vec![0u8; bad_cmd.start];
    c.pread_into(&mut back, 0).unwrap();
    assert_same(&back, &new[..bad_cmd.start], "before");
    let mut back = vec![0u8; size as usize - bad_cmd.end];
    c.pread_into(&mut back, bad_cmd.end as u64).unwrap();
    assert_same(&back, &new[bad_cmd.end..], "after");
    let e = c.pwrite(&[1; 4096], bad).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(!e.is_fatal() && !c.is_dead());
    let mut p = Pipeline::new(c.into_connection()).unwrap();
    p.queue_read(vec![0; 4096], 4096, 2 * MIB, 4096).unwrap();
    let reads = drain(&rt, &mut p);
    assert_same(
        &reads[0].0[..4096],
        &new[2 * MIB as usize..][..4096],
        "queued again",
    );
}

/// Queues 64 reads on a stopped qemu-nbd (so none can complete), kills it,
/// and drives the pipeline until the death is seen.
fn kill_mid_queue(rt: &tokio::runtime::Runtime, ex: &mut Export) -> (Pipeline, Error) {
    let mut p = Pipeline::new(ex.connect(None)).unwrap();
    ex.signal("STOP");
    for i in 0..64u64 {
        p.queue_read(
            vec![0; 256 * KIB as usize],
            256 * KIB as usize,
            i * 256 * KIB,
            64 * KIB as usize,
        )
        .unwrap();
    }
    ex.nbd.stop_with(libc::SIGKILL);
    // The first retirement already fails: none of the reads was answered.
    let e = match retire(rt, &mut p) {
        Ok(r) => panic!("a read of a killed server succeeded: {r:?}"),
        Err(e) => e,
    };
    (p, e)
}

#[test]
fn a_server_killed_mid_queue_is_fatal_and_sticky() {
    let mut ex = Export::raw("q-kill", 16 * MIB, &[]);
    let rt = runtime();
    let _guard = rt.enter();
    let (mut p, e) = kill_mid_queue(&rt, &mut ex);
    assert!(
        [libc::ENOTCONN, libc::ECONNRESET].contains(&e.errno()),
        "{e}"
    );
    assert!(e.is_fatal(), "{e}");
    assert!(p.connection().is_dead());
    // Every later call fails the same way, at once.
    let again = retire(&rt, &mut p).unwrap_err();
    assert_eq!(again, e);
    assert_eq!(p.queue_read(vec![0; 10], 10, 0, 4096).unwrap_err(), e);
    assert_eq!(p.queue_flush().unwrap_err(), e);
    // The commands stay queued (libnbd may hold their buffers until the
    // handle is closed), so the connection is never given back.
    assert!(p.queued() > 0);
    let p = p.into_connection().err().expect("commands stay queued");
    drop(p);
}

/// libnbd closes its own socket fd when the connection dies. When the
/// reactor watched that fd, a new socket given the same number by the
/// kernel lost its registration as the stale one was dropped, and never
/// woke up. The pipeline registers a descriptor it owns, so the new socket
/// works whatever number it gets.
#[test]
fn a_new_socket_after_a_dead_connection_still_wakes_up() {
    let rt = runtime();
    let _guard = rt.enter();
    for _ in 0..3 {
        let mut ex = Export::raw("q-reuse", 16 * MIB, &[]);
        let (p, e) = kill_mid_queue(&rt, &mut ex);
        assert!(e.is_fatal(), "{e}");
        // The lowest free numbers: libnbd's old fd is one of them (it
        // closed it when the connection died). Both ends are registered.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let a = tokio::net::UnixStream::from_std(a).unwrap();
        let b = tokio::net::UnixStream::from_std(b).unwrap();
        // The dead pipeline's registration goes now, after the new ones.
        drop(p);
        for (from, to) in [(&a, &b), (&b, &a)] {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        from.writable().await.unwrap();
                        match from.try_write(b"x") {
                            Ok(n) => break assert_eq!(n, 1),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
                .await
                .expect("a new socket never became writable")
            });
            // Readiness may be reported spuriously: read until a byte comes.
            let byte = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        to.readable().await.unwrap();
                        let mut byte = [0u8; 1];
                        match to.try_read(&mut byte) {
                            Ok(n) => break (n, byte),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
                .await
                .expect("a new socket never became readable")
            });
            assert_eq!(byte, (1, *b"x"));
        }
    }
}

#[test]
fn no_reply_within_the_command_timeout_is_fatal_for_queued_and_blocking_calls() {
    let size = 8 * MIB;
    let data = pattern_bytes(size as usize, 7);
    let ex = Export::raw("q-stop", size, &data);
    let rt = runtime();
    let _guard = rt.enter();
    let timeout = Duration::from_secs(1);
    let mut p = Pipeline::new(ex.connect(Some(timeout))).unwrap();
    let mut c = Blocking::from(ex.connect(Some(timeout)));
    // Progress resets the deadline: a long pipeline of quick replies is fine.
    for i in 0..32u64 {
        p.queue_read(
            vec![0; 256 * KIB as usize],
            256 * KIB as usize,
            i * 256 * KIB,
            64 * KIB as usize,
        )
        .unwrap();
    }
    drain(&rt, &mut p);

    ex.signal("STOP");
    p.queue_read(vec![0; 4096], 4096, 0, 4096).unwrap();
    let started = Instant::now();
    let e = retire(&rt, &mut p).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(e.errno(), libc::ETIMEDOUT, "{e}");
    assert!(e.is_timeout() && e.is_fatal(), "{e}");
    assert!(waited >= timeout, "failed after {waited:?}");
    assert!(waited < HANG, "failed after {waited:?}");
    assert!(p.connection().is_dead());
    assert_eq!(retire(&rt, &mut p).unwrap_err(), e);

    // A blocking call gives up the same way, and the handle is dead after.
    let mut buf = vec![0u8; 2 * MIB as usize];
    let e = c.pread_into(&mut buf, 0).unwrap_err();
    assert!(e.is_timeout() && e.is_fatal(), "{e}");
    assert!(c.is_dead());
    let e = c.flush().unwrap_err();
    assert_eq!(e.errno(), libc::ENOTCONN, "{e}");
    assert!(e.is_fatal());
    drop(p);
    drop(c);

    // Once the server runs again, a new connection works.
    ex.signal("CONT");
    let mut c = Blocking::from(ex.connect(Some(timeout)));
    c.pread_into(&mut buf, 0).unwrap();
    assert_same(&buf, &data[..buf.len()], "after SIGCONT");
}

#[test]
fn a_pipeline_needs_a_runtime_and_a_live_connection() {
    let ex = Export::raw("q-rt", MIB, &[]);
    let c = ex.connect(None);
    // Outside a runtime: an error, not a panic.
    let e = Pipeline::new(c).err().expect("no runtime");
    assert_eq!(e.errno(), libc::EINVAL, "{e}");
}

/// The command timeout bounds how long the server keeps a waiting caller
/// waiting, not how long the caller leaves its queued commands alone (a GET
/// reader waits for its HTTP client with reads in flight): a pause longer
/// than the timeout between queueing and retiring is no timeout.
#[test]
fn time_away_from_poll_oldest_does_not_count_against_the_server() {
    let size = 8 * MIB;
    let data = pattern_bytes(size as usize, 8);
    let ex = Export::raw("q-away", size, &data);
    let rt = runtime();
    let _guard = rt.enter();
    let timeout = Duration::from_secs(1);
    let mut p = Pipeline::new(ex.connect(Some(timeout))).unwrap();
    for retire_one_first in [false, true] {
        // 8 MiB of replies: far more than the socket buffers hold, so the
        // server is still sending when the caller comes back.
        p.queue_read(vec![0; size as usize], size as usize, 0, 256 * KIB as usize)
            .unwrap();
        if retire_one_first {
            retire(&rt, &mut p).unwrap();
        }
        std::thread::sleep(2 * timeout);
        let reads = drain(&rt, &mut p);
        assert_eq!(reads.len(), 1);
        assert_same(&reads[0].0[..reads[0].1], &data, "read after a pause");
    }
}
