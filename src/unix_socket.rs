//! Creating the server's Unix sockets (the control socket and the HTTP
//! listener's): one way to make the file, one way to remove it.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Mode of every socket file the server makes: its owner (root, for the
/// packaged service) and its group only.
pub(crate) const SOCKET_MODE: u32 = 0o660;

/// A socket file this process made. Removed when dropped, if it is still
/// the one we made (same inode): a newer server may have replaced it.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl SocketFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|md| md.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a listening Unix stream socket at `path` (`what` names it in
/// errors and the log, e.g. "control socket"): creates its parent directory
/// if missing, replaces a stale socket file (one nobody listens on), refuses
/// a live socket or any other kind of file, and sets mode 0660. The
/// listener is blocking, as `std` makes it.
pub(crate) fn bind(path: &Path, what: &str) -> io::Result<(UnixListener, SocketFile)> {
    let with_path = |e: io::Error, doing: &str| {
        io::Error::new(e.kind(), format!("{what} {}: {doing}: {e}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| with_path(e, "cannot create its directory"))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{what} {} is in use by another process", path.display()),
                ));
            }
            log::info!("replacing stale {what} {}", path.display());
            std::fs::remove_file(path)
                .map_err(|e| with_path(e, "cannot remove the stale socket"))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{what} {} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "cannot stat")),
    }
    let listener = UnixListener::bind(path).map_err(|e| with_path(e, "cannot bind"))?;
    // From here on the file is ours: removed again if anything below fails.
    let ino = std::fs::metadata(path)
        .map_err(|e| with_path(e, "cannot stat"))?
        .ino();
    let file = SocketFile {
        path: path.to_path_buf(),
        ino,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| with_path(e, "cannot set its mode"))?;
    Ok((listener, file))
}
