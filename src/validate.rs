//! Reading the fields of a JSON object, for the three JSON readers: a
//! transfer's config (`crate::config`), a PATCH body (`http::patch_op`) and a
//! control-socket request (`crate::control`). Each helper says what it
//! accepts and the message of what it refuses, so that the same fault reads
//! the same in all three; a reader whose message differs passes its own.
//! Absent and `null` are the same everywhere.

use std::fmt;

use serde_json::{Map, Value};

/// A JSON object.
pub(crate) type Object = Map<String, Value>;

/// Why a JSON document or one of its fields was refused: the message the
/// client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError(String);

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<FieldError> for String {
    fn from(e: FieldError) -> String {
        e.0
    }
}

/// `raw` as JSON: refused as `invalid JSON: <serde_json's reason>`.
pub(crate) fn parse(raw: &[u8]) -> Result<Value, FieldError> {
    serde_json::from_slice(raw).map_err(|e| FieldError(format!("invalid JSON: {e}")))
}

/// `value` as an object: refused as `<what> must be a JSON object`.
pub(crate) fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Object, FieldError> {
    value
        .as_object()
        .ok_or_else(|| FieldError(format!("{what} must be a JSON object")))
}

/// `key`'s value, `None` when it is absent or `null`.
pub(crate) fn present<'a>(obj: &'a Object, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// `key` as `read` takes it: absent, `null` or refused by `read` is
/// `missing or invalid "<key>"`.
pub(crate) fn required<'a, T>(
    obj: &'a Object,
    key: &str,
    read: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<T, FieldError> {
    present(obj, key)
        .and_then(read)
        .ok_or_else(|| FieldError(format!("missing or invalid \"{key}\"")))
}

/// `key` as a string; see [`required`].
pub(crate) fn required_str<'a>(obj: &'a Object, key: &str) -> Result<&'a str, FieldError> {
    required(obj, key, Value::as_str)
}

/// `key` as a positive integer (at most `u64::MAX`): a negative one or 0 is
/// `"<key>" must be positive`, anything else [`required`]'s refusal.
pub(crate) fn required_positive_u64(obj: &Object, key: &str) -> Result<u64, FieldError> {
    let n = required(obj, key, |v| v.as_u64().or_else(|| v.is_i64().then_some(0)))?;
    if n == 0 {
        return Err(FieldError(format!("\"{key}\" must be positive")));
    }
    Ok(n)
}

/// `key` as `read` takes it, `None` when absent or `null`; a value `read`
/// refuses is `invalid` (the reader's own message).
pub(crate) fn optional<'a, T>(
    obj: &'a Object,
    key: &str,
    read: impl FnOnce(&'a Value) -> Option<T>,
    invalid: &str,
) -> Result<Option<T>, FieldError> {
    optional_or(obj, key, read, || invalid.to_string())
}

/// [`optional`] refusing with `"<key>" must be <kind>`.
fn optional_kind<'a, T>(
    obj: &'a Object,
    key: &str,
    read: impl FnOnce(&'a Value) -> Option<T>,
    kind: &str,
) -> Result<Option<T>, FieldError> {
    optional_or(obj, key, read, || format!("\"{key}\" must be {kind}"))
}

fn optional_or<'a, T>(
    obj: &'a Object,
    key: &str,
    read: impl FnOnce(&'a Value) -> Option<T>,
    invalid: impl FnOnce() -> String,
) -> Result<Option<T>, FieldError> {
    match present(obj, key) {
        None => Ok(None),
        Some(v) => read(v).map(Some).ok_or_else(|| FieldError(invalid())),
    }
}

/// `key` as a string, `None` when absent or `null`; anything else is
/// `"<key>" must be a string`.
pub(crate) fn optional_str<'a>(obj: &'a Object, key: &str) -> Result<Option<&'a str>, FieldError> {
    optional_kind(obj, key, Value::as_str, "a string")
}

/// `key` as a number, `None` when absent or `null`; anything else is
/// `"<key>" must be a number`.
pub(crate) fn optional_number(obj: &Object, key: &str) -> Result<Option<f64>, FieldError> {
    optional_kind(obj, key, Value::as_f64, "a number")
}

/// `key` as a boolean, `None` when absent or `null`; anything else is
/// `"<key>" must be a boolean`.
pub(crate) fn optional_bool(obj: &Object, key: &str) -> Result<Option<bool>, FieldError> {
    optional_kind(obj, key, Value::as_bool, "a boolean")
}

/// `key` as a non-negative integer (at most `u64::MAX`), `None` when absent
/// or `null`; a negative integer is `"<key>" must be non-negative`, anything
/// else `invalid "<key>"`.
pub(crate) fn optional_u64(obj: &Object, key: &str) -> Result<Option<u64>, FieldError> {
    match present(obj, key) {
        None => Ok(None),
        Some(v) if v.is_u64() => Ok(v.as_u64()),
        Some(v) if v.is_i64() => Err(FieldError(format!("\"{key}\" must be non-negative"))),
        Some(_) => Err(FieldError(format!("invalid \"{key}\""))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        match v {
            Value::Object(o) => o,
            _ => Object::new(),
        }
    }

    fn msg<T: fmt::Debug>(r: Result<T, FieldError>) -> String {
        r.map_or_else(String::from, |v| format!("accepted {v:?}"))
    }

    #[test]
    fn documents() {
        assert!(msg(parse(b"{")).starts_with("invalid JSON: "));
        assert_eq!(
            msg(object(&json!([]), "body")),
            "body must be a JSON object"
        );
        assert!(object(&json!({}), "body").is_ok());
    }

    #[test]
    fn absent_and_null_are_the_same() {
        let o = obj(json!({"n": null}));
        for key in ["n", "absent"] {
            assert_eq!(present(&o, key), None);
            assert_eq!(optional_str(&o, key), Ok(None));
            assert_eq!(optional_number(&o, key), Ok(None));
            assert_eq!(optional_bool(&o, key), Ok(None));
            assert_eq!(optional_u64(&o, key), Ok(None));
            assert_eq!(optional(&o, key, Value::as_str, "x"), Ok(None));
            assert_eq!(
                msg(required_str(&o, key)),
                format!("missing or invalid \"{key}\"")
            );
            assert_eq!(
                msg(required_positive_u64(&o, key)),
                format!("missing or invalid \"{key}\"")
            );
        }
    }

    #[test]
    fn kinds() {
        let o = obj(json!({"s": "x", "n": 1.5, "b": true, "i": 7, "neg": -1, "zero": 0}));
        assert_eq!(required_str(&o, "s"), Ok("x"));
        assert_eq!(msg(required_str(&o, "b")), "missing or invalid \"b\"");
        assert_eq!(optional_str(&o, "s"), Ok(Some("x")));
        assert_eq!(msg(optional_str(&o, "n")), "\"n\" must be a string");
        assert_eq!(optional_number(&o, "n"), Ok(Some(1.5)));
        assert_eq!(msg(optional_number(&o, "s")), "\"s\" must be a number");
        assert_eq!(optional_bool(&o, "b"), Ok(Some(true)));
        assert_eq!(msg(optional_bool(&o, "s")), "\"s\" must be a boolean");
        assert_eq!(optional_u64(&o, "i"), Ok(Some(7)));
        assert_eq!(msg(optional_u64(&o, "neg")), "\"neg\" must be non-negative");
        assert_eq!(msg(optional_u64(&o, "n")), "invalid \"n\"");
        assert_eq!(required_positive_u64(&o, "i"), Ok(7));
        assert_eq!(
            msg(required_positive_u64(&o, "neg")),
            "\"neg\" must be positive"
        );
        assert_eq!(
            msg(required_positive_u64(&o, "zero")),
            "\"zero\" must be positive"
        );
        assert_eq!(
            msg(required_positive_u64(&o, "n")),
            "missing or invalid \"n\""
        );
        assert_eq!(
            msg(optional(
                &o,
                "s",
                |v| v.as_str().filter(|s| s.len() > 1),
                "too short"
            )),
            "too short"
        );
    }
}
