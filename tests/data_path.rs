//! The byte-moving path through the server against real qemu-nbd: several
//! NBD requests in flight per transfer, all-zero chunks sent as
//! WRITE_ZEROES, and what a client sees when qemu-nbd fails mid-transfer.

pub mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const KIB: u64 = 1024;

/// Asserts equal bytes, naming the first difference (not two huge dumps).
#[track_caller]
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {} expected {}",
            actual[i], expected[i]
        );
    }
    assert_eq!(actual.len(), expected.len(), "{what}: length");
}

fn qemu_img_json(args: &[&str], image: &Path) -> serde_json::Value {
    let out = run(Command::new("qemu-img").args(args).arg(image));
    serde_json::from_slice(&out.stdout).expect("qemu-img JSON")
}

/// Bytes the qcow2 stores data for (`qemu-img map`: `data: true`).
fn allocated_data(image: &Path) -> u64 {
    let map = qemu_img_json(&["map", "-U", "--output=json", "-f", "qcow2"], image);
    map.as_array()
        .expect("map is a list")
        .iter()
        .filter(|e| e["data"] == json!(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

fn put(server: &Server, id: &str, query: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    server.request("PUT", &format!("/images/{id}{query}"), headers, body)
}

fn get_range(server: &Server, id: &str, first: u64, last: u64) -> Vec<u8> {
    let r = server.request(
        "GET",
        &format!("/images/{id}"),
        &[("Range", &format!("bytes={first}-{last}"))],
        b"",
    );
    assert_eq!(r.status, 206, "{}", r.text());
    r.body
}

#[test]
fn upload_of_a_mostly_zero_raw_image_leaves_the_qcow2_sparse() {
    let dir = TempDir::new("sparse-up");
    let image = dir.join("disk.qcow2");
    let size = 64 * MIB;
    create_image(&image, "qcow2", size);
    let nbd = QemuNbd::start(&image, &dir.join("nbd.sock"), NbdOpts::qcow2());
    let cfg = TempDir::new("sparse-up-cfg");
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);

    // A raw image: 4 MiB of data in three places (one not aligned to
    // anything), zeroes everywhere else.
    let mut body = vec![0u8; size as usize];
    let regions = [
        (0, MIB as usize),
        (20 * MIB as usize + 12_345, 3 * MIB as usize),
        (size as usize - 4096, 4096),
    ];
    for (i, &(at, len)) in regions.iter().enumerate() {
        body[at..at + len].copy_from_slice(&pattern_bytes(len, i as u64 + 1));
    }

    let r = put(&server, "t", "?flush=y", &[], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok": true, "bytes_written": size, "flushed": true})
    );

    // Every byte reads back, through the server and from the image itself.
    let back = server.get("/images/t");
    assert_eq!(back.status, 200);
    assert_same(&back.body, &body, "GET after upload");
    let out = run(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&image)
        .arg({
            let raw = dir.join("expected.raw");
            std::fs::write(&raw, &body).unwrap();
            raw
        }));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Images are identical"),
        "{out:?}"
    );

    // Only the clusters (64 KiB) holding data were allocated: zero chunks
    // went out as WRITE_ZEROES. Written as data, all 64 MiB would be.
    let cluster = 64 * KIB;
    let data_clusters: u64 = regions
        .iter()
        .map(|&(at, len)| {
            let first = at as u64 / cluster;
            let last = (at + len - 1) as u64 / cluster;
            (last - first + 1) * cluster
        })
        .sum();
    let allocated = allocated_data(&image);
    assert!(
        allocated <= data_clusters,
        "qcow2 stores {allocated} bytes of data; the data needs {data_clusters}"
    );
    let info = qemu_img_json(&["info", "-U", "--output=json"], &image);
    assert_eq!(info["virtual-size"], json!(size));
    let actual = info["actual-size"].as_u64().unwrap();
    assert!(
        actual < size / 4,
        "qcow2 file takes {actual} bytes on disk for a {size}-byte image"
    );
}

#[test]
fn ranged_writes_over_many_requests_read_back_exact() {
    let dir = TempDir::new("ranged");
    let image = dir.join("disk.raw");
    let size = 16 * MIB;
    create_image(&image, "raw", size);
    let nbd = QemuNbd::start(&image, &dir.join("nbd.sock"), NbdOpts::raw());
    let cfg = TempDir::new("ranged-cfg");
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);
    let mut model = vec![0u8; size as usize];

    // Unaligned, longer than all requests in flight at once, data then
    // zeroes then data: some chunks are written, some zeroed.
    let start = 777u64;
    let mut body = pattern_bytes(5 * MIB as usize + 3, 7);
    body[300 * KIB as usize..1800 * KIB as usize].fill(0);
    let end = start + body.len() as u64 - 1;
    let range = format!("bytes {start}-{end}/*");
    let r = put(&server, "t", "", &[("Content-Range", &range)], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"ok": true, "bytes_written": body.len(), "flushed": false})
    );
    model[start as usize..=end as usize].copy_from_slice(&body);

    // Zeroes over part of it, then a PATCH range write across the edge.
    let zeroes = vec![0u8; 2 * MIB as usize];
    let at = 3 * MIB - 1;
    let range = format!("bytes {at}-{}/*", at + zeroes.len() as u64 - 1);
    let r = put(&server, "t", "", &[("Content-Range", &range)], &zeroes);
    assert_eq!(r.status, 200, "{}", r.text());
    model[at as usize..at as usize + zeroes.len()].copy_from_slice(&zeroes);

    let patch = pattern_bytes(MIB as usize + 11, 8);
    let at = 4 * MIB + 5;
    let r = server.request(
        "PATCH",
        "/images/t",
        &[
            (
                "Range",
                &format!("bytes={at}-{}", at + patch.len() as u64 - 1),
            ),
            ("Content-Type", "application/octet-stream"),
        ],
        &patch,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"ok": true, "bytes_written": patch.len()}));
    model[at as usize..at as usize + patch.len()].copy_from_slice(&patch);

    assert_same(&server.get("/images/t").body, &model, "whole image");
    for (first, last) in [
        (0, 776),
        (777, 778),
        (1_000_000, 3_500_000),
        (size - 1, size - 1),
    ] {
        assert_same(
            &get_range(&server, "t", first, last),
            &model[first as usize..=last as usize],
            &format!("range {first}-{last}"),
        );
    }
    let r = server.request("POST", "/images/t/flush", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_same(&std::fs::read(&image).unwrap(), &model, "image file");
}

#[test]
fn a_failed_write_among_those_in_flight_fails_the_put_and_releases_everything() {
    let dir = TempDir::new("eio-put");
    let size = 4 * MIB;
    // The last 512 KiB fail: by then the whole body has arrived, and earlier
    // writes are in flight with the failing one.
    let bad = size - 256 * KIB;
    let (image, spec) = blkdebug_image(&dir, &vec![0; size as usize], bad, "write_aio");
    let nbd = QemuNbd::start(Path::new(&spec), &dir.join("nbd.sock"), NbdOpts::raw());
    let cfg = TempDir::new("eio-put-cfg");
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);

    let body = pattern_bytes(size as usize, 9);
    assert_err(
        &put(&server, "t", "?flush=y", &[], &body),
        500,
        "backend error",
    );

    // The writes before the failing one all landed, the transfer is not
    // left locked, and a fresh connection serves the next requests.
    let good = (bad - bad % (512 * KIB)) as usize;
    assert_same(
        &get_range(&server, "t", 0, good as u64 - 1),
        &body[..good],
        "data before the failed write",
    );
    let small = pattern_bytes(4096, 10);
    let r = put(
        &server,
        "t",
        "?flush=y",
        &[("Content-Range", "bytes 4096-8191/*")],
        &small,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_same(&get_range(&server, "t", 4096, 8191), &small, "later write");
    drop(nbd);
    assert_same(
        &std::fs::read(&image).unwrap()[4096..8192],
        &small,
        "image file",
    );
}

/// Sends a GET and reads the response head; returns the stream positioned
/// at the body and the Content-Length.
fn start_get(server: &Server, path: &str) -> (BufReader<TcpStream>, u64) {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let mut len = None;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(v.trim().parse().unwrap());
            }
        }
    }
    (r, len.expect("content-length"))
}

#[test]
fn qemu_nbd_dying_mid_get_cuts_the_body_short_and_the_server_recovers() {
    let dir = TempDir::new("die-get");
    let image = dir.join("disk.raw");
    let size = 64 * MIB;
    let data = pattern_bytes(size as usize, 11);
    std::fs::write(&image, &data).unwrap();
    let socket = dir.join("nbd.sock");
    let mut nbd = QemuNbd::start(&image, &socket, NbdOpts::raw());
    let cfg = TempDir::new("die-get-cfg");
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);

    let (mut body, len) = start_get(&server, "/images/t");
    assert_eq!(len, size);
    // The server reads only a few MiB ahead of a client that is not reading.
    let mut got = vec![0u8; MIB as usize];
    body.read_exact(&mut got).unwrap();
    nbd.stop_with(libc::SIGKILL);
    body.read_to_end(&mut got)
        .expect("the server closes the connection rather than hang");
    assert!(
        (got.len() as u64) < size,
        "a body cut short is never complete: got all {size} bytes"
    );
    assert_same(&got, &data[..got.len()], "bytes before the cut");

    // The dead connection was not pooled: with qemu-nbd back, requests work.
    let nbd = QemuNbd::start(&image, &socket, NbdOpts::raw());
    assert_same(
        &get_range(&server, "t", 5, 2 * MIB),
        &data[5..=2 * MIB as usize],
        "GET after qemu-nbd restarted",
    );
    drop(nbd);
}

#[test]
fn a_failed_read_among_those_in_flight_cuts_the_get_short() {
    let dir = TempDir::new("eio-get");
    let size = 16 * MIB;
    let data = pattern_bytes(size as usize, 12);
    let bad = 9 * MIB + 4096;
    let (_image, spec) = blkdebug_image(&dir, &data, bad, "read_aio");
    let nbd = QemuNbd::start(Path::new(&spec), &dir.join("nbd.sock"), NbdOpts::raw());
    let cfg = TempDir::new("eio-get-cfg");
    let server = Server::start(cfg.path(), &[]);
    server.add_nbd("t", &nbd);

    let (mut body, len) = start_get(&server, "/images/t");
    assert_eq!(len, size);
    let mut got = Vec::new();
    body.read_to_end(&mut got)
        .expect("the server closes the connection rather than hang");
    // actix drops what it had buffered when the body fails, so fewer bytes
    // may arrive than were read; never any from the unreadable chunk on.
    assert!(
        (got.len() as u64) <= bad,
        "{} bytes arrived, past the unreadable offset {bad}",
        got.len()
    );
    assert_same(&got, &data[..got.len()], "bytes before the failed read");
    assert!(server.wait_log("GET error image_id=t", Duration::from_secs(5)));

    // The readable part still reads, on a fresh connection.
    assert_same(
        &get_range(&server, "t", 10 * MIB, 12 * MIB - 1),
        &data[10 * MIB as usize..12 * MIB as usize],
        "GET of a readable range",
    );
}
