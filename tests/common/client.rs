//! A raw HTTP/1.1 client: tests control every byte that goes on the wire
//! and read responses (and their interim `1xx`) as they come.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::server::Server;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client over one connection: TCP, or the server's
/// HTTP Unix socket.
pub struct Client<S = TcpStream> {
    stream: BufReader<S>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to server");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set timeout");
        stream.set_nodelay(true).ok();
        Client {
            stream: BufReader::new(stream),
        }
    }
}

impl Client<UnixStream> {
    pub fn connect_unix(path: &Path) -> Client<UnixStream> {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set timeout");
        Client {
            stream: BufReader::new(stream),
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// A client over a stream the test connected itself (e.g. TLS).
    pub fn over(stream: S) -> Client<S> {
        Client {
            stream: BufReader::new(stream),
        }
    }

    pub fn stream(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    /// Sends a request. A Content-Length header is added for a non-empty body
    /// unless `headers` sets one (or sets Transfer-Encoding).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.send(method, path, headers, body);
        self.read_response(method == "HEAD")
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !has("content-length")
            && !has("transfer-encoding")
            && (!body.is_empty() || method == "PUT" || method == "PATCH" || method == "POST")
        {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).expect("send head");
        s.write_all(body).expect("send body");
        s.flush().expect("flush");
    }

    /// Reads one response (Content-Length or chunked body).
    pub fn read_response(&mut self, head_only: bool) -> Response {
        self.try_read_response(head_only).expect("read response")
    }

    pub fn try_read_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        loop {
            let resp = self.read_one(head_only)?;
            if resp.status == 100 {
                continue;
            }
            return Ok(resp);
        }
    }

    /// Reads a status line and headers, leaving the body unread (see
    /// [`Client::reader`]). Header names lower-cased; repeats joined by ", ".
    pub fn read_head(&mut self) -> std::io::Result<(u16, BTreeMap<String, String>)> {
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let mut parts = line.split_whitespace();
        let _version = parts.next();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                let v = v.trim().to_string();
                headers
                    .entry(k)
                    .and_modify(|old: &mut String| {
                        old.push_str(", ");
                        old.push_str(&v);
                    })
                    .or_insert(v);
            }
        }
        Ok((status, headers))
    }

    /// Reads the next response as it comes, interim `1xx` responses included
    /// (`read_response` skips them).
    pub fn read_any(&mut self) -> std::io::Result<Response> {
        self.read_one(false)
    }

    /// Reads what the server sends until it closes the connection (or the
    /// read fails): how many bytes came.
    pub fn read_until_closed(&mut self) -> usize {
        let mut n = 0;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k,
            }
        }
    }

    /// The buffered reader of the connection (to read a body piecewise).
    pub fn reader(&mut self) -> &mut BufReader<S> {
        &mut self.stream
    }

    fn read_one(&mut self, head_only: bool) -> std::io::Result<Response> {
        let (status, headers) = self.read_head()?;
        let mut body = Vec::new();
        if !head_only && status != 100 && status != 204 && status != 304 {
            if let Some(len) = headers.get("content-length") {
                let len: usize = len.parse().map_err(std::io::Error::other)?;
                body.resize(len, 0);
                self.stream.read_exact(&mut body)?;
            } else if headers
                .get("transfer-encoding")
                .is_some_and(|t| t.contains("chunked"))
            {
                loop {
                    let mut sz = String::new();
                    self.stream.read_line(&mut sz)?;
                    let n = usize::from_str_radix(sz.trim(), 16).map_err(std::io::Error::other)?;
                    let mut chunk = vec![0; n + 2];
                    self.stream.read_exact(&mut chunk)?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
            } else {
                self.stream.read_to_end(&mut body)?;
            }
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// One request on a fresh connection whose body the server may refuse
/// without reading it: the body is written from a thread (write errors
/// ignored) while the response is read, then the connection is closed.
pub fn request_unread(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Response {
    let mut c = server.client();
    let len = body.len().to_string();
    let mut all = headers.to_vec();
    all.push(("Content-Length", &len));
    c.send(method, path, &all, b"");
    let mut w = c.stream().try_clone().expect("clone stream");
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&body);
    });
    let resp = c.read_response(false);
    let _ = c.stream().shutdown(std::net::Shutdown::Both);
    writer.join().expect("body writer");
    resp
}
