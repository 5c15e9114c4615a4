//! cloudstack-image-server: an imageio-style HTTP server that moves KVM disk
//! images over NBD (through the system libnbd) or from plain files.

pub mod nbd;
