//! What newer imageio clients ask besides `image_server.py`'s API: `GET /info/`,
//! `OPTIONS /images/*`, and the `hole` field of zero extents.

pub mod common;

use common::*;
use serde_json::json;

#[test]
fn info_reports_the_version() {
    let cfg = TempDir::new("info");
    let server = Server::start(cfg.path(), &[]);
    for path in ["/info/", "/info", "//info//"] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("accept-ranges"), Some("bytes"));
        assert_eq!(
            r.text(),
            format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
        );
    }
    assert_err(
        &server.request("POST", "/info/", &[], b""),
        405,
        "method not allowed",
    );
    assert_err(&server.get("/info/x"), 404, "not found");
}

#[test]
fn options_star_reports_every_feature_without_a_transfer() {
    let cfg = TempDir::new("opt-star");
    let server = Server::start(cfg.path(), &[]);
    let r = server.request("OPTIONS", "/images/*", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, PUT, PATCH, OPTIONS")
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.text(),
        r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":4,"max_writers":4}"#
    );
    // "*" is not a transfer for anything else.
    assert_err(&server.get("/images/*"), 404, "unknown image_id");
    assert_err(
        &server.request("OPTIONS", "/images/*/extents", &[], b""),
        404,
        "not found",
    );

    let other = Server::start(
        cfg.path(),
        &[
            "--max-readers",
            "3",
            "--max-writers",
            "2",
            "--control-socket",
            cfg.join(".other.sock").to_str().unwrap(),
        ],
    );
    assert_eq!(
        other.request("OPTIONS", "/images/*", &[], b"").json(),
        json!({"unix_socket": null, "features": ["extents", "zero", "flush"],
               "max_readers": 3, "max_writers": 2})
    );
}

/// A 4 MiB qcow2: data at 0, an allocated zero cluster at 1 MiB, the rest
/// unallocated.
fn sparse_qcow2(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    create_image(&img, "qcow2", 4 * MIB);
    run(std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 64k",
            "-c",
            "write -z 1M 64k",
        ])
        .arg(&img));
    img
}

#[test]
fn zero_extents_report_holes_when_the_export_offers_allocation_depth() {
    let dir = TempDir::new("holes");
    let cfg = TempDir::new("holes-cfg");
    let img = sparse_qcow2(&dir);
    let mut opts = NbdOpts::qcow2();
    opts.extra = vec!["-A".into()];
    let nbd = QemuNbd::start(&img, &dir.join("a.sock"), opts);
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);

    let expected = concat!(
        r#"[{"start":0,"length":65536,"zero":false,"hole":false},"#,
        r#"{"start":65536,"length":983040,"zero":true,"hole":true},"#,
        r#"{"start":1048576,"length":65536,"zero":true,"hole":false},"#,
        r#"{"start":1114112,"length":3080192,"zero":true,"hole":true}]"#
    );
    for path in ["/images/t/extents", "/images/t/extents?context=zero"] {
        let r = server.get(path);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), expected, "{path}");
    }
    // Dirty extents have no hole field (imageio's DirtyExtent has none).
    let r = server.get("/images/t/extents?context=dirty");
    assert_eq!(
        r.json(),
        json!([
            {"start": 0, "length": 65536, "dirty": true, "zero": false},
            {"start": 65536, "length": 4128768, "dirty": true, "zero": true},
        ])
    );
}

#[test]
fn zero_extents_without_allocation_depth_have_no_holes() {
    let dir = TempDir::new("noholes");
    let cfg = TempDir::new("noholes-cfg");
    let img = sparse_qcow2(&dir);
    let nbd = QemuNbd::start(&img, &dir.join("a.sock"), NbdOpts::qcow2());
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);
    assert_eq!(
        server.get("/images/t/extents").text(),
        concat!(
            r#"[{"start":0,"length":65536,"zero":false,"hole":false},"#,
            r#"{"start":65536,"length":4128768,"zero":true,"hole":false}]"#
        )
    );
}
