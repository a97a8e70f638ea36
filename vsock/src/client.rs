//! The host side of Firecracker's convention, for host programs (the `vmm vsock` CLI, tests,
//! benchmarks): connect to the VM's socket, send `CONNECT <port>\n`, read `OK <host_port>\n`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest reply line read (`OK 4294967295\n` is 14 bytes).
const REPLY_LINE_MAX_BYTES: usize = 64;

/// Why a host connection to a guest port failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The VM's socket cannot be reached.
    #[error("cannot connect to the VM's vsock socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the request or reading the reply failed.
    #[error("vsock handshake for guest port {port} failed")]
    Io {
        /// The guest port.
        port: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the connection: nothing listens on the guest port (or the guest
    /// driver is not up).
    #[error("the guest refused port {port}: no listener there, or its vsock driver is not up")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// Not `OK <port>`.
    #[error("unexpected vsock handshake reply {line:?}")]
    BadReply {
        /// What came back.
        line: String,
    },
}

/// Connects to guest port `port` through the VM's socket `uds_path`. Returns the stream (with
/// `timeout` as its read and write timeout) and the host-side port from `OK <port>`.
pub fn connect_to_guest(
    uds_path: &Path,
    port: u32,
    timeout: Option<Duration>,
) -> Result<(UnixStream, u32), ClientError> {
    let mut stream = UnixStream::connect(uds_path).map_err(|source| ClientError::Connect {
        path: uds_path.to_owned(),
        source,
    })?;
    let io = |source| ClientError::Io { port, source };
    stream.set_read_timeout(timeout).map_err(io)?;
    stream.set_write_timeout(timeout).map_err(io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io)?;
    let line = read_line(&mut stream).map_err(io)?;
    let Some(line) = line else {
        return Err(ClientError::Refused { port });
    };
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or(ClientError::BadReply { line })?;
    Ok((stream, host_port))
}

/// Reads one `\n`-terminated line byte by byte (nothing after it is consumed). `None` at end
/// of file before any byte.
fn read_line(stream: &mut UnixStream) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= REPLY_LINE_MAX_BYTES => {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    "reply line too long",
                ))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}
