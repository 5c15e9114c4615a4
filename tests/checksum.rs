//! `GET /images/{id}/checksum` and `/checksum/algorithms`: the checksum
//! equals one computed here, independently, over the image's bytes as
//! nbdcopy reads them (imageio's definition: the digest of the per-block
//! digests); validation errors; the reader limit. Real qemu-nbd, the real
//! server binary.

pub mod common;

use std::process::Command;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use common::*;
use serde_json::json;

const ALGORITHMS: [&str; 12] = [
    "blake2b", "blake2s", "md5", "sha1", "sha224", "sha256", "sha384", "sha3_224", "sha3_256",
    "sha3_384", "sha3_512", "sha512",
];

/// H(H(block0) || H(block1) || …) over `data` in blocks of `bs`.
fn blkhash<D: Digest>(data: &[u8], bs: usize) -> String {
    let mut outer = D::new();
    for block in data.chunks(bs) {
        outer.update(D::digest(block));
    }
    outer
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The guest-visible bytes of an export, as nbdcopy reads them.
fn nbdcopy(uri: &str, dir: &TempDir) -> Vec<u8> {
    let out = dir.join("copy.raw");
    run(Command::new("nbdcopy").arg(uri).arg(&out));
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// A qcow2 of 13 MiB + 4.5 KiB (qcow2 sizes are whole sectors): data, allocated zeroes, an
/// all-zero data write and unallocated clusters, with an unaligned end.
fn qcow2_with_holes(dir: &TempDir) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    let size = 13 * MIB + 4096 + 512;
    create_image(&img, "qcow2", size);
    qemu_io_write(&img, "qcow2", 0, MIB, 0x11);
    qemu_io_write(&img, "qcow2", 5 * MIB + 512, 300 * 1024, 0x22);
    qemu_io_write(&img, "qcow2", 8 * MIB, 64 * 1024, 0);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -z 9M 2M"])
        .arg(&img));
    qemu_io_write(&img, "qcow2", 13 * MIB, 4096, 0x33);
    img
}

#[test]
fn checksum_equals_an_independent_blkhash() {
    let dir = TempDir::new("checksum");
    let img = qcow2_with_holes(&dir);
    let mut opts = NbdOpts::qcow2();
    opts.read_only = true;
    let nbd = QemuNbd::start(&img, &dir.join("disk.sock"), opts);
    let data = nbdcopy(&nbd.uri(), &dir);
    assert_eq!(data.len() as u64, 13 * MIB + 4096 + 512);
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &[]);
    server.register_nbd("q", &nbd);

    let r = server.get("/images/q/checksum");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    // Field order too: imageio's.
    assert_eq!(
        r.text(),
        json!({
            "algorithm": "blake2b",
            "block_size": 4 * MIB,
            "checksum": blkhash::<Blake2b<U32>>(&data, 4 * MIB as usize),
        })
        .to_string()
    );

    let want = [
        ("sha256", MIB, blkhash::<sha2::Sha256>(&data, MIB as usize)),
        (
            "md5",
            16 * MIB,
            blkhash::<md5::Md5>(&data, 16 * MIB as usize),
        ),
        (
            "sha1",
            2 * MIB + 4096,
            blkhash::<sha1::Sha1>(&data, 2 * MIB as usize + 4096),
        ),
        (
            "sha3_256",
            4 * MIB,
            blkhash::<sha3::Sha3_256>(&data, 4 * MIB as usize),
        ),
        (
            "blake2s",
            MIB,
            blkhash::<blake2::Blake2s256>(&data, MIB as usize),
        ),
    ];
    for (alg, bs, sum) in want {
        let r = server.get(&format!(
            "/images/q/checksum?algorithm={alg}&block_size={bs}"
        ));
        assert_eq!(
            r.json(),
            json!({"algorithm": alg, "block_size": bs, "checksum": sum}),
            "{alg}"
        );
    }
    for alg in ALGORITHMS {
        let r = server.get(&format!("/images/q/checksum?algorithm={alg}"));
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(r.json()["algorithm"], alg);
    }

    // A file-backed transfer gives the same checksum for the same bytes.
    let raw = dir.join("copy-for-file.raw");
    std::fs::write(&raw, &data).unwrap();
    server.add_transfer("f", &json!({"backend": "file", "file": raw}));
    let r = server.get("/images/f/checksum");
    assert_eq!(
        r.json()["checksum"],
        blkhash::<Blake2b<U32>>(&data, 4 * MIB as usize)
    );
}

#[test]
fn checksum_errors_algorithms_and_the_reader_limit() {
    let dir = TempDir::new("checksum-err");
    let img = dir.join("disk.raw");
    std::fs::write(&img, pattern_bytes(40 * MIB as usize, 5)).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join("disk.sock"), NbdOpts::raw());
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &["--max-requests", "1", "--max-waiting", "0"]);
    server.add_nbd("r", &nbd);

    // The algorithms list needs no transfer (as in imageio).
    for path in [
        "/images/r/checksum/algorithms",
        "/images/unknown/checksum/algorithms/",
    ] {
        let r = server.get(path);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json(), json!({"algorithms": ALGORITHMS}));
    }
    assert_err(
        &server.get("/images/unknown/checksum"),
        404,
        "unknown image_id",
    );
    assert_err(&server.get("/images/r/checksum/other"), 404, "not found");

    let list = ALGORITHMS
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    assert_err(
        &server.get("/images/r/checksum?algorithm=shake_128"),
        400,
        &format!("Unsupported value \"shake_128\" for \"algorithm\", expecting one of [{list}]"),
    );
    assert_err(
        &server.get("/images/r/checksum?algorithm="),
        400,
        &format!("Unsupported value \"\" for \"algorithm\", expecting one of [{list}]"),
    );
    assert_err(
        &server.get("/images/r/checksum?block_size=4MiB"),
        400,
        "Invalid block size: \"4MiB\"",
    );
    for bad in ["1044480", "16781312", "0", "-1"] {
        assert_err(
            &server.get(&format!("/images/r/checksum?block_size={bad}")),
            400,
            "Block size out of allowed range: 1048576-16777216",
        );
    }
    assert_err(
        &server.get("/images/r/checksum?block_size=1050000"),
        400,
        "Block size is not aligned to 4096",
    );
    assert_err(
        &server.get("/images/r/checksum?algorithm=sha1&block_size=1048577"),
        400,
        "Block size is not aligned to 4096",
    );

    // A checksum reads the whole image: it is a data request. With the
    // only request slot held by a stalled GET it is refused.
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    use std::io::{Read, Write};
    write!(s, "GET /images/r HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    assert_err(&server.get("/images/r/checksum"), 503, "too many requests");
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = server.get("/images/r/checksum");
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", r.text());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An image too fragmented for a checksum to hold its zero extents (more
/// than `CHECKSUM_MAX_EXTENTS`, 65,536 block status pairs): the checksum
/// reads every block instead, with the same result, and says so in the log.
#[test]
fn a_checksum_of_a_very_fragmented_image_reads_every_block() {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("checksum-frag");
    let img = dir.join("frag.raw");
    // 4 KiB of data every 8 KiB over 288 MiB: 73,728 data extents, as many holes.
    let size = 288 * MIB as usize;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size as u64).unwrap();
    let mut data = vec![0u8; size];
    for (i, at) in (0..size).step_by(8192).enumerate() {
        let block = pattern_bytes(4096, i as u64 + 1);
        f.write_all_at(&block, at as u64).unwrap();
        data[at..at + 4096].copy_from_slice(&block);
    }
    drop(f);
    let nbd = QemuNbd::start(&img, &dir.join("frag.sock"), NbdOpts::raw());
    let cfg = dir.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let server = Server::start(&cfg, &[]);
    server.add_nbd("frag", &nbd);
    let r = server.get("/images/frag/checksum");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({
            "algorithm": "blake2b",
            "block_size": 4194304,
            "checksum": blkhash::<Blake2b<U32>>(&data, 4 * MIB as usize),
        })
    );
    assert_eq!(
        server.logged("image_id=frag: more than 65536 extents before offset 0", 1),
        1,
        "{}",
        server.log()
    );
}
