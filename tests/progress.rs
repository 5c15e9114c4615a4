//! Per-transfer figures in the control socket's `status`: exact byte counts
//! after known GET / Range GET / PUT / Content-Range PUT / PATCH range /
//! PATCH zero requests, failed requests counted as failed, requests in
//! flight, and which transfers status finds. Real qemu-nbd, the real
//! server binary, real sockets.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const SIZE: usize = 8 * MIB as usize;

fn status_of(server: &Server, id: &str) -> Value {
    server.control(&json!({"action": "status", "transfer_id": id}))
}

/// The figures of `id`, checked for shape; `started_at` and
/// `idle_seconds` (which depend on the clock) and `bytes_direct` are
/// checked and removed.
#[track_caller]
fn figures(server: &Server, id: &str) -> Value {
    let reply = status_of(server, id);
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut t = reply["transfer"].clone();
    let obj = t.as_object_mut().expect("transfer object");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let started = obj.remove("started_at").unwrap().as_u64().unwrap();
    assert!(started <= now && now - started < 600, "{started} vs {now}");
    let idle = obj.remove("idle_seconds").unwrap().as_u64().unwrap();
    assert!(idle < 600, "{idle}");
    // Whether a body is read directly depends on what actix read with its
    // head (tests/upload_boundaries.rs checks it); never more than written.
    let direct = obj.remove("bytes_direct").unwrap().as_u64().unwrap();
    assert!(direct <= obj["bytes_written"].as_u64().unwrap(), "{t}");
    t
}

/// The figures expected of a transfer whose config sets no idle timeout
/// (600 s when registered, 86400 s from the config dir).
fn expect(id: &str, source: &str, counts: [u64; 6]) -> Value {
    let [read, written, zeroed, served, failed, in_flight] = counts;
    let idle_timeout = if source == "registered" { 600 } else { 86400 };
    json!({
        "transfer_id": id,
        "source": source,
        "closed": false,
        "bytes_read": read,
        "bytes_written": written,
        "bytes_zeroed": zeroed,
        "requests_served": served,
        "requests_failed": failed,
        "requests_in_flight": in_flight,
        "nbd_timeouts": 0,
        "idle_timeout_seconds": idle_timeout,
    })
}

/// Polls `f` every 20 ms until it is true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn status_counts_exact_bytes_and_requests() {
    let dir = TempDir::new("progress");
    let img = dir.join("disk.raw");
    let data = pattern_bytes(SIZE, 7);
    std::fs::write(&img, &data).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join("disk.sock"), NbdOpts::raw());
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &[]);
    assert_eq!(
        server.register_nbd("t", &nbd),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert_eq!(figures(&server, "t"), expect("t", "registered", [0; 6]));
    // Registering the same config again is no request.
    server.register_nbd("t", &nbd);
    assert_eq!(figures(&server, "t"), expect("t", "registered", [0; 6]));

    let mut c = server.client();
    // GET, whole image.
    let r = c.request("GET", "/images/t", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    // Range GET: 1000 bytes.
    let r = c.request("GET", "/images/t", &[("Range", "bytes=100-1099")], b"");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &data[100..1100]);
    // PUT of 1 MiB + 3 at the start.
    let put = pattern_bytes(MIB as usize + 3, 8);
    let r = c.request("PUT", "/images/t", &[], &put);
    assert_eq!(r.status, 200, "{}", r.text());
    // Content-Range PUT: 4096 bytes at 2 MiB.
    let r = c.request(
        "PUT",
        "/images/t",
        &[("Content-Range", "bytes 2097152-2101247/*")],
        &[0x5a; 4096],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // PATCH with Range: 5000 bytes at 4 MiB (an all-zero body counts too).
    let r = c.request(
        "PATCH",
        "/images/t",
        &[("Range", "bytes=4194304-4199303")],
        &[0; 5000],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // PATCH zero: 64 KiB at 6 MiB, and a zero clipped at the end: 1 MiB
    // asked, 512 KiB zeroed.
    for (offset, size) in [(6 * MIB, 64 * 1024), (SIZE as u64 - 512 * 1024, MIB)] {
        let body = json!({"op": "zero", "offset": offset, "size": size}).to_string();
        let r = c.request(
            "PATCH",
            "/images/t",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let written = put.len() as u64 + 4096 + 5000;
    let zeroed = 64 * 1024 + 512 * 1024;
    let read = SIZE as u64 + 1000;
    assert_eq!(
        figures(&server, "t"),
        expect("t", "registered", [read, written, zeroed, 7, 0, 0])
    );

    // Failures: each one counted, no bytes.
    assert_err(
        &c.request("GET", "/images/t", &[("Range", "bytes=99999999-")], b""),
        416,
        "range not satisfiable",
    );
    let body = json!({"op": "zero", "offset": SIZE, "size": 1}).to_string();
    assert_err(
        &c.request(
            "PATCH",
            "/images/t",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ),
        400,
        "offset must be less than image size",
    );
    assert_err(
        &c.request("GET", "/images/t/nothing", &[], b""),
        404,
        "not found",
    );
    assert_err(
        &c.request("GET", "/images/t/checksum?algorithm=crc", &[], b""),
        400,
        "Unsupported value \"crc\" for \"algorithm\", expecting one of [\"blake2b\", \
             \"blake2s\", \"md5\", \"sha1\", \"sha224\", \"sha256\", \"sha384\", \"sha3_224\", \
             \"sha3_256\", \"sha3_384\", \"sha3_512\", \"sha512\"]",
    );
    // Unknown ids count nowhere.
    assert_err(
        &c.request("GET", "/images/other", &[], b""),
        404,
        "unknown image_id",
    );
    assert_eq!(
        figures(&server, "t"),
        expect("t", "registered", [read, written, zeroed, 7, 4, 0])
    );

    // Extents, flush, OPTIONS and checksum are requests that move no
    // bytes to or from the client.
    assert_eq!(c.request("GET", "/images/t/extents", &[], b"").status, 200);
    assert_eq!(c.request("POST", "/images/t/flush", &[], b"").status, 200);
    assert_eq!(c.request("OPTIONS", "/images/t", &[], b"").status, 200);
    assert_eq!(c.request("GET", "/images/t/checksum", &[], b"").status, 200);
    assert_eq!(
        figures(&server, "t"),
        expect("t", "registered", [read, written, zeroed, 11, 4, 0])
    );

    // Without transfer_id: the totals only, as before.
    assert_eq!(
        server.control(&json!({"action": "status"})),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert_eq!(
        server.control(&json!({"action": "status", "transfer_id": null})),
        json!({"status": "ok", "active_transfers": 1})
    );
    assert_eq!(
        status_of(&server, "other"),
        json!({"status": "error", "message": "unknown transfer_id"})
    );
    assert_eq!(
        server.control(&json!({"action": "status", "transfer_id": "a/b"})),
        json!({"status": "error", "message": "invalid transfer_id"})
    );
    assert_eq!(
        server.control(&json!({"action": "status", "transfer_id": 7})),
        json!({"status": "error", "message": "missing or invalid \"transfer_id\""})
    );

    // A different config replaces the transfer: its figures start anew.
    server.control(&json!({"action": "register", "transfer_id": "t",
        "config": {"backend": "nbd", "socket": nbd.socket, "idle_timeout_seconds": 77}}));
    let mut want = expect("t", "registered", [0; 6]);
    want["idle_timeout_seconds"] = json!(77);
    assert_eq!(figures(&server, "t"), want);
}

/// A GET whose client reads the head and some of the body, then stops.
fn stalled_get(server: &Server, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /images/{id} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    s
}

#[test]
fn in_flight_and_cut_short_gets_and_config_dir_transfers() {
    let dir = TempDir::new("progress-flight");
    let img = dir.join("big.raw");
    // Larger than what socket buffers and the server's queue hold.
    std::fs::write(&img, pattern_bytes(64 * MIB as usize, 3)).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join("big.sock"), NbdOpts::raw());
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &[]);
    server.add_nbd("c", &nbd);
    // Not loaded yet: status does not read the config dir.
    assert_eq!(
        status_of(&server, "c"),
        json!({"status": "error", "message": "unknown transfer_id"})
    );
    assert_eq!(server.request("OPTIONS", "/images/c", &[], b"").status, 200);
    assert_eq!(
        figures(&server, "c"),
        expect("c", "config_dir", [0, 0, 0, 1, 0, 0])
    );

    let stalled = stalled_get(&server, "c");
    let t = figures(&server, "c");
    assert_eq!(t["requests_in_flight"], 1, "{t}");
    assert_eq!(status_of(&server, "c")["transfer"]["idle_seconds"], 0);
    // The client goes away: the GET counts as failed, with the bytes it
    // was handed so far.
    drop(stalled);
    assert!(
        wait_until(Duration::from_secs(20), || figures(&server, "c")
            ["requests_in_flight"]
            == 0),
        "{}",
        figures(&server, "c")
    );
    let t = figures(&server, "c");
    assert_eq!(t["requests_served"], 1, "{t}");
    assert_eq!(t["requests_failed"], 1, "{t}");
    let read = t["bytes_read"].as_u64().unwrap();
    assert!(read > 0 && read < 64 * MIB, "{t}");
    // The transfer stays visible (not registered: active_transfers 0).
    assert_eq!(status_of(&server, "c")["active_transfers"], 0);
}
