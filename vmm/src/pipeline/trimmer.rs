//! The host side of the guest-trimmer's control protocol: one JSON request line to the guest's
//! vsock port (52 by default) through the VM's vsock unix socket, one JSON reply line back.
//! Used by the snapshot pipeline (`trim`), after a restore (`after_restore`) and by `vmm trim`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vsock::{connect_to_guest, ClientError};

/// The guest-trimmer's default vsock port (`vmm_trimmer_port=` in the image's /init).
pub const DEFAULT_TRIMMER_PORT: u32 = 52;
/// Bound on the vsock handshake (`CONNECT` → `OK`) with the trimmer's port.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors talking to the guest-trimmer.
#[derive(Debug, thiserror::Error)]
pub enum TrimmerError {
    /// The vsock connection to the trimmer's port could not be made (no trimmer, or the
    /// guest's vsock driver is not up).
    #[error("cannot reach the guest-trimmer on vsock port {port}")]
    Connect {
        /// The guest port.
        port: u32,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// Sending the request or reading the reply failed; a timeout shows here as
    /// `WouldBlock`/`TimedOut`.
    #[error("guest-trimmer `{op}` request on vsock port {port}: no reply within {timeout_ms} ms or the connection failed")]
    Exchange {
        /// The request's `op`.
        op: String,
        /// The guest port.
        port: u32,
        /// The bound.
        timeout_ms: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest closed the connection without replying.
    #[error("the guest-trimmer closed the connection without answering `{op}`")]
    Closed {
        /// The request's `op`.
        op: String,
    },
    /// The reply is not JSON.
    #[error("the guest-trimmer's reply to `{op}` is not JSON: {line:?}")]
    BadReply {
        /// The request's `op`.
        op: String,
        /// The reply line (cut to 200 characters).
        line: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The trimmer answered `"ok": false`.
    #[error("the guest-trimmer refused `{op}`: {message}")]
    Refused {
        /// The request's `op`.
        op: String,
        /// Its `error` field.
        message: String,
        /// The whole reply.
        reply: Value,
    },
}

impl TrimmerError {
    /// Whether the trimmer was never reached (absent, or the guest not up yet), as opposed to
    /// reached and failing or hanging.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, TrimmerError::Connect { .. })
    }
}

/// A client of one VM's guest-trimmer.
#[derive(Debug, Clone)]
pub struct TrimmerClient {
    uds_path: PathBuf,
    port: u32,
}

impl TrimmerClient {
    /// A client reaching the trimmer on guest `port` through the VM's vsock socket `uds_path`.
    pub fn new(uds_path: &Path, port: u32) -> Self {
        TrimmerClient {
            uds_path: uds_path.to_owned(),
            port,
        }
    }

    /// Sends `request` (an object with `"op"`) and returns the reply, which has `"ok": true`.
    /// The whole exchange, connection included, is bounded by `timeout`.
    pub fn request(&self, request: &Value, timeout: Duration) -> Result<Value, TrimmerError> {
        let op = request
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let timeout = timeout.max(Duration::from_millis(1));
        // The handshake gets a short bound of its own: right after a restore the guest may drop
        // a connection request made before it handled the transport reset, and the caller
        // retries a connection that failed fast.
        let handshake = timeout.min(HANDSHAKE_TIMEOUT);
        let (stream, _) =
            connect_to_guest(&self.uds_path, self.port, Some(handshake)).map_err(|source| {
                TrimmerError::Connect {
                    port: self.port,
                    source,
                }
            })?;
        let exchange = |source| TrimmerError::Exchange {
            op: op.clone(),
            port: self.port,
            timeout_ms: timeout.as_millis() as u64,
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(exchange)?;
        stream.set_write_timeout(Some(timeout)).map_err(exchange)?;
        let mut writer = stream.try_clone().map_err(exchange)?;
        let mut line = request.to_string();
        line.push('\n');
        writer.write_all(line.as_bytes()).map_err(exchange)?;
        let mut reply = String::new();
        let n = BufReader::new(stream)
            .read_line(&mut reply)
            .map_err(exchange)?;
        if n == 0 {
            return Err(TrimmerError::Closed { op });
        }
        parse_reply(&op, reply.trim_end())
    }

    /// Asks the trimmer to trim by `policy` (a policy object) and returns its reply (with
    /// `"ready"` and the report).
    pub fn trim(&self, policy: &Value, timeout: Duration) -> Result<Value, TrimmerError> {
        self.request(&json!({"op": "trim", "policy": policy}), timeout)
    }

    /// Tells the trimmer the guest was restored from a snapshot, so its after-restore hooks run.
    pub fn after_restore(&self, timeout: Duration) -> Result<Value, TrimmerError> {
        self.request(&json!({"op": "after_restore"}), timeout)
    }
}

/// Parses a reply line: JSON with `"ok": true`, else the matching error.
fn parse_reply(op: &str, line: &str) -> Result<Value, TrimmerError> {
    let reply: Value = serde_json::from_str(line).map_err(|source| TrimmerError::BadReply {
        op: op.to_string(),
        line: line.chars().take(200).collect(),
        source,
    })?;
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        return Ok(reply);
    }
    let message = reply
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("no reason given")
        .to_string();
    Err(TrimmerError::Refused {
        op: op.to_string(),
        message,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked() {
        assert!(parse_reply("trim", r#"{"ok":true,"ready":true}"#).is_ok());
        let err = parse_reply(
            "trim",
            r#"{"ok":false,"error":"a trim is already running"}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("a trim is already running"),
            "{err}"
        );
        let err = parse_reply("trim", "not json").unwrap_err();
        assert!(matches!(err, TrimmerError::BadReply { .. }), "{err}");
        assert!(parse_reply("trim", r#"{"ready":true}"#).is_err());
    }

    #[test]
    fn a_missing_socket_is_unreachable() {
        let client = TrimmerClient::new(Path::new("/nonexistent/vsock.sock"), 52);
        let err = client
            .request(&json!({"op": "ping"}), Duration::from_millis(100))
            .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert!(err.to_string().contains("port 52"), "{err}");
    }
}
