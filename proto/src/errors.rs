//! Error helpers every Drover process needs when it reports a failed call.

use std::error::Error;

use tonic::{Code, Status};

/// An error with its sources joined: top-level messages often hide the cause (tonic's transport errors
/// say only "transport error", object_store's name the operation, not what failed).
pub fn error_chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Whether a failed call may work when made again: the connection broke or the peer is busy, as
/// opposed to a refusal that a retry would only repeat.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => true,
        // A stream cut mid-flight surfaces from h2 as an internal error.
        Code::Internal => {
            let m = status.message();
            m.contains("h2 protocol error") || m.contains("transport error")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_names_every_distinct_cause_once() {
        let inner = std::io::Error::other("connection refused");
        let outer = std::io::Error::new(std::io::ErrorKind::Other, Wrapped(inner));
        assert_eq!(error_chain(&outer), "transport error: connection refused");
    }

    #[test]
    fn refusals_are_not_retried_but_broken_streams_are() {
        assert!(is_transient(&Status::unavailable("down")));
        assert!(is_transient(&Status::internal(
            "h2 protocol error: stream reset"
        )));
        assert!(!is_transient(&Status::internal("disk full")));
        assert!(!is_transient(&Status::permission_denied("no")));
        assert!(!is_transient(&Status::invalid_argument("bad")));
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }
    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }
}
