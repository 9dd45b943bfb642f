//! A memo of recently submitted pipeline texts and their checked models.
//!
//! Pipelines are submitted again and again with the same text (every push of a branch, every retry, a
//! scheduled pipeline), and walking the YAML is the largest piece of a submit's own work: about 30 us
//! of CPU for a one-job file, more than the rest of placing it. The memo keeps the model of each valid
//! text it saw recently; a hit costs a hash of the text and a clone of the model. Only the text is the
//! key: the one input of a submit that is not in it, which secrets exist, is checked on every submit,
//! hit or miss, exactly as a fresh parse does, so an unknown secret is reported at its line and column
//! either way.

use std::sync::{Arc, Mutex, MutexGuard};

use super::parse::{check, Checked};
use super::{Pipeline, PipelineError};
use crate::recent::Recent;

/// Texts longer than this are walked every time (an entry holds its text and its model).
const MAX_TEXT: usize = 64 * 1024;
/// Texts remembered; the one remembered first is forgotten first.
const ENTRIES: usize = 256;

/// Remembers the checked model of the last [`ENTRIES`] valid pipeline texts.
#[derive(Debug)]
pub struct ParseMemo {
    inner: Mutex<Recent<Arc<str>, Arc<Checked>>>,
}

impl Default for ParseMemo {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Recent::new(ENTRIES)),
        }
    }
}

impl ParseMemo {
    /// [`super::parse_with_secrets`], answered from the memo when `src` was seen (and was valid).
    pub fn parse_with_secrets(
        &self,
        src: &str,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Pipeline, Vec<PipelineError>> {
        if let Some(hit) = self.lock().get(src).cloned() {
            return Checked::clone(&hit).finish(known);
        }
        let checked = check(src)?;
        if checked.is_valid() && src.len() <= MAX_TEXT {
            self.lock()
                .insert(Arc::from(src), Arc::new(checked.clone()));
        }
        checked.finish(known)
    }

    /// How many texts are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Recent<Arc<str>, Arc<Checked>>> {
        // Sections under this lock only look up, insert and remove entries; recover rather than wedge.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::parse_with_secrets;

    const WITH_SECRET: &str = "jobs:\n  build:\n    secrets: [TOKEN]\n    steps:\n      - image: alpine\n        commands: [\"true\"]\n";

    #[test]
    fn a_remembered_text_gives_the_same_model_as_a_fresh_parse() {
        let memo = ParseMemo::default();
        let yes = |_: &str| true;
        let first = memo.parse_with_secrets(WITH_SECRET, &yes).unwrap();
        assert_eq!(memo.len(), 1);
        let second = memo.parse_with_secrets(WITH_SECRET, &yes).unwrap();
        assert_eq!(memo.len(), 1);
        assert_eq!(first, second);
        assert_eq!(second, parse_with_secrets(WITH_SECRET, &yes).unwrap());
    }

    #[test]
    fn secrets_are_checked_on_every_submit_hit_or_miss() {
        let memo = ParseMemo::default();
        memo.parse_with_secrets(WITH_SECRET, &|_| true).unwrap();
        // The secret was deleted since: the remembered text is refused exactly like a fresh parse.
        let none = |_: &str| false;
        let from_memo = memo.parse_with_secrets(WITH_SECRET, &none).unwrap_err();
        let fresh = parse_with_secrets(WITH_SECRET, &none).unwrap_err();
        assert_eq!(from_memo, fresh);
        assert_eq!(from_memo.len(), 1);
        assert!(from_memo[0].message.contains("unknown secret \"TOKEN\""));
        assert_eq!((from_memo[0].line, from_memo[0].column), (3, 15));
        // And accepted again once it exists.
        assert!(memo
            .parse_with_secrets(WITH_SECRET, &|n| n == "TOKEN")
            .is_ok());
    }

    #[test]
    fn invalid_texts_are_not_remembered_and_keep_their_errors() {
        let memo = ParseMemo::default();
        let bad = "jobs:\n  build:\n    steps: []\n    bogus: 1\n";
        let first = memo.parse_with_secrets(bad, &|_| true).unwrap_err();
        assert_eq!(memo.len(), 0);
        assert_eq!(first, memo.parse_with_secrets(bad, &|_| true).unwrap_err());
        assert!(memo.parse_with_secrets("{[", &|_| true).is_err());
        assert_eq!(memo.len(), 0);
    }

    #[test]
    fn the_oldest_text_is_forgotten_past_the_limit() {
        let memo = ParseMemo::default();
        let text = |i: usize| {
            format!(
                "jobs:\n  j{i}:\n    steps:\n      - image: alpine\n        commands: [\"true\"]\n"
            )
        };
        for i in 0..ENTRIES + 10 {
            memo.parse_with_secrets(&text(i), &|_| true).unwrap();
        }
        assert_eq!(memo.len(), ENTRIES);
        assert!(memo.lock().get(text(0).as_str()).is_none());
        assert!(memo.lock().get(text(ENTRIES + 9).as_str()).is_some());
    }
}
