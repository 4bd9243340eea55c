//! Setting up the listening socket: creating it safely at a path, or adopting an inherited fd.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use mio::net::{UnixListener, UnixStream};

use crate::server::Endpoint;

/// A socket we created; removed on drop only if the path still names that same socket.
pub struct SocketPath {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl SocketPath {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.dev_ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("removing {}: {e}", self.path.display());
                }
            }
            _ => log::info!("{} is no longer our socket: left alone", self.path.display()),
        }
    }
}

/// Binds a listening socket at `path`. A stale socket (nobody accepts on it) is replaced; a live one, or any other
/// kind of file, is an error.
pub fn listen(path: &Path) -> io::Result<(UnixListener, SocketPath)> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening on this socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Err(e) => {
                return Err(io::Error::new(e.kind(), format!("{}: probing existing socket: {e}", path.display())))
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; refusing to replace it", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
    let l =
        UnixListener::bind(path).map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))?;
    let m = std::fs::symlink_metadata(path)?;
    Ok((l, SocketPath { path: path.to_owned(), dev_ino: (m.dev(), m.ino()) }))
}

/// Adopts an inherited fd: a listening UNIX stream socket (serve clients one after another) or a connected one
/// (serve it, then exit).
pub fn adopt_fd(fd: RawFd) -> io::Result<Endpoint> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--fd {fd}: stdin/stdout/stderr cannot be the socket"),
        ));
    }
    if rustix::io::fcntl_getfd(unsafe_borrow(fd)).is_err() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("--fd {fd}: not an open file descriptor")));
    }
    let b = unsafe_borrow(fd);
    let unix = rustix::net::getsockname(b).is_ok_and(|a| a.address_family() == rustix::net::AddressFamily::UNIX);
    let stream = rustix::net::sockopt::socket_type(b).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
    if !unix || !stream {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("--fd {fd}: not a UNIX stream socket")));
    }
    let listening = rustix::net::sockopt::socket_acceptconn(b)?;
    // SAFETY: the fd is open (checked above), was handed to us on the command line, and nothing else in this
    // process owns it; from here on the OwnedFd is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::ioctl_fionbio(&owned, true)?;
    Ok(if listening {
        Endpoint::Listener(UnixListener::from_std(owned.into()))
    } else {
        Endpoint::Connected(UnixStream::from_std(owned.into()))
    })
}

/// Borrows a raw fd number for the checks above.
fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: callers only pass `fd` to non-owning queries (fcntl, getsockname, getsockopt) that fail cleanly with
    // EBADF if the fd is not open; the borrow does not outlive `adopt_fd`.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// A self-pipe that receives a byte on SIGTERM and SIGINT.
pub fn signal_pipe() -> io::Result<UnixStream> {
    let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    tx.set_nonblocking(true)?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::low_level::pipe::register(sig, tx.try_clone()?)?;
    }
    Ok(UnixStream::from_std(rx))
}

/// SIGUSR1 starts a PF-initiated VF reset, handled on a thread of its own.
pub fn on_sigusr1(handle: device::PfResetHandle) -> io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR1])?;
    std::thread::Builder::new().name("sigusr1".into()).spawn(move || {
        for _ in signals.forever() {
            log::info!("SIGUSR1: PF-initiated VF reset");
            handle.trigger();
        }
    })?;
    Ok(())
}

/// Raises the soft open-file limit to the hard one, as servers that hold many client fds do: each DMA mapping of
/// a distinct file and each interrupt eventfd is an open fd, and the usual soft limit (1,024) is far below what
/// VERSION's max_dma_maps promises. Returns the limit now in force.
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            log::warn!("raising the open-file limit to {:?}: {e}", l.maximum);
        }
    }
    getrlimit(Resource::Nofile).current
}
