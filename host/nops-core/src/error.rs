//! The error type of the domain layer.

use std::borrow::Cow;

/// What went wrong in a domain operation. The HTTP edge maps each variant to a status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The caller's input breaks a rule; nothing was changed.
    #[error("{message}")]
    Invalid {
        /// A stable, machine-readable code such as `invalid_capability`.
        code: &'static str,
        /// A message for the person who sent the input.
        message: Cow<'static, str>,
    },
    /// The resource does not exist (or is not visible to the caller's tenant).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `agent`.
        what: &'static str,
    },
    /// The change conflicts with the current state (a duplicate name, a stale revision).
    #[error("{message}")]
    Conflict {
        /// A stable, machine-readable code.
        code: &'static str,
        /// A message for the caller.
        message: Cow<'static, str>,
    },
    /// A configured limit would be exceeded.
    #[error("{message}")]
    LimitExceeded {
        /// A message naming the limit.
        message: Cow<'static, str>,
    },
    /// The credential is missing, malformed, unknown, expired or revoked.
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// Why, for logs and metrics; never echoes the credential.
        reason: &'static str,
    },
    /// The principal may not perform the action.
    #[error("forbidden")]
    Forbidden,
    /// The event bus cannot be reached or failed; the detail is for logs only.
    #[error("bus unavailable: {0}")]
    BusUnavailable(String),
    /// The store failed; the detail is for logs only.
    #[error("store unavailable: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl CoreError {
    /// An [`CoreError::Invalid`] with the given code and message.
    pub fn invalid(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::Invalid { code, message: message.into() }
    }
}

/// Result with a [`CoreError`].
pub type CoreResult<T> = Result<T, CoreError>;
