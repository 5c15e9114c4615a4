//! cloudstack-image-server: an imageio-style HTTP server that moves KVM disk
//! images over NBD (through the system libnbd) or from plain files.

pub mod backend;
pub mod checksum;
pub mod config;
pub mod control;
pub mod direct_body;
pub mod extents;
pub mod head_timeout;
pub mod http;
pub mod nbd;
pub mod ops;
pub mod request_gate;
pub mod server;
pub mod stats;
pub mod sys;
pub mod tls;
pub mod transfers;
pub mod unix_socket;
pub mod zeroes;
