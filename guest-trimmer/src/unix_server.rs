//! The control protocol on a unix stream socket (for use inside the guest and for tests; the
//! host reaches the same handler over vsock): one request per line, one reply per line, a
//! thread per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A line handler: request line in, reply line out.
pub type Handler = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Longest request line accepted (a policy is a few KiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Errors of the unix socket server and client.
#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    /// The socket could not be bound.
    #[error("bind unix socket {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting, writing or reading failed.
    #[error("{what} unix socket {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Binds `path` (replacing a stale socket file) and serves connections until the process
/// ends; returns only if binding fails.
pub fn serve(path: &Path, handler: Handler) -> Result<(), UnixError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| UnixError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::info!(path = %path.display(), "control socket listening");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let handler = handler.clone();
                std::thread::spawn(move || serve_connection(stream, handler));
            }
            Err(e) => tracing::warn!("accept on control socket: {e}"),
        }
    }
    Ok(())
}

fn serve_connection(stream: UnixStream, handler: Handler) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        // Bounded read: a client cannot make the daemon buffer without limit.
        match (&mut reader)
            .take(MAX_LINE_BYTES as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.ends_with('\n') || line.len() < MAX_LINE_BYTES {
            handler(&line)
        } else {
            format!(r#"{{"ok":false,"error":"request longer than {MAX_LINE_BYTES} bytes"}}"#)
        };
        if writer
            .write_all(reply.as_bytes())
            .and_then(|()| writer.write_all(b"\n"))
            .is_err()
        {
            return;
        }
        if line.len() >= MAX_LINE_BYTES && !line.ends_with('\n') {
            return;
        }
    }
}

/// Sends one request line to the daemon at `path` and returns its reply line.
pub fn request(path: &Path, line: &str) -> Result<String, UnixError> {
    let io = |what, source| UnixError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|e| io("connect to", e))?;
    let mut req = line.trim_end().to_string();
    req.push('\n');
    stream
        .write_all(req.as_bytes())
        .map_err(|e| io("write to", e))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| io("read from", e))?;
    Ok(reply.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_lines_and_answers_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // A stale file is replaced.
        std::fs::write(&path, "stale").unwrap();
        let handler: Handler = Arc::new(|l: &str| format!("echo:{}", l.trim()));
        let p = path.clone();
        std::thread::spawn(move || serve(&p, handler));
        let mut reply = None;
        for _ in 0..200 {
            if let Ok(r) = request(&path, "{\"op\":\"ping\"}") {
                reply = Some(r);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(reply.as_deref(), Some("echo:{\"op\":\"ping\"}"));
        // Several requests on one connection.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"a\nb\n").unwrap();
        let mut r = BufReader::new(s);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        r.read_line(&mut l).unwrap();
        assert_eq!(l, "echo:a\necho:b\n");
        let err = request(&dir.path().join("none.sock"), "x").unwrap_err();
        assert!(
            err.to_string().starts_with("connect to unix socket "),
            "{err}"
        );
    }
}
