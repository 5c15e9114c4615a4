//! Limits and locks (the newest upstream server's model): requests of one
//! transfer run concurrently (no 409), full-image PUTs of one image take
//! turns, one server-wide bound (`--max-requests`; with `--max-waiting 0`
//! refused at once with 503, see tests/load.rs for the queue), and clients
//! that go away mid-request releasing everything they held.
//!
//! "In flight" is made real without timing: a GET whose client does not read
//! the body of a large image cannot finish, and a PUT whose client sent only
//! part of the body cannot finish; the server's "PUT start" log line (written
//! once the PUT holds its request slot) says when the PUT holds it.

pub mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
/// leaving the rest unread: the GET holds its request slot. (A request that
/// just finished may hold its slot a moment longer: 503s are retried.)
fn get_in_flight(server: &Server, id: &str) -> Client {
    let (mut c, head) = poll_until(WAIT, "a request slot", || {
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

/// Starts a PUT of `len` bytes to `id` (`headers` besides Content-Length),
/// sends the first `sent` bytes of `data`, and waits until the server logs
/// that the PUT holds its request slot (the `n`-th "PUT start" of that image).
fn put_in_flight_with(
    server: &Server,
    id: &str,
    headers: &[(&str, &str)],
    data: &[u8],
    sent: usize,
    n: usize,
) -> Client {
    let mut c = server.client();
    let len = data.len().to_string();
    let mut all = vec![("Content-Length", len.as_str())];
    all.extend_from_slice(headers);
    c.send("PUT", &format!("/images/{id}"), &all, &data[..sent]);
    let needle = format!("PUT start image_id={id} ");
    poll_until(WAIT, "the PUT to start", || {
        (server.log_count(&needle) >= n).then_some(())
    });
    c
}

/// A full-image PUT in flight (see [`put_in_flight_with`]).
fn put_in_flight(server: &Server, id: &str, data: &[u8], sent: usize, n: usize) -> Client {
    put_in_flight_with(server, id, &[], data, sent, n)
}

/// Sends the rest of an in-flight PUT and returns its response.
fn finish_put(mut c: Client, rest: &[u8]) -> Response {
    c.stream().write_all(rest).expect("send rest of body");
    c.read_response(false)
}

/// `Content-Range` of `len` bytes at `at`, with an unknown total.
fn content_range(at: u64, len: usize) -> String {
    format!("bytes {}-{}/*", at, at + len as u64 - 1)
}

/// Waits until `path` holds `want` at `at` (qemu-nbd writes through the
/// host page cache, so a write that reached the export shows in the file).
fn wait_on_disk(path: &std::path::Path, at: u64, want: &[u8]) {
    poll_until(WAIT, "the write to reach the image", || {
        (read_file_at(path, at, want.len()) == want).then_some(())
    });
}

#[test]
fn max_requests_refuses_the_next_data_request_at_once() {
    let mut env = Env::new("maxreq", &["--max-requests", "2", "--max-waiting", "0"]);
    let big = env.dir.join("big.img");
    raw_image(&big, BIG, 0, b"big");
    env.export("big", &big, NbdOpts::raw());
    let (_, small) = env.raw_export("small", 64 * KIB, 1);
    let size = MIB;
    env.raw_export("a", size, 2);
    let s = &env.server;

    // Two data requests in flight: a GET of one image, a PUT of another.
    let c1 = get_in_flight(s, "big");
    let new_a = pattern_bytes(size as usize, 3);
    let c2 = put_in_flight(s, "a", &new_a, 100 * KIB as usize, 1);

    // Every other data request, on any image, is refused at once (no
    // request may wait: --max-waiting 0).
    let busy = |r: Response| {
        assert_err(&r, 503, "too many requests");
        assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    };
    busy(s.get("/images/small"));
    busy(s.request("GET", "/images/big", &[("Range", "bytes=0-9")], b""));
    busy(s.get("/images/small/checksum"));
    busy(patch_json(s, "small", r#"{"op":"zero","size":4096}"#));
    busy(patch_json(s, "small", r#"{"op":"flush"}"#));
    // Refused from the head alone, before the body.
    let mut c = s.client();
    c.send("PUT", "/images/small", &[("Content-Length", "65536")], b"");
    busy(c.read_response(false));
    let mut c = s.client();
    c.send(
        "PATCH",
        "/images/small",
        &[("Range", "bytes=0-9"), ("Content-Length", "10")],
        b"",
    );
    busy(c.read_response(false));
    // What is not a data request goes through.
    let r = s.get("/images/small/extents");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.request("OPTIONS", "/images/small", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.request("POST", "/images/small/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = s.request("HEAD", "/images/small", &[], b"");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), Some("65536"));

    // The reader goes away mid-body: its slot comes back.
    drop(c1);
    let r = poll_until(WAIT, "the request slot to be released", || {
        let r = s.get("/images/small");
        (r.status != 503).then_some(r)
    });
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == small);
    assert!(s.wait_log("GET end image_id=big ", WAIT), "{}", s.log());
    // The PUT still holds the other slot and ends well.
    let r = finish_put(c2, &new_a[100 * KIB as usize..]);
    assert_json_ok(
        &r,
        &format!(r#"{{"ok":true,"bytes_written":{size},"flushed":false}}"#),
    );
    assert!(s.get("/images/a").body == new_a);
}

/// What the concurrent requests of `concurrent_requests_of_one_transfer`
/// do to an image of 8 MiB: two ranged PUTs of 2 MiB (at 0 and 2 MiB), a
/// zero of 1 MiB at 4 MiB, a PATCH write of 10 bytes at 5 MiB; the rest
/// keeps its pattern. Returns the expected image.
fn expected_after(initial: &[u8], put1: &[u8], put2: &[u8]) -> Vec<u8> {
    let mut want = initial.to_vec();
    want[..2 * MIB as usize].copy_from_slice(put1);
    want[2 * MIB as usize..4 * MIB as usize].copy_from_slice(put2);
    want[4 * MIB as usize..5 * MIB as usize].fill(0);
    want[5 * MIB as usize..5 * MIB as usize + 10].copy_from_slice(b"0123456789");
    want
}

/// Runs `f` on a thread, for requests sent at once.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(f)
}

/// The other requests of one transfer, each on its own connection, at once:
/// a PATCH zero, a PATCH range write, flushes (POST and PATCH), extents (both
/// contexts), a ranged GET of bytes nobody writes, OPTIONS. Each thread
/// returns its request's name and response.
fn others_at_once(server: &Server) -> Vec<JoinHandle<(String, Response)>> {
    let addr = server.addr;
    let req =
        move |name: &str, method: &str, headers: Vec<(&'static str, String)>, body: Vec<u8>| {
            let name = name.to_string();
            let method = method.to_string();
            spawn(move || {
                let mut c = Client::connect(addr);
                let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let r = c.request(&method, "/images/a", &h, &body);
                (name, r)
            })
        };
    let json = || vec![("Content-Type", "application/json".to_string())];
    vec![
        req(
            "zero",
            "PATCH",
            json(),
            format!(r#"{{"op":"zero","offset":{},"size":{}}}"#, 4 * MIB, MIB).into_bytes(),
        ),
        req(
            "patch range",
            "PATCH",
            vec![("Range", format!("bytes={}-{}", 5 * MIB, 5 * MIB + 9))],
            b"0123456789".to_vec(),
        ),
        req(
            "patch flush",
            "PATCH",
            json(),
            br#"{"op":"flush"}"#.to_vec(),
        ),
        spawn(move || {
            let mut c = Client::connect(addr);
            (
                "post flush".into(),
                c.request("POST", "/images/a/flush", &[], b""),
            )
        }),
        spawn(move || {
            let mut c = Client::connect(addr);
            (
                "extents".into(),
                c.request("GET", "/images/a/extents", &[], b""),
            )
        }),
        spawn(move || {
            let mut c = Client::connect(addr);
            (
                "dirty extents".into(),
                c.request("GET", "/images/a/extents?context=dirty", &[], b""),
            )
        }),
        req(
            "get range",
            "GET",
            vec![("Range", format!("bytes={}-{}", 6 * MIB, 7 * MIB - 1))],
            Vec::new(),
        ),
        req("options", "OPTIONS", Vec::new(), Vec::new()),
    ]
}

/// Checks the responses of [`others_at_once`].
fn check_others(done: Vec<(String, Response)>, initial: &[u8]) {
    assert_eq!(done.len(), 8);
    for (name, r) in done {
        match name.as_str() {
            "zero" | "patch flush" | "post flush" => assert_json_ok(&r, r#"{"ok":true}"#),
            "patch range" => assert_json_ok(&r, r#"{"ok":true,"bytes_written":10}"#),
            "extents" | "dirty extents" => {
                assert_eq!(r.status, 200, "{name}: {}", r.text());
                let list = r.json();
                let end: u64 = list
                    .as_array()
                    .expect("extents list")
                    .iter()
                    .map(|e| e["length"].as_u64().expect("length"))
                    .sum();
                assert_eq!(end, 8 * MIB, "{name}: {list}");
            }
            "get range" => {
                assert_eq!(r.status, 206, "{name}: {}", r.text());
                assert!(r.body == initial[6 * MIB as usize..7 * MIB as usize]);
            }
            "options" => {
                assert_eq!(r.status, 200, "{name}: {}", r.text());
                assert_eq!(
                    r.text(),
                    r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":4,"max_writers":4}"#
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
}

/// Joins request threads, failing if they take longer than a generous
/// hang guard.
fn join_all(threads: Vec<JoinHandle<(String, Response)>>) -> Vec<(String, Response)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    for t in threads {
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "requests hang");
            std::thread::sleep(Duration::from_millis(20));
        }
        out.push(t.join().expect("request thread"));
    }
    out
}

/// ovirt-imageio's client and CloudStack's stress test send ranged PUTs,
/// PATCH zero, flush and extents of one transfer at once: none is refused,
/// and the image ends up with every write.
#[test]
fn concurrent_requests_of_one_transfer_all_succeed() {
    let mut env = Env::new("concurrent", &[]);
    let (path, initial) = env.raw_export("a", 8 * MIB, 4);
    let s = &env.server;
    let put1 = pattern_bytes(2 * MIB as usize, 5);
    let put2 = pattern_bytes(2 * MIB as usize, 6);
    let half = MIB as usize;

    // Two ranged PUTs in flight at once, each with half its body written.
    let p1 = put_in_flight_with(
        s,
        "a",
        &[("Content-Range", &content_range(0, put1.len()))],
        &put1,
        half,
        1,
    );
    let p2 = put_in_flight_with(
        s,
        "a",
        &[("Content-Range", &content_range(2 * MIB, put2.len()))],
        &put2,
        half,
        2,
    );
    wait_on_disk(&path, 0, &put1[..64 * KIB as usize]);
    wait_on_disk(&path, 2 * MIB, &put2[..64 * KIB as usize]);

    // Everything else at once, while both PUTs are mid-body.
    check_others(join_all(others_at_once(s)), &initial);

    let ok = format!(
        r#"{{"ok":true,"bytes_written":{},"flushed":false}}"#,
        2 * MIB
    );
    assert_json_ok(&finish_put(p1, &put1[half..]), &ok);
    assert_json_ok(&finish_put(p2, &put2[half..]), &ok);
    let want = expected_after(&initial, &put1, &put2);
    assert!(s.get("/images/a").body == want, "read back over HTTP");
    // Flushed, the image file itself holds the same bytes.
    assert_json_ok(
        &s.request("POST", "/images/a/flush", &[], b""),
        r#"{"ok":true}"#,
    );
    assert!(
        std::fs::read(&path).expect("read image") == want,
        "image file"
    );
    assert!(!s.log().contains(" 409 "), "{}", s.log());
}

/// A not-multi-conn export (qemu-nbd's default `--shared=1`) accepts one
/// connection at a time: the requests of its transfer take turns instead of
/// waiting in the socket's backlog. A request that holds the connection for
/// longer than the connect timeout (10 s) makes the others wait, not fail,
/// and nothing deadlocks.
#[test]
fn requests_of_a_single_connection_export_take_turns() {
    let mut env = Env::new("turns", &[]);
    let path = env.dir.join("a.img");
    let initial = pattern_bytes(8 * MIB as usize, 7);
    raw_image(&path, 8 * MIB, 0, &initial);
    env.export(
        "a",
        &path,
        NbdOpts {
            shared: 1,
            ..NbdOpts::raw()
        },
    );
    let s = &env.server;
    let put1 = pattern_bytes(2 * MIB as usize, 8);
    let put2 = pattern_bytes(2 * MIB as usize, 9);
    let half = MIB as usize;

    // The first PUT holds the export's one connection, mid-body.
    let p1 = put_in_flight_with(
        s,
        "a",
        &[("Content-Range", &content_range(0, put1.len()))],
        &put1,
        half,
        1,
    );
    wait_on_disk(&path, 0, &put1[..64 * KIB as usize]);

    // The rest at once: they wait for their turn.
    let addr = s.addr;
    let put2_body = put2.clone();
    let (tx, rx) = mpsc::channel();
    let mut threads = others_at_once(s);
    threads.push(spawn(move || {
        let mut c = Client::connect(addr);
        let r = c.request(
            "PUT",
            "/images/a",
            &[("Content-Range", &content_range(2 * MIB, put2_body.len()))],
            &put2_body,
        );
        let _ = tx.send(());
        ("put2".to_string(), r)
    }));
    // Longer than the NBD connect timeout: a connect queued behind the
    // first PUT's connection would have failed by now.
    std::thread::sleep(Duration::from_secs(11));
    assert!(
        rx.try_recv().is_err(),
        "a request ran while another held the export's only connection"
    );
    assert!(threads.iter().all(|t| !t.is_finished()));

    let ok = format!(
        r#"{{"ok":true,"bytes_written":{},"flushed":false}}"#,
        2 * MIB
    );
    assert_json_ok(&finish_put(p1, &put1[half..]), &ok);
    let mut done = join_all(threads);
    let (name, r) = done.pop().expect("put2");
    assert_eq!(name, "put2");
    assert_json_ok(&r, &ok);
    check_others(done, &initial);
    let want = expected_after(&initial, &put1, &put2);
    assert!(s.get("/images/a").body == want, "read back over HTTP");
    assert_json_ok(
        &s.request("POST", "/images/a/flush", &[], b""),
        r#"{"ok":true}"#,
    );
    assert!(
        std::fs::read(&path).expect("read image") == want,
        "image file"
    );
}

#[test]
fn a_second_put_to_the_same_image_waits_for_the_first() {
    let mut env = Env::new("putwait", &[]);
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
    let mut env = Env::new("putgone", &["--max-requests", "1", "--max-waiting", "0"]);
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
    assert_err(
        &patch_json(s, "a", r#"{"op":"flush"}"#),
        503,
        "too many requests",
    );
    drop(c1);
    // The only request slot comes back.
    let r = poll_until(WAIT, "the request slot to be released", || {
        let r = patch_json(s, "b", r#"{"op":"zero","offset":0,"size":4096}"#);
        (r.status != 503).then_some(r)
    });
    assert_json_ok(&r, r#"{"ok":true}"#);
    assert!(s.wait_log("PUT end image_id=a ", WAIT));
    // What did arrive may have been written; the rest is untouched.
    let now = s.get("/images/a").body;
    assert!(now[64 * KIB as usize..] == a_data[64 * KIB as usize..]);
    // The full-PUT lock of `a` came back too: the next full PUT does not wait.
    let r = s.request("PUT", "/images/a", &[], &vec![3u8; size as usize]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s.get("/images/a").body == vec![3u8; size as usize]);
}

#[test]
fn a_client_gone_mid_get_releases_its_slot() {
    let mut env = Env::new("getgone", &["--max-requests", "1"]);
    let big = env.dir.join("big.img");
    raw_image(&big, BIG, BIG - 3, b"end");
    env.export("big", &big, NbdOpts::raw());
    let s = &env.server;
    for _ in 0..3 {
        let c = get_in_flight(s, "big");
        drop(c);
        let r = poll_until(WAIT, "the request slot to be released", || {
            let r = s.request("GET", "/images/big", &[("Range", "bytes=-3")], b"");
            (r.status != 503).then_some(r)
        });
        assert_eq!((r.status, &r.body[..]), (206, &b"end"[..]));
    }
    poll_until(WAIT, "a GET end line for each GET", || {
        (s.log_count("GET end image_id=big ") >= 6).then_some(())
    });
}

/// `image_server.py` had no socket timeouts: a stalled upload held the image lock and
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
