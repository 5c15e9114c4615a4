//! A safe connection to an NBD server through the system libnbd. All
//! `unsafe` of the project that talks to libnbd lives in this module.
//!
//! One NBD engine: every command (read, write, zero, flush, block status)
//! is queued on a [`Pipeline`] and retired oldest first from a tokio
//! reactor, with one deadline (the command timeout, counted from when the
//! caller waits) and one rule for when the connection is dead (the first
//! fatal error poisons it; every later call returns that error). Only the
//! handshake blocks (`poll(2)` in [`Connection::connect_unix`]).
//!
//! One concept a file:
//! - [`Connection`] (`connection.rs`): the handle, connect (the blocking
//!   handshake), the export's flags and liveness.
//! - [`Error`] (`error.rs`): errno, message, and whether the handle is dead
//!   afterwards ([`Error::is_fatal`]).
//! - `chunks.rs`: the one loop that splits a request into NBD commands.
//! - [`Pipeline`] (`pipeline.rs`): the engine. It owns the connection and
//!   every buffer of a command in flight, and gives the connection up only
//!   when no command is (to its [`Home`], a pool, when dropped).
//! - `block_status.rs`: a block status request (the commands it needs, the
//!   lists their replies fill) and its C callback.

mod block_status;
mod chunks;
mod connection;
mod error;
mod pipeline;

pub use connection::{ConnectOptions, Connection};
pub use error::{Error, Result};
pub use pipeline::{Home, Pipeline, Retired};

use libnbd_sys as sys;

/// `base:allocation`: the standard allocation context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of qemu's dirty bitmap contexts (`qemu:dirty-bitmap:NAME`).
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// qemu's allocation depth context (0 = not allocated in any layer).
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// `base:allocation` flag: the range is a hole.
pub const STATE_HOLE: u32 = sys::LIBNBD_STATE_HOLE;
/// `base:allocation` flag: the range reads as zeroes.
pub const STATE_ZERO: u32 = sys::LIBNBD_STATE_ZERO;
/// `qemu:dirty-bitmap:*` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// The largest single read or write request we send. libnbd refuses requests
/// above 64 MiB; qemu-nbd advertises 32 MiB.
const MAX_REQUEST: u64 = 32 * 1024 * 1024;
/// The largest zero request: the NBD protocol carries 32-bit lengths.
const MAX_ZERO: u64 = 1 << 30;
/// The most block status pairs one call collects, all contexts together
/// (see [`Pipeline::block_status`]): what bounds the memory of an extents
/// list (and so of a reply of `GET /images/{id}/extents`).
pub const MAX_EXTENTS: usize = 1 << 20;
/// The largest block status request (32-bit length, kept 1 MiB aligned).
const MAX_BLOCK_STATUS: u64 = (1 << 32) - (1 << 20);
