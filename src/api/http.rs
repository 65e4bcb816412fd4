//! HTTP/1.1 for the control API, without I/O: request heads parsed (on `httparse`) from the
//! bytes a connection has read so far, and response heads encoded.
//!
//! Only what the API needs: origin-form targets, `Content-Length` bodies (no chunked
//! encoding: ferry's client and curl send a length), keep-alive on HTTP/1.1, `Expect:
//! 100-continue`. Everything else is refused with a short 4xx, so a hostile head costs at
//! most [`MAX_HEAD_BYTES`] of buffer and a parse.
//!
//! Invariants:
//! - [`parse_head`] never panics and never allocates more than the head it is given; a head
//!   that is not complete within [`MAX_HEAD_BYTES`] is [`HeadError::TooLarge`] (431).
//! - `Content-Length` is one decimal number (repeated only with the same value); a
//!   `Transfer-Encoding` is refused (411), so the body length is always known before a body
//!   byte is read, and no request can be smuggled behind another.
//! - [`MANAGER_EPOCH_HEADER`], when present, is given once and is a canonical decimal u64
//!   ([`crate::lease::fence::parse_epoch`]); anything else is refused (400) before routing.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;

use super::types::ErrorBody;

/// Largest request body accepted (read only from a caller presenting the token).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest request head (request line and headers, with the blank line) read from a peer.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in one request head.
pub const MAX_HEADERS: usize = 32;
/// The header a `ferry manager` sends with every command: its epoch (a decimal u64), which
/// the agent fences on (see [`crate::lease::fence`]).
pub const MANAGER_EPOCH_HEADER: &str = "Ferry-Manager-Epoch";

/// A request method. Routes match on the first five; anything else is answered 405.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`: answered like GET, without the body.
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// Any other token (kept for the log).
    Other(String),
}

impl Method {
    fn from_token(token: &str) -> Method {
        match token {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_string()),
        }
    }

    /// The method as sent.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Other(token) => token,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A complete, checked request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The request target as sent (path and query).
    pub target: String,
    /// The `Authorization` value; `Some("")` when it is not UTF-8 (refused as a bad token).
    pub authorization: Option<String>,
    /// The declared body length (`Content-Length`, 0 when absent).
    pub body_bytes: u64,
    /// The peer may send another request on this connection (HTTP/1.1 without
    /// `Connection: close`).
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the peer waits for a `100 Continue` before the body.
    pub expect_continue: bool,
    /// The manager epoch ([`MANAGER_EPOCH_HEADER`]); `None` from a caller that is not a
    /// manager (the CLI).
    pub manager_epoch: Option<u64>,
    /// Bytes of the head, blank line included: the body (or the next request) starts here.
    pub head_bytes: usize,
}

/// Why a request head is refused. The connection is closed after the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// No complete head within [`MAX_HEAD_BYTES`], or more than [`MAX_HEADERS`] headers.
    #[error("request head too large")]
    TooLarge,
    /// Not HTTP/1.x, or a header that cannot be read.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A body without a `Content-Length` (chunked transfer encoding).
    #[error("a request body needs a Content-Length")]
    LengthRequired,
}

impl HeadError {
    /// The HTTP status this error is answered with. Exhaustive: a new variant must decide.
    pub fn http_status(&self) -> u16 {
        match self {
            HeadError::TooLarge => 431,
            HeadError::Malformed(_) => 400,
            HeadError::LengthRequired => 411,
        }
    }
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete (read more),
/// an error once it is malformed or cannot complete within [`MAX_HEAD_BYTES`].
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_bytes = match request.parse(buf) {
        Ok(httparse::Status::Complete(head_bytes)) => head_bytes,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(err) => return Err(HeadError::Malformed(parse_problem(err))),
    };
    if head_bytes > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let mut head = Head {
        method: Method::from_token(method),
        target: target.to_string(),
        authorization: None,
        body_bytes: 0,
        // HTTP/1.0 closes after each request (we never answer with its keep-alive form).
        keep_alive: version == 1,
        expect_continue: false,
        manager_epoch: None,
        head_bytes,
    };
    let mut content_length = None;
    for header in request.headers.iter() {
        let value = header.value.trim_ascii();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_length(value)?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err(HeadError::Malformed("conflicting Content-Length"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HeadError::LengthRequired);
        } else if name.eq_ignore_ascii_case("authorization") {
            if head.authorization.is_some() {
                return Err(HeadError::Malformed("Authorization given twice"));
            }
            let text = std::str::from_utf8(value).unwrap_or_default();
            head.authorization = Some(text.to_string());
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(value, b"close") {
                head.keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err(HeadError::Malformed("unsupported Expect"));
            }
            head.expect_continue = true;
        } else if name.eq_ignore_ascii_case(MANAGER_EPOCH_HEADER) {
            if head.manager_epoch.is_some() {
                return Err(HeadError::Malformed("Ferry-Manager-Epoch given twice"));
            }
            let epoch = crate::lease::fence::parse_epoch(value).ok_or(HeadError::Malformed(
                "bad Ferry-Manager-Epoch (a decimal u64)",
            ))?;
            head.manager_epoch = Some(epoch);
        }
    }
    head.body_bytes = content_length.unwrap_or(0);
    Ok(Some(head))
}

/// A short reason for the peer; httparse's own words are fine to repeat (they hold none of
/// the peer's bytes).
fn parse_problem(err: httparse::Error) -> &'static str {
    match err {
        httparse::Error::Version => "not HTTP/1.0 or HTTP/1.1",
        httparse::Error::Token => "bad method or request target",
        httparse::Error::HeaderName | httparse::Error::HeaderValue => "bad header",
        httparse::Error::NewLine | httparse::Error::Status => "bad line ending",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

fn parse_length(value: &[u8]) -> Result<u64, HeadError> {
    const BAD: HeadError = HeadError::Malformed("bad Content-Length");
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(BAD);
    }
    let text = std::str::from_utf8(value).map_err(|_| BAD)?;
    text.parse::<u64>().map_err(|_| BAD)
}

/// Whether a comma-separated header value holds `token` (any case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|byte| *byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// An HTTP answer before the listener encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`; None for an empty body.
    pub content_type: Option<&'static str>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Extra headers (`Allow`, `WWW-Authenticate`, `Location`); values never hold CR or LF
    /// ([`Reply::with_header`] refuses them).
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, value: &impl Serialize) -> Reply {
        // Our own types always serialize (no maps with non-string keys, no failing impls).
        let body = serde_json::to_vec(value).expect("API types serialize to JSON");
        Reply {
            status,
            content_type: Some("application/json"),
            body,
            headers: Vec::new(),
        }
    }

    /// An answer without a body.
    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            content_type: None,
            body: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// A JSON error answer `{"error": message}`.
    #[cold]
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(
            status,
            &ErrorBody {
                error: message.into(),
                stale_epoch: None,
            },
        )
    }

    /// The answer with one more header.
    /// A value holding CR or LF (header injection) is a caller bug and panics.
    pub fn with_header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Reply {
        let value = value.into();
        assert!(
            !value.contains(['\r', '\n']),
            "header {name} value holds a line break"
        );
        self.headers.push((name, value));
        self
    }

    /// The answer on the wire: its head ([`response_head`]), then its body unless
    /// `head_only` (a HEAD request gets the length of the body it is not sent).
    pub fn encode(&self, close: bool, head_only: bool) -> Vec<u8> {
        let mut bytes = response_head(
            self.status,
            self.content_type,
            &self
                .headers
                .iter()
                .map(|(name, value)| (*name, value.as_ref()))
                .collect::<Vec<_>>(),
            self.body.len(),
            close,
        );
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Encodes a response head: status line, `Content-Type` (if any), `Content-Length`,
/// `extra` headers, and `Connection: close` when the connection ends after it.
pub fn response_head(
    status: u16,
    content_type: Option<&str>,
    extra: &[(&str, &str)],
    body_bytes: usize,
    close: bool,
) -> Vec<u8> {
    use std::fmt::Write;
    let mut head = String::with_capacity(160);
    // Writing to a String cannot fail.
    let _ = write!(head, "HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(content_type) = content_type {
        let _ = write!(head, "Content-Type: {content_type}\r\n");
    }
    // 204 carries no body and no length (RFC 9110 §8.6).
    if status != 204 {
        let _ = write!(head, "Content-Length: {body_bytes}\r\n");
    }
    for (name, value) in extra {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(text: &str) -> Head {
        parse_head(text.as_bytes())
            .expect("valid head")
            .expect("complete head")
    }

    #[test]
    fn a_complete_head_is_read() {
        // Goal: the fields the API uses come out of an ordinary request.
        // Method: parse a POST with a body, token, Expect, and one byte after the head.
        let text = "POST /v1/exports?x=1 HTTP/1.1\r\nHost: a\r\nauthorization: Bearer t\r\n\
                    Content-Length: 12\r\nExpect: 100-continue\r\n\r\n{";
        let head = complete(text);
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.target, "/v1/exports?x=1");
        assert_eq!(head.authorization.as_deref(), Some("Bearer t"));
        assert_eq!(head.body_bytes, 12);
        assert!(head.keep_alive);
        assert!(head.expect_continue);
        assert_eq!(head.head_bytes, text.len() - 1);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        // Goal: HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 never keeps it.
        // Method: parse the four combinations.
        assert!(complete("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(!complete("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert_eq!(complete("BREW / HTTP/1.1\r\n\r\n").method.as_str(), "BREW");
    }

    #[test]
    fn partial_heads_wait_until_the_cap() {
        // Goal: an incomplete head asks for more bytes until MAX_HEAD_BYTES, then is refused;
        // a complete head just under the cap passes. Method: grow one header line.
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost: a"), Ok(None));
        assert_eq!(parse_head(b""), Ok(None));
        let mut line = b"GET / HTTP/1.1\r\nX: ".to_vec();
        line.resize(MAX_HEAD_BYTES - 1, b'a');
        assert_eq!(parse_head(&line), Ok(None));
        line.push(b'a');
        assert_eq!(parse_head(&line), Err(HeadError::TooLarge));
        line.truncate(MAX_HEAD_BYTES - 4);
        line.extend_from_slice(b"\r\n\r\n");
        assert!(parse_head(&line).expect("fits").is_some());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(text.as_bytes()), Err(HeadError::TooLarge));
    }

    #[test]
    fn hostile_heads_are_refused() {
        // Goal: ambiguous lengths, chunked bodies, other protocols and bad bytes are refused
        // with a 4xx, never a panic. Method: parse each, check the status.
        let cases: &[(&[u8], u16)] = &[
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nContent-Length: \r\n\r\n", 400),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (
                b"GET / HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", 400),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", 400),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        ];
        for (text, status) in cases {
            let err = parse_head(text).expect_err("refused");
            let text = String::from_utf8_lossy(text);
            assert_eq!(err.http_status(), *status, "{text:?}: {err}");
        }
        // The same length twice is one length.
        let head = complete("POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(head.body_bytes, 3);
        let head = parse_head(b"GET / HTTP/1.1\r\nAuthorization: \xff\r\n\r\n");
        let head = head.expect("valid").expect("complete");
        assert_eq!(head.authorization.as_deref(), Some(""));
    }

    #[test]
    fn manager_epoch_header_is_strict() {
        // Goal: the manager's epoch is read from its header (any case of the name, spaces
        // around the value), absent is None, and anything but one canonical u64 is a 400.
        // Method: parse good heads and hostile ones.
        assert_eq!(complete("GET / HTTP/1.1\r\n\r\n").manager_epoch, None);
        let head = complete("GET / HTTP/1.1\r\nferry-manager-epoch:  42 \r\n\r\n");
        assert_eq!(head.manager_epoch, Some(42));
        let head = complete("GET / HTTP/1.1\r\nFerry-Manager-Epoch: 0\r\n\r\n");
        assert_eq!(head.manager_epoch, Some(0));
        for value in [
            "",
            "-1",
            "+1",
            "007",
            "1 2",
            "0x10",
            "4a",
            "18446744073709551616",
        ] {
            let text = format!("GET / HTTP/1.1\r\nFerry-Manager-Epoch: {value}\r\n\r\n");
            let err = parse_head(text.as_bytes()).expect_err(value);
            assert_eq!(err.http_status(), 400, "{value:?}");
            assert!(err.to_string().len() < 80, "{err}");
        }
        let twice = "GET / HTTP/1.1\r\nFerry-Manager-Epoch: 5\r\nFerry-Manager-Epoch: 5\r\n\r\n";
        assert_eq!(
            parse_head(twice.as_bytes())
                .expect_err("twice")
                .http_status(),
            400
        );
        let bytes = b"GET / HTTP/1.1\r\nFerry-Manager-Epoch: \xff\r\n\r\n";
        assert_eq!(parse_head(bytes).expect_err("not text").http_status(), 400);
    }

    #[test]
    fn random_bytes_never_panic() {
        // Goal: no byte string makes the parser panic. Method: PRNG bytes, some after a
        // valid request-line prefix, at every length up to a few hundred bytes.
        let mut prng = crate::prng::SplitMix64::new(0x4854_5450);
        for round in 0..4000 {
            let len = prng.index(300);
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                b"GET /v1 HTTP/1.1\r\n".to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..len {
                let byte = prng.byte();
                bytes.push(if round % 3 == 0 { byte % 128 } else { byte });
            }
            if let Ok(Some(head)) = parse_head(&bytes) {
                assert!(head.head_bytes <= bytes.len());
            }
        }
    }

    #[test]
    fn response_heads_are_well_formed() {
        // Goal: status line, length, extra headers and close are encoded; 204 has no length.
        // Method: encode two heads and compare the text.
        let head = response_head(401, Some("application/json"), &[("A", "b")], 5, true);
        assert_eq!(
            String::from_utf8(head).expect("ASCII"),
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n\
             Content-Length: 5\r\nA: b\r\nConnection: close\r\n\r\n"
        );
        let head = response_head(204, None, &[], 0, false);
        assert_eq!(head, b"HTTP/1.1 204 No Content\r\n\r\n");
    }
}
