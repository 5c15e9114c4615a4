//! `--nbd-timeout`: a qemu-nbd that stops answering (SIGSTOP) fails the
//! requests waiting on it within the timeout, releases what they held, and
//! does not disturb other transfers; once it runs again (SIGCONT) the same
//! transfer works.

pub mod common;

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The hang guard of each failing request: the timeout is 2 s.
const FAIL_WITHIN: Duration = Duration::from_secs(20);

fn signal(nbd: &QemuNbd, sig: &str) {
    run(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(nbd.pid().to_string()));
}

/// qemu-nbd SIGSTOPped until this is dropped (also when the test fails:
/// a stopped qemu-nbd would never act on the SIGTERM that ends it).
struct Stopped(u32);

impl Stopped {
    fn new(nbd: &QemuNbd) -> Stopped {
        signal(nbd, "STOP");
        Stopped(nbd.pid())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.0.to_string())
            .status();
    }
}

fn assert_serves(server: &Server, id: &str, data: &[u8]) {
    let r = server.request(
        "GET",
        &format!("/images/{id}"),
        &[("Range", "bytes=4096-1052671")],
        b"",
    );
    assert_eq!(r.status, 206, "{}", r.text());
    assert!(r.body == data[4096..1052672], "bytes of {id} differ");
}

/// Four GETs of `id` at once (each holds its own NBD connection until its
/// body is read), read to the end: four idle connections in its pool (its
/// maximum), which requests take while qemu-nbd is stopped (a new
/// connection would wait for the handshake, which has its own 10 s timeout
/// and then answers 502).
fn warm_pool(server: &Server, nbd: &QemuNbd, id: &str, data: &[u8]) {
    // The tests need three idle pooled connections (a GET streaming, a PUT,
    // a GET that has not sent its head), seen open on qemu-nbd's side (its
    // listening socket plus one per client connection). Under load a
    // connection used to be closed instead of pooled (concurrent first
    // loads of a config file made one transfer each, and a reader waiting
    // for its client longer than --nbd-timeout timed out); the warm-up is
    // still repeated until they are there, as this is the tests'
    // precondition, not what they test.
    for round in 1..=5 {
        warm_once(server, id, data);
        let pooled = poll_pooled(server, nbd, 4 * round);
        if pooled >= 3 {
            return;
        }
    }
    panic!("fewer than three NBD connections pooled after five warm-ups");
}

/// Four GETs at once, all connected before any ends.
fn warm_once(server: &Server, id: &str, data: &[u8]) {
    let path = format!("/images/{id}");
    let mut warm: Vec<Client> = (0..4).map(|_| server.client()).collect();
    for c in &mut warm {
        c.send("GET", &path, &[], b"");
    }
    for c in &mut warm {
        let (status, _) = c.read_head().unwrap();
        assert_eq!(status, 200);
    }
    for c in &mut warm {
        let mut body = vec![0u8; data.len()];
        c.reader().read_exact(&mut body).unwrap();
        assert!(body == data, "warm-up GET bytes");
    }
}

/// Once `ends` GETs have ended (a reader hands its connection back before
/// its body ends), the connections qemu-nbd has open a moment later.
fn poll_pooled(server: &Server, nbd: &QemuNbd, ends: usize) -> usize {
    poll_until(FAIL_WITHIN, "the warm-up GETs to end", || {
        (server.log_count("GET end image_id=") >= ends).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    socket_fds(nbd.pid()).saturating_sub(1)
}

/// Transfer `id`'s `nbd_timeouts`, once it is at least `n`.
#[track_caller]
fn nbd_timeouts(server: &Server, id: &str, n: u64) -> u64 {
    poll_until(FAIL_WITHIN, "the NBD timeouts counted", || {
        let count = server.counter(id, "nbd_timeouts");
        (count >= n).then_some(count)
    })
}

#[test]
fn a_stopped_qemu_nbd_fails_get_and_put_within_the_timeout_and_frees_everything() {
    let size = 64 * MIB;
    let mut env = Env::new("deadline", &["--nbd-timeout", "2"]);
    let (_, data_a) = env.raw_export("a", size, 1);
    let (_, data_b) = env.raw_export("b", size, 2);
    let server = &env.server;

    warm_pool(server, &env.nbd[0], "a", &data_a);

    // A GET streaming when qemu-nbd stops.
    let mut streaming = server.client();
    streaming.send("GET", "/images/a", &[], b"");
    let (status, _) = streaming.read_head().unwrap();
    assert_eq!(status, 200);
    let mut first = vec![0u8; MIB as usize];
    streaming.reader().read_exact(&mut first).unwrap();
    assert!(first == data_a[..MIB as usize]);

    // A ranged PUT whose head (not its body) arrives before the stop: its
    // NBD connection is open when qemu-nbd stops, and its writes get no
    // reply.
    let addr = server.addr;
    let mut put_client = Client::connect(addr);
    let body = pattern_bytes(8 * MIB as usize, 9);
    let len = body.len().to_string();
    put_client.send(
        "PUT",
        "/images/a",
        &[
            ("Content-Range", "bytes 0-8388607/*"),
            ("Content-Length", &len),
        ],
        b"",
    );
    assert!(server.wait_log("PUT start image_id=a", FAIL_WITHIN));
    // (The handler opens the connection right after that line.)
    std::thread::sleep(Duration::from_millis(500));

    let stop = Stopped::new(&env.nbd[0]);
    let stopped = Instant::now();

    // The PUT's body, and a GET that has not sent its head yet: both 504.
    let put = std::thread::spawn(move || {
        let mut c = put_client;
        let mut w = c.stream().try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&body);
        });
        let started = Instant::now();
        let r = c.read_response(false);
        let took = started.elapsed();
        let _ = c.stream().shutdown(std::net::Shutdown::Both);
        writer.join().unwrap();
        (r, took)
    });
    let get = std::thread::spawn(move || {
        let started = Instant::now();
        let r = Client::connect(addr).request("GET", "/images/a", &[], b"");
        (r, started.elapsed())
    });

    // Other transfers are served meanwhile.
    assert_serves(server, "b", &data_b);

    let (r, took) = put.join().unwrap();
    assert_eq!(r.status, 504, "{}\n{}", r.text(), server.log());
    assert_err(&r, 504, "backend timed out");
    assert!(took < FAIL_WITHIN, "PUT failed after {took:?}");
    let (r, took) = get.join().unwrap();
    assert_eq!(r.status, 504, "{}\n{}", r.text(), server.log());
    assert_err(&r, 504, "backend timed out");
    assert!(took < FAIL_WITHIN, "GET failed after {took:?}");

    // The streaming GET ends short, its connection closed.
    let rest = streaming.read_until_closed();
    assert!(
        (MIB as usize + rest) < size as usize,
        "a complete body from a stopped qemu-nbd"
    );
    assert!(stopped.elapsed() < FAIL_WITHIN * 2);

    // Each failed request counts once, on its own transfer only, and logs
    // one line that names the transfer.
    assert_eq!(nbd_timeouts(server, "a", 3), 3, "{}", server.log());
    assert_eq!(server.logged("NBD timeout image_id=a", 3), 3);
    assert_eq!(server.counter("b", "nbd_timeouts"), 0);
    assert_eq!(server.counter("b", "requests_failed"), 0);

    // The slots of the failed GETs are free again: eight GETs stream at
    // once (--max-readers only advertises, it refuses nothing).
    let mut holders: Vec<Client> = (0..8).map(|_| server.client()).collect();
    for c in &mut holders {
        c.send("GET", "/images/b", &[], b"");
    }
    for c in &mut holders {
        let (status, _) = c.read_head().unwrap();
        assert_eq!(status, 200);
    }
    drop(holders);
    // (The server sees the eight go at its own pace.)
    poll_until(FAIL_WITHIN, "a reader slot after the eight", || {
        let r = server.request("GET", "/images/b", &[("Range", "bytes=0-4095")], b"");
        (r.status == 206).then(|| assert!(r.body == data_b[..4096]))
    });

    // Running again: the same transfer reads and writes, on fresh connections.
    drop(stop);
    let r = server.get("/images/a");
    assert_eq!(r.status, 200);
    assert!(r.body == data_a, "GET after SIGCONT");
    let new = pattern_bytes(MIB as usize, 10);
    let r = server.request(
        "PUT",
        "/images/a",
        &[("Content-Range", "bytes 1048576-2097151/*")],
        &new,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.request(
        "GET",
        "/images/a",
        &[("Range", "bytes=1048576-2097151")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert!(r.body == new, "bytes written after SIGCONT");
}

#[test]
fn blocking_calls_time_out_too_and_release_the_transfer() {
    let mut env = Env::new("deadline-blocking", &["--nbd-timeout", "2"]);
    let (_, data) = env.raw_export("a", 64 * MIB, 3);
    let server = &env.server;
    warm_pool(server, &env.nbd[0], "a", &data);

    let stop = Stopped::new(&env.nbd[0]);
    // Extents (block status) and flush: commands of their own, on the same
    // pipeline and deadline as the data path.
    for (method, path) in [("GET", "/images/a/extents"), ("POST", "/images/a/flush")] {
        let started = Instant::now();
        let r = server.request(method, path, &[], b"");
        assert_err(&r, 504, "backend timed out");
        assert!(started.elapsed() < FAIL_WITHIN, "{path}");
    }
    assert_eq!(nbd_timeouts(server, "a", 2), 2, "{}", server.log());
    assert_eq!(server.logged("NBD timeout image_id=a", 2), 2);
    drop(stop);
    let r = server.request("POST", "/images/a/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = server.get("/images/a");
    assert_eq!(r.status, 200);
    assert!(r.body == data);
}

/// Zero and checksum send their commands through the same pipeline as the
/// data path: a stopped qemu-nbd fails them with the same 504 within the
/// timeout, each counted once; the same requests work once it runs again.
#[test]
fn zero_and_checksum_time_out_on_the_same_deadline() {
    let mut env = Env::new("deadline-zero-sum", &["--nbd-timeout", "2"]);
    let (_, data) = env.raw_export("a", 64 * MIB, 4);
    let server = &env.server;
    warm_pool(server, &env.nbd[0], "a", &data);
    let zero = br#"{"op":"zero","offset":0,"size":1048576}"#;
    let json = [("Content-Type", "application/json")];

    let stop = Stopped::new(&env.nbd[0]);
    let started = Instant::now();
    let r = server.request("PATCH", "/images/a", &json, zero);
    assert_err(&r, 504, "backend timed out");
    assert!(started.elapsed() < FAIL_WITHIN, "zero");
    let started = Instant::now();
    let r = server.request("GET", "/images/a/checksum", &[], b"");
    assert_err(&r, 504, "backend timed out");
    assert!(started.elapsed() < FAIL_WITHIN, "checksum");
    assert_eq!(nbd_timeouts(server, "a", 2), 2, "{}", server.log());
    assert_eq!(server.logged("NBD timeout image_id=a", 2), 2);
    drop(stop);

    let r = server.request("PATCH", "/images/a", &json, zero);
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = server.get("/images/a");
    assert_eq!(r.status, 200);
    let mut expected = data.clone();
    expected[..MIB as usize].fill(0);
    assert!(r.body == expected, "bytes after the zero");
    let r = server.request("GET", "/images/a/checksum", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}
