//! Every curl example of `image_server.py`'s docstring, run with the real curl
//! against the real server (the `| jq .` of two examples is replaced by
//! parsing the JSON here). The demo disk of the docstring is 50 MiB
//! (its Content-Range example says `/52428800`); the zero examples need a
//! disk larger than 1 GiB, so they run on a sparse 2 GiB qcow2.

pub mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const DEMO_SIZE: u64 = 52_428_800;
const GIB: u64 = 1024 * MIB;

/// What curl did: the HTTP status of the last response, stdout without the
/// status line we append, and the verbose trace.
struct Curl {
    code: u16,
    stdout: Vec<u8>,
    stderr: String,
}

impl Curl {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs curl with the docstring's arguments (in `cwd`, for `@file` and
/// `-o file`), adding only a bound on the run time and a status trailer.
fn curl(cwd: &Path, args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .current_dir(cwd)
        .args(args)
        .args(["--max-time", "120", "--write-out", "\n%{http_code}"])
        .output()
        .expect("run curl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?} failed: {:?}\n{stderr}",
        out.status
    );
    let mut stdout = out.stdout;
    let nl = stdout
        .iter()
        .rposition(|&b| b == b'\n')
        .expect("status trailer");
    let code = std::str::from_utf8(&stdout[nl + 1..])
        .expect("ascii")
        .parse()
        .expect("status code");
    stdout.truncate(nl);
    Curl {
        code,
        stdout,
        stderr,
    }
}

fn url(server: &Server, rest: &str) -> String {
    format!("http://{}/images/demo{rest}", server.addr)
}

#[test]
fn docstring_examples_on_the_50mib_demo_disk() {
    let mut env = Env::new("doc-demo", &[]);
    let mut data = vec![0u8; DEMO_SIZE as usize];
    data[..2 * MIB as usize].copy_from_slice(&pattern_bytes(2 * MIB as usize, 1));
    let at = 48 * MIB as usize;
    data[at..at + MIB as usize].copy_from_slice(&pattern_bytes(MIB as usize, 2));
    let img = env.dir.join("demo.raw");
    std::fs::write(&img, &data).unwrap();
    env.export("demo", &img, NbdOpts::raw());
    let s = &env.server;
    let cwd = env.dir.join("client");
    std::fs::create_dir(&cwd).unwrap();

    // curl -i -X OPTIONS http://127.0.0.1:54322/images/demo
    let r = curl(&cwd, &["-i", "-X", "OPTIONS", &url(s, "")]);
    assert_eq!(r.code, 200, "{}", r.stderr);
    let text = r.text();
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\naccess-control-allow-methods: get, put, patch, options"));
    assert!(head.contains("\r\naccept-ranges: bytes"));
    assert!(head.contains("\r\ncontent-type: application/json"));
    assert_eq!(
        body,
        r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":4,"max_writers":4}"#
    );

    // curl -v http://127.0.0.1:54322/images/demo -o demo.img
    let r = curl(&cwd, &["-v", &url(s, ""), "-o", "demo.img"]);
    assert_eq!(r.code, 200, "{}", r.stderr);
    assert!(std::fs::read(cwd.join("demo.img")).unwrap() == data);

    // curl -v -H "Range: bytes=0-1048575" ... -o first_1MiB.bin
    let r = curl(
        &cwd,
        &[
            "-v",
            "-H",
            "Range: bytes=0-1048575",
            &url(s, ""),
            "-o",
            "first_1MiB.bin",
        ],
    );
    assert_eq!(r.code, 206, "{}", r.stderr);
    assert!(
        r.stderr
            .to_ascii_lowercase()
            .contains("< content-range: bytes 0-1048575/52428800"),
        "{}",
        r.stderr
    );
    assert!(std::fs::read(cwd.join("first_1MiB.bin")).unwrap() == data[..MIB as usize]);

    // curl -v -T demo.img http://127.0.0.1:54322/images/demo
    // The upload waits for `100 Continue`; a server that never sends it
    // would only get the body after the timeout, so the trace must show it.
    let mut upload = pattern_bytes(DEMO_SIZE as usize, 3);
    upload[4 * MIB as usize..40 * MIB as usize].fill(0);
    std::fs::write(cwd.join("demo.img"), &upload).unwrap();
    for (query, flushed) in [("", false), ("?flush=y", true)] {
        let r = curl(
            &cwd,
            &[
                "-v",
                "--expect100-timeout",
                "30",
                "-T",
                "demo.img",
                &url(s, query),
            ],
        );
        assert_eq!(r.code, 200, "{}", r.stderr);
        assert!(r.stderr.contains("> Expect: 100-continue"), "{}", r.stderr);
        assert!(r.stderr.contains("< HTTP/1.1 100 Continue"), "{}", r.stderr);
        assert_eq!(
            r.text(),
            format!(r#"{{"ok":true,"bytes_written":{DEMO_SIZE},"flushed":{flushed}}}"#)
        );
        assert!(s.get("/images/demo").body == upload);
        upload[..4096].fill(0x42);
        std::fs::write(cwd.join("demo.img"), &upload).unwrap();
    }
    upload[..4096].copy_from_slice(&pattern_bytes(DEMO_SIZE as usize, 3)[..4096]);

    // Ranged PUTs with Content-Range `start-end/*` and `start-end/size`.
    let chunk = pattern_bytes(MIB as usize, 4);
    let chunk2 = pattern_bytes(MIB as usize, 5);
    std::fs::write(cwd.join("chunk.bin"), &chunk).unwrap();
    std::fs::write(cwd.join("chunk2.bin"), &chunk2).unwrap();
    let r = curl(
        &cwd,
        &[
            "-v",
            "-X",
            "PUT",
            "-H",
            "Content-Range: bytes 0-1048575/*",
            "-H",
            "Content-Length: 1048576",
            "--data-binary",
            "@chunk.bin",
            &url(s, ""),
        ],
    );
    assert_eq!(r.code, 200, "{}", r.stderr);
    assert_eq!(
        r.text(),
        r#"{"ok":true,"bytes_written":1048576,"flushed":false}"#
    );
    let r = curl(
        &cwd,
        &[
            "-v",
            "-X",
            "PUT",
            "-H",
            "Content-Range: bytes 1048576-2097151/52428800",
            "-H",
            "Content-Length: 1048576",
            "--data-binary",
            "@chunk2.bin",
            &url(s, "?flush=n"),
        ],
    );
    assert_eq!(r.code, 200, "{}", r.stderr);
    assert_eq!(
        r.text(),
        r#"{"ok":true,"bytes_written":1048576,"flushed":false}"#
    );
    upload[..MIB as usize].copy_from_slice(&chunk);
    upload[MIB as usize..2 * MIB as usize].copy_from_slice(&chunk2);
    assert!(s.get("/images/demo").body == upload);

    // The docstring's PATCH range example is off by one (the end is
    // inclusive: 0-1048576 is 1 MiB + 1 byte) and must change nothing.
    std::fs::write(cwd.join("chunk.bin"), pattern_bytes(MIB as usize, 6)).unwrap();
    let r = curl(
        &cwd,
        &[
            "-v",
            "-X",
            "PATCH",
            "-H",
            "Range: bytes=0-1048576",
            "--data-binary",
            "@chunk.bin",
            &url(s, ""),
        ],
    );
    assert_eq!(r.code, 400, "{}", r.stderr);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.stdout).unwrap(),
        json!({"error": "Content-Length (1048576) must equal range length (1048577)"})
    );
    assert!(s.get("/images/demo").body == upload, "nothing written");
    // With the end corrected it writes the chunk.
    let r = curl(
        &cwd,
        &[
            "-v",
            "-X",
            "PATCH",
            "-H",
            "Range: bytes=0-1048575",
            "--data-binary",
            "@chunk.bin",
            &url(s, ""),
        ],
    );
    assert_eq!(r.code, 200, "{}", r.stderr);
    assert_eq!(r.text(), r#"{"ok":true,"bytes_written":1048576}"#);
    upload[..MIB as usize].copy_from_slice(&pattern_bytes(MIB as usize, 6));
    assert!(s.get("/images/demo").body == upload);
}

#[test]
fn docstring_examples_for_extents_zero_and_flush() {
    let mut env = Env::new("doc-zero", &[]);
    let size = 2 * GIB;
    let img = env.dir.join("demo.qcow2");
    create_image(&img, "qcow2", size);
    qemu_io(
        &img,
        "qcow2",
        &["write -P 0xab 0 1M", "write -P 0xcd 1G 1M"],
    );
    add_bitmap(&img, "demo-bitmap");
    qemu_io(&img, "qcow2", &["write -P 0xef 32M 1M"]);
    env.export(
        "demo",
        &img,
        NbdOpts {
            bitmap: Some("demo-bitmap".into()),
            ..NbdOpts::qcow2()
        },
    );
    let s = &env.server;
    let cwd = env.dir.path().to_path_buf();
    let json_of = |r: &Curl| -> Value {
        assert_eq!(r.code, 200, "{}", r.stderr);
        serde_json::from_slice(&r.stdout).expect("JSON body")
    };
    // No `qemu-nbd -A`: no allocation depth, so `hole` is false.
    let ext =
        |s_: u64, l: u64, z: bool| json!({"start": s_, "length": l, "zero": z, "hole": false});
    let dext = |s_: u64, l: u64, d: bool, z: bool| json!({"start": s_, "length": l, "dirty": d, "zero": z});

    // curl -s http://127.0.0.1:54322/images/demo/extents | jq .
    let r = curl(&cwd, &["-s", &url(s, "/extents")]);
    assert_eq!(
        json_of(&r),
        json!([
            ext(0, MIB, false),
            ext(MIB, 31 * MIB, true),
            ext(32 * MIB, MIB, false),
            ext(33 * MIB, GIB - 33 * MIB, true),
            ext(GIB, MIB, false),
            ext(GIB + MIB, GIB - MIB, true),
        ])
    );
    // curl -s "http://127.0.0.1:54322/images/demo/extents?context=dirty" | jq .
    let r = curl(&cwd, &["-s", &url(s, "/extents?context=dirty")]);
    assert_eq!(
        json_of(&r),
        json!([
            dext(0, MIB, false, false),
            dext(MIB, 31 * MIB, false, true),
            dext(32 * MIB, MIB, true, false),
            dext(33 * MIB, GIB - 33 * MIB, false, true),
            dext(GIB, MIB, false, false),
            dext(GIB + MIB, GIB - MIB, false, true),
        ])
    );
    // curl -s -X POST http://127.0.0.1:54322/images/demo/flush | jq .
    let r = curl(&cwd, &["-s", "-X", "POST", &url(s, "/flush")]);
    assert_eq!(json_of(&r), json!({"ok": true}));

    let patch = |body: &str| {
        curl(
            &cwd,
            &[
                "-k",
                "-X",
                "PATCH",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
                &url(s, ""),
            ],
        )
    };
    let range = |a: u64, len: u64| {
        let r = s.request(
            "GET",
            "/images/demo",
            &[("Range", &format!("bytes={a}-{}", a + len - 1))],
            b"",
        );
        assert_eq!(r.status, 206);
        r.body
    };

    // PATCH zero: 8192 bytes at 4096.
    let r = patch(r#"{"op": "zero", "offset": 4096, "size": 8192}"#);
    assert_eq!(r.text(), r#"{"ok":true}"#, "{}", r.stderr);
    let mut want = vec![0xab; 16384];
    want[4096..12288].fill(0);
    assert_eq!(range(0, 16384), want);

    // Zero at offset 1 GiB, 4096 bytes, no flush.
    let r = patch(r#"{"op": "zero", "offset": 1073741824, "size": 4096}"#);
    assert_eq!(r.text(), r#"{"ok":true}"#, "{}", r.stderr);
    let mut want = vec![0xcd; 8192];
    want[..4096].fill(0);
    assert_eq!(range(GIB, 8192), want);

    // PATCH flush.
    let r = patch(r#"{"op": "flush"}"#);
    assert_eq!(r.text(), r#"{"ok":true}"#, "{}", r.stderr);

    // Zero entire disk and flush: 100 GiB, clamped to the 2 GiB disk.
    let r = patch(r#"{"op": "zero", "size": 107374182400, "flush": true}"#);
    assert_eq!(r.text(), r#"{"ok":true}"#, "{}", r.stderr);
    assert_eq!(range(32 * MIB, 4096), vec![0; 4096]);
    assert_eq!(range(size - 4096, 4096), vec![0; 4096]);
    let r = curl(&cwd, &["-s", &url(s, "/extents")]);
    assert_eq!(json_of(&r), json!([ext(0, size, true)]));
    let r = curl(&cwd, &["-s", &url(s, "/extents?context=dirty")]);
    assert_eq!(json_of(&r), json!([dext(0, size, true, true)]));
}
