//! Shared fixtures for the integration tests, one concern a module:
//! - [`qemu`]: images, qemu-img/qemu-io, blkdebug, `qemu-nbd` exports, nbdinfo;
//! - [`server`]: the real server binary on an ephemeral port with a temporary
//!   config dir and its control socket;
//! - [`client`]: a small raw HTTP/1.1 client (so tests control every byte that
//!   goes on the wire);
//! - [`asserts`]: assertions on responses;
//! - [`storm`] and [`tls`]: fault-storm readers and HTTPS fixtures, used by
//!   few tests and so named by path (`common::tls::make_cert`).
//!
//! Everything else is re-exported here so that a test says `use common::*;`.
//!
//! Each test binary compiles this whole module but uses only part of it.
//! The test files declare it `pub mod common;` (not `mod common;`): its pub
//! items are then the binary's public API, which rustc does not report as
//! dead code or unused re-exports, so no lint is turned off here and an
//! unused import or private item inside a module is still reported.

pub mod asserts;
pub mod blocking;
pub mod client;
pub mod qemu;
pub mod server;
pub mod storm;
pub mod tls;

pub use asserts::*;
pub use blocking::*;
pub use client::*;
pub use qemu::*;
pub use server::*;
