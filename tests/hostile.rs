//! Hostile input on the wire: oversized and malformed request heads, bad
//! Content-Length, huge ranges, JSON bombs, path tricks in transfer ids.
//! Nothing may panic, hang or allocate without bound; requests that reach
//! our handlers get a 4xx JSON error; requests that actix-http's HTTP/1
//! codec refuses before any handler runs get its bare 400/431 and a closed
//! connection (see SECURITY.md). After every case the server still serves.

pub mod common;

use std::io::Write;

use common::*;
use serde_json::json;

struct Fixture {
    _tmp: TempDir,
    _nbd: QemuNbd,
    server: Server,
    data: Vec<u8>,
}

const SIZE: u64 = MIB;

fn fixture(tag: &str) -> Fixture {
    fixture_with(tag, &[])
}

fn fixture_with(tag: &str, args: &[&str]) -> Fixture {
    let tmp = TempDir::new(tag);
    let cfg = tmp.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let img = tmp.join("a.raw");
    let data = pattern_bytes(SIZE as usize, 21);
    std::fs::write(&img, &data).unwrap();
    let nbd = QemuNbd::start(&img, &tmp.join("a.sock"), NbdOpts::raw());
    let server = Server::start(&cfg, args);
    server.add_nbd("t1", &nbd);
    Fixture {
        _tmp: tmp,
        _nbd: nbd,
        server,
        data,
    }
}

impl Fixture {
    /// The process runs and serves a normal request, with the right bytes.
    #[track_caller]
    fn assert_alive(&self, case: &str) {
        let r = self
            .server
            .request("GET", "/images/t1", &[("Range", "bytes=100-199")], b"");
        assert_eq!(r.status, 206, "after {case}: {}", r.text());
        assert!(r.body == self.data[100..200], "after {case}: bytes differ");
    }

    /// Sends `raw` bytes as they are (from a thread, so a server that stops
    /// reading cannot block us) and reads what comes back: a response, or
    /// the connection closed without one.
    fn exchange(&self, raw: Vec<u8>) -> std::io::Result<Response> {
        let mut client = self.server.client();
        let mut w = client.stream().try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&raw);
        });
        let r = client.try_read_response(false);
        drop(client);
        writer.join().unwrap();
        r
    }

    fn head(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut h = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
        for (k, v) in headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str("\r\n");
        h.into_bytes()
    }
}

/// actix-http answers a bare status with no JSON body and closes.
#[track_caller]
fn assert_bare(r: &std::io::Result<Response>, status: u16, case: &str) {
    match r {
        Ok(r) => {
            assert_eq!(r.status, status, "{case}: {}", r.text());
            assert!(r.body.is_empty(), "{case}: {:?}", r.text());
        }
        // The refusal can race the rest of our request: a reset instead of
        // the status line is acceptable, a hang is not (read timeout 60 s).
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            ),
            "{case}: {e}"
        ),
    }
}

#[test]
fn oversized_and_malformed_heads() {
    let f = fixture_with("hostile-head", &["--header-timeout", "2"]);

    // A request line of 60 KiB reaches the handler: the id is too long to
    // be a transfer.
    let long_id = "x".repeat(60 * 1024);
    let r = f.exchange(f.head("GET", &format!("/images/{long_id}"), &[]));
    assert_err(&r.unwrap(), 404, "unknown image_id");
    f.assert_alive("60 KiB request line");
    // A target of 64 KiB or more is not a valid URI for the `http` crate
    // (65534 bytes at most): actix-http answers a bare 400.
    let long_id = "x".repeat(64 * 1024);
    let r = f.exchange(f.head("GET", &format!("/images/{long_id}"), &[]));
    assert_bare(&r, 400, "64 KiB request target");
    f.assert_alive("64 KiB request target");

    // Heads over actix-http's 128 KiB buffer: bare 431, connection closed.
    let r = f.exchange(f.head("GET", &format!("/images/{}", "x".repeat(200 * 1024)), &[]));
    assert_bare(&r, 431, "200 KiB request line");
    f.assert_alive("200 KiB request line");
    let big = "v".repeat(200 * 1024);
    let r = f.exchange(f.head("GET", "/images/t1", &[("X-Big", &big)]));
    assert_bare(&r, 431, "200 KiB header");
    f.assert_alive("200 KiB header");
    // Endless header lines without an end of head: cut at the same limit.
    let mut endless = b"GET /images/t1 HTTP/1.1\r\n".to_vec();
    for i in 0..20_000 {
        endless.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    let r = f.exchange(endless);
    assert_bare(&r, 431, "endless head");
    f.assert_alive("endless head");

    // A 100 KiB header fits the buffer and is simply carried.
    let big = "v".repeat(100 * 1024);
    let r = f
        .exchange(f.head(
            "GET",
            "/images/t1",
            &[("X-Big", &big), ("Range", "bytes=0-9")],
        ))
        .unwrap();
    assert_eq!(r.status, 206);
    assert!(r.body == f.data[..10]);

    // More than 96 headers: httparse refuses them, actix answers a bare 431.
    let many: Vec<(String, String)> = (0..100).map(|i| (format!("X-H{i}"), "1".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = f.exchange(f.head("GET", "/images/t1", &many));
    assert_bare(&r, 431, "100 headers");
    f.assert_alive("100 headers");
    // 90 headers are fine.
    let r = f
        .exchange(f.head("GET", "/images/t1", &many[..90]))
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, SIZE);

    // Garbage instead of HTTP.
    for (case, raw) in [
        (
            "binary garbage",
            b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec(),
        ),
        ("no version", b"GET /images/t1\r\n\r\n".to_vec()),
        ("bad method", b"G\x01T /images/t1 HTTP/1.1\r\n\r\n".to_vec()),
        (
            "space in target",
            b"GET /images/ t1 HTTP/1.1\r\n\r\n".to_vec(),
        ),
        (
            "header without colon",
            b"GET /images/t1 HTTP/1.1\r\nHost t\r\n\r\n".to_vec(),
        ),
    ] {
        let r = f.exchange(raw);
        match &r {
            Ok(resp) => assert_eq!(resp.status, 400, "{case}: {}", resp.text()),
            Err(_) => assert_bare(&r, 400, case),
        }
        f.assert_alive(case);
    }

    // Empty lines forever are no request: the header timeout ends them.
    let r = f.exchange(b"\r\n\n\r\n\n".to_vec());
    assert_bare(&r, 408, "empty lines");
    f.assert_alive("empty lines");

    // An unknown method reaches the handler.
    assert_err(
        &f.exchange(f.head("BREW", "/images/t1", &[])).unwrap(),
        405,
        "method not allowed",
    );
    f.assert_alive("unknown method");
}

#[test]
fn bad_content_length() {
    let f = fixture("hostile-cl");
    // Refused by actix-http's codec: bare 400, connection closed.
    for (case, cl) in [
        ("larger than u64", vec!["99999999999999999999999"]),
        ("negative", vec!["-1"]),
        ("plus sign", vec!["+5"]),
        ("hex", vec!["0x10"]),
        ("duplicated, different", vec!["4", "5"]),
        ("duplicated, same", vec!["4", "4"]),
    ] {
        let headers: Vec<(&str, &str)> = cl.iter().map(|v| ("Content-Length", *v)).collect();
        let mut raw = f.head("PUT", "/images/t1", &headers);
        raw.extend_from_slice(b"abcd");
        assert_bare(&f.exchange(raw), 400, case);
        f.assert_alive(case);
    }
    // Content-Length with chunked: refused by the codec as well.
    let mut raw = f.head(
        "PUT",
        "/images/t1",
        &[("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
    );
    raw.extend_from_slice(b"4\r\nabcd\r\n0\r\n\r\n");
    assert_bare(&f.exchange(raw), 400, "CL + chunked");
    f.assert_alive("CL + chunked");

    // Reaching our handlers: JSON errors, nothing written, no allocation
    // from the claimed size.
    let mut raw = f.head("PUT", "/images/t1", &[("Transfer-Encoding", "chunked")]);
    raw.extend_from_slice(b"4\r\nabcd\r\n0\r\n\r\n");
    assert_err(&f.exchange(raw).unwrap(), 400, "Content-Length required");
    let r = f
        .exchange(f.head(
            "PUT",
            "/images/t1",
            &[("Content-Length", "18446744073709551615")],
        ))
        .unwrap();
    assert_err(&r, 416, "range not satisfiable");
    assert_eq!(r.header("content-range"), Some("bytes */1048576"));
    let r = f
        .exchange(f.head(
            "PATCH",
            "/images/t1",
            &[
                ("Content-Type", "application/json"),
                ("Content-Length", "18446744073709551615"),
            ],
        ))
        .unwrap();
    assert_err(&r, 400, "Invalid Content-Length");
    f.assert_alive("huge valid Content-Length");
    // Nothing was written by any of the above.
    let r = f.server.get("/images/t1");
    assert_eq!(r.status, 200);
    assert!(r.body == f.data);
}

#[test]
fn huge_range_numbers() {
    let f = fixture("hostile-range");
    let huge = "9".repeat(10_000);
    let get = |range: &str| {
        f.server
            .request("GET", "/images/t1", &[("Range", range)], b"")
    };
    for range in [
        format!("bytes={huge}-"),
        format!("bytes={huge}-{huge}"),
        "bytes=18446744073709551615-18446744073709551615".to_string(),
        "bytes=1048576-".to_string(),
    ] {
        let r = get(&range);
        assert_err(&r, 416, "range not satisfiable");
        assert_eq!(r.header("content-range"), Some("bytes */1048576"));
    }
    for range in [format!("bytes=0-{huge}"), format!("bytes=-{huge}")] {
        let r = get(&range);
        assert_eq!(r.status, 206);
        assert_eq!(r.header("content-range"), Some("bytes 0-1048575/1048576"));
        assert!(r.body == f.data);
    }
    for (range, msg) in [
        (format!("bytes=0-{huge}x"), "invalid Range header"),
        (
            format!("bytes={}", "0-1,".repeat(5000)),
            "invalid Range header",
        ),
        ("bytes=0-\u{e9}".to_string(), "invalid range header"),
    ] {
        let r = get(&range);
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{range:?}"
        );
        assert_err(&r, 400, msg);
    }
    // A control character in a header value is refused by the codec.
    for range in ["bytes=\u{0}0-1", "bytes=0-1\u{7f}"] {
        let raw = f.head("GET", "/images/t1", &[("Range", range)]);
        assert_bare(&f.exchange(raw), 400, range);
        f.assert_alive("control character in Range");
    }
    // Writes at huge offsets: 416, nothing written.
    let r = f.server.request(
        "PUT",
        "/images/t1",
        &[(
            "Content-Range",
            "bytes 18446744073709551614-18446744073709551615/*",
        )],
        b"ab",
    );
    assert_err(&r, 416, "range not satisfiable");
    let cr = format!("bytes {huge}-{huge}/{huge}");
    let r = f
        .server
        .request("PUT", "/images/t1", &[("Content-Range", &cr)], b"ab");
    assert_err(&r, 416, "range not satisfiable");
    let r = f.server.request(
        "PATCH",
        "/images/t1",
        &[("Range", "bytes=18446744073709551614-18446744073709551615")],
        b"ab",
    );
    assert_err(&r, 416, "range not satisfiable");
    for body in [
        r#"{"op":"zero","offset":18446744073709551615,"size":1}"#,
        r#"{"op":"zero","offset":1048576,"size":18446744073709551615}"#,
    ] {
        assert_err(
            &f.server.request(
                "PATCH",
                "/images/t1",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            ),
            400,
            "offset must be less than image size",
        );
    }
    assert_err(
        &f.server.request(
            "PATCH",
            "/images/t1",
            &[("Content-Type", "application/json")],
            br#"{"op":"zero","offset":1e30,"size":1}"#,
        ),
        400,
        "invalid \"offset\"",
    );
    let r = f.server.get("/images/t1");
    assert!(r.body == f.data, "a refused write changed the image");
}

#[test]
fn json_bombs_in_patch() {
    let f = fixture("hostile-json");
    let patch = |body: &[u8]| {
        f.server.request(
            "PATCH",
            "/images/t1",
            &[("Content-Type", "application/json")],
            body,
        )
    };
    // Nesting bombs within the 64 KiB limit: serde_json's recursion limit.
    let arrays = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let r = patch(arrays.as_bytes());
    assert_eq!(r.status, 400);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("invalid JSON: recursion limit exceeded"),
        "{msg}"
    );
    let objects = format!(
        r#"{{"op":"zero","size":1,"x":{}0{}}}"#,
        "{\"a\":".repeat(10_000),
        "}".repeat(10_000)
    );
    let r = patch(objects.as_bytes());
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("invalid JSON: recursion limit exceeded"));
    f.assert_alive("nesting bomb");

    // Size bombs: over 64 KiB is refused from Content-Length alone.
    let big = format!(r#"{{"op":"flush","pad":"{}"}}"#, "a".repeat(64 * 1024));
    assert_err(&patch(big.as_bytes()), 400, "Invalid Content-Length");
    // Exactly at the limit is read and parsed.
    let mut at_limit = br#"{"op":"flush","pad":""#.to_vec();
    at_limit.resize(64 * 1024 - 2, b'a');
    at_limit.extend_from_slice(b"\"}");
    assert_eq!(at_limit.len(), 64 * 1024);
    let r = patch(&at_limit);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok": true}));
    // Many keys / long strings inside the limit.
    let keys: String = (0..5000).map(|i| format!("\"k{i}\":{i},")).collect();
    let r = patch(format!(r#"{{{keys}"op":"zero","size":-1}}"#).as_bytes());
    assert_err(&r, 400, "\"size\" must be positive");
    // A body shorter than its Content-Length, then EOF.
    let mut client = f.server.client();
    client.send(
        "PATCH",
        "/images/t1",
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "1000"),
        ],
        br#"{"op":"flush"}"#,
    );
    client.stream().shutdown(std::net::Shutdown::Write).unwrap();
    let r = client.try_read_response(false);
    if let Ok(r) = r {
        assert_err(&r, 400, "request body truncated");
    }
    f.assert_alive("json bombs");
    let r = f.server.get("/images/t1");
    assert!(r.body == f.data);
}

#[test]
fn hostile_transfer_ids() {
    let f = fixture("hostile-ids");
    // A config file the traversal attempts would like to reach.
    let long = "a".repeat(60 * 1024);
    let long_pct = "%41".repeat(20 * 1024);
    for path in [
        "/images/%2e%2e",
        "/images/%2E%2E",
        "/images/.",
        "/images/%2e",
        "/images/..%2f..%2fetc%2fpasswd",
        "/images/%2e%2e%2fcfg%2ft1",
        "/images/..%5c..%5ct1",
        "/images/t1%00",
        "/images/%00",
        "/images/t1%2f",
        "/images/%zz",
        "/images/%ff%fe",
        "/images/%",
        &format!("/images/{long}"),
        &format!("/images/{long_pct}"),
    ] {
        for method in ["GET", "OPTIONS", "PUT", "POST"] {
            let p = if method == "POST" {
                format!("{path}/flush")
            } else {
                path.to_string()
            };
            let r = f.server.request(method, &p, &[], b"");
            assert_err(&r, 404, "unknown image_id");
        }
    }
    for path in [
        "/images/t1/..",
        "/images/t1/%2e%2e",
        "/images/t1/extents/x",
        "/",
    ] {
        assert_err(&f.server.get(path), 404, "not found");
    }
    f.assert_alive("hostile ids");
    assert!(!f.server.log().contains("panicked"), "{}", f.server.log());
}
