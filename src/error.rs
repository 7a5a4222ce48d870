//! The one error type of the service, and its RFC 9457 problem+json rendering.
//!
//! Every refusal the API makes is an [`ApiError`]; `code` is the stable token clients match
//! on. Database failures are classified here: "cannot reach / too slow" is 503 with
//! `Retry-After`, anything else is a 500 whose detail carries no SQL and no stack.

use std::fmt;

use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidKey(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("a valid bearer token is required for this request")]
    Unauthorized { token_given: bool },
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed on this path; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("the request body was not received in time")]
    RequestTimeout,
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    ValueTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidKey(_) | ApiError::InvalidJson(_) | ApiError::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::ValueTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code (API.md "Errors").
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidKey(_) => "invalid_key",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::PreconditionFailed(_) => "precondition_failed",
            ApiError::ValueTooLarge(_) => "value_too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The human sentence for `detail`. Internal errors never expose their cause.
    fn detail(&self) -> String {
        match self {
            ApiError::Internal(_) => {
                "an unexpected error occurred; it has been logged with this request id".into()
            }
            other => other.to_string(),
        }
    }

    /// The problem document (JSON). `request_id` is echoed so a user can quote it.
    pub fn problem_json(&self, request_id: &str) -> Vec<u8> {
        let status = self.status();
        let doc = Problem {
            r#type: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: self.detail(),
            code: self.code(),
            request_id,
        };
        serde_json::to_vec(&doc).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Renders the problem document as the response.
    pub fn into_response(self, request_id: &str) -> Response {
        let status = self.status();
        let body = self.problem_json(request_id);
        let mut resp = Response::new(body.into());
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            ApiError::Unauthorized { token_given } => {
                let v = if *token_given {
                    "Bearer realm=\"kvstore\", error=\"invalid_token\""
                } else {
                    "Bearer realm=\"kvstore\""
                };
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The rest of the body may still arrive: the connection cannot carry another
            // request (RFC 9110 §15.5.9), and hyper closes it after this answer.
            ApiError::RequestTimeout => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[derive(serde::Serialize)]
struct Problem<'a> {
    r#type: &'static str,
    title: &'static str,
    status: u16,
    detail: String,
    code: &'static str,
    request_id: &'a str,
}

/// A database failure, as the store reports it.
#[derive(Debug, Clone)]
pub enum DbError {
    /// Could not get a connection, or the query did not finish in time.
    Timeout(&'static str),
    /// The connection failed (network, server gone, protocol).
    Unreachable(String),
    /// The server refused the statement.
    Server { code: u16, message: String },
    /// Anything else (driver bug, conversion).
    Other(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Timeout(what) => write!(f, "database {what} timed out"),
            DbError::Unreachable(e) => write!(f, "database unreachable: {e}"),
            DbError::Server { code, message } => write!(f, "database error {code}: {message}"),
            DbError::Other(e) => write!(f, "database driver error: {e}"),
        }
    }
}

impl std::error::Error for DbError {}

impl DbError {
    /// Deadlocks and duplicate keys from racing creates are worth one more try.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DbError::Server {
                code: 1213 | 1062,
                ..
            }
        )
    }

    /// Whether the failure says "the database is not there right now".
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Timeout(_) | DbError::Unreachable(_) => true,
            // 1205 lock wait timeout, 1213 deadlock (after retries), 1040 too many
            // connections, 1203 / 1226 the user's connection or resource limit reached,
            // 1045 access denied (credentials being rotated), 1053 shutdown in progress,
            // 2006/2013 gone away, 4031 disconnected for inactivity, 1927 killed, 1969 / 3024
            // statement time limit (MariaDB / MySQL), 3101 rolled back by a replication
            // plugin (group replication conflict), 1290 read-only (failover in progress),
            // 1146 / 1305 no such table / procedure (the schema is not migrated yet: a
            // request that beat readiness).
            DbError::Server { code, .. } => {
                matches!(
                    code,
                    1205 | 1213
                        | 1040
                        | 1203
                        | 1226
                        | 1045
                        | 1053
                        | 2006
                        | 2013
                        | 4031
                        | 1927
                        | 1969
                        | 3024
                        | 3101
                        | 1290
                        | 1062
                        | 1146
                        | 1305
                )
            }
            DbError::Other(_) => false,
        }
    }
}

impl From<mysql_async::Error> for DbError {
    fn from(e: mysql_async::Error) -> Self {
        match e {
            mysql_async::Error::Server(s) => DbError::Server {
                code: s.code,
                message: s.message,
            },
            mysql_async::Error::Io(e) => DbError::Unreachable(e.to_string()),
            mysql_async::Error::Driver(e) => DbError::Unreachable(e.to_string()),
            other => DbError::Other(other.to_string()),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        if e.is_unavailable() {
            ApiError::Unavailable("the database is unreachable or overloaded; retry shortly".into())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: u16) -> DbError {
        DbError::Server {
            code,
            message: String::new(),
        }
    }

    #[test]
    fn unavailable_means_retry_later_and_the_rest_is_a_bug() {
        // Lock wait, deadlock, too many connections, gone away, read-only, schema not yet
        // migrated (no such table / procedure): 503 with Retry-After.
        for code in [
            1205, 1213, 1040, 1203, 1226, 1045, 2006, 4031, 1969, 3024, 3101, 1290, 1146, 1305,
        ] {
            assert!(server(code).is_unavailable(), "{code}");
        }
        assert!(DbError::Timeout("query").is_unavailable());
        // A syntax error or a driver surprise is ours: 500.
        assert!(!server(1064).is_unavailable());
        assert!(!server(1054).is_unavailable());
        assert!(!DbError::Other("x".into()).is_unavailable());
        assert!(server(1213).is_retryable() && !server(1205).is_retryable());
    }
}
