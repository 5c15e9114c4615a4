//! The HTTP contract of `image_server.py` (`docs/api.md`), row by row, against
//! the real server binary and real qemu-nbd exports: status codes, the
//! headers every response carries, and exact bodies.

pub mod common;

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KIB: u64 = 1024;
const WRITABLE_METHODS: &str = "GET, PUT, PATCH, OPTIONS";

/// Asserts a 416 for an image of `size` bytes.
#[track_caller]
fn assert_416(resp: &Response, size: u64) {
    assert_err(resp, 416, "range not satisfiable");
    let want = format!("bytes */{size}");
    assert_eq!(resp.header("content-range"), Some(want.as_str()));
}

fn get_range(server: &Server, id: &str, range: &str) -> Response {
    server.request("GET", &format!("/images/{id}"), &[("Range", range)], b"")
}

fn get_all(server: &Server, id: &str) -> Vec<u8> {
    let r = server.get(&format!("/images/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.body
}

fn patch_json(server: &Server, id: &str, body: &str) -> Response {
    server.request(
        "PATCH",
        &format!("/images/{id}"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

fn extents(server: &Server, id: &str, query: &str) -> Value {
    let r = server.get(&format!("/images/{id}/extents{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_imageio_headers(&r, DEFAULT_METHODS);
    r.json()
}

/// `[{"start","length","zero","hole"}]` from (start, length, zero) triples;
/// `hole` is false (the exports here run without `-A`, so the server has no
/// `qemu:allocation-depth` to tell holes by).
fn zero_list(v: &[(u64, u64, bool)]) -> Value {
    Value::Array(
        v.iter()
            .map(|&(s, l, z)| json!({"start": s, "length": l, "zero": z, "hole": false}))
            .collect(),
    )
}

/// `[{"start","length","dirty","zero"}]` from (start, length, dirty, zero).
fn dirty_list(v: &[(u64, u64, bool, bool)]) -> Value {
    Value::Array(
        v.iter()
            .map(|&(s, l, d, z)| json!({"start": s, "length": l, "dirty": d, "zero": z}))
            .collect(),
    )
}

/// `nbdinfo --map` of `nbd`, as the server's zero extents (merged).
fn nbdinfo_zero_extents(nbd: &QemuNbd) -> Value {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (o, l, t) in nbdinfo_map(&nbd.uri(), None) {
        let zero = t & 3 != 0;
        match out.last_mut() {
            Some(last) if last.0 + last.1 == o && last.2 == zero => last.1 += l,
            _ => out.push((o, l, zero)),
        }
    }
    zero_list(&out)
}

fn qcow2(env: &Env, name: &str, size: u64, cmds: &[&str]) -> std::path::PathBuf {
    let path = env.dir.join(name);
    create_image(&path, "qcow2", size);
    if !cmds.is_empty() {
        qemu_io(&path, "qcow2", cmds);
    }
    path
}

// ---------------------------------------------------------------- OPTIONS

#[test]
fn options_writable_nbd_asks_the_export() {
    let mut env = Env::new("opt-rw", &[]);
    env.raw_export("demo", MIB, 1);
    let r = env.server.request("OPTIONS", "/images/demo", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_imageio_headers(&r, WRITABLE_METHODS);
    assert_eq!(
        r.text(),
        r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":4,"max_writers":4}"#
    );

    // The limits come from the command line.
    let control = env.dir.join("other.sock");
    let other = Server::start(
        &env.server.config_dir,
        &[
            "--max-readers",
            "3",
            "--max-writers",
            "2",
            "--control-socket",
            control.to_str().expect("utf-8 path"),
        ],
    );
    let r = other.request("OPTIONS", "/images/demo", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":3,"max_writers":2}"#
    );

    // OPTIONS has no sub-resources.
    let r = env
        .server
        .request("OPTIONS", "/images/demo/extents", &[], b"");
    assert_err(&r, 404, "not found");
    let r = env.server.request("OPTIONS", "/images/nosuch", &[], b"");
    assert_err(&r, 404, "unknown image_id");
}

#[test]
fn options_read_only_export_and_writes_refused() {
    let mut env = Env::new("opt-ro", &[]);
    let path = env.dir.join("ro.img");
    let data = pattern_bytes(MIB as usize, 2);
    raw_image(&path, MIB, 0, &data);
    env.export(
        "ro",
        &path,
        NbdOpts {
            read_only: true,
            ..NbdOpts::raw()
        },
    );
    let r = env.server.request("OPTIONS", "/images/ro", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_imageio_headers(&r, "GET, OPTIONS");
    assert_eq!(
        r.text(),
        r#"{"unix_socket":null,"features":["extents"],"max_readers":4,"max_writers":0}"#
    );
    assert_eq!(get_all(&env.server, "ro"), data);
    assert_eq!(
        extents(&env.server, "ro", ""),
        zero_list(&[(0, MIB, false)])
    );

    // Writes are refused with a JSON error and change nothing.
    let r = request_unread(
        &env.server,
        "PUT",
        "/images/ro",
        &[],
        vec![7u8; MIB as usize],
    );
    assert_err(&r, 403, "image is read-only");
    let r = patch_json(&env.server, "ro", r#"{"op":"zero","size":4096}"#);
    assert_err(&r, 403, "image is read-only");
    assert_eq!(read_file_at(&path, 0, MIB as usize), data);
}

#[test]
fn dead_socket_is_a_json_5xx() {
    let mut env = Env::new("opt-dead", &[]);
    let (_, data) = env.raw_export("gone", MIB, 3);
    // Used first, so the server may hold pooled connections to it.
    assert!(get_all(&env.server, "gone") == data);
    let r = env.server.request("OPTIONS", "/images/gone", &[], b"");
    assert_eq!(r.status, 200);
    env.nbd[0].stop();
    env.server.add_transfer(
        "never",
        &json!({"backend": "nbd", "socket": env.dir.join("never.sock")}),
    );
    for id in ["gone", "never"] {
        let path = format!("/images/{id}");
        let r = env.server.request("OPTIONS", &path, &[], b"");
        assert_err(&r, 502, "backend unavailable");
        let r = env.server.get(&path);
        assert_err(&r, 502, "backend unavailable");
        let r = get_range(&env.server, id, "bytes=0-9");
        assert_err(&r, 502, "backend unavailable");
        let r = env.server.get(&format!("{path}/extents"));
        assert_err(&r, 502, "backend unavailable");
        let r = env
            .server
            .request("POST", &format!("{path}/flush"), &[], b"");
        assert_err(&r, 502, "backend unavailable");
        let r = patch_json(&env.server, id, r#"{"op":"zero","size":1}"#);
        assert_err(&r, 502, "backend unavailable");
        let r = env.server.request("PUT", &path, &[], b"abcd");
        assert_err(&r, 502, "backend unavailable");
    }
    // The server keeps serving.
    let (_, data) = env.raw_export("alive", 4 * KIB, 4);
    assert_eq!(get_all(&env.server, "alive"), data);
}

// ---------------------------------------------------------------- GET

#[test]
fn get_whole_image_and_ranges() {
    let mut env = Env::new("get", &[]);
    // Not a power of two (qemu-nbd rounds raw sizes up to 512 bytes).
    let size = MIB + 1536;
    let (_, data) = env.raw_export("demo", size, 5);
    let s = &env.server;

    let r = s.get("/images/demo");
    assert_eq!(r.status, 200);
    assert_imageio_headers(&r, DEFAULT_METHODS);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let len = size.to_string();
    assert_eq!(r.header("content-length"), Some(len.as_str()));
    assert_eq!(r.header("content-range"), None);
    assert!(r.body == data, "full GET returns the image");

    let last = size - 1;
    let cases: Vec<(String, u64, u64)> = vec![
        ("bytes=0-99".into(), 0, 99),
        ("bytes=1000-".into(), 1000, last),
        ("bytes=-500".into(), size - 500, last),
        (format!("bytes=-{}", size + 1000), 0, last),
        ("bytes=1048000-99999999".into(), 1048000, last),
        (format!("bytes={last}-{last}"), last, last),
        ("bytes=0-0".into(), 0, 0),
        ("bytes=0-99999999999999999999999".into(), 0, last),
        (format!("bytes={}-{}", MIB, MIB + 10), MIB, MIB + 10),
    ];
    for (range, a, b) in cases {
        let r = get_range(s, "demo", &range);
        assert_eq!(r.status, 206, "{range}: {}", r.text());
        assert_imageio_headers(&r, DEFAULT_METHODS);
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        let cr = format!("bytes {a}-{b}/{size}");
        assert_eq!(r.header("content-range"), Some(cr.as_str()), "{range}");
        let cl = (b - a + 1).to_string();
        assert_eq!(r.header("content-length"), Some(cl.as_str()), "{range}");
        assert!(
            r.body == data[a as usize..=b as usize],
            "{range}: wrong bytes"
        );
    }

    for range in [
        format!("bytes={size}-"),
        format!("bytes={size}-{}", size + 10),
        "bytes=10-5".to_string(),
        "bytes=99999999999999999999-".to_string(),
    ] {
        assert_416(&get_range(s, "demo", &range), size);
    }

    for range in [
        "bytes=0-1,2-3",
        "bytes=0-1, 5-6",
        "items=0-1",
        "garbage",
        "bytes=",
        "bytes=-",
        "bytes=-0",
        "bytes=a-b",
        "bytes=1-b",
        "bytes=0x10-",
        "bytes=+1-2",
        "Bytes=0-1",
        "",
    ] {
        assert_err(&get_range(s, "demo", range), 400, "invalid Range header");
    }
}

#[test]
fn get_logs_start_and_end() {
    let mut env = Env::new("getlog", &[]);
    let size = 300 * KIB;
    env.raw_export("logged", size, 6);
    assert_eq!(get_all(&env.server, "logged").len() as u64, size);
    let end = format!("GET end image_id=logged bytes={size} ");
    assert!(
        env.server.wait_log(&end, Duration::from_secs(20)),
        "no {end:?} in\n{}",
        env.server.log()
    );
    env.server.logged("GET start image_id=logged range=-", 1);

    let r = get_range(&env.server, "logged", "bytes=100-199");
    assert_eq!(r.status, 206);
    assert!(env.server.wait_log(
        "GET end image_id=logged bytes=100 ",
        Duration::from_secs(20)
    ));
    env.server
        .logged("GET start image_id=logged range=bytes=100-199", 1);
}

// ---------------------------------------------------------------- extents

#[test]
fn extents_equal_nbdinfo_map() {
    let mut env = Env::new("ext", &[]);
    let size = 8 * MIB;
    let path = qcow2(
        &env,
        "ext.qcow2",
        size,
        &[
            "write -P 1 0 64k",
            "write -z 1M 128k",
            "write -P 2 2M 1M",
            // Allocated data that happens to be zero is data, not zero.
            "write -P 0 5M 64k",
        ],
    );
    let nbd_uri = {
        let nbd = env.export("ext", &path, NbdOpts::qcow2());
        nbdinfo_zero_extents(nbd)
    };
    let got = extents(&env.server, "ext", "");
    assert_eq!(got, nbd_uri, "server extents == merged nbdinfo --map");
    assert_eq!(
        got,
        zero_list(&[
            (0, 64 * KIB, false),
            (64 * KIB, 2 * MIB - 64 * KIB, true),
            (2 * MIB, MIB, false),
            (3 * MIB, 2 * MIB, true),
            (5 * MIB, 64 * KIB, false),
            (5 * MIB + 64 * KIB, 3 * MIB - 64 * KIB, true),
        ])
    );
    // `context=zero` is the same list.
    assert_eq!(extents(&env.server, "ext", "?context=zero"), got);

    let r = env.server.get("/images/ext/extents?context=bogus");
    assert_err(&r, 400, "unsupported extents context");
    let r = env.server.get("/images/ext/extents?context=");
    assert_err(&r, 400, "unsupported extents context");
    let r = env.server.get("/images/nosuch/extents");
    assert_err(&r, 404, "unknown image_id");
}

#[test]
fn extents_of_a_1tib_sparse_image_are_few() {
    let mut env = Env::new("ext1t", &[]);
    let size = 1024 * 1024 * MIB;
    let half = size / 2;
    let path = qcow2(
        &env,
        "big.qcow2",
        size,
        &[
            "write -P 1 0 64k",
            &format!("write -P 2 {half} 64k"),
            &format!("write -P 3 {} 64k", size - 64 * KIB),
        ],
    );
    let want = zero_list(&[
        (0, 64 * KIB, false),
        (64 * KIB, half - 64 * KIB, true),
        (half, 64 * KIB, false),
        (half + 64 * KIB, half - 128 * KIB, true),
        (size - 64 * KIB, 64 * KIB, false),
    ]);
    let map = {
        let nbd = env.export("big", &path, NbdOpts::qcow2());
        nbdinfo_zero_extents(nbd)
    };
    assert_eq!(map, want);
    assert_eq!(extents(&env.server, "big", ""), want);
    let r = get_range(&env.server, "big", &format!("bytes={half}-{}", half + 3));
    assert_eq!(r.status, 206);
    assert_eq!(r.body, vec![2u8; 4]);
}

#[test]
fn dirty_extents_follow_writes_through_the_server() {
    let mut env = Env::new("dirty", &[]);
    let size = 8 * MIB;
    let path = qcow2(&env, "d.qcow2", size, &["write -P 1 0 64k"]);
    add_bitmap(&path, "b1");
    env.export(
        "d",
        &path,
        NbdOpts {
            bitmap: Some("b1".into()),
            ..NbdOpts::qcow2()
        },
    );
    let s = &env.server;
    assert_eq!(
        extents(s, "d", "?context=dirty"),
        dirty_list(&[
            (0, 64 * KIB, false, false),
            (64 * KIB, size - 64 * KIB, false, true)
        ])
    );

    let chunk = pattern_bytes(64 * KIB as usize, 7);
    let r = s.request(
        "PUT",
        "/images/d",
        &[("Content-Range", "bytes 1048576-1114111/*")],
        &chunk,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":65536,"flushed":false}"#);
    let r = patch_json(s, "d", r#"{"op":"zero","offset":4194304,"size":131072}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = s.request(
        "PATCH",
        "/images/d",
        &[("Range", "bytes=6291456-6356991")],
        &chunk,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":65536}"#);

    let k64 = 64 * KIB;
    assert_eq!(
        extents(s, "d", "?context=dirty"),
        dirty_list(&[
            (0, k64, false, false),
            (k64, MIB - k64, false, true),
            (MIB, k64, true, false),
            (MIB + k64, 3 * MIB - k64, false, true),
            (4 * MIB, 2 * k64, true, true),
            (4 * MIB + 2 * k64, 2 * MIB - 2 * k64, false, true),
            (6 * MIB, k64, true, false),
            (6 * MIB + k64, 2 * MIB - k64, false, true),
        ])
    );
    // Without a context, the same image's allocation.
    assert_eq!(
        extents(s, "d", ""),
        zero_list(&[
            (0, k64, false),
            (k64, MIB - k64, true),
            (MIB, k64, false),
            (MIB + k64, 5 * MIB - k64, true),
            (6 * MIB, k64, false),
            (6 * MIB + k64, 2 * MIB - k64, true),
        ])
    );

    // A configured bitmap the export does not offer: all dirty.
    s.add_transfer(
        "d-other",
        &json!({"socket": env.nbd[0].socket, "export_bitmap": "nosuch"}),
    );
    // No bitmap configured for the same export: all dirty.
    s.add_transfer("d-none", &json!({"socket": env.nbd[0].socket}));
    let all_dirty = dirty_list(&[
        (0, k64, true, false),
        (k64, MIB - k64, true, true),
        (MIB, k64, true, false),
        (MIB + k64, 5 * MIB - k64, true, true),
        (6 * MIB, k64, true, false),
        (6 * MIB + k64, 2 * MIB - k64, true, true),
    ]);
    assert_eq!(extents(s, "d-other", "?context=dirty"), all_dirty);
    assert_eq!(extents(s, "d-none", "?context=dirty"), all_dirty);
}

#[test]
fn dirty_extents_fall_back_when_the_bitmap_is_not_exported() {
    let mut env = Env::new("dirty-nob", &[]);
    let size = 4 * MIB;
    let path = qcow2(&env, "n.qcow2", size, &["write -P 1 1M 64k"]);
    add_bitmap(&path, "b1");
    // qemu-nbd without -B: the bitmap exists in the image but is not exported.
    let socket = env.export("n", &path, NbdOpts::qcow2()).socket.clone();
    env.server.add_transfer(
        "n",
        &json!({"backend": "nbd", "socket": socket, "export_bitmap": "b1"}),
    );
    assert_eq!(
        extents(&env.server, "n", "?context=dirty"),
        dirty_list(&[
            (0, MIB, true, true),
            (MIB, 64 * KIB, true, false),
            (MIB + 64 * KIB, 3 * MIB - 64 * KIB, true, true),
        ])
    );
}

// ---------------------------------------------------------------- PUT

#[test]
fn put_full_image_and_flush_parameter() {
    let mut env = Env::new("put", &[]);
    let size = 2 * MIB + 4 * KIB;
    let (path, _) = env.raw_export("demo", size, 8);
    let s = &env.server;

    let mut new = pattern_bytes(size as usize, 9);
    // An all-zero stretch in the middle (may be sent as a zero request).
    new[MIB as usize..(MIB + 300 * KIB) as usize].fill(0);
    let r = s.request("PUT", "/images/demo", &[], &new);
    assert_json_ok(
        &r,
        &format!(r#"{{"ok":true,"bytes_written":{size},"flushed":false}}"#),
    );
    assert!(get_all(s, "demo") == new, "GET returns what PUT wrote");
    assert!(
        read_file_at(&path, 0, size as usize) == new,
        "the image file holds what PUT wrote"
    );

    for (i, (q, flushed)) in [
        ("y", true),
        ("yes", true),
        ("true", true),
        ("1", true),
        ("Y", true),
        ("TRUE", true),
        ("n", false),
        ("no", false),
        ("0", false),
        ("false", false),
        ("", false),
        ("maybe", false),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern_bytes(size as usize, 100 + i as u64);
        let r = s.request("PUT", &format!("/images/demo?flush={q}"), &[], &data);
        assert_json_ok(
            &r,
            &format!(r#"{{"ok":true,"bytes_written":{size},"flushed":{flushed}}}"#),
        );
        assert!(get_all(s, "demo") == data, "flush={q}");
    }
}

#[test]
fn put_refusals_change_nothing() {
    let mut env = Env::new("put-bad", &[]);
    let size = MIB;
    let (path, data) = env.raw_export("demo", size, 10);
    let s = &env.server;

    // Larger than the export: refused up front (head only: the server must
    // decide from Content-Length alone).
    let mut c = s.client();
    c.send(
        "PUT",
        "/images/demo",
        &[("Content-Length", &(size + 1).to_string())],
        b"",
    );
    assert_416(&c.read_response(false), size);
    // And with the body sent.
    let r = request_unread(
        s,
        "PUT",
        "/images/demo",
        &[],
        vec![0xee; size as usize + 512],
    );
    assert_416(&r, size);

    let r = s.request("PUT", "/images/demo", &[("Range", "bytes=0-3")], b"abcd");
    assert_err(
        &r,
        400,
        "Range header not supported for PUT; use Content-Range or PATCH",
    );

    let r = s.request(
        "PUT",
        "/images/demo",
        &[("Transfer-Encoding", "chunked")],
        b"4\r\nabcd\r\n0\r\n\r\n",
    );
    assert_err(&r, 400, "Content-Length required");

    assert!(
        read_file_at(&path, 0, size as usize) == data,
        "nothing written"
    );
    assert!(get_all(s, "demo") == data);
}

#[test]
fn put_content_range() {
    let mut env = Env::new("put-cr", &[]);
    let size = MIB;
    let (path, mut data) = env.raw_export("demo", size, 11);
    let s = &env.server;

    let a = pattern_bytes(64 * KIB as usize, 12);
    let r = s.request(
        "PUT",
        "/images/demo",
        &[("Content-Range", "bytes 65536-131071/*")],
        &a,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":65536,"flushed":false}"#);
    data[65536..131072].copy_from_slice(&a);

    let b = pattern_bytes(4096, 13);
    let r = s.request(
        "PUT",
        "/images/demo?flush=1",
        &[(
            "Content-Range",
            &format!("bytes {}-{}/{size}", size - 4096, size - 1),
        )],
        &b,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":4096,"flushed":true}"#);
    data[(size - 4096) as usize..].copy_from_slice(&b);

    // Start at or past the end, or running past it: 416.
    for (cr, body) in [
        (format!("bytes {size}-{}/*", size + 3), 4),
        (format!("bytes {}-{}/*", size + 100, size + 103), 4),
        (format!("bytes {}-{}/{size}", size - 4, size + 3), 8),
        ("bytes 0-0/*".to_string(), size as usize + 1),
    ] {
        let r = request_unread(
            s,
            "PUT",
            "/images/demo",
            &[("Content-Range", &cr)],
            vec![0x55; body],
        );
        assert_416(&r, size);
    }

    for cr in [
        "bytes 0-3",
        "bytes=0-3/*",
        "bytes 0-3/",
        "bytes x-y/*",
        "bytes 0-/*",
        "bytes -3/*",
        "items 0-3/*",
        "bytes 0-3/size",
        "garbage",
    ] {
        let r = s.request("PUT", "/images/demo", &[("Content-Range", cr)], b"abcd");
        assert_err(
            &r,
            400,
            "invalid Content-Range header: invalid Content-Range",
        );
    }
    let r = s.request(
        "PUT",
        "/images/demo",
        &[("Content-Range", "bytes 3-0/*")],
        b"abcd",
    );
    assert_err(
        &r,
        400,
        "invalid Content-Range header: invalid Content-Range range",
    );

    assert!(get_all(s, "demo") == data);
    assert!(read_file_at(&path, 0, size as usize) == data);
}

#[test]
fn put_body_shorter_than_content_length_is_an_error() {
    let mut env = Env::new("put-short", &[]);
    let size = MIB;
    env.raw_export("demo", size, 14);
    let mut c = env.server.client();
    c.send(
        "PUT",
        "/images/demo",
        &[("Content-Length", &size.to_string())],
        &vec![1u8; 100_000],
    );
    c.stream().shutdown(Shutdown::Write).expect("half-close");
    let r = c.read_response(false);
    assert_body_ended_early(&r, 100_000);
    // The image lock and write slot are free again.
    let r = patch_json(&env.server, "demo", r#"{"op":"flush"}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let mut env = Env::new("expect", &[]);
    let size = 256 * KIB;
    env.raw_export("demo", size, 15);
    let data = pattern_bytes(size as usize, 16);
    let mut c = env.server.client();
    c.send(
        "PUT",
        "/images/demo",
        &[
            ("Content-Length", &size.to_string()),
            ("Expect", "100-continue"),
        ],
        b"",
    );
    let interim = c.read_any().expect("interim response");
    assert_eq!(interim.status, 100, "{interim:?}");
    c.stream().write_all(&data).expect("send body");
    let r = c.read_response(false);
    assert_json_ok(
        &r,
        &format!(r#"{{"ok":true,"bytes_written":{size},"flushed":false}}"#),
    );
    // Same connection, still alive.
    let r = c.request("GET", "/images/demo", &[], b"");
    assert!(r.status == 200 && r.body == data);
}

// ---------------------------------------------------------------- PATCH

#[test]
fn patch_zero() {
    let mut env = Env::new("zero", &[]);
    let size = MIB;
    let (_, mut data) = env.raw_export("demo", size, 17);
    let s = &env.server;

    let r = patch_json(s, "demo", r#"{"op": "zero", "offset": 4096, "size": 8192}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
    data[4096..12288].fill(0);
    assert!(get_all(s, "demo") == data, "zeroed exactly 4096..12288");

    // Clamped to the end, with flush.
    let r = patch_json(
        s,
        "demo",
        &format!(
            r#"{{"op":"zero","offset":{},"size":{},"flush":true}}"#,
            size - 1000,
            10 * MIB
        ),
    );
    assert_json_ok(&r, r#"{"ok":true}"#);
    data[(size - 1000) as usize..].fill(0);
    // No offset: from 0.
    let r = patch_json(s, "demo", r#"{"op":"zero","size":10,"flush":false}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
    data[..10].fill(0);
    assert!(get_all(s, "demo") == data);

    let size_msg = "missing or invalid \"size\"";
    for (body, msg) in [
        (
            format!(r#"{{"op":"zero","offset":{size},"size":1}}"#),
            "offset must be less than image size",
        ),
        (
            format!(r#"{{"op":"zero","offset":{},"size":1}}"#, u64::MAX),
            "offset must be less than image size",
        ),
        (
            r#"{"op":"zero","size":0}"#.to_string(),
            "\"size\" must be positive",
        ),
        (
            r#"{"op":"zero","size":-5}"#.to_string(),
            "\"size\" must be positive",
        ),
        (r#"{"op":"zero"}"#.to_string(), size_msg),
        (r#"{"op":"zero","size":1.5}"#.to_string(), size_msg),
        (r#"{"op":"zero","size":"10"}"#.to_string(), size_msg),
        (r#"{"op":"zero","size":null}"#.to_string(), size_msg),
        (r#"{"op":"zero","size":true}"#.to_string(), size_msg),
        (
            r#"{"op":"zero","size":99999999999999999999999}"#.to_string(),
            size_msg,
        ),
        (
            r#"{"op":"zero","offset":-1,"size":1}"#.to_string(),
            "\"offset\" must be non-negative",
        ),
        (
            r#"{"op":"zero","offset":"1","size":1}"#.to_string(),
            "invalid \"offset\"",
        ),
        (
            r#"{"op":"zero","offset":0.5,"size":1}"#.to_string(),
            "invalid \"offset\"",
        ),
        (
            r#"{"op":"zero","size":1,"flush":"false"}"#.to_string(),
            "\"flush\" must be a boolean",
        ),
        (
            r#"{"op":"zero","size":1,"flush":1}"#.to_string(),
            "\"flush\" must be a boolean",
        ),
    ] {
        let r = patch_json(s, "demo", &body);
        assert_err(&r, 400, msg);
    }
    assert!(
        get_all(s, "demo") == data,
        "refused PATCHes changed nothing"
    );
}

#[test]
fn patch_flush_and_post_flush() {
    let mut env = Env::new("flush", &[]);
    env.raw_export("demo", MIB, 18);
    let s = &env.server;
    let r = patch_json(s, "demo", r#"{"op":"flush"}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
    // Offset and size are ignored for flush.
    let r = patch_json(s, "demo", r#"{"op":"flush","offset":5,"size":-1}"#);
    assert_json_ok(&r, r#"{"ok":true}"#);
    let r = s.request("POST", "/images/demo/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);

    let r = s.request("POST", "/images/demo", &[], b"");
    assert_err(&r, 404, "not found");
    let r = s.request("POST", "/images/demo/extents", &[], b"");
    assert_err(&r, 404, "not found");
    let r = s.request("POST", "/images/nosuch/flush", &[], b"");
    assert_err(&r, 404, "unknown image_id");
}

#[test]
fn patch_range_writes_binary() {
    let mut env = Env::new("prange", &[]);
    let size = MIB;
    let (path, mut data) = env.raw_export("demo", size, 19);
    let s = &env.server;

    let chunk = pattern_bytes(10_000, 20);
    let r = s.request(
        "PATCH",
        "/images/demo",
        &[
            ("Range", "bytes=5000-14999"),
            ("Content-Type", "application/octet-stream"),
        ],
        &chunk,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":10000}"#);
    data[5000..15000].copy_from_slice(&chunk);

    // The last bytes, no Content-Type.
    let r = s.request(
        "PATCH",
        "/images/demo",
        &[("Range", &format!("bytes={}-{}", size - 3, size - 1))],
        b"xyz",
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":3}"#);
    data[(size - 3) as usize..].copy_from_slice(b"xyz");

    // The docstring's off-by-one: inclusive end, so 1 MiB + 1 bytes.
    let r = request_unread(
        s,
        "PATCH",
        "/images/demo",
        &[("Range", "bytes=0-1048575")],
        vec![9u8; 1048575],
    );
    assert_err(
        &r,
        400,
        "Content-Length (1048575) must equal range length (1048576)",
    );
    let r = s.request("PATCH", "/images/demo", &[("Range", "bytes=0-9")], b"short");
    assert_err(&r, 400, "Content-Length (5) must equal range length (10)");

    // Past the end: 416.
    for range in [
        format!("bytes={}-{}", size - 2, size + 1),
        format!("bytes={size}-{}", size + 3),
    ] {
        let r = s.request("PATCH", "/images/demo", &[("Range", &range)], b"abcd");
        assert_416(&r, size);
    }
    let r = s.request(
        "PATCH",
        "/images/demo",
        &[("Range", "bytes=0-1,4-5")],
        b"abcd",
    );
    assert_err(
        &r,
        400,
        "invalid Range header: multiple ranges not supported",
    );
    assert!(get_all(s, "demo") == data);
    assert!(read_file_at(&path, 0, size as usize) == data);
}

#[test]
fn patch_refusals() {
    let mut env = Env::new("patch-bad", &[]);
    let (_, data) = env.raw_export("demo", MIB, 21);
    let s = &env.server;

    let r = s.request("PATCH", "/images/demo", &[], b"{\"op\":\"flush\"}");
    assert_err(
        &r,
        415,
        "PATCH requires Content-Type: application/json (for zero/flush) or Range with binary body",
    );
    let r = s.request(
        "PATCH",
        "/images/demo",
        &[("Content-Type", "text/plain")],
        b"{\"op\":\"flush\"}",
    );
    assert_eq!(r.status, 415);
    assert_imageio_headers(&r, DEFAULT_METHODS);

    // Content-Type parameters and case do not matter.
    let r = s.request(
        "PATCH",
        "/images/demo",
        &[("Content-Type", "Application/JSON; charset=utf-8")],
        b"{\"op\":\"flush\"}",
    );
    assert_json_ok(&r, r#"{"ok":true}"#);

    let r = patch_json(s, "demo", "{not json");
    assert_eq!(r.status, 400);
    assert_imageio_headers(&r, DEFAULT_METHODS);
    let msg = r.json()["error"]
        .as_str()
        .expect("error message")
        .to_string();
    assert!(msg.starts_with("invalid JSON: "), "{msg}");

    for body in ["[1,2]", "\"zero\"", "42", "null"] {
        assert_err(
            &patch_json(s, "demo", body),
            400,
            "body must be a JSON object",
        );
    }
    let op_msg = "unsupported op; only \"zero\" and \"flush\" are supported";
    for body in [
        r#"{"op":"trim"}"#,
        r#"{}"#,
        r#"{"op":1}"#,
        r#"{"op":"ZERO","size":1}"#,
    ] {
        assert_err(&patch_json(s, "demo", body), 400, op_msg);
    }

    // A JSON body over 64 KiB, judged by its Content-Length.
    let big = format!(r#"{{"op":"flush","pad":"{}"}}"#, "x".repeat(64 * 1024));
    let r = request_unread(
        s,
        "PATCH",
        "/images/demo",
        &[("Content-Type", "application/json")],
        big.into_bytes(),
    );
    assert_err(&r, 400, "Invalid Content-Length");
    let mut c = s.client();
    c.send(
        "PATCH",
        "/images/demo",
        &[
            ("Content-Type", "application/json"),
            ("Content-Length", "65537"),
        ],
        b"",
    );
    assert_err(&c.read_response(false), 400, "Invalid Content-Length");
    // Exactly 64 KiB is fine.
    let pad = 64 * 1024 - r#"{"op":"flush","pad":""}"#.len();
    let exact = format!(r#"{{"op":"flush","pad":"{}"}}"#, "x".repeat(pad));
    assert_eq!(exact.len(), 64 * 1024);
    assert_json_ok(&patch_json(s, "demo", &exact), r#"{"ok":true}"#);

    let r = s.request(
        "PATCH",
        "/images/demo",
        &[
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ],
        b"e\r\n{\"op\":\"flush\"}\r\n0\r\n\r\n",
    );
    assert_err(&r, 400, "Content-Length required");

    let r = s.request(
        "PATCH",
        "/images/demo/flush",
        &[("Content-Type", "application/json")],
        b"{\"op\":\"flush\"}",
    );
    assert_err(&r, 404, "not found");
    assert!(get_all(s, "demo") == data);
}

// ---------------------------------------------------------------- ids, paths

#[test]
fn unknown_ids_and_invalid_configs() {
    let mut env = Env::new("ids", &[]);
    let (_, data) = env.raw_export("demo", 64 * KIB, 22);
    let socket = env.nbd[0].socket.clone();
    let s = &env.server;
    let cfg_dir = s.config_dir.clone();
    let good = json!({"backend": "nbd", "socket": socket}).to_string();

    // Valid configs the id rules must never reach.
    std::fs::create_dir(cfg_dir.join("sub")).unwrap();
    std::fs::write(cfg_dir.join("sub").join("x"), &good).unwrap();
    std::fs::write(env.dir.join("outside"), &good).unwrap();
    std::fs::write(cfg_dir.join("back\\slash"), &good).unwrap();
    std::fs::write(cfg_dir.join("a"), &good).unwrap();

    // Invalid configs.
    std::fs::write(cfg_dir.join("notjson"), "{not json").unwrap();
    std::fs::write(cfg_dir.join("array"), "[1,2]").unwrap();
    std::fs::write(cfg_dir.join("empty"), "").unwrap();
    std::fs::write(
        cfg_dir.join("relative"),
        json!({"backend": "nbd", "socket": "demo.sock"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        cfg_dir.join("ceph"),
        json!({"backend": "ceph", "socket": socket}).to_string(),
    )
    .unwrap();
    let padded = |len: usize| format!("{good}{}", " ".repeat(len - good.len()));
    std::fs::write(cfg_dir.join("big"), padded(4097)).unwrap();
    std::fs::write(cfg_dir.join("exact4k"), padded(4096)).unwrap();
    std::fs::create_dir(cfg_dir.join("adir")).unwrap();

    let long = "x".repeat(300);
    let unknown = [
        "nosuch",
        "%2e%2e",
        "..",
        ".",
        "%2E%2E%2Foutside",
        "..%2Foutside",
        "sub%2Fx",
        "sub%2fx",
        "back%5Cslash",
        "a%00",
        "a%00b",
        "%ff",
        "%zz",
        long.as_str(),
        "notjson",
        "array",
        "empty",
        "relative",
        "ceph",
        "big",
        "adir",
    ];
    for id in unknown {
        let path = format!("/images/{id}");
        for (method, p) in [
            ("GET", path.clone()),
            ("OPTIONS", path.clone()),
            ("GET", format!("{path}/extents")),
            ("POST", format!("{path}/flush")),
        ] {
            let r = s.request(method, &p, &[], b"");
            assert_err(&r, 404, "unknown image_id");
        }
        let r = s.request("PUT", &path, &[], b"abcd");
        assert_err(&r, 404, "unknown image_id");
        let r = patch_json(s, id, r#"{"op":"flush"}"#);
        assert_err(&r, 404, "unknown image_id");
    }
    // Invalid configs are logged.
    for id in ["notjson", "array", "relative", "big"] {
        s.logged(&format!("image_id={id} "), 1);
    }
    // Exactly 4 KiB is accepted; an id is case-sensitive.
    assert_eq!(get_all(s, "exact4k"), data);
    assert_eq!(get_all(s, "a"), data);
    assert_err(&s.get("/images/DEMO"), 404, "unknown image_id");
    // Percent-encoding of ordinary characters is decoded.
    assert_eq!(get_all(s, "%64emo"), data);

    for (method, path) in [
        ("GET", "/"),
        ("GET", "/images"),
        ("GET", "/images/"),
        ("GET", "/foo"),
        ("GET", "/imagesx/demo"),
        ("GET", "/foo/demo"),
        ("GET", "/images/demo/bogus"),
        ("GET", "/images/demo/flush"),
        ("GET", "/images/demo/extents/more"),
        ("PUT", "/images/demo/extents"),
        ("OPTIONS", "/images/demo/flush"),
        ("OPTIONS", "/images"),
        ("POST", "/images/demo/bogus"),
    ] {
        let r = s.request(method, path, &[], b"");
        assert_err(&r, 404, "not found");
    }
}

// ---------------------------------------------------------------- keep-alive

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let mut env = Env::new("keepalive", &[]);
    let size = MIB;
    let (_, mut data) = env.raw_export("demo", size, 23);
    let mut c = env.server.client();

    let r = c.request("OPTIONS", "/images/demo", &[], b"");
    assert_eq!(r.status, 200);
    let r = c.request("GET", "/images/demo", &[("Range", "bytes=0-9")], b"");
    assert_eq!((r.status, &r.body[..]), (206, &data[..10]));
    let chunk = pattern_bytes(4096, 24);
    let r = c.request(
        "PUT",
        "/images/demo",
        &[("Content-Range", "bytes 8192-12287/*")],
        &chunk,
    );
    assert_json_ok(&r, r#"{"ok":true,"bytes_written":4096,"flushed":false}"#);
    data[8192..12288].copy_from_slice(&chunk);
    let r = c.request(
        "PATCH",
        "/images/demo",
        &[("Content-Type", "application/json")],
        br#"{"op":"zero","offset":0,"size":100}"#,
    );
    assert_json_ok(&r, r#"{"ok":true}"#);
    data[..100].fill(0);
    let r = c.request("GET", "/images/demo/extents", &[], b"");
    assert_eq!(r.status, 200);
    let r = c.request("POST", "/images/demo/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);
    // Errors without a body keep the connection too.
    assert_err(
        &c.request("GET", "/images/nosuch", &[], b""),
        404,
        "unknown image_id",
    );
    assert_416(
        &c.request("GET", "/images/demo", &[("Range", "bytes=99999999-")], b""),
        size,
    );
    assert_err(&c.request("GET", "/nowhere", &[], b""), 404, "not found");
    let r = c.request("GET", "/images/demo", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body == data);
    let r = c.request("PUT", "/images/demo", &[], &data);
    assert_eq!(r.status, 200);
    let r = c.request("GET", "/images/demo", &[("Range", "bytes=-4")], b"");
    assert_eq!(r.body, &data[data.len() - 4..]);
}

/// GET bodies are written around actix-http's write buffer (src/direct_body/outbox.rs):
/// requests sent before the previous response was read (their heads wait
/// in the server's read buffer while a multi-chunk body is still going
/// out) get their responses whole and in order, framed by Content-Length.
/// (No HEAD among them: actix-http 3.20 takes "is HEAD" from the last
/// request it decoded, not from the one it answers, and gets a pipelined
/// HEAD wrong with or without this server's body path.)
#[test]
fn pipelined_requests_behind_a_large_get_come_back_whole_and_in_order() {
    let mut env = Env::new("pipelined", &[]);
    // Six and a bit of the server's 512 KiB chunks.
    let (_, data) = env.raw_export("demo", 3 * MIB + 512, 29);
    let size = data.len();
    let mut c = env.server.client();
    for _ in 0..2 {
        c.send("GET", "/images/demo", &[], b"");
        c.send(
            "GET",
            "/images/demo",
            &[("Range", "bytes=1048570-2097160")],
            b"",
        );
        c.send("OPTIONS", "/images/demo", &[], b"");
    }
    c.send("GET", "/images/nosuch", &[], b"");
    c.send("GET", "/images/demo", &[("Range", "bytes=-3")], b"");

    for _ in 0..2 {
        let r = c.read_response(false);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
        assert_eq!(r.header("transfer-encoding"), None);
        assert!(r.body == data, "full GET differs");
        let r = c.read_response(false);
        assert_eq!(r.status, 206);
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes 1048570-2097160/{size}").as_str())
        );
        assert!(r.body == data[1048570..2097161], "ranged GET differs");
        let r = c.read_response(false);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["features"], json!(["extents", "zero", "flush"]));
    }
    assert_err(&c.read_response(false), 404, "unknown image_id");
    let r = c.read_response(false);
    assert_eq!((r.status, &r.body[..]), (206, &data[data.len() - 3..]));
}

// ------------------------------------------------ image_server.py's defects

/// `image_server.py` closed fds libnbd owned: under concurrent requests another
/// request's connection broke (`Bad file descriptor`, empty replies).
#[test]
fn concurrent_requests_all_get_their_own_bytes() {
    let mut env = Env::new("concurrent", &[]);
    let size = 2 * MIB;
    let images: Vec<Vec<u8>> = (0..4)
        .map(|i| env.raw_export(&format!("img{i}"), size, 30 + i).1)
        .collect();
    let addr = env.server.addr;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let images = images.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for n in 0..30u64 {
                    let i = ((t + n) % 4) as usize;
                    let path = format!("/images/img{i}");
                    match n % 3 {
                        0 => {
                            let a = (n * 65_537 + t * 4099) % (size - 100_000);
                            let range = format!("bytes={a}-{}", a + 99_999);
                            let r = c.request("GET", &path, &[("Range", &range)], b"");
                            assert_eq!(r.status, 206, "{}", r.text());
                            assert!(r.body == images[i][a as usize..a as usize + 100_000]);
                        }
                        1 => {
                            let r = c.request("OPTIONS", &path, &[], b"");
                            assert_eq!(r.status, 200, "{}", r.text());
                        }
                        _ => {
                            // Extents of this thread's own image (the
                            // image lock would refuse a shared one).
                            let own = format!("/images/img{t}/extents");
                            let r = c.request("GET", &own, &[], b"");
                            assert_eq!(r.status, 200, "{}", r.text());
                            assert_eq!(r.json(), zero_list(&[(0, size, false)]));
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    for (i, data) in images.iter().enumerate() {
        assert!(get_all(&env.server, &format!("img{i}")) == *data);
    }
}

/// Pooled NBD connections must not outlive the config they were made for.
#[test]
fn a_changed_or_removed_config_never_reuses_a_stale_connection() {
    let mut env = Env::new("stale", &[]);
    let (_, a) = env.raw_export("a", 64 * KIB, 40);
    let (_, b) = env.raw_export("b", 64 * KIB, 41);
    let (sock_a, sock_b) = (env.nbd[0].socket.clone(), env.nbd[1].socket.clone());
    let s = &env.server;
    // Replaces the config atomically, as a new file.
    let set = |socket: &std::path::Path| {
        let tmp = s.config_dir.join(".t.tmp");
        std::fs::write(
            &tmp,
            json!({"backend": "nbd", "socket": socket}).to_string(),
        )
        .unwrap();
        std::fs::rename(&tmp, s.config_dir.join("t")).unwrap();
    };
    for round in 0..3 {
        set(&sock_a);
        for _ in 0..3 {
            assert!(get_all(s, "t") == a, "round {round}: t is a");
        }
        set(&sock_b);
        for _ in 0..3 {
            assert!(get_all(s, "t") == b, "round {round}: t is b");
        }
        std::fs::remove_file(s.config_dir.join("t")).unwrap();
        assert_err(&s.get("/images/t"), 404, "unknown image_id");
    }
}

/// The reference merge of allocation and dirty-bitmap extents: `image_server.py`'s
/// boundary algorithm, then touching extents with equal flags joined.
fn reference_dirty_merge(alloc: &[(u64, u64, u32)], dirty: &[(u64, u64, u32)], size: u64) -> Value {
    let mut bounds: Vec<u64> = vec![0, size];
    for &(o, l, _) in alloc.iter().chain(dirty) {
        bounds.push(o);
        bounds.push(o + l);
    }
    bounds.sort_unstable();
    bounds.dedup();
    let lookup = |list: &[(u64, u64, u32)], at: u64| {
        list.iter()
            .find(|&&(o, l, _)| o <= at && at < o + l)
            .map(|e| e.2)
            .unwrap_or(0)
    };
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for w in bounds.windows(2) {
        let (a, b) = (w[0], w[1]);
        let dirty = lookup(dirty, a) & 1 != 0;
        let zero = lookup(alloc, a) & 3 != 0;
        match out.last_mut() {
            Some(last) if last.2 == dirty && last.3 == zero => last.1 += b - a,
            _ => out.push((a, b - a, dirty, zero)),
        }
    }
    dirty_list(&out)
}

/// Many extents: the linear merge must agree with the naive reference on
/// every boundary (`image_server.py` cut extents at 64 MiB steps and merged in
/// quadratic time).
#[test]
fn many_dirty_extents_match_the_reference_merge() {
    let mut env = Env::new("manyext", &[]);
    let size = 96 * MIB;
    let path = env.dir.join("many.qcow2");
    create_image(&path, "qcow2", size);
    let before: Vec<String> = (0..size / (256 * KIB))
        .map(|i| format!("write -P 1 {} 64k", i * 256 * KIB))
        .collect();
    qemu_io(
        &path,
        "qcow2",
        &before.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    add_bitmap(&path, "b1");
    let after: Vec<String> = (0..size / (384 * KIB))
        .map(|i| match i % 3 {
            0 => format!("write -P 2 {} 64k", i * 384 * KIB + 32 * KIB),
            1 => format!("write -z {} 128k", i * 384 * KIB),
            _ => format!("write -P 0 {} 4k", i * 384 * KIB + 200 * KIB),
        })
        .collect();
    qemu_io(
        &path,
        "qcow2",
        &after.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let nbd = env.export(
        "many",
        &path,
        NbdOpts {
            bitmap: Some("b1".into()),
            ..NbdOpts::qcow2()
        },
    );
    let alloc = nbdinfo_map(&nbd.uri(), None);
    let dirty = nbdinfo_map(&nbd.uri(), Some("qemu:dirty-bitmap:b1"));
    let want = reference_dirty_merge(&alloc, &dirty, size);
    let n = want.as_array().map_or(0, Vec::len);
    assert!(n > 500, "the image has many extents ({n})");
    assert_eq!(extents(&env.server, "many", "?context=dirty"), want);
    assert_eq!(extents(&env.server, "many", ""), {
        let nbd = &env.nbd[0];
        nbdinfo_zero_extents(nbd)
    });
}

/// Reads one response head byte by byte, exactly up to its blank line, so
/// that nothing after it is consumed: (status, headers as sent, lower-cased
/// names in order).
fn read_exact_head(stream: &mut std::net::TcpStream) -> (u16, Vec<(String, String)>) {
    use std::io::Read;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).expect("read head"), 1, "EOF in head");
        head.push(byte[0]);
        assert!(head.len() < 16 * 1024, "head too long");
    }
    let text = String::from_utf8(head).expect("ASCII head");
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    (status, headers)
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut found = headers.iter().filter(|(k, _)| k == name);
    let first = found.next().map(|(_, v)| v.as_str());
    assert!(found.next().is_none(), "{name} sent twice: {headers:?}");
    first
}

/// `HEAD /images/{id}` answers with the headers of a full GET (nbdkit's
/// curl plugin and qemu's curl driver learn the size that way) and no body:
/// on a keep-alive connection the next response follows the head at once.
#[test]
fn head_gives_the_headers_of_a_full_get_and_no_body() {
    let mut env = Env::new("head", &[]);
    let size = 3 * MIB + 4096;
    let (_, data) = env.raw_export("demo", size, 21);
    let file = env.dir.join("disk.img");
    std::fs::write(&file, b"file backend bytes").unwrap();
    env.file_transfer("f", &file);
    let s = &env.server;
    let full = s.get("/images/demo");
    assert_eq!(full.status, 200);

    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut ask = |req: String| {
        c.write_all(req.as_bytes()).unwrap();
        read_exact_head(&mut c)
    };
    for range in ["", "Range: bytes=0-9\r\n"] {
        let (status, headers) = ask(format!(
            "HEAD /images/demo HTTP/1.1\r\nHost: t\r\n{range}\r\n"
        ));
        // A Range is ignored: HTTP defines ranges for GET only.
        assert_eq!(status, 200, "{headers:?}");
        let size_text = size.to_string();
        assert_eq!(
            header_of(&headers, "content-length"),
            Some(size_text.as_str())
        );
        for name in [
            "content-length",
            "content-type",
            "accept-ranges",
            "access-control-allow-methods",
        ] {
            assert_eq!(header_of(&headers, name), full.header(name), "{name}");
        }
        assert_eq!(
            header_of(&headers, "content-type"),
            Some("application/octet-stream")
        );
        assert_eq!(header_of(&headers, "content-range"), None);
        // Same header names as the GET (its date aside).
        let mut names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        let mut get_names: Vec<&str> = full.headers.keys().map(String::as_str).collect();
        get_names.sort_unstable();
        assert_eq!(names, get_names);
    }
    // The same connection goes on: no body bytes came after the head.
    let (status, headers) =
        ask("GET /images/demo HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\n\r\n".into());
    assert_eq!(status, 206, "{headers:?}");
    let mut body = [0u8; 10];
    std::io::Read::read_exact(&mut c, &mut body).unwrap();
    assert_eq!(body, data[..10]);

    // Unknown id and other paths: the JSON error's headers, no body.
    let mut c = s.client();
    for (path, status, message) in [
        ("/images/nope", 404, "unknown image_id"),
        ("/images/demo/extents", 404, "not found"),
        ("/images/..", 404, "unknown image_id"),
    ] {
        let head = c.request("HEAD", path, &[], b"");
        assert_eq!(head.status, status, "{path}");
        assert!(head.body.is_empty());
        let json = json!({ "error": message }).to_string();
        assert_eq!(
            head.header("content-length"),
            Some(json.len().to_string().as_str())
        );
        assert_eq!(head.header("content-type"), Some("application/json"));
        assert_imageio_headers(&head, DEFAULT_METHODS);
    }
    // ... and the connection still serves after each.
    let r = c.request("GET", "/images/demo", &[("Range", "bytes=-3")], b"");
    assert_eq!((r.status, &r.body[..]), (206, &data[data.len() - 3..]));

    // The file backend: its size.
    let head = c.request("HEAD", "/images/f", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("18"));
    assert_eq!(
        head.header("content-type"),
        Some("application/octet-stream")
    );
    assert_imageio_headers(&head, DEFAULT_METHODS);
}

/// HEAD reads no image data: a registered transfer's status counts it as a
/// request served with no bytes read.
#[test]
fn head_reads_no_image_data() {
    let mut env = Env::new("head-stats", &[]);
    let path = env.dir.join("a.img");
    raw_image(&path, 4 * MIB, 0, &pattern_bytes(4 * MIB as usize, 22));
    let nbd = QemuNbd::start(&path, &env.dir.join("reg.sock"), NbdOpts::raw());
    let s = &env.server;
    assert_eq!(s.register_nbd("reg", &nbd)["status"], "ok");
    for _ in 0..3 {
        let r = s.request("HEAD", "/images/reg", &[], b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("4194304"));
    }
    let st = s.control(&json!({"action": "status", "transfer_id": "reg"}));
    assert_eq!(st["transfer"]["bytes_read"], 0, "{st}");
    assert_eq!(st["transfer"]["requests_served"], 3, "{st}");
    assert!(!s.log().contains("GET start image_id=reg"));
    env.nbd.push(nbd);
}
