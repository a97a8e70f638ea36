//! A small, strict HTTP/1.1 codec for the control API.
//!
//! Only what the API needs: a request line, headers, and a body delimited by `Content-Length`.
//! Chunked transfer coding is refused, header sections and bodies are bounded, and every
//! function here is total on arbitrary bytes — `parse_request` is a fuzz target and must never
//! panic, allocate without bound, or loop on client input.

use std::fmt;
use std::io::{self, Write};

/// Largest accepted header section (request line + headers + the blank line), in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest accepted request body, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest piece of client input echoed back in an error message, in characters.
const MAX_ECHO_CHARS: usize = 64;

/// The request methods the parser recognises. Routing decides which are allowed where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `POST`
    Post,
    /// `DELETE`
    Delete,
    /// `HEAD`
    Head,
    /// `OPTIONS`
    Options,
}

impl Method {
    /// Recognises a method token (case-sensitive, as RFC 9110 requires).
    pub fn from_token(token: &str) -> Option<Method> {
        Some(match token {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            _ => return None,
        })
    }

    /// The method's token, e.g. `"PATCH"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HTTP versions the parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `HTTP/1.0`: connections close after each response unless the client asks otherwise.
    Http10,
    /// `HTTP/1.1`: connections persist unless the client sends `Connection: close`.
    Http11,
}

/// A parsed header field. The name is lower-cased; the value has surrounding blanks trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Lower-cased field name.
    pub name: String,
    /// Field value without leading/trailing spaces or tabs.
    pub value: String,
}

/// A complete, syntactically valid request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request method.
    pub method: Method,
    /// The path part of the request target (always starts with `/`), without the query.
    pub path: String,
    /// The query string after `?`, if any (not interpreted by the API yet).
    pub query: Option<String>,
    /// The request's HTTP version.
    pub version: Version,
    /// All header fields, in order.
    pub headers: Vec<Header>,
    /// The body (empty when there is no `Content-Length` or it is 0).
    pub body: Vec<u8>,
    /// Whether the connection may stay open after the response (HTTP/1.1 default, or
    /// HTTP/1.0 with `Connection: keep-alive`; never with `Connection: close`).
    pub keep_alive: bool,
}

impl Request {
    /// The value of the first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
}

/// Result of feeding bytes to [`parse_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedRequest {
    /// A whole request was parsed; it used the first `consumed` bytes of the input (anything
    /// after that is the start of the next, pipelined request).
    Complete {
        /// The request.
        request: Request,
        /// Bytes of input the request occupied.
        consumed: usize,
    },
    /// The bytes so far are a valid prefix of a request; read more and call again.
    Incomplete,
}

/// Why a request (or response) could not be parsed. Each maps to a status code, after which
/// the server answers and closes the connection (it cannot find the next request boundary).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line is not `METHOD SP /target SP HTTP/x.y`.
    #[error("malformed request line: {0}")]
    BadRequestLine(String),
    /// A header line is malformed.
    #[error("malformed header: {0}")]
    BadHeader(String),
    /// The request line or headers are not valid UTF-8.
    #[error("request line or headers are not valid UTF-8")]
    NotUtf8,
    /// The header section is larger than [`MAX_HEADER_BYTES`].
    #[error("header section exceeds {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// `Content-Length` announces more than [`MAX_BODY_BYTES`].
    #[error("request body of {0} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge(u64),
    /// `Content-Length` is not a decimal number, or two of them disagree.
    #[error("invalid Content-Length: {0}")]
    BadContentLength(String),
    /// The request uses `Transfer-Encoding` (e.g. chunked), which is not supported.
    #[error("Transfer-Encoding is not supported; send the body with a Content-Length")]
    TransferEncoding,
    /// The method token is well-formed but not one the server implements.
    #[error("method {0} is not implemented")]
    MethodNotImplemented(String),
    /// The HTTP version is not 1.0 or 1.1.
    #[error("HTTP version {0} is not supported")]
    VersionNotSupported(String),
    /// A response (client side) is malformed.
    #[error("malformed response: {0}")]
    BadResponse(String),
}

impl HttpError {
    /// The status code the server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequestLine(_)
            | HttpError::BadHeader(_)
            | HttpError::NotUtf8
            | HttpError::BadContentLength(_)
            | HttpError::BadResponse(_) => 400,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::HeadersTooLarge => 431,
            HttpError::TransferEncoding | HttpError::MethodNotImplemented(_) => 501,
            HttpError::VersionNotSupported(_) => 505,
        }
    }
}

/// Parses one request from the start of `bytes`.
///
/// Returns [`ParsedRequest::Incomplete`] while `bytes` is a valid prefix of a request, so the
/// caller can read more and retry with the longer buffer. Errors are final for the connection.
/// Never panics; does not allocate more than `bytes.len()` plus small constants.
pub fn parse_request(bytes: &[u8]) -> Result<ParsedRequest, HttpError> {
    // RFC 9112 §2.2: a server SHOULD ignore empty lines received before the request line.
    let mut start = 0;
    while bytes.get(start..start + 2) == Some(b"\r\n") {
        start += 2;
        if start > MAX_HEADER_BYTES {
            return Err(HttpError::HeadersTooLarge);
        }
    }
    let rest = bytes.get(start..).unwrap_or_default();

    let Some(head_len) = find_head_end(rest)? else {
        // Reject a bad request line as soon as it is complete, without waiting for headers.
        if let Some(line_end) = find(rest, b"\r\n") {
            parse_request_line(as_utf8(rest.get(..line_end).unwrap_or_default())?)?;
        }
        return Ok(ParsedRequest::Incomplete);
    };
    let head = as_utf8(rest.get(..head_len).unwrap_or_default())?;
    let mut lines = head.split("\r\n");
    let (method, target, version) = parse_request_line(lines.next().unwrap_or_default())?;
    let fields = parse_fields(lines)?;

    let mut content_length: Option<u64> = None;
    let mut close = false;
    let mut keep_alive_token = false;
    for field in &fields {
        match field.name.as_str() {
            "content-length" => {
                let len = parse_content_length(&field.value)?;
                if content_length.is_some_and(|prev| prev != len) {
                    return Err(HttpError::BadContentLength(
                        "conflicting Content-Length headers".into(),
                    ));
                }
                content_length = Some(len);
            }
            "transfer-encoding" => return Err(HttpError::TransferEncoding),
            "connection" => {
                for token in field.value.split(',').map(str::trim) {
                    close |= token.eq_ignore_ascii_case("close");
                    keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
                }
            }
            _ => {}
        }
    }
    let body_len = match content_length {
        None => 0,
        Some(len) if len > MAX_BODY_BYTES as u64 => return Err(HttpError::BodyTooLarge(len)),
        // Bounded by MAX_BODY_BYTES above, so it fits in usize.
        Some(len) => usize::try_from(len).map_err(|_| HttpError::BodyTooLarge(len))?,
    };

    let body_start = start + head_len + 4;
    let Some(body) = bytes.get(body_start..body_start + body_len) else {
        return Ok(ParsedRequest::Incomplete);
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (target.to_string(), None),
    };
    let keep_alive = !close && (version == Version::Http11 || keep_alive_token);
    Ok(ParsedRequest::Complete {
        request: Request {
            method,
            path,
            query,
            version,
            headers: fields,
            body: body.to_vec(),
            keep_alive,
        },
        consumed: body_start + body_len,
    })
}

/// A parsed response (used by the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    /// The status code.
    pub status: u16,
    /// All header fields, in order.
    pub headers: Vec<Header>,
    /// The body.
    pub body: Vec<u8>,
}

/// Parses a whole response from `bytes`. `eof` says the peer has closed the connection, which
/// delimits a body sent without `Content-Length`. `Ok(None)` means "read more".
pub fn parse_response(bytes: &[u8], eof: bool) -> Result<Option<ParsedResponse>, HttpError> {
    let Some(head_len) = find_head_end(bytes).map_err(|_| bad_response("header too large"))? else {
        return if eof {
            Err(bad_response(
                "connection closed before the end of the headers",
            ))
        } else {
            Ok(None)
        };
    };
    let head = as_utf8(bytes.get(..head_len).unwrap_or_default())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad_response(&format!("status line {status_line:?}")));
    }
    let status = match code.parse::<u16>() {
        Ok(status) if code.len() == 3 && (100..=599).contains(&status) => status,
        _ => return Err(bad_response(&format!("status line {status_line:?}"))),
    };
    let headers = parse_fields(lines)?;
    let mut content_length = None;
    for field in headers.iter().filter(|f| f.name == "content-length") {
        content_length = Some(
            field
                .value
                .parse::<usize>()
                .map_err(|_| bad_response("invalid Content-Length"))?,
        );
    }
    let rest = bytes.get(head_len + 4..).unwrap_or_default();
    let body = if status < 200 || status == 204 || status == 304 {
        Vec::new()
    } else if let Some(len) = content_length {
        match rest.get(..len) {
            Some(body) => body.to_vec(),
            None if eof => return Err(bad_response("connection closed in the middle of the body")),
            None => return Ok(None),
        }
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(ParsedResponse {
        status,
        headers,
        body,
    }))
}

/// A response to be written by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Extra header fields (e.g. `Allow`); framing headers are added by [`Response::to_bytes`].
    pub headers: Vec<(&'static str, String)>,
    /// A JSON body, or empty for none.
    pub body: Vec<u8>,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Response {
        Response {
            status: 204,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A response with a JSON body.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            headers: Vec::new(),
            // Serialising a `Value` cannot fail (its map keys are always strings).
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// An error response with Firecracker's `{"fault_message": "..."}` body.
    pub fn fault(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "fault_message": message }))
    }

    /// The response's wire form. `keep_alive` says whether the connection stays open;
    /// `http10_keep_alive` adds `Connection: keep-alive` for HTTP/1.0 clients that asked for it.
    pub fn to_bytes(&self, keep_alive: bool, http10_keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: vmm\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        if !keep_alive {
            out.push_str("Connection: close\r\n");
        } else if http10_keep_alive {
            out.push_str("Connection: keep-alive\r\n");
        }
        // RFC 9110 §8.6: no Content-Length in a 204.
        if self.status != 204 {
            if !self.body.is_empty() {
                out.push_str("Content-Type: application/json\r\n");
            }
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Writes the response to `w` (see [`Response::to_bytes`]).
    pub fn write_to<W: Write>(
        &self,
        w: &mut W,
        keep_alive: bool,
        http10_keep_alive: bool,
    ) -> io::Result<()> {
        w.write_all(&self.to_bytes(keep_alive, http10_keep_alive))?;
        w.flush()
    }
}

/// The standard reason phrase for the status codes the API uses.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Position of the `\r\n\r\n` ending the header section, or `None` if it has not arrived yet.
/// Errors once more than [`MAX_HEADER_BYTES`] have arrived without it.
fn find_head_end(bytes: &[u8]) -> Result<Option<usize>, HttpError> {
    let window = bytes.get(..MAX_HEADER_BYTES).unwrap_or(bytes);
    match find(window, b"\r\n\r\n") {
        Some(pos) => Ok(Some(pos)),
        None if bytes.len() >= MAX_HEADER_BYTES => Err(HttpError::HeadersTooLarge),
        None => Ok(None),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn as_utf8(bytes: &[u8]) -> Result<&str, HttpError> {
    std::str::from_utf8(bytes).map_err(|_| HttpError::NotUtf8)
}

/// Truncates client input before it is echoed in an error message.
fn echo(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_ECHO_CHARS).collect();
    if s.chars().nth(MAX_ECHO_CHARS).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

fn bad_response(what: &str) -> HttpError {
    HttpError::BadResponse(what.to_string())
}

/// RFC 9110 `tchar`.
fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn parse_request_line(line: &str) -> Result<(Method, &str, Version), HttpError> {
    let bad = |why: &str| HttpError::BadRequestLine(format!("{why} in {}", echo(line)));
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected `METHOD /path HTTP/1.1`"));
    };
    if method.is_empty() || !method.chars().all(is_tchar) {
        return Err(bad("invalid method"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes().get(5).is_some_and(u8::is_ascii_digit)
            && v.as_bytes().get(6) == Some(&b'.')
            && v.as_bytes().get(7).is_some_and(u8::is_ascii_digit) =>
        {
            return Err(HttpError::VersionNotSupported(echo(v)))
        }
        _ => return Err(bad("invalid HTTP version")),
    };
    if !target.starts_with('/') {
        return Err(bad("request target must be an absolute path"));
    }
    if !target.bytes().all(|b| b.is_ascii_graphic()) || target.contains('#') {
        return Err(bad("invalid character in request target"));
    }
    let method =
        Method::from_token(method).ok_or_else(|| HttpError::MethodNotImplemented(echo(method)))?;
    Ok((method, target, version))
}

fn parse_fields<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<Header>, HttpError> {
    let mut fields = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::BadHeader(format!(
                "obsolete line folding in {}",
                echo(line)
            )));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::BadHeader(format!(
                "missing `:` in {}",
                echo(line)
            )));
        };
        if name.is_empty() || !name.chars().all(is_tchar) {
            return Err(HttpError::BadHeader(format!(
                "invalid field name {}",
                echo(name)
            )));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(HttpError::BadHeader(format!(
                "control character in the value of {}",
                echo(name)
            )));
        }
        fields.push(Header {
            name: name.to_ascii_lowercase(),
            value: value.to_string(),
        });
    }
    Ok(fields)
}

fn parse_content_length(value: &str) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadContentLength(echo(value)));
    }
    // All digits, so the only possible failure is overflow: that is certainly too large.
    Ok(value.parse::<u64>().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> (Request, usize) {
        match parse_request(bytes) {
            Ok(ParsedRequest::Complete { request, consumed }) => (request, consumed),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn error(bytes: &[u8]) -> HttpError {
        match parse_request(bytes) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let raw = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (req, consumed) = complete(raw);
        assert_eq!(consumed, raw.len());
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/");
        assert_eq!(req.query, None);
        assert_eq!(req.version, Version::Http11);
        assert_eq!(req.header("HOST"), Some("localhost"));
        assert!(req.body.is_empty());
        assert!(req.keep_alive);
    }

    #[test]
    fn body_and_query() {
        let raw = b"PATCH /vm?x=1 HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}";
        let (req, consumed) = complete(raw);
        assert_eq!(consumed, raw.len());
        assert_eq!(req.method, Method::Patch);
        assert_eq!(req.path, "/vm");
        assert_eq!(req.query.as_deref(), Some("x=1"));
        assert_eq!(req.body, b"{\"state\":\"Paused\"}");
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let raw =
            b"PUT /actions HTTP/1.1\r\nContent-Length: 25\r\n\r\n{\"action_type\":\"Shutdown\"}";
        let raw = &raw[..raw.len() - 1]; // Content-Length 25 ends before the final `}`.
        for end in 0..raw.len() {
            assert_eq!(
                parse_request(&raw[..end]),
                Ok(ParsedRequest::Incomplete),
                "prefix of {end} bytes"
            );
        }
        let (req, consumed) = complete(raw);
        assert_eq!(consumed, raw.len());
        assert_eq!(req.body.len(), 25);
    }

    #[test]
    fn pipelined_requests() {
        let raw = b"GET / HTTP/1.1\r\n\r\nPUT /actions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /vm HTT";
        let (first, n1) = complete(raw);
        assert_eq!(first.path, "/");
        let (second, n2) = complete(&raw[n1..]);
        assert_eq!(second.path, "/actions");
        assert_eq!(second.body, b"{}");
        assert_eq!(
            parse_request(&raw[n1 + n2..]),
            Ok(ParsedRequest::Incomplete)
        );
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let raw = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let (req, consumed) = complete(raw);
        assert_eq!(req.path, "/");
        assert_eq!(consumed, raw.len());
    }

    #[test]
    fn connection_semantics() {
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !complete(b"GET / HTTP/1.1\r\nconnection: Keep-Alive, Close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn bad_request_lines() {
        for raw in [
            &b"GET\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET http://host/ HTTP/1.1\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/x\r\n\r\n",
            b"GET / http/1.1\r\n\r\n",
            b"GET / HTTP/1.1\n\r\n",
            b"GET / HTTP/1.1\rX: y\r\n\r\n",
        ] {
            let err = error(raw);
            assert_eq!(
                err.status(),
                400,
                "{:?} -> {err}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn bad_request_line_is_rejected_before_headers_end() {
        assert_eq!(error(b"garbage\r\nHost: x\r\n").status(), 400);
    }

    #[test]
    fn unknown_method_and_version() {
        assert_eq!(
            error(b"BREW / HTTP/1.1\r\n\r\n"),
            HttpError::MethodNotImplemented("\"BREW\"".into())
        );
        assert_eq!(error(b"BREW / HTTP/1.1\r\n\r\n").status(), 501);
        assert_eq!(error(b"GET / HTTP/2.0\r\n\r\n").status(), 505);
    }

    #[test]
    fn bad_headers() {
        for raw in [
            &b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nName : v\r\n\r\n",
            b"GET / HTTP/1.1\r\n: v\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x7fc\r\n\r\n",
        ] {
            let err = error(raw);
            assert!(matches!(err, HttpError::BadHeader(_)), "{err}");
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn bad_content_length() {
        for value in ["", "abc", "-1", "+5", "1 2", "0x10", "5, 5"] {
            let raw = format!("PUT /actions HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            let err = error(raw.as_bytes());
            assert!(
                matches!(err, HttpError::BadContentLength(_)),
                "{value:?}: {err}"
            );
            assert_eq!(err.status(), 400);
        }
        let conflicting = b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(error(conflicting).status(), 400);
        // Identical duplicates are harmless.
        let (req, _) =
            complete(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab");
        assert_eq!(req.body, b"ab");
    }

    #[test]
    fn oversized_body_is_rejected_before_it_arrives() {
        let raw = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(error(raw.as_bytes()).status(), 413);
        let huge = b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(error(huge), HttpError::BodyTooLarge(u64::MAX));
        // The limit itself is fine.
        let raw = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
        assert_eq!(parse_request(raw.as_bytes()), Ok(ParsedRequest::Incomplete));
    }

    #[test]
    fn oversized_headers() {
        let mut raw = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        raw.resize(MAX_HEADER_BYTES + 10, b'a');
        assert_eq!(error(&raw), HttpError::HeadersTooLarge);
        assert_eq!(error(&raw).status(), 431);
        // Just below the limit is still only incomplete.
        raw.truncate(MAX_HEADER_BYTES - 1);
        assert_eq!(parse_request(&raw), Ok(ParsedRequest::Incomplete));
        // Endless blank lines do not bypass the limit.
        let blanks = b"\r\n".repeat(MAX_HEADER_BYTES);
        assert_eq!(error(&blanks), HttpError::HeadersTooLarge);
    }

    #[test]
    fn chunked_is_refused() {
        let err =
            error(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n");
        assert_eq!(err, HttpError::TransferEncoding);
        assert_eq!(err.status(), 501);
    }

    #[test]
    fn non_utf8() {
        assert_eq!(error(b"GET /\xff HTTP/1.1\r\n\r\n").status(), 400);
        assert_eq!(
            error(b"GET / HTTP/1.1\r\nX: \xc3\x28\r\n\r\n"),
            HttpError::NotUtf8
        );
        // A non-UTF-8 body is the router's business (it fails JSON parsing there).
        let (req, _) = complete(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\n\xff");
        assert_eq!(req.body, b"\xff");
    }

    #[test]
    fn error_messages_truncate_echoed_input() {
        let mut raw = b"GET /".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 5000));
        raw.extend_from_slice(b" HTTP/1.1 x\r\n\r\n");
        let message = error(&raw).to_string();
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn arbitrary_bytes_do_not_panic() {
        // A cheap deterministic stand-in for the fuzzer: every prefix and a few mutations of
        // a valid request.
        let seed = b"PATCH /vm HTTP/1.1\r\nContent-Length: 18\r\nConnection: close\r\n\r\n{\"state\":\"Paused\"}";
        for end in 0..=seed.len() {
            let _ = parse_request(&seed[..end]);
        }
        let mut state = 0x9e37_79b9_u32;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let mut input = seed.to_vec();
            let pos = state as usize % input.len();
            input[pos] = (state >> 8) as u8;
            let cut = (state >> 16) as usize % (input.len() + 1);
            let _ = parse_request(&input[..cut]);
            let _ = parse_response(&input[..cut], state & 1 == 0);
        }
    }

    #[test]
    fn response_wire_format() {
        let bytes = Response::no_content().to_bytes(true, false);
        assert_eq!(bytes, b"HTTP/1.1 204 No Content\r\nServer: vmm\r\n\r\n");
        let bytes = Response::fault(404, "no such path").to_bytes(false, false);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(
            text.ends_with("\r\n\r\n{\"fault_message\":\"no such path\"}"),
            "{text}"
        );
    }

    #[test]
    fn response_round_trip() {
        let value = serde_json::json!({"state": "Running"});
        let bytes = Response::json(200, &value).to_bytes(true, false);
        for end in 0..bytes.len() {
            assert_eq!(parse_response(&bytes[..end], false), Ok(None));
        }
        let parsed = parse_response(&bytes, false).unwrap().unwrap();
        assert_eq!(parsed.status, 200);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&parsed.body).unwrap(),
            value
        );
        let parsed = parse_response(&Response::no_content().to_bytes(false, false), false);
        assert_eq!(parsed.unwrap().unwrap().body, b"");
        // Without Content-Length the body runs to EOF.
        let raw = b"HTTP/1.1 200 OK\r\n\r\n{}";
        assert_eq!(parse_response(raw, false), Ok(None));
        assert_eq!(parse_response(raw, true).unwrap().unwrap().body, b"{}");
        assert!(parse_response(b"HTTP/1.1 2000 OK\r\n\r\n", true).is_err());
        assert!(parse_response(b"HTTP/1.1 200", true).is_err());
    }
}
