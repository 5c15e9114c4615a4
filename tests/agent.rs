//! What the CloudStack KVM agent needs of the server, besides the HTTP API:
//! the newest upstream defaults, its command line after the operator's
//! flags, every control-socket client it has shipped, and its certificate
//! files. The whole start/stop cycle against the installed package is
//! tests/agent_replay.py (`make test-package`).

pub mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;

/// Port and parallelism of the newest upstream image server
/// (imageserver/constants.py: DEFAULT_HTTP_PORT, MAX_PARALLEL_READS/WRITES),
/// the agent's IMAGE_SERVER_DEFAULT_PORT.
#[test]
fn defaults_are_the_newest_upstream_servers() {
    let out = Command::new(server_binary())
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // Each flag's paragraph, up to the next flag.
    let default_of = |flag: &str| -> String {
        let start = help
            .find(&format!("  {flag} "))
            .unwrap_or_else(|| panic!("{flag} in --help:\n{help}"));
        let rest = &help[start + 2..];
        let end = rest[2..].find("\n  --").map_or(rest.len(), |e| e + 2);
        let para = &rest[..end];
        let d = para
            .find("[default: ")
            .unwrap_or_else(|| panic!("no default for {flag}: {para}"));
        para[d + 10..].split(']').next().unwrap().to_string()
    };
    assert_eq!(default_of("--port"), "54322");
    assert_eq!(default_of("--max-readers"), "4");
    assert_eq!(default_of("--max-writers"), "4");
    assert!(
        help.ends_with("\nA flag given twice counts once, with its last value.\n"),
        "{help}"
    );

    let cfg = TempDir::new("agent-defaults");
    let img = cfg.join("d.raw");
    raw_image(&img, 1 << 20, 0, &[]);
    let nbd = QemuNbd::start(&img, &cfg.join("d.sock"), NbdOpts::raw());
    let server = Server::start(cfg.path(), &[]);
    server.register_nbd("d", &nbd);
    let r = server.request("OPTIONS", "/images/d", &[], b"");
    assert_eq!(
        r.json(),
        json!({"unix_socket": null, "features": ["extents", "zero", "flush"],
               "max_readers": 4, "max_writers": 4})
    );
}

/// packaging/imageserver puts the operator's CSIS_AGENT_ARGS before the
/// agent's flags: a flag given twice takes its last value, so the agent's
/// --listen and --port win and the server starts.
#[test]
fn the_last_of_a_repeated_flag_wins() {
    let cfg = TempDir::new("agent-repeat");
    // Server::start gives --listen 127.0.0.1 --port 0 first; these follow.
    let server = Server::start(
        cfg.path(),
        &[
            "--max-requests",
            "1",
            "--max-readers",
            "9",
            "--listen",
            "127.0.0.1",
            "--port",
            "0",
            "--max-readers",
            "3",
        ],
    );
    assert_eq!(server.addr.ip().to_string(), "127.0.0.1");
    let img = cfg.join("r.raw");
    raw_image(&img, 1 << 20, 0, &[]);
    let nbd = QemuNbd::start(&img, &cfg.join("r.sock"), NbdOpts::raw());
    server.register_nbd("r", &nbd);
    let r = server.request("OPTIONS", "/images/r", &[], b"");
    assert_eq!(r.json()["max_readers"], json!(3));
}

/// One request the way the newer agent's Java client sends it: one line,
/// then half-close, then read up to the first newline (5 s deadline).
fn half_closed(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.ends_with('\n'), "{line:?}");
    serde_json::from_str(&line).unwrap()
}

/// One line, write side left open: the reply must come anyway, and the
/// server closes the connection after it.
fn kept_open(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    assert!(text.ends_with('\n'));
    serde_json::from_str(&text).unwrap()
}

/// The older agent's exact command: `echo '<json>' | socat -t5 - UNIX-CONNECT:<sock>`.
fn socat(socket: &Path, request: &serde_json::Value) -> serde_json::Value {
    let line = request.to_string().replace('\'', r"'\''");
    let out = Command::new("/bin/bash")
        .arg("-c")
        .arg(format!(
            "echo '{line}' | socat -t5 - UNIX-CONNECT:{}",
            socket.display()
        ))
        .stderr(Stdio::inherit())
        .output()
        .expect("socat (scripts/deps.sh installs it)");
    assert!(out.status.success(), "socat: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches('\n').count(), 1, "{text:?}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_agent_control_client_gets_its_answer() {
    let dir = TempDir::new("agent-ctl");
    let cfg = TempDir::new("agent-ctl-cfg");
    let mut nbds = Vec::new();
    for name in ["a", "b", "c"] {
        let img = dir.join(&format!("{name}.raw"));
        raw_image(&img, 1 << 20, 0, &[]);
        nbds.push(QemuNbd::start(
            &img,
            &dir.join(&format!("{name}.sock")),
            NbdOpts::raw(),
        ));
    }
    let server = Server::start(cfg.path(), &[]);
    let sock: PathBuf = server.control_socket.clone();
    let register = |id: &str, nbd: &QemuNbd| {
        // The agent's payload: backend, socket, export, idle timeout (and a
        // token from a fork of the agent, which the server ignores).
        let mut config = nbd_config(nbd);
        config["idle_timeout_seconds"] = json!(3600);
        config["token"] = json!("ignored");
        json!({"action": "register", "transfer_id": id, "config": config})
    };
    let ok = |n: u64| json!({"status": "ok", "active_transfers": n});

    assert_eq!(half_closed(&sock, &json!({"action": "status"})), ok(0));
    assert_eq!(kept_open(&sock, &json!({"action": "status"})), ok(0));
    assert_eq!(socat(&sock, &json!({"action": "status"})), ok(0));

    assert_eq!(half_closed(&sock, &register("a", &nbds[0])), ok(1));
    assert_eq!(kept_open(&sock, &register("b", &nbds[1])), ok(2));
    assert_eq!(socat(&sock, &register("c", &nbds[2])), ok(3));
    for id in ["a", "b", "c"] {
        assert_eq!(server.get(&format!("/images/{id}")).status, 200, "{id}");
    }

    // Unregistering an id the server does not hold is "ok" with the count:
    // an error would make the agent stop the server under the others.
    let unregister = |id: &str| json!({"action": "unregister", "transfer_id": id});
    assert_eq!(socat(&sock, &unregister("never-registered")), ok(3));
    assert_eq!(half_closed(&sock, &unregister("a")), ok(2));
    assert_eq!(half_closed(&sock, &unregister("a")), ok(2));
    assert_eq!(kept_open(&sock, &unregister("b")), ok(1));
    assert_eq!(socat(&sock, &unregister("c")), ok(0));
    assert_eq!(socat(&sock, &unregister("c")), ok(0));
}

/// cloud.crt as CloudStack writes it (the host certificate followed by its
/// chain) and cloud.key as PKCS#8 or PKCS#1: a client that trusts only the
/// root CA accepts the server, so the whole chain is sent.
#[test]
fn the_agents_certificate_chain_and_keys() {
    let dir = TempDir::new("agent-tls");
    let cfg = TempDir::new("agent-tls-cfg");
    // Arguments separated by spaces (none contains one).
    let openssl = |args: &str| {
        run(Command::new("openssl")
            .current_dir(dir.path())
            .args(args.split_whitespace())
            .stderr(Stdio::null()));
    };
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=root -keyout root.key -out root.crt",
    );
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    openssl("req -newkey rsa:2048 -nodes -subj /CN=intermediate -keyout mid.key -out mid.csr");
    openssl("x509 -req -in mid.csr -CA root.crt -CAkey root.key -CAcreateserial -days 2 -extfile ca.ext -out mid.crt");
    std::fs::write(dir.join("host.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl("req -newkey rsa:2048 -nodes -subj /CN=kvm-host -keyout host.key -out host.csr");
    openssl("x509 -req -in host.csr -CA mid.crt -CAkey mid.key -CAcreateserial -days 2 -extfile host.ext -out host.crt");
    let mut chain = std::fs::read(dir.join("host.crt")).unwrap();
    chain.extend(std::fs::read(dir.join("mid.crt")).unwrap());
    chain.extend(std::fs::read(dir.join("root.crt")).unwrap());
    std::fs::write(dir.join("cloud.crt"), chain).unwrap();
    openssl("pkey -in host.key -out cloud.pkcs8.key");
    openssl("rsa -traditional -in host.key -out cloud.pkcs1.key");
    for (key, head) in [
        ("cloud.pkcs8.key", "-----BEGIN PRIVATE KEY-----"),
        ("cloud.pkcs1.key", "-----BEGIN RSA PRIVATE KEY-----"),
    ] {
        let text = std::fs::read_to_string(dir.join(key)).unwrap();
        assert!(text.starts_with(head), "{key}: {text}");
        let crt = dir.join("cloud.crt");
        let keyp = dir.join(key);
        let mut args = common::tls::tls_args(&crt, &keyp);
        let ctl = cfg.join(&format!(".{key}.sock"));
        args.extend(["--control-socket", ctl.to_str().unwrap()]);
        let server = Server::start(cfg.path(), &args);
        assert_eq!(server.scheme, "https");
        let out = Command::new("curl")
            .args(["-s", "--max-time", "30", "--cacert"])
            .arg(dir.join("root.crt"))
            .arg(format!("https://{}/info/", server.addr))
            .output()
            .unwrap();
        assert!(out.status.success(), "{key}: {out:?}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!(r#"{{"version":"{}"}}"#, env!("CARGO_PKG_VERSION"))
        );
    }
}
