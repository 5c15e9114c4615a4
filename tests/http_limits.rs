//! Limits and locks (seed semantics): reader and writer slots refused at once
//! with 503, the per-image lock (PUT waits, the rest get 409), and clients
//! that go away mid-request releasing everything they held.
//!
//! "In flight" is made real without timing: a GET whose client does not read
//! the body of a large image cannot finish, and a PUT whose client sent only
//! part of the body cannot finish; the server's "PUT start" log line (written
//! once the lock and slot are held) says when the PUT holds them.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const KIB: u64 = 1024;
const WAIT: Duration = Duration::from_secs(30);

/// A big sparse image: far more than the socket buffers and the server's
/// read-ahead can hold, so a GET of it stays in flight while unread.
const BIG: u64 = 256 * MIB;

fn patch_json(server: &Server, id: &str, body: &str) -> Response {
    server.request(
        "PATCH",
        &format!("/images/{id}"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// Starts a GET of `id` and reads its head and the first bytes of the body,
/// leaving the rest unread: the GET holds its reader slot. (A reader that
/// just finished may hold its slot a moment longer: 503s are retried.)
fn get_in_flight(server: &Server, id: &str) -> Client {
    let (mut c, head) = poll_until(WAIT, "a reader slot", || {
        let mut c = server.client();
        c.send("GET", &format!("/images/{id}"), &[], b"");
        let head = c.read_response(true);
        (head.status != 503).then_some((c, head))
    });
    assert_eq!(head.status, 200, "{head:?}");
    let mut first = vec![0u8; 64 * 1024];
    c.stream().read_exact(&mut first).expect("first body bytes");
    c
}

/// Starts a PUT of `len` bytes to `id`, sends the first `sent` bytes of
/// `data`, and waits until the server logs that the PUT holds the image lock
/// and a write slot (the `n`-th "PUT start" of that image).
fn put_in_flight(server: &Server, id: &str, data: &[u8], sent: usize, n: usize) -> Client {
    let mut c = server.client();
    c.send(
        "PUT",
        &format!("/images/{id}"),
        &[("Content-Length", &data.len().to_string())],
        &data[..sent],
    );
    let needle = format!("PUT start image_id={id} ");
    poll_until(WAIT, "the PUT to start", || {
        (server.log_count(&needle) >= n).then_some(())
    });
    c
}

/// Sends the rest of an in-flight PUT and returns its response.
fn finish_put(mut c: Client, rest: &[u8]) -> Response {
    c.stream().write_all(rest).expect("send rest of body");
    c.read_response(false)
}

#[test]
fn max_readers_refuses_the_next_get_at_once() {
    let mut env = Env::new("readers", &["--max-readers", "1"]);
    let big = env.dir.join("big.img");
    raw_image(&big, BIG, 0, b"big");
    env.export("big", &big, NbdOpts::raw());
    let (_, small) = env.raw_export("small", 64 * KIB, 1);
    let s = &env.server;

    let c1 = get_in_flight(s, "big");
    assert_err(&s.get("/images/small"), 503, "too many parallel reads");
    let r = s.request("GET", "/images/big", &[("Range", "bytes=0-9")], b"");
    assert_err(&r, 503, "too many parallel reads");
    // Only image GETs take a reader slot.
    let r = s.get("/images/small/extents");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.request("OPTIONS", "/images/small", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.request("PUT", "/images/small", &[], &small);
    assert_eq!(r.status, 200, "{}", r.text());

    // The reader goes away mid-body: its slot comes back.
    drop(c1);
    let r = poll_until(WAIT, "the reader slot to be released", || {
        let r = s.get("/images/small");
        (r.status != 503).then_some(r)
    });
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == small);
    assert!(s.wait_log("GET end image_id=big ", WAIT), "{}", s.log());
}

#[test]
fn max_writers_refuses_the_next_write_at_once() {
    let mut env = Env::new("writers", &[]);
    let size = MIB;
    env.raw_export("a", size, 2);
    let (_, b_data) = env.raw_export("b", 64 * KIB, 3);
    let s = &env.server;

    let new_a = pattern_bytes(size as usize, 4);
    let c1 = put_in_flight(s, "a", &new_a, 100 * KIB as usize, 1);

    // Another image: refused for the slot (head only: refused before the body).
    let mut c = s.client();
    c.send("PUT", "/images/b", &[("Content-Length", "65536")], b"");
    assert_err(&c.read_response(false), 503, "too many parallel writes");
    let r = patch_json(s, "b", r#"{"op":"zero","size":4096}"#);
    assert_err(&r, 503, "too many parallel writes");
    let mut c = s.client();
    c.send(
        "PATCH",
        "/images/b",
        &[("Range", "bytes=0-9"), ("Content-Length", "10")],
        b"",
    );
    assert_err(&c.read_response(false), 503, "too many parallel writes");
    // Reads and flushes of the other image are not writes.
    assert!(s.get("/images/b").body == b_data);
    let r = s.request("POST", "/images/b/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);

    let r = finish_put(c1, &new_a[100 * KIB as usize..]);
    assert_json_ok(
        &r,
        &format!(r#"{{"ok":true,"bytes_written":{size},"flushed":false}}"#),
    );
    assert!(s.get("/images/a").body == new_a);
    let r = patch_json(s, "b", r#"{"op":"zero","size":4096}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
}

#[test]
fn image_lock_refuses_other_operations_on_that_image_only() {
    // Two writers, so that only the image lock can refuse.
    let mut env = Env::new("lock", &["--max-writers", "2"]);
    let size = MIB;
    env.raw_export("a", size, 5);
    let (_, mut b_data) = env.raw_export("b", size, 6);
    let s = &env.server;

    let new_a = pattern_bytes(size as usize, 7);
    let c1 = put_in_flight(s, "a", &new_a, 200 * KIB as usize, 1);

    let busy = |r: Response| assert_err(&r, 409, "image busy");
    busy(s.get("/images/a/extents"));
    busy(s.get("/images/a/extents?context=dirty"));
    busy(s.request("POST", "/images/a/flush", &[], b""));
    busy(patch_json(s, "a", r#"{"op":"zero","size":4096}"#));
    busy(patch_json(s, "a", r#"{"op":"flush"}"#));
    let mut c = s.client();
    c.send(
        "PATCH",
        "/images/a",
        &[("Range", "bytes=0-9"), ("Content-Length", "10")],
        b"",
    );
    busy(c.read_response(false));
    // Data GETs and OPTIONS do not take the lock.
    let r = s.request("GET", "/images/a", &[("Range", "bytes=0-9")], b"");
    assert_eq!(r.status, 206, "{}", r.text());
    let r = s.request("OPTIONS", "/images/a", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());

    // The same operations on another image go through.
    let r = s.get("/images/b/extents");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.request("POST", "/images/b/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = patch_json(s, "b", r#"{"op":"zero","offset":0,"size":4096}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
    b_data[..4096].fill(0);
    let r = s.request(
        "PATCH",
        "/images/b",
        &[("Range", "bytes=4096-4105")],
        b"0123456789",
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":10}"#);
    b_data[4096..4106].copy_from_slice(b"0123456789");

    let r = finish_put(c1, &new_a[200 * KIB as usize..]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.get("/images/a/extents");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s.get("/images/a").body == new_a);
    assert!(s.get("/images/b").body == b_data);
}

#[test]
fn a_second_put_to_the_same_image_waits_for_the_first() {
    let mut env = Env::new("putwait", &["--max-writers", "2"]);
    let size = MIB;
    env.raw_export("a", size, 8);
    let s = &env.server;

    let first = pattern_bytes(size as usize, 9);
    let second = pattern_bytes(size as usize, 10);
    let c1 = put_in_flight(s, "a", &first, 300 * KIB as usize, 1);

    // The second PUT: once the server has read its head (it answers
    // `100 Continue`), it goes on to wait for the image lock.
    let (tx, rx) = mpsc::channel();
    let addr = s.addr;
    let second2 = second.clone();
    let t = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.send(
            "PUT",
            "/images/a",
            &[
                ("Content-Length", &second2.len().to_string()),
                ("Expect", "100-continue"),
            ],
            b"",
        );
        let interim = c.read_any().expect("interim response");
        tx.send(interim.status).expect("report");
        c.stream().write_all(&second2).expect("second body");
        c.read_response(false)
    });
    assert_eq!(rx.recv().expect("second PUT reached the server"), 100);

    let r1 = finish_put(c1, &first[300 * KIB as usize..]);
    let body = format!(r#"{{"ok":true,"bytes_written":{size},"flushed":false}}"#);
    assert_json_ok(&r1, &body);
    let r2 = t.join().expect("second PUT thread");
    assert_json_ok(&r2, &body);

    // Serialised: the second began after the first ended, and won.
    poll_until(WAIT, "both PUT end lines", || {
        (s.log_count("PUT end image_id=a ") == 2).then_some(())
    });
    let log = s.log();
    let lines: Vec<&str> = log.lines().collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("PUT start image_id=a "))
        .collect();
    let ends: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("PUT end image_id=a "))
        .collect();
    assert_eq!((starts.len(), ends.len()), (2, 2), "{log}");
    assert!(starts[0] < ends[0] && ends[0] < starts[1], "{log}");
    assert!(s.get("/images/a").body == second);
}

#[test]
fn a_client_gone_mid_put_releases_lock_and_slot() {
    let mut env = Env::new("putgone", &[]);
    let size = MIB;
    let (_, a_data) = env.raw_export("a", size, 11);
    env.raw_export("b", 64 * KIB, 12);
    let s = &env.server;

    let c1 = put_in_flight(
        s,
        "a",
        &pattern_bytes(size as usize, 13),
        64 * KIB as usize,
        1,
    );
    assert_err(&patch_json(s, "a", r#"{"op":"flush"}"#), 409, "image busy");
    drop(c1);
    // The lock of `a` and the only write slot come back.
    let r = poll_until(WAIT, "the image lock to be released", || {
        let r = patch_json(s, "a", r#"{"op":"zero","offset":0,"size":4096}"#);
        (r.status != 409 && r.status != 503).then_some(r)
    });
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = s.request("PUT", "/images/b", &[], &vec![3u8; 64 * KIB as usize]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s.wait_log("PUT end image_id=a ", WAIT));
    // What did arrive may have been written; the rest is untouched.
    let now = s.get("/images/a").body;
    assert!(now[64 * KIB as usize..] == a_data[64 * KIB as usize..]);
}

#[test]
fn a_client_gone_mid_get_releases_its_slot() {
    let mut env = Env::new("getgone", &["--max-readers", "1"]);
    let big = env.dir.join("big.img");
    raw_image(&big, BIG, BIG - 3, b"end");
    env.export("big", &big, NbdOpts::raw());
    let s = &env.server;
    for _ in 0..3 {
        let c = get_in_flight(s, "big");
        drop(c);
        let r = poll_until(WAIT, "the reader slot to be released", || {
            let r = s.request("GET", "/images/big", &[("Range", "bytes=-3")], b"");
            (r.status != 503).then_some(r)
        });
        assert_eq!((r.status, &r.body[..]), (206, &b"end"[..]));
    }
    poll_until(WAIT, "a GET end line for each GET", || {
        (s.log_count("GET end image_id=big ") >= 6).then_some(())
    });
}

/// The seed had no socket timeouts: a stalled upload held the image lock and
/// the write slot for ever. Here the time between body bytes is bounded
/// (`--body-timeout 1`): the stalled request fails with 408 and releases
/// everything, while its client is still connected.
#[test]
fn a_stalled_upload_times_out_and_releases_everything() {
    let mut env = Env::new("stall", &["--body-timeout", "1", "--header-timeout", "1"]);
    env.raw_export("a", MIB, 14);
    let s = &env.server;

    let data = pattern_bytes(MIB as usize, 15);
    let mut c1 = put_in_flight(s, "a", &data, 100_000, 1);
    let r = c1.read_response(false);
    assert_err(
        &r,
        408,
        "timed out waiting for the request body after 100000 bytes",
    );
    let r = patch_json(s, "a", r#"{"op":"zero","size":4096}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);

    // A stalled JSON body and a stalled ranged PATCH.
    for headers in [
        vec![
            ("Content-Type", "application/json"),
            ("Content-Length", "30"),
        ],
        vec![("Range", "bytes=0-99"), ("Content-Length", "100")],
    ] {
        let mut c = s.client();
        c.send("PATCH", "/images/a", &headers, b"{\"op\":");
        let r = c.read_response(false);
        assert_eq!(r.status, 408, "{}", r.text());
        assert_imageio_headers(&r, DEFAULT_METHODS);
        let msg = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.starts_with("timed out waiting for the request body"),
            "{msg}"
        );
    }
    let r = s.request("PUT", "/images/a", &[], &data);
    assert_eq!(r.status, 200, "{}", r.text());

    // A stalled request head: the server closes the connection.
    let mut c = s.client();
    c.stream()
        .write_all(b"GET /images/a HTTP/1.1\r\nHost: t\r\n")
        .expect("partial head");
    match c.read_any() {
        Ok(r) => assert_eq!(r.status, 408, "{r:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
    }
    assert!(s.get("/images/a").body == data);
}
