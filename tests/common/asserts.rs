//! Assertions on responses (the contract's status, headers and JSON bodies)
//! and waiting for a condition.

use std::time::{Duration, Instant};

use super::client::Response;

/// `Access-Control-Allow-Methods` of every response that is not an OPTIONS
/// reply of a known image.
pub const DEFAULT_METHODS: &str = "GET, PUT, OPTIONS";

/// Asserts the headers every response carries.
#[track_caller]
pub fn assert_imageio_headers(resp: &Response, methods: &str) {
    assert_eq!(
        resp.header("access-control-allow-methods"),
        Some(methods),
        "{resp:?}"
    );
    assert_eq!(resp.header("accept-ranges"), Some("bytes"), "{resp:?}");
}

/// Asserts a compact JSON success body, byte for byte, with the headers
/// every response carries.
#[track_caller]
pub fn assert_json_ok(resp: &Response, body: &str) {
    assert_eq!(resp.status, 200, "body: {}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_imageio_headers(resp, DEFAULT_METHODS);
    assert_eq!(resp.text(), body);
}

/// Asserts a JSON error response with this status and exact message, and
/// the headers every response carries.
#[track_caller]
pub fn assert_err(resp: &Response, status: u16, message: &str) {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.json(), serde_json::json!({ "error": message }));
    assert_imageio_headers(resp, DEFAULT_METHODS);
}

/// Asserts the 400 of a body that ended before its Content-Length after the
/// client sent `sent` bytes. (actix may drop the last buffered bytes when the
/// client half-closes, so the count reported can be lower.)
#[track_caller]
pub fn assert_body_ended_early(resp: &Response, sent: u64) {
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert_imageio_headers(resp, DEFAULT_METHODS);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let v = resp.json();
    let msg = v["error"].as_str().expect("error message");
    let n: u64 = msg
        .strip_prefix("request body ended early at ")
        .and_then(|m| m.strip_suffix(" bytes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected error {msg:?}"));
    assert!(n <= sent, "{msg:?} but only {sent} bytes were sent");
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{v}");
}

/// Retries `f` until it returns `Some` (at most `timeout`); panics otherwise.
#[track_caller]
pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
