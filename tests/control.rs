//! The control socket (register / unregister / status), the registry's
//! precedence over the config dir, unregistering while requests are in
//! flight, and the per-transfer idle timeout. Real qemu-nbd, the real
//! server binary, real sockets.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A raw image of `size` bytes filled with `pattern_bytes(size, seed)`,
/// exported by qemu-nbd.
fn export_pattern(dir: &TempDir, name: &str, size: usize, seed: u64) -> (QemuNbd, Vec<u8>) {
    let img = dir.join(&format!("{name}.raw"));
    let data = pattern_bytes(size, seed);
    std::fs::write(&img, &data).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join(&format!("{name}.sock")), NbdOpts::raw());
    (nbd, data)
}

/// Sockets qemu-nbd has open (its listener plus one per client).
fn socket_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Polls `f` every 50 ms until it is true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A GET whose client reads the head and a little of the body, then stops
/// reading: the server's body stream stalls with the request in flight.
/// Returns the connection and how many body bytes were read.
fn stalled_get(server: &Server, id: &str) -> (TcpStream, usize) {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /images/{id} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let body_start = loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    (s, buf.len() - body_start)
}

fn status(server: &Server) -> serde_json::Value {
    server.control(&json!({"action": "status"}))
}

#[test]
fn register_status_unregister() {
    let dir = TempDir::new("ctl-basic");
    let cfg = TempDir::new("ctl-basic-cfg");
    let (nbd, data) = export_pattern(&dir, "a", 1 << 20, 1);
    let server = Server::start(cfg.path(), &[]);

    let md = std::fs::metadata(&server.control_socket).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o7777, 0o660);

    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 0})
    );
    assert_err(&server.get("/images/t1"), 404, "unknown image_id");

    let baseline = socket_fds(nbd.pid());
    assert_eq!(
        server.register_nbd("t1", &nbd),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert!(server.wait_log(
        "control: registered transfer_id=t1 backend=nbd",
        Duration::from_secs(5)
    ));
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 1})
    );
    let r = server.get("/images/t1");
    assert_eq!(r.status, 200);
    assert!(r.body == data, "registered transfer serves the export");
    // The connection stays pooled (qemu-nbd advertises multi-conn)...
    assert!(socket_fds(nbd.pid()) > baseline);
    // An unflushed write: unregistering flushes it.
    let r = server.request(
        "PUT",
        "/images/t1",
        &[("Content-Range", "bytes 0-3/*")],
        &data[..4],
    );
    assert_eq!(
        r.json(),
        json!({"ok": true, "bytes_written": 4, "flushed": false})
    );

    assert_eq!(
        server.control(&json!({"action": "unregister", "transfer_id": "t1"})),
        json!({"status": "ok", "active_transfers": 0})
    );
    assert_err(&server.get("/images/t1"), 404, "unknown image_id");
    // ...and is closed by unregistering.
    assert!(
        wait_until(Duration::from_secs(10), || socket_fds(nbd.pid())
            == baseline),
        "NBD connections of an unregistered transfer are closed"
    );
    // Unregistering an unknown id is not an error: the agent wants the count.
    assert_eq!(
        server.control(&json!({"action": "unregister", "transfer_id": "t1"})),
        json!({"status": "ok", "active_transfers": 0})
    );
}

#[test]
fn register_validates_like_config_files_and_logs_refusals() {
    let cfg = TempDir::new("ctl-valid");
    let server = Server::start(cfg.path(), &[]);
    let cases = [
        (
            json!({"action": "register", "transfer_id": "bad1", "config": {"socket": "/etc/x.sock"}}),
            r#"invalid config: "socket" must not be under /etc"#,
        ),
        (
            json!({"action": "register", "transfer_id": "bad2", "config": {"socket": "rel.sock"}}),
            r#"invalid config: "socket" must be an absolute path"#,
        ),
        (
            json!({"action": "register", "transfer_id": "bad3", "config": {"socket": "/a/../b"}}),
            r#"invalid config: "socket" must be a normalised path"#,
        ),
        (
            json!({"action": "register", "transfer_id": "bad4", "config": {"backend": "file", "file": "/dev/sda"}}),
            r#"invalid config: "file" must not be under /dev"#,
        ),
        (
            json!({"action": "register", "transfer_id": "bad5", "config": {"backend": "ceph"}}),
            r#"invalid config: unsupported backend "ceph""#,
        ),
        (
            json!({"action": "register", "transfer_id": "bad6", "config": "x"}),
            "invalid config: config must be a JSON object",
        ),
        (
            json!({"action": "register", "transfer_id": "bad7"}),
            r#"missing "config""#,
        ),
        (
            json!({"action": "register", "transfer_id": "bad8", "config": null}),
            r#"missing "config""#,
        ),
        (
            json!({"action": "register", "transfer_id": "a/b", "config": {"socket": "/s"}}),
            "invalid transfer_id",
        ),
        (
            json!({"action": "register", "transfer_id": "..", "config": {"socket": "/s"}}),
            "invalid transfer_id",
        ),
        (
            json!({"action": "register", "transfer_id": 7, "config": {"socket": "/s"}}),
            r#"missing or invalid "transfer_id""#,
        ),
        (
            json!({"action": "unregister"}),
            r#"missing or invalid "transfer_id""#,
        ),
    ];
    for (req, message) in cases {
        assert_eq!(
            server.control(&req),
            json!({"status": "error", "message": message}),
            "{req}"
        );
    }
    for id in ["bad1", "bad2", "bad3", "bad4", "bad5", "bad6"] {
        assert!(
            server.wait_log(
                &format!("control: register refused transfer_id={id} err="),
                Duration::from_secs(5)
            ),
            "refusal of {id} is logged"
        );
        assert_err(
            &server.get(&format!("/images/{id}")),
            404,
            "unknown image_id",
        );
    }
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 0})
    );
}

#[test]
fn malformed_and_oversized_requests_get_errors_and_never_stop_the_server() {
    let dir = TempDir::new("ctl-bad");
    let cfg = TempDir::new("ctl-bad-cfg");
    let (nbd, data) = export_pattern(&dir, "a", 64 * 1024, 2);
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);

    // A client that connects and sends nothing does not hold up others.
    let idle = std::os::unix::net::UnixStream::connect(&server.control_socket).unwrap();

    let err = |m: &str| json!({"status": "error", "message": m});
    let raw = |bytes: &[u8]| parse_control_reply(&server.control_raw(bytes));
    assert_eq!(
        raw(b"garbage\n"),
        err("invalid JSON: expected value at line 1 column 1")
    );
    assert_eq!(raw(b"[1,2]\n"), err("request must be a JSON object"));
    assert_eq!(
        raw(b"{\"action\":5}\n"),
        err("missing or invalid \"action\"")
    );
    assert_eq!(raw(b"{}\n"), err("missing or invalid \"action\""));
    assert_eq!(
        raw(b"{\"action\":\"reboot\"}\n"),
        err("unknown action: \"reboot\"")
    );
    assert_eq!(raw(b"\n"), err("empty request"));
    assert_eq!(raw(b""), err("empty request"));
    assert_eq!(
        raw(&[0xff, 0xfe, b'\n']),
        err("invalid JSON: expected value at line 1 column 1")
    );
    // No newline but the end of the stream: still one request.
    assert_eq!(
        raw(br#"{"action":"status"}"#),
        json!({"status": "ok", "active_transfers": 0})
    );
    // Only the first line counts.
    assert_eq!(
        raw(b"{\"action\":\"status\"}\n{\"action\":\"bogus\"}\n"),
        json!({"status": "ok", "active_transfers": 0})
    );
    // Larger than 64 KiB without a newline: refused without reading it all.
    let mut big = b"{\"action\":\"status\",\"pad\":\"".to_vec();
    big.resize(200 * 1024, b'x');
    assert_eq!(raw(&big), err("request larger than 65536 bytes"));
    // A line just under the bound is read and parsed.
    let mut fits = b"{\"action\":\"status\",\"pad\":\"".to_vec();
    fits.resize(60 * 1024, b'x');
    fits.extend_from_slice(b"\"}\n");
    assert_eq!(raw(&fits), json!({"status": "ok", "active_transfers": 0}));

    // Many clients at once, each answered.
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let path = server.control_socket.clone();
            std::thread::spawn(move || control_request(&path, b"{\"action\":\"status\"}\n"))
        })
        .collect();
    for h in handles {
        assert_eq!(
            parse_control_reply(&h.join().unwrap()),
            json!({"status": "ok", "active_transfers": 0})
        );
    }
    drop(idle);

    // The server still serves HTTP and the control socket.
    let r = server.get("/images/t");
    assert_eq!(r.status, 200);
    assert!(r.body == data);
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 0})
    );
}

#[test]
fn registered_id_wins_over_config_file() {
    let dir = TempDir::new("ctl-wins");
    let cfg = TempDir::new("ctl-wins-cfg");
    let (nbd_a, data_a) = export_pattern(&dir, "a", 256 * 1024, 3);
    let (nbd_b, data_b) = export_pattern(&dir, "b", 128 * 1024, 4);
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd_a);
    assert!(server.get("/images/t").body == data_a);

    assert_eq!(
        server.register_nbd("t", &nbd_b),
        json!({"status": "ok", "active_transfers": 1})
    );
    let r = server.get("/images/t");
    assert_eq!(r.status, 200);
    assert!(r.body == data_b, "the registered config wins");

    // Re-registering with another config replaces it.
    assert_eq!(
        server.register_nbd("t", &nbd_a),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert!(server.get("/images/t").body == data_a);
    assert_eq!(
        server.register_nbd("t", &nbd_b),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert!(server.get("/images/t").body == data_b);

    assert_eq!(
        server.control(&json!({"action": "unregister", "transfer_id": "t"})),
        json!({"status": "ok", "active_transfers": 0})
    );
    let r = server.get("/images/t");
    assert_eq!(r.status, 200);
    assert!(
        r.body == data_a,
        "after unregistering, the config file applies again"
    );
}

#[test]
fn unregister_waits_for_an_in_flight_get() {
    let dir = TempDir::new("ctl-wait");
    let cfg = TempDir::new("ctl-wait-cfg");
    let img = dir.join("big.raw");
    create_image(&img, "raw", 64 * MIB);
    let nbd = QemuNbd::start(&img, &dir.join("big.sock"), NbdOpts::raw());
    let server = Server::start(cfg.path(), &[]);
    server.register_nbd("big", &nbd);
    let baseline_other = server.register_nbd("other", &nbd);
    assert_eq!(
        baseline_other,
        json!({"status": "ok", "active_transfers": 2})
    );

    let (reader, _) = stalled_get(&server, "big");

    let (tx, rx) = mpsc::channel();
    let sock = server.control_socket.clone();
    std::thread::spawn(move || {
        let reply = control_request(
            &sock,
            b"{\"action\":\"unregister\",\"transfer_id\":\"big\"}\n",
        );
        let _ = tx.send(reply);
    });
    assert!(server.wait_log(
        "control: unregistering transfer_id=big requests_in_flight=1",
        Duration::from_secs(10)
    ));
    // While it waits: no reply yet, the id is refused, others are served.
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "unregister must wait for the GET in flight"
    );
    assert_err(&server.get("/images/big"), 404, "unknown image_id");
    assert_err(
        &server.request("OPTIONS", "/images/big", &[], b""),
        404,
        "unknown image_id",
    );
    assert_eq!(server.get("/images/other").status, 200);
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 1})
    );

    // The client goes away: the body is dropped, unregister completes.
    drop(reader);
    let reply = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("unregister completes once the GET is gone");
    assert_eq!(
        parse_control_reply(&reply),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert!(server.wait_log(
        "control: unregistered transfer_id=big",
        Duration::from_secs(5)
    ));
    assert_err(&server.get("/images/big"), 404, "unknown image_id");
    assert_eq!(server.get("/images/other").status, 200);
}

fn write_config(path: &Path, value: &serde_json::Value) {
    std::fs::write(path, value.to_string()).unwrap();
}

#[test]
fn idle_timeout_drops_transfers_but_never_while_a_request_is_in_flight() {
    // 3 s, not 1: on a loaded machine the first requests below must still
    // come well inside the timeout.
    let dir = TempDir::new("ctl-idle");
    let cfg = TempDir::new("ctl-idle-cfg");
    let img = dir.join("big.raw");
    create_image(&img, "raw", 64 * MIB);
    let nbd = QemuNbd::start(&img, &dir.join("big.sock"), NbdOpts::raw());
    let server = Server::start(cfg.path(), &[]);
    let short = |id: &str| {
        server.control(&json!({
            "action": "register",
            "transfer_id": id,
            "config": {"socket": nbd.socket, "idle_timeout_seconds": 3},
        }))
    };
    assert_eq!(short("busy")["status"], "ok");
    assert_eq!(short("reg")["status"], "ok");
    // The default (600 s for a registered transfer) and values below 1
    // (which mean 86400 s): not dropped within this test.
    server.register_nbd("long", &nbd);
    assert_eq!(
        server.control(&json!({
            "action": "register",
            "transfer_id": "zero",
            "config": {"socket": nbd.socket, "idle_timeout_seconds": 0},
        }))["status"],
        "ok"
    );
    let file_cfg = cfg.join("dir");
    write_config(
        &file_cfg,
        &json!({"socket": nbd.socket, "idle_timeout_seconds": 3}),
    );

    let (mut reader, got) = stalled_get(&server, "busy");
    assert_eq!(server.get("/images/dir").status, 200);
    assert_eq!(server.get("/images/reg").status, 200);

    // Waiting must not touch them (every request counts as activity): watch
    // the log, then look.
    assert!(
        server.wait_log(
            "image_id=reg unregistered: no request for 3 s",
            Duration::from_secs(20)
        ),
        "an idle registered transfer is dropped"
    );
    assert_err(&server.get("/images/reg"), 404, "unknown image_id");
    assert!(
        server.wait_log(
            "image_id=dir closed: no request for 3 s",
            Duration::from_secs(20)
        ),
        "an idle config-dir transfer is closed"
    );
    assert_err(&server.get("/images/dir"), 404, "unknown image_id");
    // "busy" has been in flight for longer than its timeout: still there.
    assert_eq!(
        server.request("OPTIONS", "/images/busy", &[], b"").status,
        200
    );
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 3}),
        "busy, long and zero remain"
    );
    // The stalled GET can still read all of its body.
    let mut rest = vec![0u8; 64 * MIB as usize - got];
    reader.read_exact(&mut rest).expect("the rest of the body");
    assert!(rest.iter().all(|&b| b == 0));
    drop(reader);

    // A changed config file makes the config-dir transfer usable again.
    write_config(
        &file_cfg,
        &json!({"socket": nbd.socket, "idle_timeout_seconds": 3600}),
    );
    assert_eq!(server.get("/images/dir").status, 200);

    assert!(
        server.wait_log(
            "image_id=busy unregistered: no request for 3 s",
            Duration::from_secs(20)
        ),
        "once idle, the busy transfer is dropped too"
    );
    assert_err(&server.get("/images/busy"), 404, "unknown image_id");
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 2})
    );
    assert_eq!(server.get("/images/long").status, 200);
    assert_eq!(server.get("/images/zero").status, 200);
    assert_eq!(server.get("/images/dir").status, 200);
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_refused() {
    let cfg = TempDir::new("ctl-stale");
    let sock = cfg.join("run/sub/image-server.sock");
    // A stale socket file (nobody listens) in a directory that exists.
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let sock_str = sock.to_str().unwrap();
    let mut server = Server::start(cfg.path(), &["--control-socket", sock_str]);
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 0})
    );

    // A second server on the same (live) socket refuses to start.
    let stderr = failed_start(&[
        "--control-socket",
        sock_str,
        "--config-dir",
        cfg.path().to_str().unwrap(),
    ]);
    assert!(
        stderr.contains(&format!(
            "control socket {sock_str} is in use by another process"
        )),
        "{stderr}"
    );
    // ...and the first one still answers.
    assert_eq!(
        status(&server),
        json!({"status": "ok", "active_transfers": 0})
    );

    // Stopped, the server removes its socket file.
    server.signal(libc::SIGTERM);
    assert!(server
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    assert!(!sock.exists());

    // A regular file in the way is not removed.
    std::fs::write(&sock, b"not a socket").unwrap();
    let stderr = failed_start(&[
        "--control-socket",
        sock_str,
        "--config-dir",
        cfg.path().to_str().unwrap(),
    ]);
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}

#[test]
fn an_idle_config_dir_transfer_closes_its_connections() {
    let dir = TempDir::new("ctl-idle-conn");
    let cfg = TempDir::new("ctl-idle-conn-cfg");
    let (nbd, data) = export_pattern(&dir, "a", 256 * 1024, 5);
    let server = Server::start(cfg.path(), &[]);
    let baseline = socket_fds(nbd.pid());
    write_config(
        &cfg.join("t"),
        &json!({"socket": nbd.socket, "idle_timeout_seconds": 2}),
    );
    let r = server.get("/images/t");
    assert!(r.status == 200 && r.body == data);
    assert!(socket_fds(nbd.pid()) > baseline, "the connection is pooled");
    // The closed transfer stays cached (refused until its file changes);
    // its connections must not stay with it.
    assert!(server.wait_log(
        "image_id=t closed: no request for 2 s",
        Duration::from_secs(20)
    ));
    assert!(
        wait_until(Duration::from_secs(10), || socket_fds(nbd.pid())
            == baseline),
        "NBD connections of an idle transfer are closed"
    );
    assert_err(&server.get("/images/t"), 404, "unknown image_id");
}

/// The idle timeout a transfer gets, as the control socket's status shows
/// it: a registered config without `idle_timeout_seconds` idles out after
/// 600 s (as CloudStack's newer image server), a config file after 86400 s
/// (`image_server.py` had none), and below 1 means 86400 s either way. Fields the
/// server does not use, such as the `token` newer agents send, are accepted
/// in both.
#[test]
fn idle_timeout_defaults_and_unknown_config_fields() {
    let dir = TempDir::new("ctl-defaults");
    let cfg = TempDir::new("ctl-defaults-cfg");
    let (nbd, data) = export_pattern(&dir, "a", 1 << 20, 3);
    let server = Server::start(cfg.path(), &[]);
    let idle_timeout = |id: &str| {
        let r = server.control(&json!({"action": "status", "transfer_id": id}));
        assert_eq!(r["status"], "ok", "{r}");
        r["transfer"]["idle_timeout_seconds"].clone()
    };
    let register = |id: &str, config: serde_json::Value| {
        let r = server.control(&json!({"action": "register", "transfer_id": id, "config": config}));
        assert_eq!(r["status"], "ok", "{id}: {r}");
    };
    let socket = nbd.socket.to_str().unwrap();
    register(
        "plain",
        json!({"backend": "nbd", "socket": socket, "token": "eyJhbGciOi.J9.sig"}),
    );
    register(
        "null",
        json!({"socket": socket, "idle_timeout_seconds": null}),
    );
    register("zero", json!({"socket": socket, "idle_timeout_seconds": 0}));
    register(
        "half",
        json!({"socket": socket, "idle_timeout_seconds": 0.5}),
    );
    register("set", json!({"socket": socket, "idle_timeout_seconds": 42}));
    register(
        "odd",
        json!({"socket": socket, "token": 17, "extra": {"a": [1, 2]}, "transfer_id": "x"}),
    );
    assert_eq!(idle_timeout("plain"), 600);
    assert_eq!(idle_timeout("null"), 600);
    assert_eq!(idle_timeout("zero"), 86400);
    assert_eq!(idle_timeout("half"), 86400);
    assert_eq!(idle_timeout("set"), 42);
    assert_eq!(idle_timeout("odd"), 600);
    server.logged(&format!(
        "control: registered transfer_id=plain backend=nbd socket={socket} export=- export_bitmap=- idle_timeout_s=600"
    ), 1);

    // Config files: 86400 s without the field; a token is accepted there too.
    server.add_transfer("file", &json!({"socket": socket, "token": "abc"}));
    server.add_transfer(
        "file-zero",
        &json!({"socket": socket, "idle_timeout_seconds": 0}),
    );
    server.add_transfer(
        "file-set",
        &json!({"socket": socket, "idle_timeout_seconds": 7}),
    );
    for (id, want) in [("file", 86400), ("file-zero", 86400), ("file-set", 7)] {
        let r = server.get(&format!("/images/{id}"));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert!(r.body == data, "{id}");
        assert_eq!(idle_timeout(id), want, "{id}");
    }
    for id in ["plain", "odd"] {
        let r = server.get(&format!("/images/{id}"));
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert!(r.body == data, "{id}");
    }
}
