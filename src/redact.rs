//! Secrets never reach the log: every line is masked on its way to stderr.
//!
//! Filtering at the writer, not at each call site, covers the lines other
//! libraries write too (the S3 client prints session tokens and signed
//! headers at trace when asked for by its own target). Three things are
//! masked: values registered as secret when they were read (keys, tokens),
//! the value after a header name that carries a credential, and the
//! `user:password@` of any URL.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::{Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

const MASK: &str = "***";

/// Shorter values are too likely to be ordinary words (moto's key is `test`).
const MIN_SECRET_LEN: usize = 8;

/// Header names whose value is a credential, lowercase.
const SECRET_HEADERS: &[&str] = &[
    "x-amz-security-token",
    "x-amz-server-side-encryption-customer-key",
];

/// A credential-looking run after a header name: at least this long and
/// within this many bytes of the name (past quotes, colons and wrappers like
/// `HeaderValue { _private: H0("`).
const MIN_TOKEN_LEN: usize = 24;
const TOKEN_SEARCH: usize = 64;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Marks `value` as secret: from now on it is masked in every log line.
pub fn secret(value: &str) {
    let value = value.trim();
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    let mut secrets = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
    if !secrets.iter().any(|s| s == value) {
        secrets.push(value.to_string());
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the secrets the process environment holds.
pub fn secrets_from_env() {
    for name in [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "WALSYNC_ENCRYPTION_KEY",
    ] {
        if let Ok(value) = std::env::var(name) {
            secret(&value);
        }
    }
}

/// `text` with every secret masked.
pub fn mask(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let secrets = SECRETS.lock().unwrap_or_else(PoisonError::into_inner);
        for s in secrets.iter() {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), MASK));
            }
        }
    }
    if let Some(masked) = mask_headers(&out) {
        out = Cow::Owned(masked);
    }
    if let Some(masked) = mask_userinfo(&out) {
        out = Cow::Owned(masked);
    }
    out
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+/=%_-.".contains(&b)
}

fn mask_headers(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for name in SECRET_HEADERS {
        let mut from = 0;
        while let Some(found) = lower[from..].find(name) {
            let after = from + found + name.len();
            from = after;
            let window_end = (after + TOKEN_SEARCH).min(text.len());
            let bytes = text.as_bytes();
            let mut i = after;
            while i < window_end {
                if !is_token_byte(bytes[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bytes.len() && is_token_byte(bytes[i]) {
                    i += 1;
                }
                if i - start >= MIN_TOKEN_LEN {
                    cuts.push((start, i));
                    break;
                }
            }
        }
    }
    splice(text, cuts)
}

/// `scheme://user:password@host` becomes `scheme://***@host`.
fn mask_userinfo(text: &str) -> Option<String> {
    let mut cuts = Vec::new();
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        from = start;
        let authority_end = text[start..]
            .find(|c: char| {
                c == '/' || c == '?' || c == '#' || c.is_whitespace() || "\"'<>`".contains(c)
            })
            .map_or(text.len(), |e| start + e);
        if let Some(at) = text[start..authority_end].rfind('@') {
            cuts.push((start, start + at));
        }
    }
    splice(text, cuts)
}

fn splice(text: &str, mut cuts: Vec<(usize, usize)>) -> Option<String> {
    if cuts.is_empty() {
        return None;
    }
    cuts.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in cuts {
        if start < at {
            continue;
        }
        out.push_str(&text[at..start]);
        out.push_str(MASK);
        at = end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// Stderr for the log, one masked event at a time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Event;

    fn make_writer(&'a self) -> Self::Writer {
        Event(Vec::new())
    }
}

/// One log event, written (masked) when it is complete: a secret split
/// across two writes is still seen whole.
#[derive(Debug)]
pub struct Event(Vec<u8>);

impl Write for Event {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let text = mask(&text);
        // Nowhere to report a failed write to stderr.
        crate::progress::out_of_the_way(|| {
            let _ = io::stderr().lock().write_all(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_values_headers_and_userinfo_are_masked() {
        secret("registered-secret-value");
        secret("short");
        let line = "key=registered-secret-value word=short";
        assert_eq!(mask(line), "key=*** word=short");

        let canonical = "x-amz-date:20261201T000957Z\nx-amz-security-token:IQoJb3JpZ2luX2VjEJr//token==\nhost:h";
        assert_eq!(
            mask(canonical),
            "x-amz-date:20261201T000957Z\nx-amz-security-token:***\nhost:h"
        );
        let debug = r#"{"X-Amz-Security-Token": HeaderValue { _private: H0("FwoGZXIvYXdzEJr+abc/def0123456789") }, "host": "h"}"#;
        assert_eq!(
            mask(debug),
            r#"{"X-Amz-Security-Token": HeaderValue { _private: H0("***") }, "host": "h"}"#
        );
        // The signed-header list names the header but holds no value.
        let names = "host;x-amz-content-sha256;x-amz-date;x-amz-security-token;x-amz-user-agent";
        assert_eq!(mask(names), names);

        assert_eq!(
            mask("endpoint=http://admin:hunter2@minio:9000/b and https://h/x@y"),
            "endpoint=http://***@minio:9000/b and https://h/x@y"
        );
        assert!(matches!(mask("nothing to hide"), Cow::Borrowed(_)));
    }
}
