//! Pipelined requests (several in one write) each get their own response,
//! framed for that request (a HEAD's without a body, a PUT's with its JSON),
//! in order; `Connection: close` ends the connection after that response,
//! and nothing sent after it runs. Over TCP, HTTPS and the Unix socket
//! alike (one stream wrapper serves all three: `src/request_gate.rs`).

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const SIZE: u64 = 1 << 20;

/// A request as it goes on the wire.
fn req(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let mut r = r.into_bytes();
    r.extend_from_slice(body);
    r
}

/// Reads until the server closes the connection; what came.
fn read_to_close<S: Read + Write>(c: &mut Client<S>) -> Vec<u8> {
    let mut rest = Vec::new();
    c.reader()
        .read_to_end(&mut rest)
        .expect("the server closes the connection");
    rest
}

fn assert_options(r: &Response) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, PUT, PATCH, OPTIONS")
    );
    assert_eq!(
        r.json()["features"],
        serde_json::json!(["extents", "zero", "flush"])
    );
}

fn assert_info(r: &Response) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.body,
        format!("{{\"version\":\"{}\"}}", env!("CARGO_PKG_VERSION")).as_bytes()
    );
}

/// PUT, HEAD, OPTIONS, `GET /info/` and a ranged GET in one write, then
/// HEAD, OPTIONS and `GET /info/` in another: every response is the one its
/// request asks for, framed for it, in order, and the connection stays
/// usable. (actix-http alone answers the PUT with the HEAD's
/// Content-Length and no body, and closes the second group unanswered.)
#[test]
fn pipelined_requests_each_get_their_own_response() {
    let mut env = Env::new("pipe", &[]);
    let (path, data) = env.raw_export("a", SIZE, 3);
    let mut c = env.server.client();
    let mut burst = req(
        "PUT",
        "/images/a",
        &[("Content-Length", "4"), ("Content-Range", "bytes 0-3/*")],
        b"abcd",
    );
    burst.extend(req("HEAD", "/images/a", &[], b""));
    burst.extend(req("OPTIONS", "/images/a", &[], b""));
    burst.extend(req("GET", "/info/", &[], b""));
    burst.extend(req("GET", "/images/a", &[("Range", "bytes=0-7")], b""));
    c.stream().write_all(&burst).unwrap();

    let put = c.read_response(false);
    assert_json_ok(&put, r#"{"ok":true,"bytes_written":4,"flushed":false}"#);
    assert_eq!(put.header("content-length"), Some("45"));
    let head = c.read_response(true);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    assert_eq!(
        head.header("content-type"),
        Some("application/octet-stream")
    );
    assert_options(&c.read_response(false));
    assert_info(&c.read_response(false));
    let get = c.read_response(false);
    assert_eq!(get.status, 206, "{}", get.text());
    assert_eq!(get.header("content-range"), Some("bytes 0-7/1048576"));
    let mut want = b"abcd".to_vec();
    want.extend_from_slice(&data[4..8]);
    assert_eq!(get.body, want);

    let mut burst = req("HEAD", "/images/a", &[], b"");
    burst.extend(req("OPTIONS", "/images/a", &[], b""));
    burst.extend(req("GET", "/info/", &[], b""));
    c.stream().write_all(&burst).unwrap();
    let head = c.read_response(true);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    assert_options(&c.read_response(false));
    assert_info(&c.read_response(false));

    // Nothing more was sent: the connection is idle and still serves.
    assert_info(&c.request("GET", "/info/", &[], b""));
    assert_eq!(read_file_at(&path, 0, 4), b"abcd");
}

/// A ranged GET and, in the same write, a PUT whose body is still on its
/// way: the GET's response does not say `connection: close` (actix-http
/// alone says it, then serves the PUT anyway), and the PUT is answered once
/// its body arrived.
#[test]
fn a_pipelined_upload_behind_a_get_is_served_after_it() {
    let mut env = Env::new("pipe-put", &[]);
    let (path, data) = env.raw_export("a", SIZE, 4);
    let mut c = env.server.client();
    let mut burst = req("GET", "/images/a", &[("Range", "bytes=0-3")], b"");
    burst.extend(req(
        "PUT",
        "/images/a",
        &[("Content-Length", "8"), ("Content-Range", "bytes 8-15/*")],
        b"WXYZ",
    ));
    c.stream().write_all(&burst).unwrap();
    let get = c.read_response(false);
    assert_eq!(get.status, 206, "{}", get.text());
    assert_eq!(get.body, data[..4]);
    assert_eq!(get.header("connection"), None, "{:?}", get.headers);
    c.stream().write_all(b"wxyz").unwrap();
    assert_json_ok(
        &c.read_response(false),
        r#"{"ok":true,"bytes_written":8,"flushed":false}"#,
    );
    assert_eq!(read_file_at(&path, 8, 8), b"WXYZwxyz");
}

/// `Connection: close` on a request: its response says so, the server
/// closes the connection after it, and a request pipelined behind it never
/// runs (the image is unchanged).
#[test]
fn connection_close_is_the_last_response() {
    let mut env = Env::new("pipe-close", &[]);
    let (path, data) = env.raw_export("a", SIZE, 5);
    for first in ["GET", "HEAD", "OPTIONS"] {
        let mut c = env.server.client();
        let mut burst = req(
            first,
            "/images/a",
            &[("Range", "bytes=0-3"), ("Connection", "close")],
            b"",
        );
        burst.extend(req(
            "PUT",
            "/images/a",
            &[("Content-Length", "4"), ("Content-Range", "bytes 0-3/*")],
            b"WXYZ",
        ));
        c.stream().write_all(&burst).unwrap();
        let r = c.read_response(first == "HEAD");
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{first}: {:?}",
            r.headers
        );
        match first {
            "GET" => {
                assert_eq!(r.status, 206);
                assert_eq!(r.body, data[..4]);
            }
            "HEAD" => assert_eq!(r.status, 200),
            _ => assert_options(&r),
        }
        assert_eq!(read_to_close(&mut c), b"", "{first}: more after the close");
        assert_eq!(read_file_at(&path, 0, 4), data[..4], "{first}: the PUT ran");
    }
    // And the server goes on serving.
    assert_info(&env.server.get("/info/"));
}

/// HEAD, a ranged GET, `GET /info/` with `Connection: close` and one more
/// request in one write: the first three answered, each framed for its
/// request, then the connection closed.
fn burst_with_close<S: Read + Write>(c: &mut Client<S>, data: &[u8]) {
    let mut burst = req("HEAD", "/images/a", &[], b"");
    burst.extend(req("GET", "/images/a", &[("Range", "bytes=4-7")], b""));
    burst.extend(req("GET", "/info/", &[("Connection", "close")], b""));
    burst.extend(req("GET", "/info/", &[], b""));
    c.stream().write_all(&burst).unwrap();
    c.stream().flush().unwrap();
    let head = c.read_response(true);
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    let get = c.read_response(false);
    assert_eq!(get.status, 206);
    assert_eq!(get.body, data[4..8]);
    let info = c.read_response(false);
    assert_info(&info);
    assert_eq!(info.header("connection"), Some("close"));
    let mut rest = Vec::new();
    // A TLS stream may end without close_notify (an error here): what came
    // before it is what counts.
    let _ = c.reader().read_to_end(&mut rest);
    assert_eq!(rest, b"", "more after the close");
}

/// The same over the HTTP Unix socket and over HTTPS.
#[test]
fn pipelining_over_the_unix_socket_and_tls() {
    let dir = TempDir::new("pipe-tls");
    let (cert, key) = common::tls::make_cert(&dir, "srv", &["rsa:2048"]);
    let sock = dir.join("http.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let mut args = common::tls::tls_args(&cert, &key);
    args.extend(["--unix-socket", sock_s.as_str()]);
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &args);
    let data = pattern_bytes(SIZE as usize, 6);
    raw_image(&dir.join("a.img"), SIZE, 0, &data);
    let _nbd = {
        let nbd = QemuNbd::start(&dir.join("a.img"), &dir.join("a.sock"), NbdOpts::raw());
        server.add_nbd("a", &nbd);
        nbd
    };
    burst_with_close(&mut Client::connect_unix(&sock), &data);
    let tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    burst_with_close(
        &mut Client::over(common::tls::tls_connect(&cert, tcp)),
        &data,
    );
}
