//! SIGTERM/SIGINT: the server stops accepting, lets in-flight transfers
//! finish, flushes what was written, and exits 0.

pub mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

#[test]
fn upload_in_flight_at_sigterm_completes_and_is_readable() {
    let tmp = TempDir::new("shutdown");
    let img = tmp.join("disk.raw");
    create_image(&img, "raw", 8 * MIB);
    let nbd = QemuNbd::start(&img, &tmp.join("nbd.sock"), NbdOpts::raw());
    let cfg = tmp.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let mut server = Server::start(&cfg, &["--shutdown-timeout", "20"]);
    server.add_nbd("t1", &nbd);

    let data = pattern_bytes(4 * MIB as usize, 7);
    let mut client = server.client();
    let len = data.len().to_string();
    let headers =
        format!("PUT /images/t1?flush=y HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n");
    client.stream().write_all(headers.as_bytes()).unwrap();
    client.stream().write_all(&data[..MIB as usize]).unwrap();
    client.stream().flush().unwrap();
    assert!(
        server.wait_log("PUT start image_id=t1", Duration::from_secs(10)),
        "{}",
        server.log()
    );

    server.signal(libc::SIGTERM);
    // The server no longer accepts new connections once it has begun stopping.
    let mut refused = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(server.addr).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused, "listener still accepting after SIGTERM");

    client.stream().write_all(&data[MIB as usize..]).unwrap();
    let resp = client.read_response(false);
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json(),
        serde_json::json!({"ok": true, "bytes_written": data.len(), "flushed": true})
    );
    drop(client);

    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("server exits after the upload");
    assert!(status.success(), "exit status {status:?}\n{}", server.log());

    // Read back through NBD, independently of the server.
    let out = run(std::process::Command::new("nbdcopy")
        .arg(nbd.uri())
        .arg(tmp.join("back.raw")));
    assert!(out.status.success());
    let back = std::fs::read(tmp.join("back.raw")).unwrap();
    assert_eq!(back.len() as u64, 8 * MIB);
    assert!(back[..data.len()] == data[..], "uploaded bytes differ");
    assert!(back[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn sigint_with_idle_keepalive_connection_exits_zero() {
    let tmp = TempDir::new("sigint");
    let img = tmp.join("disk.raw");
    create_image(&img, "raw", MIB);
    let nbd = QemuNbd::start(&img, &tmp.join("nbd.sock"), NbdOpts::raw());
    let cfg = tmp.join("cfg");
    std::fs::create_dir(&cfg).unwrap();
    let mut server = Server::start(&cfg, &["--shutdown-timeout", "3"]);
    server.add_nbd("t1", &nbd);
    let mut client = server.client();
    let r = client.request("GET", "/images/t1", &[("Range", "bytes=0-9")], b"");
    assert_eq!(r.status, 206);
    // An unflushed write, so shutdown has something to flush.
    let r = client.request("PATCH", "/images/t1", &[("Range", "bytes=0-3")], b"abcd");
    assert_eq!(r.status, 200, "{}", r.text());
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("server exits");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        server.wait_log("flushed image_id=t1 at shutdown", Duration::from_secs(5)),
        "{}",
        server.log()
    );
}

/// Shutdown flushes a file transfer only when the file backend says a
/// completed upload is not covered by a flush: an upload without `flush`
/// is fsynced at shutdown; one with `flush`, or one followed by a flush
/// request, is not fsynced again.
#[test]
fn file_uploads_are_flushed_at_shutdown_only_when_no_flush_covered_them() {
    for (tag, put, flush_after, flushed_at_shutdown) in [
        ("fsd-unflushed", "/images/f", false, 1),
        ("fsd-put-flush", "/images/f?flush=y", false, 0),
        ("fsd-flushed", "/images/f", true, 0),
    ] {
        let mut env = Env::new(tag, &[]);
        let path = env.dir.join("disk.img");
        std::fs::write(&path, b"old bytes").unwrap();
        env.file_transfer("f", &path);
        let r = env.server.request("PUT", put, &[], b"new bytes!");
        assert_eq!(r.status, 200, "{tag}: {}", r.text());
        if flush_after {
            let r = env.server.request("POST", "/images/f/flush", &[], b"");
            assert_eq!(r.status, 200, "{tag}: {}", r.text());
        }
        env.server.signal(libc::SIGTERM);
        let status = env
            .server
            .wait_exit(Duration::from_secs(30))
            .expect("server exits");
        assert!(status.success(), "{tag}: exit status {status:?}");
        assert_eq!(
            env.server.log_count("flushed image_id=f at shutdown"),
            flushed_at_shutdown,
            "{tag}: {}",
            env.server.log()
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"new bytes!", "{tag}");
    }
}
