//! A small client for the API socket: one request per connection, with a timeout.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::http;

/// How long [`request`] waits for the whole exchange.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted, in bytes.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// A response from the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The JSON body, if the response had one.
    pub body: Option<serde_json::Value>,
}

impl ApiResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `fault_message` of an error response, if present.
    pub fn fault_message(&self) -> Option<&str> {
        self.body.as_ref()?.get("fault_message")?.as_str()
    }
}

/// Errors talking to the API socket. Each names the socket path.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be connected to (usually: the VM is not running).
    #[error("cannot connect to API socket {path} (is the VM running?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Sending the request failed.
    #[error("cannot send the request to API socket {path}")]
    Send {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the response failed.
    #[error("cannot read the response from API socket {path}")]
    Receive {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No complete response arrived in time.
    #[error("no response from API socket {path} within {timeout:?}")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The method or path cannot be put on a request line.
    #[error("invalid request `{method} {target}` for API socket {path}")]
    InvalidRequest {
        /// The socket path.
        path: PathBuf,
        /// The method given.
        method: String,
        /// The request target given.
        target: String,
    },
    /// The response is not valid HTTP, too large, or its body is not JSON.
    #[error("invalid response from API socket {path}: {reason}")]
    InvalidResponse {
        /// The socket path.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
}

/// Sends one request and returns the response, waiting at most [`DEFAULT_TIMEOUT`].
///
/// `path` is the request target, e.g. `/vm`; `body` is sent as JSON.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<ApiResponse, ClientError> {
    request_with_timeout(socket, method, path, body, DEFAULT_TIMEOUT)
}

/// [`request`] with an explicit timeout for the whole exchange.
pub fn request_with_timeout(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<ApiResponse, ClientError> {
    let deadline = Instant::now() + timeout;
    let io_error = |make: fn(PathBuf, io::Error) -> ClientError| {
        move |err: io::Error| {
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                ClientError::Timeout {
                    path: socket.to_path_buf(),
                    timeout,
                }
            } else {
                make(socket.to_path_buf(), err)
            }
        }
    };
    let send_error = io_error(|path, source| ClientError::Send { path, source });
    let receive_error = io_error(|path, source| ClientError::Receive { path, source });
    let invalid = |reason: String| ClientError::InvalidResponse {
        path: socket.to_path_buf(),
        reason,
    };

    let valid_method = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    let valid_target = path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic());
    if !valid_method || !valid_target {
        return Err(ClientError::InvalidRequest {
            path: socket.to_path_buf(),
            method: method.to_string(),
            target: path.to_string(),
        });
    }

    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(&send_error)?;

    let body = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(|err| ClientError::Send {
            path: socket.to_path_buf(),
            source: err.into(),
        })?;
    let mut message = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(body) = &body {
        message.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    message.push_str("\r\n");
    let mut bytes = message.into_bytes();
    bytes.extend_from_slice(body.as_deref().unwrap_or_default());
    stream.write_all(&bytes).map_err(&send_error)?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    let response = loop {
        if let Some(response) =
            http::parse_response(&buf, eof).map_err(|err| invalid(err.to_string()))?
        {
            break response;
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(invalid(format!("larger than {MAX_RESPONSE_BYTES} bytes")));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ClientError::Timeout {
                path: socket.to_path_buf(),
                timeout,
            });
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(&receive_error)?;
        match stream.read(&mut chunk) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(receive_error(err)),
        }
    };

    let body = if response.body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice(&response.body)
                .map_err(|err| invalid(format!("body is not JSON: {err}")))?,
        )
    };
    Ok(ApiResponse {
        status: response.status,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_error_names_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("missing.sock");
        let err = request(&socket, "GET", "/", None).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }));
        let message = format!("{:#}", anyhow::Error::from(err));
        assert!(message.contains(&*socket.to_string_lossy()), "{message}");
        assert!(message.contains("is the VM running?"), "{message}");
        assert!(message.contains("No such file or directory"), "{message}");
    }

    #[test]
    fn fault_message() {
        let response = ApiResponse {
            status: 409,
            body: Some(serde_json::json!({"fault_message": "not booted"})),
        };
        assert!(!response.is_success());
        assert_eq!(response.fault_message(), Some("not booted"));
        let empty = ApiResponse {
            status: 204,
            body: None,
        };
        assert!(empty.is_success());
        assert_eq!(empty.fault_message(), None);
    }
}
