//! The file backend: GET with ranges, a full PUT that replaces the file
//! (whatever its new size), flush; everything else refused with 400.

pub mod common;

use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const FILE_METHODS: &str = "GET, PUT, POST, OPTIONS";

/// An environment with file transfer `f` over `<dir>/disk.img` holding `data`.
fn file_env(tag: &str, data: &[u8]) -> (Env, PathBuf) {
    let env = Env::new(tag, &[]);
    let path = env.dir.join("disk.img");
    std::fs::write(&path, data).expect("write file");
    env.file_transfer("f", &path);
    (env, path)
}

/// Files in `dir` other than `keep`: upload leftovers.
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn options_of_a_file_transfer() {
    let (env, _) = file_env("file-opt", b"abc");
    let r = env.server.request("OPTIONS", "/images/f", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_imageio_headers(&r, FILE_METHODS);
    assert_eq!(
        r.text(),
        r#"{"unix_socket":null,"features":["flush"],"max_readers":4,"max_writers":4}"#
    );
    // The backend name is case-insensitive.
    let path = env.dir.join("disk.img");
    env.server.add_transfer(
        "upper",
        &serde_json::json!({"backend": "FILE", "file": path}),
    );
    let r = env.server.request("OPTIONS", "/images/upper", &[], b"");
    assert_eq!(r.status, 200);
    assert_imageio_headers(&r, FILE_METHODS);
}

#[test]
fn get_whole_file_and_ranges() {
    let size = 300_001u64;
    let data = pattern_bytes(size as usize, 1);
    let (env, _) = file_env("file-get", &data);
    let s = &env.server;

    let r = s.get("/images/f");
    assert_eq!(r.status, 200);
    assert_imageio_headers(&r, DEFAULT_METHODS);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("content-length"), Some("300001"));
    assert!(r.body == data);
    assert!(s.wait_log("GET end image_id=f bytes=300001 ", Duration::from_secs(20)));

    for (range, a, b) in [
        ("bytes=0-9", 0u64, 9u64),
        ("bytes=300000-", 300_000, 300_000),
        ("bytes=-1", 300_000, 300_000),
        ("bytes=1000-9999999", 1000, 300_000),
        ("bytes=-400000", 0, 300_000),
    ] {
        let r = s.request("GET", "/images/f", &[("Range", range)], b"");
        assert_eq!(r.status, 206, "{range}");
        assert_imageio_headers(&r, DEFAULT_METHODS);
        let cr = format!("bytes {a}-{b}/{size}");
        assert_eq!(r.header("content-range"), Some(cr.as_str()));
        assert!(r.body == data[a as usize..=b as usize], "{range}");
    }
    for range in ["bytes=300001-", "bytes=5-4"] {
        let r = s.request("GET", "/images/f", &[("Range", range)], b"");
        assert_err(&r, 416, "range not satisfiable");
        assert_eq!(r.header("content-range"), Some("bytes */300001"));
    }
    let r = s.request("GET", "/images/f", &[("Range", "bytes=0-1,3-4")], b"");
    assert_err(&r, 400, "invalid Range header");
}

#[test]
fn get_of_an_empty_file() {
    let (env, _) = file_env("file-empty", b"");
    let s = &env.server;
    let r = s.get("/images/f");
    assert_eq!(r.status, 200);
    assert_imageio_headers(&r, DEFAULT_METHODS);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("content-length"), Some("0"));
    assert!(r.body.is_empty());
    let r = s.request("GET", "/images/f", &[("Range", "bytes=0-")], b"");
    assert_err(&r, 416, "range not satisfiable");
    assert_eq!(r.header("content-range"), Some("bytes */0"));
}

#[test]
fn full_put_replaces_the_file() {
    let (env, path) = file_env("file-put", &pattern_bytes(100_000, 2));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let s = &env.server;

    // Larger, smaller, empty: the file takes the body's size.
    for (i, (len, query, flushed)) in [
        (250_000usize, "", false),
        (1000, "?flush=y", true),
        (0, "?flush=n", false),
        (4 * MIB as usize + 7, "?flush=true", true),
    ]
    .into_iter()
    .enumerate()
    {
        let body = pattern_bytes(len, 10 + i as u64);
        let r = s.request("PUT", &format!("/images/f{query}"), &[], &body);
        assert_json_ok(
            &r,
            &format!(r#"{{"ok":true,"bytes_written":{len},"flushed":{flushed}}}"#),
        );
        assert!(std::fs::read(&path).unwrap() == body, "PUT of {len}");
        assert!(s.get("/images/f").body == body);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "the file keeps its mode");
    }
    assert!(others(env.dir.path(), &["cfg", "disk.img"]).is_empty());

    let r = s.request("POST", "/images/f/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);
}

#[test]
fn refused_requests_leave_the_file_alone() {
    let data = pattern_bytes(64 * 1024, 3);
    let (env, path) = file_env("file-bad", &data);
    let s = &env.server;

    let r = s.request(
        "PUT",
        "/images/f",
        &[("Content-Range", "bytes 0-3/*")],
        b"abcd",
    );
    assert_err(
        &r,
        400,
        "Content-Range PUT not supported for file backend; use full PUT",
    );
    let patch_msg =
        "range writes and PATCH not supported for file backend; use PUT for full upload";
    let r = s.request(
        "PATCH",
        "/images/f",
        &[("Content-Type", "application/json")],
        br#"{"op":"zero","size":10}"#,
    );
    assert_err(&r, 400, patch_msg);
    let r = s.request(
        "PATCH",
        "/images/f",
        &[("Content-Type", "application/json")],
        br#"{"op":"flush"}"#,
    );
    assert_err(&r, 400, patch_msg);
    let r = s.request("PATCH", "/images/f", &[("Range", "bytes=0-3")], b"abcd");
    assert_err(&r, 400, patch_msg);
    let r = s.get("/images/f/extents");
    assert_err(&r, 400, "extents not supported for file backend");
    let r = s.get("/images/f/extents?context=dirty");
    assert_err(&r, 400, "extents not supported for file backend");
    let r = s.request("PUT", "/images/f", &[("Range", "bytes=0-3")], b"abcd");
    assert_err(
        &r,
        400,
        "Range header not supported for PUT; use Content-Range or PATCH",
    );
    let r = s.request(
        "PUT",
        "/images/f",
        &[("Transfer-Encoding", "chunked")],
        b"4\r\nabcd\r\n0\r\n\r\n",
    );
    assert_err(&r, 400, "Content-Length required");
    let r = s.request("POST", "/images/f", &[], b"");
    assert_err(&r, 404, "not found");

    // A body that ends before Content-Length: an error, and the file is
    // exactly as it was (no partial replacement, no leftover upload).
    let mut c = s.client();
    c.send(
        "PUT",
        "/images/f",
        &[("Content-Length", "200000")],
        &vec![0x77; 150_000],
    );
    c.stream().shutdown(Shutdown::Write).expect("half-close");
    let r = c.read_response(false);
    assert_body_ended_early(&r, 150_000);
    // A client that goes away mid-upload.
    let mut c = s.client();
    c.send(
        "PUT",
        "/images/f",
        &[("Content-Length", "200000")],
        &vec![0x78; 150_000],
    );
    drop(c);
    poll_until(Duration::from_secs(20), "two PUT end lines", || {
        (s.log_count("PUT end image_id=f ") == 2).then_some(())
    });
    let r = s.request("POST", "/images/f/flush", &[], b"");
    assert_json_ok(&r, r#"{"ok":true}"#);
    assert!(std::fs::read(&path).unwrap() == data);
    assert!(others(env.dir.path(), &["cfg", "disk.img"]).is_empty());
}
