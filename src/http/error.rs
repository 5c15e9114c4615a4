//! The one error type of the HTTP layer: it renders itself as the JSON
//! `{"error": message}` response with the right status.

use std::fmt;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::backend::BackendError;
use crate::http::range::RangeError;
use crate::ops::OpError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// For 416: the image size, sent as `Content-Range: bytes */size`.
    unsatisfiable_size: Option<u64>,
    /// For 503: seconds, sent as `Retry-After`.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            unsatisfiable_size: None,
            retry_after: None,
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn not_found() -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not found")
    }
    pub(crate) fn unknown_image() -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "unknown image_id")
    }
    pub(crate) fn range_not_satisfiable(size: u64) -> ApiError {
        ApiError {
            status: StatusCode::RANGE_NOT_SATISFIABLE,
            message: "range not satisfiable".into(),
            unsatisfiable_size: Some(size),
            retry_after: None,
        }
    }
    /// The same error, telling the client to try again in `secs` seconds.
    pub(crate) fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
    #[cfg(test)]
    pub(crate) fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
    }
    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// From a range parse/resolve failure: 400 with `what`, or 416.
    pub(crate) fn from_range(e: RangeError, what: &str, size: u64) -> ApiError {
        match e {
            RangeError::Unsatisfiable => Self::range_not_satisfiable(size),
            RangeError::Invalid(why) => Self::bad_request(format!("invalid {what} header: {why}")),
        }
    }
    pub fn status(&self) -> StatusCode {
        self.status
    }
    #[cfg(test)]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status);
        if let Some(size) = self.unsatisfiable_size {
            b.insert_header((header::CONTENT_RANGE, format!("bytes */{size}")));
        }
        if let Some(secs) = self.retry_after {
            b.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        b.content_type("application/json")
            .body(serde_json::json!({ "error": self.message }).to_string())
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> ApiError {
        match e {
            BackendError::Unavailable(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "backend unavailable")
            }
            BackendError::Io(_) => ApiError::internal("backend error"),
            BackendError::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "backend timed out")
            }
            BackendError::OutOfRange { size } => ApiError::range_not_satisfiable(size),
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        match e {
            OpError::BodyTimeout { .. } => {
                ApiError::new(StatusCode::REQUEST_TIMEOUT, e.to_string())
            }
            OpError::BodyEnded { .. } => ApiError::bad_request(e.to_string()),
            OpError::Backend(e) => e.into(),
            OpError::ReadOnly => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
            OpError::OffsetPastEnd | OpError::NotSupported(_) => {
                ApiError::bad_request(e.to_string())
            }
            OpError::Internal => ApiError::internal(e.to_string()),
        }
    }
}
