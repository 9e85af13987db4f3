//! The error every engine operation returns: a stable code for the API, a
//! one-line message for the user, and the underlying cause for the log.

use std::fmt;

use vroom_types::{ErrorCode, InvalidInputError};

#[derive(Debug)]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// Wraps a lower-layer error; its whole cause chain becomes the message.
    pub fn wrap(
        code: ErrorCode,
        context: impl fmt::Display,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        OpError {
            code,
            message: format!("{context}: {}", chain(&err)),
            source: Some(Box::new(err)),
        }
    }

    pub fn not_found(what: &str, name: &str) -> Self {
        OpError::new(ErrorCode::NotFound, format!("no {what} named {name:?}"))
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        OpError::new(ErrorCode::Conflict, message)
    }

    /// The same error, its message prefixed with what it concerns
    /// (`instance web: memory 0 MiB is below ...`).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn internal(
        context: impl fmt::Display,
        err: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        OpError::wrap(ErrorCode::Internal, context, err)
    }
}

/// `outer: inner: innermost` on one line.
pub use vroom_base::error_chain as chain;

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OpError {}

impl From<InvalidInputError> for OpError {
    fn from(e: InvalidInputError) -> Self {
        OpError::new(e.code(), e.to_string())
    }
}
