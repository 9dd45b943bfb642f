//! Masking secret values in step output before it reaches the spool, so neither the live stream nor the
//! stored log ever holds them.
//!
//! A value can be split across two reads of the container's output (`printf 'sec'; sleep 1; printf
//! 'ret'`), so the masker keeps back the shortest tail that could still be the start of a secret (at most
//! the longest secret minus one byte) until the next read or the end of the step.

use std::io;

use crate::executor::OutputSink;

/// What replaces each secret value.
pub const MASK: &[u8] = b"***";

/// Finds secret values in a byte stream and replaces them by [`MASK`].
#[derive(Debug, Default, Clone)]
pub struct Masker {
    /// Values to hide, longest first (so a secret containing another is hidden whole).
    patterns: Vec<Vec<u8>>,
    /// Bytes held back: a possible start of a secret.
    tail: Vec<u8>,
}

impl Masker {
    /// A masker for `values`. Empty values are ignored; a multi-line value is also masked line by line
    /// (lines of 4 bytes or more), because tools often print one line of it.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Masker {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for v in values {
            if v.is_empty() {
                continue;
            }
            patterns.push(v.as_bytes().to_vec());
            if v.contains('\n') {
                for line in v.lines().map(|l| l.trim_end_matches('\r')) {
                    if line.len() >= 4 {
                        patterns.push(line.as_bytes().to_vec());
                    }
                }
            }
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Masker {
            patterns,
            tail: Vec::new(),
        }
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Feeds `data`; returns the bytes that can be written now, masked.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.patterns.is_empty() {
            return data.to_vec();
        }
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(data);
        let (out, keep_from) = self.scan(&buf, false);
        self.tail = buf[keep_from..].to_vec();
        out
    }

    /// The end of the stream: returns everything held back, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let buf = std::mem::take(&mut self.tail);
        self.scan(&buf, true).0
    }

    /// Masks `buf`; unless `last`, stops at the first position where the rest of `buf` is a proper
    /// prefix of a secret, and returns that position to keep.
    fn scan(&self, buf: &[u8], last: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'outer: while i < buf.len() {
            let rest = &buf[i..];
            for p in &self.patterns {
                if rest.starts_with(p) {
                    out.extend_from_slice(MASK);
                    i += p.len();
                    continue 'outer;
                }
            }
            if !last
                && self
                    .patterns
                    .iter()
                    .any(|p| p.len() > rest.len() && p.starts_with(rest))
            {
                return (out, i);
            }
            out.push(buf[i]);
            i += 1;
        }
        (out, buf.len())
    }
}

/// An [`OutputSink`] that masks secrets before passing output on. Call [`MaskingSink::finish`] when the
/// step's output ends, so held-back bytes are written.
#[derive(Debug)]
pub struct MaskingSink<S> {
    /// The sink written to.
    pub inner: S,
    masker: Masker,
}

impl<S: OutputSink> MaskingSink<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, masker: Masker) -> Self {
        MaskingSink { inner, masker }
    }

    /// Writes what was held back.
    pub async fn finish(&mut self) -> io::Result<()> {
        let rest = self.masker.finish();
        self.inner.write(rest.into()).await
    }
}

impl<S: OutputSink> OutputSink for MaskingSink<S> {
    async fn started(&mut self) {
        self.inner.started().await
    }

    async fn container_started(&mut self, container_id: &str) {
        self.inner.container_started(container_id).await
    }

    async fn write(&mut self, data: bytes::Bytes) -> io::Result<()> {
        if self.masker.is_empty() {
            // Nothing to hide: pass the bytes on without a copy.
            return self.inner.write(data).await;
        }
        let out = self.masker.push(&data);
        if out.is_empty() {
            return Ok(());
        }
        self.inner.write(out.into()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(m: &mut Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.push(c));
        }
        out.extend(m.finish());
        out
    }

    #[test]
    fn masks_whole_and_split_values() {
        let mut m = Masker::new(["secret"]);
        assert_eq!(run(&mut m, &[b"a secret b"]), b"a *** b");
        let mut m = Masker::new(["secret"]);
        assert_eq!(run(&mut m, &[b"sec", b"ret\n"]), b"***\n");
        let mut m = Masker::new(["secret"]);
        assert_eq!(run(&mut m, &[b"s", b"e", b"c", b"r", b"e", b"t"]), b"***");
        // A prefix that never completes is written at the end, unchanged.
        let mut m = Masker::new(["secret"]);
        assert_eq!(m.push(b"x secr"), b"x ");
        assert_eq!(m.finish(), b"secr");
        // The longer of two overlapping secrets wins; lines of a multi-line secret are masked too.
        let mut m = Masker::new(["abc", "abcdef"]);
        assert_eq!(run(&mut m, &[b"abcdef abc"]), b"*** ***");
        let mut m = Masker::new(["line-one\nline-two"]);
        assert_eq!(run(&mut m, &[b"x line-two y"]), b"x *** y");
        let mut m = Masker::new(["ss"]);
        assert_eq!(run(&mut m, &[b"sss"]), b"***s");
        let mut m = Masker::new([""]);
        assert!(m.is_empty());
        assert_eq!(run(&mut m, &[b"abc"]), b"abc");
    }

    proptest! {
        /// However the output is cut into reads, no secret survives and nothing else is changed.
        #[test]
        fn chunking_never_leaks(
            prefix in "[a-z ]{0,20}",
            suffix in "[a-z ]{0,20}",
            cuts in proptest::collection::vec(0usize..60, 0..8),
        ) {
            let secret = "Q7xZ9kP";
            let text = format!("{prefix}{secret}{suffix}{secret}");
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().filter(|c| *c <= bytes.len()).collect();
            points.push(0);
            points.push(bytes.len());
            points.sort();
            let chunks: Vec<&[u8]> = points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let mut m = Masker::new([secret]);
            let out = run(&mut m, &chunks);
            let expected = format!("{prefix}***{suffix}***");
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }
}
