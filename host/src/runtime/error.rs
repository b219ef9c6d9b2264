//! How a call into an extension can fail, as the rest of the host sees it.
//!
//! A guest-visible failure is the extension's own `ext-error` answer
//! ([`CallError::Backend`]). Everything else is the host stopping or losing
//! the call: a trap, a limit, an answer too large to accept, or a host-side
//! fault. Each names the extension instance, the function and, for limits,
//! the limit.

use super::bindings::sandboxer::extension::types::ExtError;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The extension answered with an error of its own.
    #[error("extension `{extension}` {function}: {}", describe_ext_error(error))]
    Backend {
        extension: String,
        function: &'static str,
        error: ExtError,
    },

    #[error("extension `{extension}` {function}: stopped at its wall-clock limit of {limit_ms} ms")]
    Timeout {
        extension: String,
        function: &'static str,
        limit_ms: u64,
    },

    #[error("extension `{extension}` {function}: stopped after burning its fuel limit of {fuel}")]
    OutOfFuel {
        extension: String,
        function: &'static str,
        fuel: u64,
    },

    #[error("extension `{extension}` {function}: stopped at its memory limit of {limit_mb} MiB")]
    MemoryLimit {
        extension: String,
        function: &'static str,
        limit_mb: u64,
    },

    #[error("extension `{extension}` {function}: trapped: {message}")]
    Trap {
        extension: String,
        function: &'static str,
        message: String,
    },

    #[error(
        "extension `{extension}` {function}: returned a {field} of {size} bytes; the limit is {limit}"
    )]
    OutputTooLarge {
        extension: String,
        function: &'static str,
        field: &'static str,
        size: usize,
        limit: usize,
    },

    /// The extension handed the host a string or list larger than the host
    /// copies for one host call or one answer.
    #[error(
        "extension `{extension}` {function}: passed the host more than {limit_bytes} bytes at once (in one answer or host call); the limit is {limit_bytes}"
    )]
    TooMuchData {
        extension: String,
        function: &'static str,
        limit_bytes: usize,
    },

    #[error("extension `{extension}` {function}: host error: {message}")]
    Host {
        extension: String,
        function: &'static str,
        message: String,
    },
}

impl CallError {
    /// Whether another backend may be tried after this failure: capacity,
    /// unavailability, traps and limit kills are the backend's problem, a bad
    /// spec is the request's.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { error, .. } => {
                matches!(error, ExtError::Capacity(_) | ExtError::Unavailable(_))
            }
            Self::Timeout { .. }
            | Self::OutOfFuel { .. }
            | Self::MemoryLimit { .. }
            | Self::TooMuchData { .. }
            | Self::Trap { .. } => true,
            Self::OutputTooLarge { .. } | Self::Host { .. } => false,
        }
    }

    /// The extension's own error, when it answered with one.
    pub fn ext_error(&self) -> Option<&ExtError> {
        match self {
            Self::Backend { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// `unavailable: install bubblewrap`, with the message cut to one short line.
pub fn describe_ext_error(error: &ExtError) -> String {
    let (case, message) = match error {
        ExtError::InvalidSpec(message) => ("invalid-spec", message),
        ExtError::Capacity(message) => ("capacity", message),
        ExtError::Unavailable(message) => ("unavailable", message),
        ExtError::NotFound(message) => ("not-found", message),
        ExtError::Internal(message) => ("internal", message),
    };
    format!("{case}: {}", one_line(message, 500))
}

/// Collapses whitespace runs (newlines included) and cuts at `max_chars`.
///
/// Reads only as much of `text` as it keeps: an extension's 100 MiB message
/// costs no more than a short one.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut line = String::new();
    let mut chars = 0;
    for word in text.split_whitespace() {
        let separator = usize::from(chars > 0);
        let word_chars = word.chars().take(max_chars + 1).count();
        if chars + separator + word_chars > max_chars {
            if separator == 1 && chars < max_chars {
                line.push(' ');
                chars += 1;
            }
            line.extend(word.chars().take(max_chars - chars));
            line.push('…');
            return line;
        }
        if separator == 1 {
            line.push(' ');
        }
        line.push_str(word);
        chars += separator + word_chars;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_follows_the_error_case() {
        let backend = |error| CallError::Backend {
            extension: "x".into(),
            function: "create",
            error,
        };
        assert!(backend(ExtError::Capacity("full".into())).is_retryable());
        assert!(backend(ExtError::Unavailable("down".into())).is_retryable());
        assert!(!backend(ExtError::InvalidSpec("bad".into())).is_retryable());
        assert!(
            CallError::Timeout {
                extension: "x".into(),
                function: "create",
                limit_ms: 1
            }
            .is_retryable()
        );
    }

    #[test]
    fn messages_name_extension_function_and_limit() {
        let error = CallError::Timeout {
            extension: "loop".into(),
            function: "estimate-cost",
            limit_ms: 250,
        };
        assert_eq!(
            error.to_string(),
            "extension `loop` estimate-cost: stopped at its wall-clock limit of 250 ms"
        );
        let error = CallError::Backend {
            extension: "s".into(),
            function: "create",
            error: ExtError::Unavailable("line one\nline two".into()),
        };
        assert_eq!(
            error.to_string(),
            "extension `s` create: unavailable: line one line two"
        );
    }

    #[test]
    fn one_line_cuts_long_text() {
        assert_eq!(one_line("a\n b\t c", 10), "a b c");
        assert_eq!(one_line(&"x".repeat(20), 5), "xxxxx…");
        assert_eq!(one_line("ab cd ef", 5), "ab cd…");
        assert_eq!(one_line("ab cd ef", 6), "ab cd …");
        assert_eq!(one_line("ab cdef", 4), "ab c…");
        assert_eq!(one_line("  ", 4), "");
        assert_eq!(one_line("é è ê", 3), "é è…");
    }

    #[test]
    fn one_line_reads_no_more_than_it_keeps() {
        // Words counted past the cut would make this quadratic or huge.
        let long = "w ".repeat(4 << 20);
        assert_eq!(one_line(&long, 7), "w w w w…");
        let word = "x".repeat(8 << 20);
        assert_eq!(one_line(&word, 3), "xxx…");
    }
}
