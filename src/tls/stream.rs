//! The HTTPS connection as actix reads and writes it: a [`Session`] driven
//! over an async transport (the accepted `TcpStream`).
//!
//! - Reads: ciphertext is received up to [`super::READ_AHEAD`] bytes at a
//!   time; a read returns as much plaintext as the reader has room for and
//!   is received without waiting (one record per read would be a round
//!   through actix's dispatcher and the body reader per 16 KiB).
//! - Writes: up to [`super::WRITE_PIECE`] bytes of plaintext are encrypted
//!   per write and sent; what the socket does not take at once is sent
//!   before the next write is taken, and by `poll_flush`.
//! - `poll_shutdown` sends close_notify. The peer's close_notify is the end
//!   of the stream; the transport's end without it is an error
//!   (`UnexpectedEof`), as is any TLS error (its alert is sent first).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::session::{Read, Session};

/// A TLS server stream over `T`.
pub(crate) struct TlsStream<T> {
    io: T,
    tls: Session,
    /// An error met after some bytes were already returned: the next read's.
    error: Option<io::Error>,
}

/// Runs the TLS handshake on `io` (the caller bounds its time).
pub(crate) async fn accept<T>(io: T, config: Arc<ServerConfig>) -> io::Result<TlsStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let tls = Session::new(config).map_err(io::Error::other)?;
    let mut s = TlsStream {
        io,
        tls,
        error: None,
    };
    poll_fn(|cx| s.poll_handshake(cx)).await?;
    Ok(s)
}

impl<T: AsyncRead + AsyncWrite + Unpin> TlsStream<T> {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bounded: every round receives, or returns.
        loop {
            let done = match self.tls.handshake() {
                Ok(done) => done,
                Err(e) => return Poll::Ready(Err(self.failed(cx, e))),
            };
            // Sent while receiving: a peer may be sending too, and read
            // only once it has. What is left (TLS 1.3 session tickets)
            // goes with the first read or write.
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if done {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_receive(cx))?;
        }
    }

    /// Sends the ciphertext queued.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tls.to_send().is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.tls.to_send()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tls.sent(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Receives ciphertext (0 bytes: the transport ended).
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(self.tls.receive_room()?);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.tls.received(n);
        Poll::Ready(Ok(n))
    }

    /// `e`, after a try at sending what TLS queued for the peer (its alert).
    fn failed(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        let _ = self.poll_send(cx);
        e
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let start = buf.filled().len();
        // Bounded: every round fills more of `buf`, receives, or returns.
        while buf.remaining() > 0 {
            // What TLS itself has to say (key updates) goes first.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return this.read_error(start, buf, e);
            }
            let e = match this.tls.read(buf) {
                Ok(Read::Data(_)) => continue,
                Ok(Read::Eof) => break,
                Ok(Read::NeedInput) => match this.poll_receive(cx) {
                    Poll::Pending if buf.filled().len() == start => return Poll::Pending,
                    Poll::Pending => break,
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(e)) => e,
                },
                Err(e) => this.failed(cx, e),
            };
            return this.read_error(start, buf, e);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T> TlsStream<T> {
    /// `e` now if nothing was read, else with the next read.
    fn read_error(
        &mut self,
        start: usize,
        buf: &ReadBuf<'_>,
        e: io::Error,
    ) -> Poll<io::Result<()>> {
        if buf.filled().len() == start {
            return Poll::Ready(Err(e));
        }
        self.error = Some(e);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What an earlier write queued goes first: at most one piece waits.
        ready!(this.poll_send(cx))?;
        let mut total = 0;
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            let room = super::WRITE_PIECE - total;
            if room == 0 {
                break;
            }
            let n = match this.tls.write(&b[..b.len().min(room)]) {
                Ok(n) => n,
                // What was taken goes out; the error comes with the next
                // write (the session keeps failing alike).
                Err(_) if total > 0 => break,
                Err(e) => return Poll::Ready(Err(this.failed(cx, e))),
            };
            total += n;
            if n < b.len() {
                break;
            }
        }
        // Sent now if the socket takes it; else by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        this.tls.close()?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::ClientConnection;
    use std::io::{Read as _, Write as _};
    use std::process::{Command, Stdio};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A self-signed P-256 certificate for "localhost", the server's
    /// configuration from it, and a client configuration trusting it for
    /// `versions`.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl req");
        let server = crate::tls::server_config(&cert, &key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&cert).unwrap())
            .unwrap();
        let client = rustls::ClientConfig::builder_with_protocol_versions(versions)
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A rustls client driven over one end of a duplex pipe.
    struct Client {
        conn: ClientConnection,
        io: DuplexStream,
        /// TLS bytes received and not yet given to rustls.
        inbox: Vec<u8>,
    }

    impl Client {
        fn new(config: Arc<rustls::ClientConfig>, io: DuplexStream) -> Self {
            let name = ServerName::try_from("localhost").unwrap();
            Client {
                conn: ClientConnection::new(config, name).unwrap(),
                io,
                inbox: Vec::new(),
            }
        }

        async fn flush(&mut self) {
            while self.conn.wants_write() {
                let mut out = Vec::new();
                self.conn.write_tls(&mut out).unwrap();
                self.io.write_all(&out).await.unwrap();
            }
        }

        /// Receives and processes more; false at the end of the pipe.
        async fn pump(&mut self) -> bool {
            self.flush().await;
            if self.inbox.is_empty() {
                let mut buf = vec![0u8; 64 * 1024];
                let n = self.io.read(&mut buf).await.unwrap();
                if n == 0 {
                    return false;
                }
                self.inbox.extend_from_slice(&buf[..n]);
            }
            // One record's worth at most: the plaintext is taken between.
            let mut got = &self.inbox[..];
            self.conn.read_tls(&mut got).unwrap();
            let used = self.inbox.len() - got.len();
            self.inbox.drain(..used);
            self.conn.process_new_packets().unwrap();
            true
        }

        async fn handshake(&mut self) {
            while self.conn.is_handshaking() {
                assert!(self.pump().await, "the server ended the handshake");
            }
            self.flush().await;
        }

        async fn send(&mut self, data: &[u8]) {
            for piece in data.chunks(16 * 1024) {
                self.conn.writer().write_all(piece).unwrap();
                self.flush().await;
            }
        }

        /// Plaintext until `n` bytes or the server's close_notify.
        async fn receive(&mut self, n: usize) -> Vec<u8> {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while got.len() < n {
                match self.conn.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(self.pump().await, "the pipe ended");
                    }
                    Err(e) => panic!("client read: {e}"),
                }
            }
            got
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed ^ (i >> 13) as u8)
            })
            .collect()
    }

    /// Handshake, `n` bytes each way, a key update (TLS 1.3), then the
    /// server's close_notify; over a pipe of `pipe` bytes.
    async fn round_trip(
        versions: &[&'static rustls::SupportedProtocolVersion],
        n: usize,
        pipe: usize,
    ) {
        let (server_config, client_config) = configs(versions);
        let (a, b) = tokio::io::duplex(pipe);
        let up = pattern(n, 1);
        let down = pattern(n, 2);
        let mut client = Client::new(client_config, b);
        let server = {
            let (up, down) = (up.clone(), down.clone());
            tokio::spawn(async move {
                let mut s = accept(a, server_config).await.unwrap();
                let mut got = vec![0u8; up.len()];
                s.read_exact(&mut got).await.unwrap();
                assert!(got == up, "the server reads what the client sent");
                s.write_all(&down).await.unwrap();
                s.flush().await.unwrap();
                // After the client's key update (TLS 1.3): more both ways.
                let mut more = [0u8; 5];
                s.read_exact(&mut more).await.unwrap();
                assert_eq!(&more, b"again");
                s.write_all(b"answer").await.unwrap();
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
            })
        };
        client.handshake().await;
        client.send(&up).await;
        let got = client.receive(down.len()).await;
        assert!(got == down, "the client reads what the server sent");
        if client.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            client.conn.refresh_traffic_keys().unwrap();
        }
        client.send(b"again").await;
        assert_eq!(client.receive(6).await, b"answer");
        // The server's close_notify: the end of its data.
        assert_eq!(client.receive(1).await, b"");
        client.conn.send_close_notify();
        client.flush().await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn tls13_moves_bytes_both_ways_and_closes_cleanly() {
        round_trip(&[&rustls::version::TLS13], 3 << 20, 1 << 20).await;
    }

    #[tokio::test]
    async fn tls12_moves_bytes_both_ways_and_closes_cleanly() {
        round_trip(&[&rustls::version::TLS12], 3 << 20, 1 << 20).await;
    }

    #[tokio::test]
    async fn one_byte_at_a_time_each_way() {
        // Every record arrives in 1-byte reads and leaves in 1-byte writes.
        round_trip(&[&rustls::version::TLS13], 40_000, 1).await;
        round_trip(&[&rustls::version::TLS12], 40_000, 1).await;
    }

    /// A server stream after the handshake, and its client.
    async fn connected(pipe: usize) -> (TlsStream<DuplexStream>, Client) {
        let (server_config, client_config) = configs(&[&rustls::version::TLS13]);
        let (a, b) = tokio::io::duplex(pipe);
        let mut client = Client::new(client_config, b);
        let (s, ()) = tokio::join!(accept(a, server_config), client.handshake());
        (s.unwrap(), client)
    }

    #[tokio::test]
    async fn the_peers_close_notify_is_the_end_and_a_cut_transport_an_error() {
        let (mut s, mut client) = connected(1 << 20).await;
        client.send(b"last words").await;
        client.conn.send_close_notify();
        client.flush().await;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");

        let (mut s, mut client) = connected(1 << 20).await;
        client.send(b"cut").await;
        drop(client);
        let mut got = [0u8; 3];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"cut");
        let e = s.read(&mut [0u8; 10]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(
            e.to_string(),
            "peer closed connection without sending TLS close_notify"
        );
    }

    #[tokio::test]
    async fn a_read_takes_every_record_received_and_the_rest_waits() {
        let (mut s, mut client) = connected(1 << 20).await;
        let data = pattern(100_000, 3);
        client.send(&data).await;
        // Seven records received: one read returns them all.
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < data.len() {
            got += s.read(&mut buf[got..]).await.unwrap();
        }
        assert!(buf[..got] == data[..]);
        // A reader with less room than a record: the rest comes next.
        client.send(&data[..20_000]).await;
        let mut small = vec![0u8; 1000];
        let mut got = Vec::new();
        while got.len() < 20_000 {
            let n = s.read(&mut small).await.unwrap();
            assert!(n > 0 && n <= 1000);
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == data[..20_000]);
    }

    #[tokio::test]
    async fn buffers_are_given_back_between_requests() {
        let (mut s, mut client) = connected(4 << 20).await;
        let data = pattern(1 << 20, 4);
        client.send(&data).await;
        let mut buf = vec![0u8; data.len()];
        s.read_exact(&mut buf).await.unwrap();
        let write = async {
            s.write_all(&data).await.unwrap();
            s.flush().await.unwrap();
        };
        let ((), got) = tokio::join!(write, client.receive(data.len()));
        assert!(got == data);
        // A small request and a small answer: nothing large stays.
        client.send(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut head = [0u8; 18];
        s.read_exact(&mut head).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.tls.buffers(), (0, 0));
    }

    #[tokio::test]
    async fn garbage_fails_the_handshake_with_an_alert() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let (a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let e = accept(a, server_config).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let mut alert = [0u8; 7];
        b.read_exact(&mut alert).await.unwrap();
        assert_eq!(alert[0], 21, "an alert record: {alert:?}");
    }
}
