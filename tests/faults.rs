//! Faults with real processes: qemu-nbd killed or restarted under a
//! transfer, clients that vanish or stall, configs changed mid-transfer,
//! sockets that are not NBD servers, slow-loris clients. After each fault the
//! server must answer cleanly and keep serving.

pub mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A temp dir with a config dir `cfg` inside.
fn setup(tag: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new(tag);
    let cfg = tmp.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    (tmp, cfg)
}

/// A raw image of `size` bytes whose first `data_len` bytes are
/// `pattern_bytes(data_len, seed)` (the rest a hole). Returns the data.
fn raw_image(path: &std::path::Path, size: u64, data_len: usize, seed: u64) -> Vec<u8> {
    let data = pattern_bytes(data_len, seed);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    (&f).write_all(&data).unwrap();
    f.sync_all().unwrap();
    data
}

/// Retries `f` every 50 ms for up to `timeout` until it returns Some.
fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The server still serves `id` (an image starting with `data`).
#[track_caller]
fn assert_serves(server: &Server, id: &str, data: &[u8]) {
    let r = server.request(
        "GET",
        &format!("/images/{id}"),
        &[("Range", "bytes=0-4095")],
        b"",
    );
    assert_eq!(r.status, 206, "{}", r.text());
    assert!(r.body == data[..4096], "bytes of {id} differ");
}

/// Reads the rest of a body until EOF or error; returns how many bytes came.
fn drain(client: &mut Client) -> (usize, Option<std::io::Error>) {
    let mut n = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match client.reader().read(&mut buf) {
            Ok(0) => return (n, None),
            Ok(k) => n += k,
            Err(e) => return (n, Some(e)),
        }
    }
}

#[test]
fn qemu_nbd_killed_mid_get_truncates_the_body_and_others_still_served() {
    let (tmp, cfg) = setup("kill-get");
    let size = 64 * MIB;
    let data = raw_image(&tmp.join("a.raw"), size, 4 * MIB as usize, 1);
    let data_b = raw_image(&tmp.join("b.raw"), 8 * MIB, 64 * 1024, 2);
    let mut nbd_a = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let nbd_b = QemuNbd::start(&tmp.join("b.raw"), &tmp.join("b.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &[]);
    server.add_nbd("a", &nbd_a);
    server.add_nbd("b", &nbd_b);

    let mut client = server.client();
    client.send("GET", "/images/a", &[], b"");
    let (status, headers) = client.read_head().unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["content-length"], size.to_string());
    let mut first = vec![0u8; MIB as usize];
    client.reader().read_exact(&mut first).unwrap();
    assert!(first == data[..MIB as usize]);

    nbd_a.stop_with(libc::SIGKILL);
    let (rest, _err) = drain(&mut client);
    let got = MIB as usize + rest;
    assert!(
        (got as u64) < size,
        "a complete-looking body after qemu-nbd died ({got} bytes)"
    );
    assert!(
        server.wait_log("GET error image_id=a", Duration::from_secs(10)),
        "{}",
        server.log()
    );

    // The other transfer is unaffected, and the dead one answers cleanly.
    assert_serves(&server, "b", &data_b);
    assert_err(&server.get("/images/a"), 502, "backend unavailable");
    assert_serves(&server, "b", &data_b);
}

#[test]
fn qemu_nbd_killed_mid_put_gives_a_json_5xx_and_others_unaffected() {
    let (tmp, cfg) = setup("kill-put");
    raw_image(&tmp.join("a.raw"), 64 * MIB, 0, 1);
    let data_b = raw_image(&tmp.join("b.raw"), 8 * MIB, 64 * 1024, 2);
    let mut nbd_a = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let nbd_b = QemuNbd::start(&tmp.join("b.raw"), &tmp.join("b.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &[]);
    server.add_nbd("a", &nbd_a);
    server.add_nbd("b", &nbd_b);

    let body = pattern_bytes(64 * MIB as usize, 3);
    let mut client = server.client();
    let len = body.len().to_string();
    client.send("PUT", "/images/a", &[("Content-Length", &len)], b"");
    client
        .stream()
        .write_all(&body[..4 * MIB as usize])
        .unwrap();
    // Kill only once bytes reached the image: the PUT is mid-write.
    let img = tmp.join("a.raw");
    assert!(
        poll(Duration::from_secs(20), || {
            let on_disk = std::fs::read(&img).ok()?;
            (on_disk[..4096] == body[..4096]).then_some(())
        })
        .is_some(),
        "the PUT never reached the image; {}",
        server.log()
    );
    nbd_a.stop_with(libc::SIGKILL);

    // Keep sending like a real client would; the server answers as soon as
    // it sees the backend gone.
    let mut sender = client.stream().try_clone().unwrap();
    let rest = body[4 * MIB as usize..].to_vec();
    let feeder = std::thread::spawn(move || {
        for piece in rest.chunks(256 * 1024) {
            if sender.write_all(piece).is_err() {
                return;
            }
        }
    });
    let resp = client.read_response(false);
    assert_err(&resp, 500, "backend error");
    drop(client);
    feeder.join().unwrap();
    assert!(
        server.wait_log("write error image_id=a", Duration::from_secs(10)),
        "{}",
        server.log()
    );

    // Other transfers: reads and a full write still work.
    assert_serves(&server, "b", &data_b);
    let new_b = pattern_bytes(MIB as usize, 4);
    let r = server.request("PUT", "/images/b?flush=y", &[], &new_b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_serves(&server, "b", &new_b);
}

#[test]
fn qemu_nbd_restarted_on_the_same_socket_is_reconnected() {
    let (tmp, cfg) = setup("restart");
    let img = tmp.join("a.raw");
    let data = raw_image(&img, 8 * MIB, MIB as usize, 5);
    let sock = tmp.join("a.sock");
    // --shared=0 advertises multi-conn: connections are pooled.
    let mut nbd = QemuNbd::start(&img, &sock, NbdOpts::raw());
    let server = Server::start(&cfg, &[]);
    server.add_nbd("a", &nbd);
    // Fill the pool with several idle connections.
    let mut clients: Vec<Client> = (0..3).map(|_| server.client()).collect();
    for _ in 0..2 {
        for c in &mut clients {
            let r = c.request("GET", "/images/a", &[("Range", "bytes=0-4095")], b"");
            assert_eq!(r.status, 206);
        }
    }

    for round in 0..2u64 {
        // SIGTERM keeps a bitmap-free raw image consistent; SIGKILL too.
        nbd.stop_with(if round == 0 {
            libc::SIGTERM
        } else {
            libc::SIGKILL
        });
        nbd = QemuNbd::start(&img, &sock, NbdOpts::raw());
        // The very next request works: no dead pooled connection handed out.
        for c in &mut clients {
            let r = c.request("GET", "/images/a", &[("Range", "bytes=0-4095")], b"");
            assert_eq!(r.status, 206, "round {round}: {}", r.text());
            assert!(r.body == data[..4096]);
        }
        let patch = pattern_bytes(4096, 10 + round);
        let r = server.request(
            "PATCH",
            "/images/a",
            &[("Range", "bytes=4096-8191")],
            &patch,
        );
        assert_eq!(r.status, 200, "round {round}: {}", r.text());
        let r = server.request("GET", "/images/a", &[("Range", "bytes=4096-8191")], b"");
        assert_eq!(r.status, 206);
        assert!(r.body == patch);
    }
    drop(nbd);
}

#[test]
fn client_gone_mid_get_releases_the_request_slot() {
    let (tmp, cfg) = setup("gone-get");
    let data = raw_image(&tmp.join("a.raw"), 64 * MIB, MIB as usize, 6);
    let nbd = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &["--max-requests", "1", "--max-waiting", "0"]);
    server.add_nbd("a", &nbd);

    let mut client = server.client();
    client.send("GET", "/images/a", &[], b"");
    let (status, _) = client.read_head().unwrap();
    assert_eq!(status, 200);
    let mut some = vec![0u8; 64 * 1024];
    client.reader().read_exact(&mut some).unwrap();
    // The one request slot is taken while this GET is open.
    assert_err(&server.get("/images/a"), 503, "too many requests");
    drop(client);

    let ok = poll(Duration::from_secs(20), || {
        let r = server.request("GET", "/images/a", &[("Range", "bytes=0-4095")], b"");
        (r.status == 206).then_some(r)
    })
    .expect("request slot never released after the client left");
    assert!(ok.body == data[..4096]);
    assert!(
        server.wait_log("GET end image_id=a", Duration::from_secs(10)),
        "{}",
        server.log()
    );
}

#[test]
fn client_gone_mid_put_releases_the_lock_and_request_slot() {
    let (tmp, cfg) = setup("gone-put");
    raw_image(&tmp.join("a.raw"), 16 * MIB, 0, 1);
    let nbd = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &["--max-requests", "1", "--max-waiting", "0"]);
    server.add_nbd("a", &nbd);

    for ranged in [false, true] {
        let mut client = server.client();
        let len = (8 * MIB).to_string();
        let mut headers = vec![("Content-Length", len.as_str())];
        if ranged {
            headers.push(("Content-Range", "bytes 0-8388607/*"));
        }
        client.send("PUT", "/images/a", &headers, b"");
        client
            .stream()
            .write_all(&pattern_bytes(3 * MIB as usize, 1))
            .unwrap();
        client.stream().flush().unwrap();
        // The PUT holds the only request slot: another data request is
        // refused, a flush (no data request) goes through meanwhile.
        assert!(poll(Duration::from_secs(10), || {
            let r = server.request("GET", "/images/a", &[("Range", "bytes=0-0")], b"");
            (r.status == 503).then_some(())
        })
        .is_some());
        let r = server.request("POST", "/images/a/flush", &[], b"");
        assert_eq!(r.json(), json!({"ok": true}));
        drop(client);

        // The slot comes back: a zero succeeds.
        let r = poll(Duration::from_secs(20), || {
            let r = server.request(
                "PATCH",
                "/images/a",
                &[("Content-Type", "application/json")],
                br#"{"op":"zero","offset":0,"size":16777216,"flush":true}"#,
            );
            (r.status == 200).then_some(r)
        })
        .expect("slot never released after the client left");
        assert_eq!(r.json(), json!({"ok": true}));
    }
    // The full-PUT lock came back too: a full PUT does not wait for ever.
    let data = pattern_bytes(MIB as usize, 9);
    let r = server.request("PUT", "/images/a", &[], &data);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_serves(&server, "a", &data);
}

#[test]
fn config_removed_mid_get_finishes_then_the_id_is_unknown() {
    let (tmp, cfg) = setup("cfg-rm");
    let size = 16 * MIB;
    let data = raw_image(&tmp.join("a.raw"), size, size as usize, 7);
    let nbd = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &[]);
    server.add_nbd("a", &nbd);

    let mut client = server.client();
    client.send("GET", "/images/a", &[], b"");
    let (status, _) = client.read_head().unwrap();
    assert_eq!(status, 200);
    let mut body = vec![0u8; size as usize];
    client
        .reader()
        .read_exact(&mut body[..MIB as usize])
        .unwrap();
    std::fs::remove_file(cfg.join("a")).unwrap();
    client
        .reader()
        .read_exact(&mut body[MIB as usize..])
        .unwrap();
    assert!(body == data, "in-flight GET bytes differ");

    assert_err(&server.get("/images/a"), 404, "unknown image_id");
    // The same connection keeps working too.
    let r = client.request("OPTIONS", "/images/a", &[], b"");
    assert_err(&r, 404, "unknown image_id");
}

#[test]
fn config_rewritten_mid_put_finishes_on_the_old_image_next_request_sees_the_new() {
    let (tmp, cfg) = setup("cfg-rw");
    raw_image(&tmp.join("a.raw"), 8 * MIB, 0, 1);
    let data_b = raw_image(&tmp.join("b.raw"), 8 * MIB, MIB as usize, 8);
    let nbd_a = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let nbd_b = QemuNbd::start(&tmp.join("b.raw"), &tmp.join("b.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &[]);
    server.add_nbd("t", &nbd_a);
    server.add_nbd("a-check", &nbd_a);

    let body = pattern_bytes(4 * MIB as usize, 11);
    let mut client = server.client();
    client.send(
        "PUT",
        "/images/t?flush=1",
        &[("Content-Length", &body.len().to_string())],
        b"",
    );
    client.stream().write_all(&body[..MIB as usize]).unwrap();
    assert!(server.wait_log("PUT start image_id=t", Duration::from_secs(10)));
    // Replaced by rename (a new inode), as a careful agent writes it: an
    // in-place rewrite of the same length within one timestamp tick would
    // look unchanged to any stat-based cache.
    let new_cfg = json!({"backend": "nbd", "socket": nbd_b.socket});
    std::fs::write(cfg.join(".t.new"), new_cfg.to_string()).unwrap();
    std::fs::rename(cfg.join(".t.new"), cfg.join("t")).unwrap();
    client.stream().write_all(&body[MIB as usize..]).unwrap();
    let r = client.read_response(false);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok": true, "bytes_written": body.len(), "flushed": true})
    );

    // The PUT went to a, whole; t now names b.
    let r = server.request(
        "GET",
        "/images/a-check",
        &[("Range", "bytes=0-4194303")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert!(r.body == body, "PUT bytes on the old image differ");
    let r = client.request("GET", "/images/t", &[("Range", "bytes=0-1048575")], b"");
    assert_eq!(r.status, 206);
    assert!(r.body == data_b, "t does not name the new image");
}

/// A Unix socket that accepts connections and then never speaks
/// (`garbage = None`) or sends `garbage` and waits. Runs until the test ends.
fn fake_nbd_server(path: PathBuf, garbage: Option<&'static [u8]>) {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().map_while(Result::ok) {
            if let Some(g) = garbage {
                let _ = conn.write_all(g);
            }
            held.push(conn);
        }
    });
}

#[test]
fn socket_that_is_not_an_nbd_server_gives_a_json_502() {
    let (tmp, cfg) = setup("not-nbd");
    fake_nbd_server(tmp.join("silent.sock"), None);
    fake_nbd_server(
        tmp.join("garbage.sock"),
        Some(b"HTTP/1.1 200 OK\r\nthis is not NBD\r\n\r\n\x00\x01\x02"),
    );
    let data = raw_image(&tmp.join("ok.raw"), MIB, 8192, 12);
    let nbd = QemuNbd::start(&tmp.join("ok.raw"), &tmp.join("ok.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &[]);
    server.add_nbd("ok", &nbd);
    for id in ["silent", "garbage"] {
        server.add_transfer(
            id,
            &json!({"backend": "nbd", "socket": tmp.join(&format!("{id}.sock"))}),
        );
    }
    server.add_transfer(
        "nothing",
        &json!({"backend": "nbd", "socket": tmp.join("no-such.sock")}),
    );

    for id in ["garbage", "nothing"] {
        let path = format!("/images/{id}");
        assert_err(&server.get(&path), 502, "backend unavailable");
        assert_err(
            &server.request("OPTIONS", &path, &[], b""),
            502,
            "backend unavailable",
        );
        assert_err(
            &server.request("PUT", &path, &[], b"abcd"),
            502,
            "backend unavailable",
        );
        assert_serves(&server, "ok", &data);
    }
    // The silent one costs the connect timeout per request: one GET, with
    // another client served while it waits.
    let addr = server.addr;
    let silent = std::thread::spawn(move || {
        Client::connect(addr).request("GET", "/images/silent", &[], b"")
    });
    assert!(server.wait_log("GET start image_id=silent", Duration::from_secs(10)));
    assert_serves(&server, "ok", &data);
    assert_err(&silent.join().unwrap(), 502, "backend unavailable");
    // The writer slot and lock were released by the failed PUTs.
    let r = server.request("PATCH", "/images/ok", &[("Range", "bytes=0-3")], b"wxyz");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Sends a request head one byte per 100 ms (~45 s in all) on a new
/// connection, after one complete keep-alive request when `after_first`.
/// Returns whether the server closed the connection and what it sent
/// during the slow head.
fn slow_loris(addr: std::net::SocketAddr, after_first: bool) -> (bool, Vec<u8>) {
    let mut client = Client::connect(addr);
    if after_first {
        let r = client.request("GET", "/images/a", &[("Range", "bytes=0-9")], b"");
        assert_eq!(r.status, 206);
    }
    let s = client.stream();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let head = format!(
        "GET /images/a HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(400)
    );
    let mut reply = Vec::new();
    for b in head.as_bytes() {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
    // Whatever came, the connection must now be closed by the server.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let closed = s.read_to_end(&mut rest).is_ok()
        || s.write_all(b"x").is_err()
        || s.write_all(b"x").is_err();
    reply.extend_from_slice(&rest);
    (closed, reply)
}

/// Runs slow-loris clients (`after_first` per client) while other clients
/// are served; each must be cut off without its request reaching a handler.
fn slow_loris_case(tag: &str, after_first: &[bool]) {
    let (tmp, cfg) = setup(tag);
    let data = raw_image(&tmp.join("a.raw"), MIB, 8192, 13);
    let nbd = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &["--header-timeout", "2"]);
    server.add_nbd("a", &nbd);

    let addr = server.addr;
    let lorises: Vec<_> = after_first
        .iter()
        .map(|&first| std::thread::spawn(move || slow_loris(addr, first)))
        .collect();

    // Meanwhile other clients are served normally.
    for _ in 0..5 {
        assert_serves(&server, "a", &data);
        std::thread::sleep(Duration::from_millis(200));
    }
    for (i, loris) in lorises.into_iter().enumerate() {
        let (closed, reply) = loris.join().unwrap();
        assert!(closed, "slow-loris connection {i} still open");
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
            "unexpected reply to slow-loris client {i}: {reply:?}"
        );
    }
    assert!(
        !server.log().contains("GET start image_id=a range=- "),
        "a slow request reached the handler"
    );
    assert_serves(&server, "a", &data);
}

#[test]
fn slow_loris_headers_are_cut_off_and_others_are_served() {
    slow_loris_case("loris", &[false, false]);
}

/// actix-http arms its request-head timer only for the first request of a
/// connection; `head_timeout` bounds every later head too.
#[test]
fn slow_loris_on_a_keep_alive_connection_is_cut_off() {
    slow_loris_case("loris-ka", &[true]);
}

#[test]
fn stalled_body_is_cut_off_and_releases_lock_and_writer_slot() {
    let (tmp, cfg) = setup("stall");
    raw_image(&tmp.join("a.raw"), 16 * MIB, 0, 1);
    let nbd = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &["--body-timeout", "2"]);
    server.add_nbd("a", &nbd);

    // A full PUT, a ranged PUT and a PATCH range write that stall mid-body.
    let cases: [(&str, &[(&str, &str)]); 3] = [
        ("PUT", &[("Content-Length", "8388608")]),
        (
            "PUT",
            &[
                ("Content-Length", "8388608"),
                ("Content-Range", "bytes 0-8388607/*"),
            ],
        ),
        (
            "PATCH",
            &[("Content-Length", "8388608"), ("Range", "bytes=0-8388607")],
        ),
    ];
    for (method, headers) in cases {
        let mut client = server.client();
        client.send(method, "/images/a", headers, b"");
        client
            .stream()
            .write_all(&pattern_bytes(MIB as usize, 2))
            .unwrap();
        let r = client.read_response(false);
        assert_err(
            &r,
            408,
            "timed out waiting for the request body after 1048576 bytes",
        );
        // Lock and writer slot are free right away.
        let r = server.request(
            "PATCH",
            "/images/a",
            &[("Content-Type", "application/json")],
            br#"{"op":"zero","size":16777216}"#,
        );
        assert_eq!(r.status, 200, "{method} {headers:?}: {}", r.text());
    }

    // A JSON PATCH body that stalls.
    let mut client = server.client();
    client.send(
        "PATCH",
        "/images/a",
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "100"),
        ],
        br#"{"op":"#,
    );
    assert_err(
        &client.read_response(false),
        408,
        "timed out waiting for the request body",
    );
    let r = server.request("POST", "/images/a/flush", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A GET client that stops reading (but stays connected) loses its request
/// slot after `--body-timeout`; the server then serves others.
#[test]
fn stalled_get_reader_releases_the_request_slot() {
    let (tmp, cfg) = setup("stall-get");
    let data = raw_image(&tmp.join("a.raw"), 256 * MIB, MIB as usize, 14);
    let nbd = QemuNbd::start(&tmp.join("a.raw"), &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, &["--max-requests", "1", "--body-timeout", "2"]);
    server.add_nbd("a", &nbd);
    let mut client = server.client();
    client.send("GET", "/images/a", &[], b"");
    let (status, _) = client.read_head().unwrap();
    assert_eq!(status, 200);
    // Stop reading, but stay connected.
    let freed = poll(Duration::from_secs(30), || {
        let r = server.request("GET", "/images/a", &[("Range", "bytes=0-4095")], b"");
        (r.status == 206).then_some(r)
    });
    let r = freed.expect("request slot still held by a client that stopped reading");
    assert!(r.body == data[..4096]);
    assert!(
        server.stalled_gets_closed("a", 2, 1, Duration::from_secs(5)) >= 1,
        "{}",
        server.log()
    );
    // Reading again, the stalled client gets a truncated body, never a
    // complete-looking one.
    let (got, _) = drain(&mut client);
    assert!((got as u64) < 256 * MIB, "{got} bytes");
}
