//! The JSON body of `PATCH /images/{id}` → one validated operation. Pure (no
//! I/O), so it can be unit-tested, property-tested and fuzzed on its own.

use super::error::ApiError;
use crate::validate;

/// A validated JSON PATCH operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOp {
    /// `{"op":"flush"}`
    Flush,
    /// `{"op":"zero","offset":o,"size":n,"flush":b}`: `size` > 0; the
    /// offset is checked against the image size later, by the handler.
    Zero { offset: u64, size: u64, flush: bool },
}

/// Parses and validates a PATCH JSON body (already bounded by the caller to
/// `MAX_JSON_BODY`; serde_json's recursion limit bounds nesting). Every
/// failure is a 400 with a JSON error.
pub fn parse_patch_json(body: &[u8]) -> Result<PatchOp, ApiError> {
    let value = validate::parse(body).map_err(ApiError::bad_request)?;
    let obj = validate::object(&value, "body").map_err(ApiError::bad_request)?;
    match validate::required_str(obj, "op") {
        Ok("flush") => Ok(PatchOp::Flush),
        Ok("zero") => {
            let size =
                validate::required_positive_u64(obj, "size").map_err(ApiError::bad_request)?;
            let offset = validate::optional_u64(obj, "offset").map_err(ApiError::bad_request)?;
            let flush = validate::optional_bool(obj, "flush").map_err(ApiError::bad_request)?;
            Ok(PatchOp::Zero {
                offset: offset.unwrap_or(0),
                size,
                flush: flush.unwrap_or(false),
            })
        }
        _ => Err(ApiError::bad_request(
            "unsupported op; only \"zero\" and \"flush\" are supported",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::StatusCode;

    fn err(body: &str) -> String {
        let e = parse_patch_json(body.as_bytes()).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
        e.message().to_string()
    }

    #[test]
    fn valid_ops() {
        assert_eq!(parse_patch_json(br#"{"op":"flush"}"#), Ok(PatchOp::Flush));
        assert_eq!(
            parse_patch_json(br#"{"op":"zero","size":5}"#),
            Ok(PatchOp::Zero {
                offset: 0,
                size: 5,
                flush: false
            })
        );
        assert_eq!(
            parse_patch_json(
                br#"{"op":"zero","offset":7,"size":18446744073709551615,"flush":true}"#
            ),
            Ok(PatchOp::Zero {
                offset: 7,
                size: u64::MAX,
                flush: true
            })
        );
    }

    #[test]
    fn invalid_ops() {
        assert_eq!(
            err(r#"{"op":"zero","size":0}"#),
            "\"size\" must be positive"
        );
        assert_eq!(
            err(r#"{"op":"zero","size":-3}"#),
            "\"size\" must be positive"
        );
        assert_eq!(
            err(r#"{"op":"zero","size":1.5}"#),
            "missing or invalid \"size\""
        );
        assert_eq!(
            err(r#"{"op":"zero","size":18446744073709551616}"#),
            "missing or invalid \"size\""
        );
        assert_eq!(err(r#"{"op":"zero"}"#), "missing or invalid \"size\"");
        assert_eq!(
            err(r#"{"op":"zero","size":1,"offset":-1}"#),
            "\"offset\" must be non-negative"
        );
        assert_eq!(
            err(r#"{"op":"zero","size":1,"offset":"1"}"#),
            "invalid \"offset\""
        );
        assert_eq!(
            err(r#"{"op":"zero","size":1,"flush":"false"}"#),
            "\"flush\" must be a boolean"
        );
        assert_eq!(err("[]"), "body must be a JSON object");
        assert_eq!(
            err(r#"{"op":"trim"}"#),
            "unsupported op; only \"zero\" and \"flush\" are supported"
        );
        assert!(err("{").starts_with("invalid JSON: "));
        // Nesting bomb: serde_json's recursion limit refuses it, no overflow.
        let bomb = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(err(&bomb).starts_with("invalid JSON: recursion limit exceeded"));
        let bomb = format!(
            r#"{{"op":"zero","size":1,"x":{}1{}}}"#,
            "{\"a\":".repeat(50_000),
            "}".repeat(50_000)
        );
        assert!(err(&bomb).starts_with("invalid JSON: recursion limit exceeded"));
    }
}
