//! HTTPS with `--tls-enabled --tls-cert-file … --tls-key-file …`: a
//! self-signed certificate made by openssl, curl with `--cacert` as the
//! client. As CloudStack's newer image server, a certificate and key without
//! `--tls-enabled` mean plain HTTP (with a warning), and `--tls-enabled`
//! without them does not start.

pub mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::{make_cert, tls_args};
use common::*;

/// curl with the certificate as the only trusted CA; returns (exit ok, stdout).
fn curl(cacert: &Path, args: &[&str]) -> (bool, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "--cacert"])
        .arg(cacert)
        .args(args)
        .output()
        .expect("run curl");
    (out.status.success(), out.stdout)
}

#[test]
fn https_serves_reads_and_writes() {
    let dir = TempDir::new("tls");
    let cfg = TempDir::new("tls-cfg");
    let (cert, key) = make_cert(&dir, "rsa", &["rsa:2048"]);
    let img = dir.join("img.raw");
    let data = pattern_bytes(3 * MIB as usize, 11);
    std::fs::write(&img, &data).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join("a.sock"), NbdOpts::raw());
    let server = Server::start(cfg.path(), &tls_args(&cert, &key));
    assert_eq!(server.scheme, "https");
    assert!(server.url("t").starts_with("https://127.0.0.1:"));
    server.add_nbd("t", &nbd);

    let (ok, body) = curl(&cert, &[&server.url("t")]);
    assert!(ok);
    assert!(body == data, "full GET over TLS");
    let (ok, body) = curl(&cert, &["-H", "Range: bytes=1000-1999", &server.url("t")]);
    assert!(ok);
    assert!(body == data[1000..2000]);
    let (ok, body) = curl(&cert, &["-X", "OPTIONS", &server.url("*")]);
    assert!(ok);
    assert_eq!(
        String::from_utf8_lossy(&body),
        r#"{"unix_socket":null,"features":["extents","zero","flush"],"max_readers":4,"max_writers":4}"#
    );

    // A ranged PUT over TLS, read back.
    let chunk = pattern_bytes(65536, 12);
    let chunk_file = dir.join("chunk.bin");
    std::fs::write(&chunk_file, &chunk).unwrap();
    let (ok, body) = curl(
        &cert,
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Range: bytes 65536-131071/*",
            "--data-binary",
            &format!("@{}", chunk_file.display()),
            &server.url("t"),
        ],
    );
    assert!(ok);
    assert_eq!(
        String::from_utf8_lossy(&body),
        r#"{"ok":true,"bytes_written":65536,"flushed":false}"#
    );
    let (ok, body) = curl(
        &cert,
        &["-H", "Range: bytes=65536-131071", &server.url("t")],
    );
    assert!(ok);
    assert!(body == chunk);

    // Without the CA the certificate is not trusted.
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "30",
            "-o",
            "/dev/null",
            &server.url("t"),
        ])
        .env("SSL_CERT_FILE", "/nonexistent")
        .env("CURL_CA_BUNDLE", "/nonexistent")
        .status()
        .unwrap();
    assert!(!out.success());
}

#[test]
fn plain_http_to_the_tls_port_fails_cleanly_and_the_server_keeps_serving() {
    let dir = TempDir::new("tls-plain");
    let cfg = TempDir::new("tls-plain-cfg");
    let (cert, key) = make_cert(&dir, "rsa", &["rsa:2048"]);
    let server = Server::start(cfg.path(), &tls_args(&cert, &key));

    // A raw plain-HTTP request: no HTTP response, the connection ends.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /info/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    let _ = s.read_to_end(&mut got);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the server closes the connection"
    );
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );

    // curl over plain http fails.
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30"])
        .arg(format!("http://{}/info/", server.addr))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());

    // The server still serves TLS.
    let (ok, body) = curl(&cert, &[&format!("https://{}/info/", server.addr)]);
    assert!(ok);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn rsa_pkcs1_and_ec_keys_work() {
    let dir = TempDir::new("tls-keys");
    let cfg = TempDir::new("tls-keys-cfg");
    let (rsa_cert, rsa_key) = make_cert(&dir, "rsa", &["rsa:2048"]);
    let pkcs1 = dir.join("rsa.pkcs1.key");
    run(Command::new("openssl")
        .args(["rsa", "-traditional", "-in"])
        .arg(&rsa_key)
        .arg("-out")
        .arg(&pkcs1)
        .stderr(Stdio::null()));
    assert!(std::fs::read_to_string(&pkcs1)
        .unwrap()
        .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let (ec_cert, ec_key) = make_cert(
        &dir,
        "ec",
        &["ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
    );
    let sec1 = dir.join("ec.sec1.key");
    run(Command::new("openssl")
        .args(["ec", "-in"])
        .arg(&ec_key)
        .arg("-out")
        .arg(&sec1)
        .stderr(Stdio::null()));
    assert!(std::fs::read_to_string(&sec1)
        .unwrap()
        .starts_with("-----BEGIN EC PRIVATE KEY-----"));

    for (i, (cert, key)) in [(&rsa_cert, &pkcs1), (&ec_cert, &ec_key), (&ec_cert, &sec1)]
        .into_iter()
        .enumerate()
    {
        let sock = cfg.join(&format!(".ctl{i}.sock"));
        let mut args = tls_args(cert, key);
        args.extend(["--control-socket", sock.to_str().unwrap()]);
        let server = Server::start(cfg.path(), &args);
        let (ok, body) = curl(cert, &[&format!("https://{}/info/", server.addr)]);
        assert!(ok, "{}", key.display());
        assert!(body.starts_with(b"{\"version\""));
        // TLS 1.2 is accepted too.
        let (ok, _) = curl(
            cert,
            &[
                "--tls-max",
                "1.2",
                &format!("https://{}/info/", server.addr),
            ],
        );
        assert!(ok, "TLS 1.2 with {}", key.display());
    }
}

/// Runs the server expecting it to refuse to start; returns its stderr.
fn start_fails(cfg: &TempDir, args: &[&str]) -> String {
    let mut child = Command::new(server_binary())
        .args(["--listen", "127.0.0.1", "--port", "0", "--config-dir"])
        .arg(cfg.path())
        .arg("--control-socket")
        .arg(cfg.join(".ctl.sock"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("server with {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{args:?} must fail");
    assert!(!stdout.contains("listening on"), "{stdout}");
    stderr
}

#[test]
fn bad_certificate_or_key_files_stop_the_start() {
    let dir = TempDir::new("tls-bad");
    let cfg = TempDir::new("tls-bad-cfg");
    let (cert, key) = make_cert(&dir, "a", &["rsa:2048"]);
    let (other_cert, _) = make_cert(&dir, "b", &["rsa:2048"]);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let missing = dir.join("missing.pem");
    let c = |p: &Path| p.to_str().unwrap().to_string();

    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "--tls-enabled".into(),
                "--tls-cert-file".into(),
                c(&missing),
                "--tls-key-file".into(),
                c(&key),
            ],
            format!("cannot read TLS certificate file {}", missing.display()),
        ),
        (
            vec![
                "--tls-enabled".into(),
                "--tls-cert-file".into(),
                c(&cert),
                "--tls-key-file".into(),
                c(&missing),
            ],
            format!("cannot read TLS key file {}", missing.display()),
        ),
        (
            vec![
                "--tls-enabled".into(),
                "--tls-cert-file".into(),
                c(&garbage),
                "--tls-key-file".into(),
                c(&key),
            ],
            format!("no certificate found in {}", garbage.display()),
        ),
        (
            vec![
                "--tls-enabled".into(),
                "--tls-cert-file".into(),
                c(&cert),
                "--tls-key-file".into(),
                c(&cert),
            ],
            format!(
                "no private key (PKCS#8, RSA or EC) found in {}",
                cert.display()
            ),
        ),
        (
            vec![
                "--tls-enabled".into(),
                "--tls-cert-file".into(),
                c(&other_cert),
                "--tls-key-file".into(),
                c(&key),
            ],
            format!(
                "TLS key {} does not match certificate {}",
                key.display(),
                other_cert.display()
            ),
        ),
        (
            vec!["--tls-cert-file".into(), c(&cert)],
            "--tls-key-file".into(),
        ),
        (
            vec!["--tls-enabled".into()],
            "--tls-enabled needs --tls-cert-file and --tls-key-file".into(),
        ),
        (
            vec!["--tls-enabled".into(), "--tls-key-file".into(), c(&key)],
            "--tls-cert-file".into(),
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = start_fails(&cfg, &args);
        assert!(stderr.contains(&needle), "{args:?}: {stderr}");
    }
}

/// The newer agent passes `--tls-enabled` to turn HTTPS on; without it a
/// certificate and key are not used (not even read): plain HTTP, and the
/// log says why.
#[test]
fn cert_and_key_without_tls_enabled_mean_plain_http_with_a_warning() {
    let dir = TempDir::new("tls-off");
    let cfg = TempDir::new("tls-off-cfg");
    let (cert, key) = make_cert(&dir, "rsa", &["rsa:2048"]);
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    for (i, (cert, key)) in [(&cert, &key), (&garbage, &garbage)]
        .into_iter()
        .enumerate()
    {
        let sock = cfg.join(&format!(".ctl{i}.sock"));
        let server = Server::start(
            cfg.path(),
            &[
                "--tls-cert-file",
                cert.to_str().unwrap(),
                "--tls-key-file",
                key.to_str().unwrap(),
                "--control-socket",
                sock.to_str().unwrap(),
            ],
        );
        assert_eq!(server.scheme, "http");
        let r = server.get("/info/");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
        );
        let warning = format!(
            "--tls-cert-file {} and --tls-key-file {} are ignored without --tls-enabled: serving plain HTTP",
            cert.display(),
            key.display()
        );
        server.logged(&warning, 1);
    }
}

/// 64 MiB up and down through the direct paths (a PUT's body read straight
/// into the chunk, a GET's written from it), with curl held to TLS 1.2 and
/// to TLS 1.3: every byte arrives, both versions are served.
#[test]
fn large_transfers_over_tls_1_2_and_1_3() {
    let dir = TempDir::new("tls-large");
    let cfg = TempDir::new("tls-large-cfg");
    let (cert, key) = make_cert(&dir, "ec", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let img = dir.join("img.raw");
    let size = 64 * MIB as usize;
    std::fs::write(&img, vec![0u8; size]).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join("a.sock"), NbdOpts::raw());
    let server = Server::start(cfg.path(), &tls_args(&cert, &key));
    server.add_nbd("t", &nbd);
    let up = dir.join("up.bin");
    let down = dir.join("down.bin");
    for (seed, version, flags) in [
        (21, "TLSv1.2", &["--tlsv1.2", "--tls-max", "1.2"][..]),
        (22, "TLSv1.3", &["--tlsv1.3"][..]),
    ] {
        let data = pattern_bytes(size, seed);
        std::fs::write(&up, &data).unwrap();
        let out = Command::new("curl")
            .args(["-sS", "-v", "--max-time", "120", "--cacert"])
            .arg(&cert)
            .args(flags)
            .arg("-T")
            .arg(&up)
            .arg(server.url("t"))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert!(
            log.contains(&format!("SSL connection using {version}")),
            "{log}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(r#"{{"ok":true,"bytes_written":{size},"flushed":false}}"#)
        );
        let _ = std::fs::remove_file(&down);
        let (ok, _) = curl(
            &cert,
            &[flags, &["-o", down.to_str().unwrap(), &server.url("t")]].concat(),
        );
        assert!(ok);
        assert!(
            std::fs::read(&down).unwrap() == data,
            "{version}: GET returns the PUT's bytes"
        );
    }
}

/// A client that connects and sends nothing, or half a ClientHello, is
/// disconnected by the handshake timeout (3 s); the server serves on.
#[test]
fn a_handshake_that_does_not_finish_is_cut_off() {
    let dir = TempDir::new("tls-stall");
    let cfg = TempDir::new("tls-stall-cfg");
    let (cert, key) = make_cert(&dir, "ec", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let server = Server::start(cfg.path(), &tls_args(&cert, &key));
    // The first bytes of a TLS record holding a ClientHello, and no more.
    for sent in [&b""[..], &[22, 3, 1, 0x02, 0x00, 1, 0, 1][..]] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(sent).unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_secs(15),
            "closed after {took:?}"
        );
        assert!(got.is_empty(), "{got:?}");
    }
    let (ok, body) = curl(&cert, &[&format!("https://{}/info/", server.addr)]);
    assert!(ok);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
    );
}

/// A transport that sends one byte per write (TCP_NODELAY: one segment
/// each), so that the server receives records, even the handshake's, in
/// pieces.
struct Trickle(TcpStream);

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(&buf[..buf.len().min(1)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[test]
fn records_arriving_a_byte_at_a_time_are_served() {
    let dir = TempDir::new("tls-trickle");
    let cfg = TempDir::new("tls-trickle-cfg");
    let (cert, key) = make_cert(&dir, "ec", &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let img = dir.join("img.raw");
    std::fs::write(&img, vec![0u8; MIB as usize]).unwrap();
    let nbd = QemuNbd::start(&img, &dir.join("a.sock"), NbdOpts::raw());
    let server = Server::start(cfg.path(), &tls_args(&cert, &key));
    server.add_nbd("t", &nbd);
    let tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut tls = common::tls::tls_connect(&cert, Trickle(tcp));
    let body = pattern_bytes(40_000, 23);
    let head = format!(
        "PUT /images/t HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\
         Content-Range: bytes 4096-{}/*\r\n\r\n",
        body.len(),
        4096 + body.len() - 1
    );
    tls.write_all(head.as_bytes()).unwrap();
    tls.write_all(&body).unwrap();
    tls.flush().unwrap();
    let want = r#"{"ok":true,"bytes_written":40000,"flushed":false}"#;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(want.as_bytes()) {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let written = std::fs::read(&img).unwrap();
    assert!(written[4096..4096 + body.len()] == body[..]);
    assert!(written[..4096].iter().all(|&b| b == 0));
}
