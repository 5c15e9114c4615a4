//! `--unix-socket PATH`: the same HTTP API, plain HTTP, on a Unix socket
//! beside the TCP listener (HTTP or HTTPS), advertised by OPTIONS as
//! `unix_socket`; the same limits and head deadline; mode 0660; removed at
//! shutdown; off with an empty value.

pub mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::tls::{make_cert, tls_args, tls_connect};
use common::*;
use serde_json::json;

const IMAGE_SIZE: u64 = 4 * MIB;

/// A server on `<dir>/cfg` with its HTTP Unix socket at `<dir>/http.sock`,
/// `extra` flags added, and the raw export `img` of IMAGE_SIZE pattern
/// bytes. Returns it with the export's bytes.
fn env_with_socket(tag: &str, extra: &[&str]) -> (Env, Vec<u8>) {
    let dir = TempDir::new(tag);
    let sock = dir.join("http.sock");
    let mut args = vec!["--unix-socket", sock.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).expect("create config dir");
    let mut env = Env {
        server: Server::start(&cfg, &args),
        nbd: Vec::new(),
        dir,
    };
    let (_, data) = env.raw_export("img", IMAGE_SIZE, 15);
    (env, data)
}

/// OPTIONS of every image and of one transfer, over `c`: both advertise
/// `socket` as `unix_socket`.
#[track_caller]
fn assert_options_advertise<S: Read + Write>(c: &mut Client<S>, socket: &Path) {
    let socket = socket.to_str().expect("utf-8 path");
    let all = c.request("OPTIONS", "/images/*", &[], b"");
    assert_eq!(all.status, 200, "{}", all.text());
    assert_eq!(
        all.text(),
        format!(
            r#"{{"unix_socket":"{socket}","features":["extents","zero","flush"],"max_readers":4,"max_writers":4}}"#
        )
    );
    let one = c.request("OPTIONS", "/images/img", &[], b"");
    assert_eq!(one.status, 200, "{}", one.text());
    assert_imageio_headers(&one, "GET, PUT, PATCH, OPTIONS");
    assert_eq!(
        one.json(),
        json!({"unix_socket": socket, "features": ["extents", "zero", "flush"],
               "max_readers": 4, "max_writers": 4})
    );
}

/// Reads, writes and errors over the socket, the writes seen over TCP and
/// the other way round; OPTIONS on both listeners names the socket.
/// `tcp` opens a connection to the TCP listener (plain or TLS).
fn serve_both<S: Read + Write>(env: &Env, data: &[u8], tcp: impl Fn() -> Client<S>) {
    let server = &env.server;
    let sock = server.unix_socket.clone().expect("socket on");
    let md = std::fs::symlink_metadata(&sock).expect("socket file");
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o7777, 0o660);

    let mut u = server.unix_client();
    assert_options_advertise(&mut u, &sock);
    assert_options_advertise(&mut tcp(), &sock);

    // A ranged GET, then the whole image, on one keep-alive connection.
    let r = u.request("GET", "/images/img", &[("Range", "bytes=1000-5999")], b"");
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-5999/{IMAGE_SIZE}").as_str())
    );
    assert_imageio_headers(&r, DEFAULT_METHODS);
    assert_eq!(r.body, &data[1000..6000]);
    let r = u.request("GET", "/images/img", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("4194304"));
    assert_eq!(r.body, data);

    // A ranged PUT over the socket is read back over TCP...
    let patch = pattern_bytes(300_000, 77);
    let r = u.request(
        "PUT",
        "/images/img",
        &[("Content-Range", "bytes 65536-365535/*")],
        &patch,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":300000,"flushed":false}"#);
    let r = tcp().request(
        "GET",
        "/images/img",
        &[("Range", "bytes=65536-365535")],
        b"",
    );
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(r.body, patch);
    // ...and a PUT over TCP over the socket.
    let back = pattern_bytes(4096, 78);
    let r = tcp().request(
        "PUT",
        "/images/img?flush=y",
        &[("Content-Range", "bytes 0-4095/*")],
        &back,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":4096,"flushed":true}"#);
    let r = u.request("GET", "/images/img", &[("Range", "bytes=0-4095")], b"");
    assert_eq!(r.body, back);

    // Errors are the same JSON.
    assert_err(
        &u.request("GET", "/images/nope", &[], b""),
        404,
        "unknown image_id",
    );
    assert_err(&u.request("GET", "/nothing", &[], b""), 404, "not found");
    let r = u.request("GET", "/images/img", &[("Range", "bytes=9999999-")], b"");
    assert_eq!(r.status, 416, "{}", r.text());
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{IMAGE_SIZE}").as_str())
    );
}

/// Stops the server with SIGTERM: it exits 0 and removes its socket file.
fn stop_removes_socket(mut env: Env) {
    let sock = env.server.unix_socket.clone().expect("socket on");
    assert!(sock.exists());
    env.server.signal(libc::SIGTERM);
    assert!(env
        .server
        .wait_exit(Duration::from_secs(60))
        .is_some_and(|s| s.success()));
    assert!(!sock.exists(), "{} left behind", sock.display());
}

#[test]
fn beside_plain_http() {
    let (env, data) = env_with_socket("unix-http", &[]);
    assert_eq!(env.server.scheme, "http");
    serve_both(&env, &data, || env.server.client());
    let sock = env.server.unix_socket.clone().expect("socket on");
    env.server.logged(
        &format!(
            "HTTP unix socket listening on {} (plain HTTP)",
            sock.display()
        ),
        1,
    );
    stop_removes_socket(env);
}

/// TLS is for the TCP listener only: the socket speaks plain HTTP.
#[test]
fn beside_https() {
    let certs = TempDir::new("unix-https-cert");
    let (cert, key) = make_cert(&certs, "ec", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let (env, data) = env_with_socket("unix-https", &tls_args(&cert, &key));
    assert_eq!(env.server.scheme, "https");
    serve_both(&env, &data, || {
        let tcp = TcpStream::connect(env.server.addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Client::over(tls_connect(&cert, tcp))
    });
    // Plain HTTP to the TCP port is refused there (it wants a TLS hello).
    let mut c = env.server.client();
    c.send("GET", "/images/img", &[], b"");
    let mut buf = [0u8; 16];
    let n = c.stream().read(&mut buf).unwrap_or(0);
    assert!(!buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    stop_removes_socket(env);
}

/// One server-wide --max-requests counts requests of both listeners.
#[test]
fn shares_the_request_limit_with_tcp() {
    let dir = TempDir::new("unix-limit");
    let sock = dir.join("http.sock");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(
        &cfg,
        &[
            "--unix-socket",
            sock.to_str().unwrap(),
            "--max-requests",
            "1",
            "--max-waiting",
            "0",
        ],
    );
    let mut env = Env {
        server,
        nbd: Vec::new(),
        dir,
    };
    // Larger than every buffer between server and client, so a GET whose
    // client does not read holds its slot.
    env.raw_export("big", 64 * MIB, 3);
    let big = env.server.url("big");
    assert!(big.starts_with("http://"));

    // Held on TCP, refused on the socket; then the other way round.
    let held = hold_get(|| env.server.client());
    assert_err(
        &env.server
            .unix_client()
            .request("GET", "/images/big", &[], b""),
        503,
        "too many requests",
    );
    drop(held);
    slot_back(&env.server);
    let held = hold_get(|| env.server.unix_client());
    assert_err(&env.server.get("/images/big"), 503, "too many requests");
    drop(held);
    slot_back(&env.server);
}

/// Starts a GET of the whole `big` image and reads only the start of its
/// response, a 200: the request keeps its slot until the client is gone.
/// A 503 is tried again on a new connection: the request that last had the
/// slot gives it back only once its body is done, which its client may see
/// a moment earlier.
fn hold_get<S: Read + Write>(connect: impl Fn() -> Client<S>) -> Client<S> {
    poll_until(Duration::from_secs(60), "a GET that holds the slot", || {
        let mut c = connect();
        c.send("GET", "/images/big", &[], b"");
        let mut status = [0u8; 12];
        c.reader().read_exact(&mut status).expect("response starts");
        (&status == b"HTTP/1.1 200").then_some(c)
    })
}

/// Waits until a request gets a slot again (the server saw a held
/// client go).
fn slot_back(server: &Server) {
    poll_until(Duration::from_secs(60), "the slot to come back", || {
        let r = server
            .unix_client()
            .request("GET", "/images/big", &[("Range", "bytes=0-15")], b"");
        (r.status == 206).then_some(())
    });
}

/// Each later request head on a socket connection must be complete within
/// --header-timeout, as on TCP (`src/head_timeout.rs` wraps every stream).
#[test]
fn bounds_every_request_head() {
    let (env, _) = env_with_socket("unix-head", &["--header-timeout", "1"]);
    let mut c = env.server.unix_client();
    let r = c.request("GET", "/images/img", &[("Range", "bytes=0-99")], b"");
    assert_eq!(r.status, 206);
    // A second head that never ends: the connection is closed unanswered.
    let start = Instant::now();
    c.stream()
        .write_all(b"GET /images/img HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let read = c.reader().read_to_end(&mut rest);
    assert!(
        matches!(&read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != ErrorKind::WouldBlock),
        "{read:?} {rest:?}"
    );
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    // Hang guard only: the client's read timeout is 60 s.
    assert!(start.elapsed() < Duration::from_secs(50));
    // The server keeps serving the socket.
    let r = env
        .server
        .unix_client()
        .request("GET", "/images/img", &[("Range", "bytes=0-0")], b"");
    assert_eq!(r.status, 206);
}

/// `--unix-socket ''`: no socket file, `unix_socket: null`.
#[test]
fn empty_path_turns_it_off() {
    let dir = TempDir::new("unix-off");
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &["--unix-socket", ""]);
    assert!(server.unix_socket.is_none());
    let r = server.request("OPTIONS", "/images/*", &[], b"");
    assert_eq!(
        r.text(),
        r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":4,"max_writers":4}"#
    );
    assert_eq!(server.log_count("HTTP unix socket"), 0, "{}", server.log());
    // Only the control socket in the config dir; nothing else made.
    let mut made: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .chain(std::fs::read_dir(&cfg).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    made.sort();
    assert_eq!(made, [".control.sock", "cfg"]);
}

/// A live socket at the path is another server's: refused at start; a
/// stale one is replaced.
#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let (env, _) = env_with_socket("unix-live", &[]);
    let sock = env.server.unix_socket.clone().unwrap();
    let other_control = env.dir.join("other-control.sock");
    let stderr = failed_start(&[
        "--config-dir".as_ref(),
        env.dir.path().as_os_str(),
        "--control-socket".as_ref(),
        other_control.as_os_str(),
        "--unix-socket".as_ref(),
        sock.as_os_str(),
    ]);
    assert!(
        stderr.contains(&format!(
            "HTTP unix socket {} is in use by another process",
            sock.display()
        )),
        "{stderr}"
    );
    // The first server still serves it.
    let r = env
        .server
        .unix_client()
        .request("OPTIONS", "/images/*", &[], b"");
    assert_eq!(r.status, 200);

    let dir = TempDir::new("unix-stale");
    let stale = dir.join("run/http.sock");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(UnixStream::connect(&stale).is_err());
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &["--unix-socket", stale.to_str().unwrap()]);
    let r = server
        .unix_client()
        .request("OPTIONS", "/images/*", &[], b"");
    assert_eq!(r.status, 200);
    server.logged("replacing stale HTTP unix socket", 1);
}
