//! What a control request carries, checked before anything acts on it: the bearer token (in
//! constant time), the JSON body (at most [`MAX_BODY_BYTES`]), query flags and parameters,
//! and path segments, percent-decoded. Pure parsing, shared by the agent's API
//! ([`super::server`]) and the manager's.
//!
//! Invariants: nothing here panics or allocates past the body cap on hostile input; every
//! refusal is a short [`Reply`] (400, 401 or 413) that never echoes the hostile text.

use std::io::Read;

use serde::de::DeserializeOwned;

use super::http::{Reply, MAX_BODY_BYTES};

/// The optional `batch=NAME` of a query that takes nothing else. The name is checked here,
/// before it reaches the agent: 1 to [`MAX_NAME_BYTES`] of `[A-Za-z0-9._-]`, not starting
/// with '.' (what batch names are when a migration records them).
pub fn batch_param(query: &str) -> Result<Option<String>, Reply> {
    let params = query_pairs(query).ok_or_else(|| Reply::error(400, "malformed query string"))?;
    let mut batch = None;
    for (key, value) in params {
        match key.as_str() {
            "batch" if batch.is_some() => return Err(Reply::error(400, "batch given twice")),
            "batch" => batch = Some(value),
            _ => return Err(Reply::error(400, "unknown query parameter (only batch)")),
        }
    }
    if let Some(name) = &batch {
        // The reply never echoes the hostile text; the rule is enough to fix the request.
        crate::name::validate(name).map_err(|_| {
            Reply::error(
                400,
                format!(
                    "batch: 1 to {} of letters, digits, '.', '_', '-' (no leading '.')",
                    crate::name::NAME_MAX_BYTES
                ),
            )
        })?;
    }
    Ok(batch)
}

/// Checks a `Bearer` token in constant time; the refusal is 401 with a challenge.
pub fn authenticate(authorization: Option<&str>, token: &str) -> Result<(), Reply> {
    let unauthorized = |message: &str| {
        Reply::error(401, message).with_header("WWW-Authenticate", "Bearer realm=\"ferry\"")
    };
    let Some(value) = authorization else {
        return Err(unauthorized(
            "missing API token (Authorization: Bearer ...)",
        ));
    };
    let presented = match value.trim().split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => {
            return Err(unauthorized(
                "the Authorization header is not a Bearer token",
            ))
        }
    };
    if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("wrong API token"))
    }
}

/// Compares two byte strings in time that depends only on their lengths (the token's length
/// is public: 64 hex digits), so response timing reveals nothing about a guessed prefix.
pub fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    let diff = presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    // Keeps the compiler from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cold]
fn body_too_large() -> Reply {
    Reply::error(
        413,
        format!("request body larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// Reads and decodes a JSON body of at most [`MAX_BODY_BYTES`].
pub fn decode<T: DeserializeOwned>(body: &mut dyn Read) -> Result<T, Reply> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_BODY_BYTES).expect("1 MiB fits in u64") + 1;
    body.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|err| Reply::error(400, format!("cannot read the request body: {err}")))?;
    if bytes.len() > MAX_BODY_BYTES {
        return Err(body_too_large());
    }
    serde_json::from_slice(&bytes)
        .map_err(|err| Reply::error(400, format!("invalid JSON body: {err}")))
}

/// `force=true|false|1|0|yes|no`; absent is false.
pub fn flag(query: &str, name: &str) -> Result<bool, Reply> {
    let params = query_pairs(query).ok_or_else(|| Reply::error(400, "malformed query string"))?;
    match params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
    {
        None | Some("false" | "0" | "no") => Ok(false),
        Some("" | "true" | "1" | "yes") => Ok(true),
        Some(other) => Err(Reply::error(
            400,
            format!("{name}={other}: use true or false"),
        )),
    }
}

/// The decoded segments of an absolute path (empty segments dropped); None if a segment
/// has a bad escape or is not UTF-8.
pub fn path_segments(path: &str) -> Option<Vec<String>> {
    if !path.starts_with('/') {
        return None;
    }
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s, false))
        .collect()
}

/// Decoded `key=value` pairs of a query string (`+` is a space); None if malformed.
pub fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(key, true)?, percent_decode(value, true)?))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`).
fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::TrackerAdd;

    #[test]
    fn constant_time_eq_compares_bytes() {
        // Goal: equal only when identical. Method: same, one byte off, prefix, empty.
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdeg", b"abcdef"));
        assert!(!constant_time_eq(b"abc", b"abcdef"));
        assert!(!constant_time_eq(b"", b"abcdef"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn authorization_header_forms() {
        // Goal: only "Bearer <token>" (any case of the scheme) passes. Method: try variants.
        assert!(authenticate(Some("Bearer tok"), "tok").is_ok());
        assert!(authenticate(Some("bearer  tok "), "tok").is_ok());
        for bad in [
            None,
            Some("tok"),
            Some("Basic tok"),
            Some("Bearer tok2"),
            Some("Bearer "),
        ] {
            let reply = authenticate(bad, "tok").expect_err("refused");
            assert_eq!(reply.status, 401, "{bad:?}");
            assert!(reply
                .headers
                .iter()
                .any(|(name, value)| (*name, value.as_ref())
                    == ("WWW-Authenticate", "Bearer realm=\"ferry\"")));
        }
    }

    #[test]
    fn percent_decoding() {
        // Goal: escapes decode, malformed ones are rejected instead of panicking.
        // Method: decode good and bad inputs, including a truncated escape at the end.
        assert_eq!(percent_decode("a%20b", false).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        for bad in ["%", "%4", "%zz", "%ff", "%e2%82"] {
            assert_eq!(percent_decode(bad, false), None, "{bad}");
        }
        assert_eq!(percent_decode("%E2%82%AC", false).as_deref(), Some("€"));
    }

    #[test]
    fn query_and_flags() {
        // Goal: query parsing finds values and rejects nonsense. Method: parse examples.
        let pairs = query_pairs("tracker=a%2Bb&cells=64&&x").expect("parsed");
        assert_eq!(
            pairs,
            vec![
                ("tracker".to_string(), "a+b".to_string()),
                ("cells".to_string(), "64".to_string()),
                ("x".to_string(), String::new()),
            ]
        );
        assert!(flag("force=true", "force").expect("true"));
        assert!(flag("force", "force").expect("bare"));
        assert!(!flag("", "force").expect("absent"));
        assert!(!flag("force=0", "force").expect("0"));
        assert_eq!(flag("force=maybe", "force").expect_err("bad").status, 400);
        assert_eq!(
            flag("force=%zz", "force").expect_err("bad escape").status,
            400
        );
    }

    #[test]
    fn batch_queries_are_checked() {
        // Goal: hostile query strings get a short 400 before the agent sees them; good ones
        // pass. Method: valid, absent, bad names (escapes, traversal, too long, control
        // characters), duplicates, unknown keys, a bad escape; no reply repeats the input.
        assert_eq!(batch_param("").expect("none"), None);
        assert_eq!(
            batch_param("batch=rack-4.b_1").expect("ok").as_deref(),
            Some("rack-4.b_1")
        );
        let long = format!("batch={}", "a".repeat(crate::name::NAME_MAX_BYTES + 1));
        for bad in [
            "batch=",
            "batch=..%2Fetc",
            "batch=.hidden",
            "batch=a%0Ab",
            "batch=%E2%82%AC",
            "batch=a&batch=b",
            "batch=a&x=1",
            "cells=3",
            "batch=%zz",
            long.as_str(),
        ] {
            let reply = batch_param(bad).expect_err(bad);
            assert_eq!(reply.status, 400, "{bad}");
            let body = String::from_utf8_lossy(&reply.body);
            assert!(body.len() < 120, "{bad}: {body}");
            assert!(!body.contains("etc") && !body.contains("hidden"), "{body}");
        }
        let exact = "a".repeat(crate::name::NAME_MAX_BYTES);
        assert!(batch_param(&format!("batch={exact}")).is_ok());
    }

    #[test]
    fn path_segments_decode() {
        // Goal: paths split into decoded segments. Method: examples with escapes and slashes.
        assert_eq!(
            path_segments("/v1/exports/vm%31/").expect("ok"),
            vec!["v1", "exports", "vm1"]
        );
        assert_eq!(path_segments("relative"), None);
        assert_eq!(path_segments("/v1/%zz"), None);
    }

    #[test]
    fn oversized_body_is_refused() {
        // Goal: bodies over the cap are refused without decoding. Method: feed 1 MiB + 1.
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let err = decode::<TrackerAdd>(&mut big.as_slice()).expect_err("too large");
        assert_eq!(err.status, 413);
        let err = decode::<TrackerAdd>(&mut &b"{\"name\":"[..]).expect_err("truncated");
        assert_eq!(err.status, 400);
    }
}
