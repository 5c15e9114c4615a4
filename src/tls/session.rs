//! A server-side TLS session on rustls' unbuffered API, apart from any I/O:
//! the caller receives ciphertext into [`Session::receive_room`], sends
//! [`Session::to_send`], and reads and writes plaintext through it. The
//! server drives it asynchronously ([`super::TlsStream`]), `bench/floor.rs`
//! with blocking sockets.
//!
//! Why not rustls' buffered API (through tokio-rustls): it asks its
//! transport for at most 4 KiB per read, into its own buffer (a copy of
//! every received byte when the transport reads ahead), and returns one
//! record per read. Here ciphertext is received up to [`READ_AHEAD`] bytes
//! at a time into one buffer that rustls decrypts in place, and a read
//! takes every record received. (rustls 0.23 still moves each decrypted
//! record into a `Vec` of its own before handing it out; the record is
//! copied from there into the reader's buffer.) Writes are encrypted into
//! one send buffer, [`WRITE_PIECE`] bytes at a time (rustls 0.23 seals
//! each record in a `Vec` of its own and copies it there).
//!
//! Memory per connection: the receive buffer (none while idle, 32 KiB for
//! small requests, [`READ_AHEAD`] while receives of 16 KiB or more come),
//! the send buffer (none while idle, [`WRITE_PIECE`] plus record overhead
//! while large writes go out), plaintext the reader had no room for (the
//! rest of one record, or, when a response is written while the peer's
//! next records are already received, at most what the receive buffer
//! held), and rustls' own state (one record).

use std::io;
use std::sync::Arc;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::ReadBuf;

/// Bytes asked of the transport per receive while large receives come.
pub const READ_AHEAD: usize = 256 * 1024;

/// The receive buffer of a connection sending small requests: room for the
/// largest record (16 KiB of plaintext and 2 KiB of expansion at most).
const SMALL: usize = 32 * 1024;

/// A receive smaller than this, once processed, gives the receive buffer
/// back; a write smaller than this, once sent, the send buffer.
const KEEP_ABOVE: usize = 16 * 1024;

/// Most plaintext encrypted per write.
pub const WRITE_PIECE: usize = 256 * 1024;

/// Bytes of plaintext per record rustls makes at most.
const RECORD: usize = 16 * 1024;

/// A first guess of a record's overhead (header, explicit nonce, tag,
/// content type); a larger need is asked of rustls and met.
const RECORD_OVERHEAD: usize = 64;

/// What [`Session::read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Plaintext, this many bytes, was put into the reader's buffer.
    Data(usize),
    /// The peer closed the session (close_notify): no more plaintext.
    Eof,
    /// More ciphertext is needed: receive, then read again.
    NeedInput,
}

/// What one round of rustls' state machine came to.
enum Step {
    /// Something was done (a handshake message encoded, a state passed):
    /// go on.
    Again,
    /// A record was read (into the reader's buffer, the rest kept).
    Copied,
    /// The handshake needs more input.
    Blocked,
    /// The session is established and no complete record is waiting.
    Idle,
    /// The peer closed the session.
    Closed,
    /// Plaintext was encrypted: this many bytes.
    Wrote(usize),
}

/// What a round is for.
#[derive(Clone, Copy)]
enum Want<'a> {
    Read,
    Write(&'a [u8]),
    Close,
}

/// The ciphertext received: `buf[start..end]` is not yet processed.
#[derive(Default)]
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// How many bytes the last receive brought.
    last: usize,
    /// The transport ended.
    eof: bool,
}

impl Incoming {
    fn pending(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    fn discard(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
            if self.last < KEEP_ABOVE {
                self.buf = Vec::new();
            }
        }
    }

    fn room(&mut self) -> io::Result<&mut [u8]> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let want = if self.last >= KEEP_ABOVE {
            READ_AHEAD
        } else {
            SMALL
        };
        if self.buf.is_empty() {
            self.buf = vec![0; want];
        } else if self.buf.len() < want
            || (self.end == self.buf.len() && self.buf.len() < READ_AHEAD)
        {
            self.buf.resize(READ_AHEAD, 0);
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS record larger than the receive buffer",
            ));
        }
        Ok(&mut self.buf[self.end..])
    }
}

/// The ciphertext to send: `buf[sent..queued]`.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    sent: usize,
    queued: usize,
    /// Bytes of plaintext the last write encrypted.
    last: usize,
}

impl Outgoing {
    /// Puts what `f` writes (it says how much, or how much room it needs)
    /// after what is queued.
    fn put(
        &mut self,
        guess: usize,
        mut f: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
    ) -> io::Result<()> {
        let mut need = guess;
        // Bounded: rustls says how much room it needs, and is given it.
        for _ in 0..2 {
            if self.buf.len() < self.queued + need {
                self.buf.resize(self.queued + need, 0);
            }
            match f(&mut self.buf[self.queued..]) {
                Ok(n) => {
                    self.queued += n;
                    return Ok(());
                }
                Err(Some(required)) => need = required,
                Err(None) => break,
            }
        }
        Err(io::Error::other("TLS: cannot encode a record"))
    }
}

/// A server-side TLS session; see the module docs.
pub struct Session {
    conn: UnbufferedServerConnection,
    incoming: Incoming,
    outgoing: Outgoing,
    /// Plaintext the reader had no room for: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// The peer's close_notify came.
    peer_closed: bool,
    /// Our close_notify is queued.
    closing: bool,
    /// rustls failed: every later call fails alike.
    failed: Option<(io::ErrorKind, String)>,
}

fn encode_error(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_error(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

impl Session {
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Session {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Incoming::default(),
            outgoing: Outgoing::default(),
            plain: Vec::new(),
            plain_at: 0,
            peer_closed: false,
            closing: false,
            failed: None,
        })
    }

    /// Where to receive ciphertext; say how much came with
    /// [`Session::received`].
    pub fn receive_room(&mut self) -> io::Result<&mut [u8]> {
        self.incoming.room()
    }

    /// `n` bytes were received into [`Session::receive_room`]; 0: the
    /// transport ended.
    pub fn received(&mut self, n: usize) {
        self.incoming.end += n;
        self.incoming.last = n;
        if n == 0 {
            self.incoming.eof = true;
            self.incoming.discard(0);
        }
    }

    /// The ciphertext to send, in order: handshake messages, alerts,
    /// records. Say how much went with [`Session::sent`].
    pub fn to_send(&self) -> &[u8] {
        &self.outgoing.buf[self.outgoing.sent..self.outgoing.queued]
    }

    pub fn sent(&mut self, n: usize) {
        let o = &mut self.outgoing;
        o.sent = (o.sent + n).min(o.queued);
        if o.sent == o.queued {
            o.sent = 0;
            o.queued = 0;
            if o.last < KEEP_ABOVE {
                o.buf = Vec::new();
            }
        }
    }

    /// Processes what was received until the handshake is complete (true)
    /// or needs more input (false).
    pub fn handshake(&mut self) -> io::Result<bool> {
        loop {
            match self.step(&mut ReadBuf::new(&mut []), Want::Read)? {
                Step::Again => {}
                Step::Blocked => {
                    if self.incoming.eof {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed during the TLS handshake",
                        ));
                    }
                    return Ok(false);
                }
                _ => return Ok(true),
            }
        }
    }

    /// Plaintext into `out`: everything received that fits.
    pub fn read(&mut self, out: &mut ReadBuf<'_>) -> io::Result<Read> {
        if out.remaining() == 0 {
            return Ok(Read::Data(0));
        }
        let start = out.filled().len();
        if self.plain_at < self.plain.len() {
            let n = out.remaining().min(self.plain.len() - self.plain_at);
            out.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
            self.plain_at += n;
            if self.plain_at == self.plain.len() {
                self.plain_at = 0;
                self.plain.clear();
                if self.plain.capacity() > RECORD {
                    self.plain = Vec::new();
                }
            }
        }
        // Bounded: every round processes received bytes or returns.
        while out.remaining() > 0 {
            match self.step(out, Want::Read)? {
                Step::Again | Step::Copied | Step::Wrote(_) => {}
                Step::Closed => break,
                Step::Blocked | Step::Idle => {
                    if out.filled().len() > start {
                        break;
                    }
                    if self.incoming.eof {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        ));
                    }
                    return Ok(Read::NeedInput);
                }
            }
        }
        match out.filled().len() - start {
            0 => Ok(Read::Eof),
            n => Ok(Read::Data(n)),
        }
    }

    /// Encrypts up to [`WRITE_PIECE`] bytes of `data` into the ciphertext
    /// to send; returns how many.
    pub fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.closing {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS session closed for writing",
            ));
        }
        let data = &data[..data.len().min(WRITE_PIECE)];
        loop {
            match self.step(&mut ReadBuf::new(&mut []), Want::Write(data))? {
                Step::Wrote(n) => return Ok(n),
                Step::Again | Step::Copied => {}
                Step::Blocked | Step::Idle | Step::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "TLS session cannot send",
                    ))
                }
            }
        }
    }

    /// Queues close_notify (once; nothing if the session never started or
    /// failed).
    pub fn close(&mut self) -> io::Result<()> {
        if self.closing || self.failed.is_some() {
            return Ok(());
        }
        loop {
            match self.step(&mut ReadBuf::new(&mut []), Want::Close)? {
                Step::Again | Step::Copied => {}
                _ => return Ok(()),
            }
        }
    }

    /// One round of rustls' state machine over what was received.
    fn step(&mut self, out: &mut ReadBuf<'_>, want: Want<'_>) -> io::Result<Step> {
        if let Some((kind, msg)) = &self.failed {
            return Err(io::Error::new(*kind, msg.clone()));
        }
        let UnbufferedStatus { mut discard, state } =
            self.conn.process_tls_records(self.incoming.pending());
        let step = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                let mut err = None;
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            let n = out.remaining().min(record.payload.len());
                            out.put_slice(&record.payload[..n]);
                            // The rest of a record, or (while writing or
                            // handshaking) the records after the response.
                            self.plain.extend_from_slice(&record.payload[n..]);
                        }
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                match err {
                    Some(e) => Err(e),
                    None => Ok(Step::Copied),
                }
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                let o = &mut self.outgoing;
                o.put(RECORD_OVERHEAD, |buf| {
                    data.encode(buf).map_err(encode_error)
                })?;
                Ok(Step::Again)
            }
            // Whatever is encoded goes out before anything queued later.
            Ok(ConnectionState::TransmitTlsData(data)) => {
                data.done();
                Ok(Step::Again)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::Blocked),
            Ok(ConnectionState::PeerClosed) => {
                self.peer_closed = true;
                Ok(Step::Again)
            }
            Ok(ConnectionState::Closed) => {
                self.peer_closed = true;
                Ok(Step::Closed)
            }
            Ok(ConnectionState::WriteTraffic(mut w)) => match want {
                Want::Write(data) => {
                    let o = &mut self.outgoing;
                    let guess = data.len() + (data.len() / RECORD + 1) * RECORD_OVERHEAD;
                    o.put(guess, |buf| w.encrypt(data, buf).map_err(encrypt_error))?;
                    o.last = data.len();
                    Ok(Step::Wrote(data.len()))
                }
                Want::Close => {
                    let o = &mut self.outgoing;
                    o.put(RECORD_OVERHEAD, |buf| {
                        w.queue_close_notify(buf).map_err(encrypt_error)
                    })?;
                    o.last = 0;
                    self.closing = true;
                    Ok(Step::Idle)
                }
                Want::Read if self.peer_closed => Ok(Step::Closed),
                Want::Read => Ok(Step::Idle),
            },
            Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
        };
        self.incoming.discard(discard);
        step.map_err(|e| self.fail(e))
    }

    /// Records rustls' error, and queues the alert it has for the peer.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(self.incoming.pending());
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
            let _ = self.outgoing.put(RECORD_OVERHEAD, |buf| {
                data.encode(buf).map_err(encode_error)
            });
        }
        let kind = io::ErrorKind::InvalidData;
        let msg = format!("TLS: {e}");
        self.failed = Some((kind, msg.clone()));
        io::Error::new(kind, msg)
    }
}

#[cfg(test)]
impl Session {
    /// The sizes of the receive and send buffers.
    pub(crate) fn buffers(&self) -> (usize, usize) {
        (self.incoming.buf.len(), self.outgoing.buf.len())
    }
}
