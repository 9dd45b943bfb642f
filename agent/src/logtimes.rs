//! Per-line timestamps of a step's log, kept in a compact sidecar beside the spool
//! (`<step>.times`) and shipped with the chunks they fall in.
//!
//! A record `(offset, unix_ms)` says: every line starting at or after `offset`, up to the next
//! record, started at `unix_ms`. Lines are timestamped when their first byte is read from the
//! container, so all lines starting within one read share that read's time; a record is written
//! only when a read starts a line *and* the clock moved since the last record. That bounds the
//! sidecar by the number of reads (and milliseconds), not by the number of lines: a step printing
//! millions of short lines quickly costs a few kilobytes, not tens of megabytes.
//!
//! Records are 16 bytes, little endian: offset (u64), unix_ms (i64); offsets strictly increase.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use drover_proto::v1::LineTime;

/// Size of one record in a `.times` sidecar.
pub const RECORD: usize = 16;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Decides which reads get a record.
#[derive(Debug, Clone)]
pub struct LineClock {
    /// The next byte written starts a line (true at the start of the log).
    at_line_start: bool,
    /// Time of the last record written, if any.
    last_ms: Option<i64>,
}

impl Default for LineClock {
    fn default() -> Self {
        Self {
            at_line_start: true,
            last_ms: None,
        }
    }
}

impl LineClock {
    /// Observes `data` written at `offset` at time `now_ms`; returns the record to append to the
    /// sidecar, if any.
    pub fn observe(&mut self, offset: u64, data: &[u8], now_ms: i64) -> Option<LineTime> {
        if data.is_empty() {
            return None;
        }
        let first_start = if self.at_line_start {
            Some(0)
        } else {
            // A line starts after the first newline, unless that newline ends this read (the next
            // line's first byte has not arrived yet).
            memchr::memchr(b'\n', data)
                .map(|i| i + 1)
                .filter(|&i| i < data.len())
        };
        self.at_line_start = data.last() == Some(&b'\n');
        let start = first_start?;
        if self.last_ms == Some(now_ms) {
            return None;
        }
        self.last_ms = Some(now_ms);
        Some(LineTime {
            offset: offset + start as u64,
            unix_ms: now_ms,
        })
    }
}

/// Encodes a record.
pub fn encode(t: &LineTime) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[..8].copy_from_slice(&t.offset.to_le_bytes());
    out[8..].copy_from_slice(&t.unix_ms.to_le_bytes());
    out
}

fn decode(b: &[u8]) -> LineTime {
    let mut off = [0u8; 8];
    let mut ms = [0u8; 8];
    off.copy_from_slice(&b[..8]);
    ms.copy_from_slice(&b[8..RECORD]);
    LineTime {
        offset: u64::from_le_bytes(off),
        unix_ms: i64::from_le_bytes(ms),
    }
}

fn record_at(file: &File, index: u64) -> io::Result<LineTime> {
    let mut buf = [0u8; RECORD];
    file.read_exact_at(&mut buf, index * RECORD as u64)?;
    Ok(decode(&buf))
}

/// The records of the sidecar at `path` whose offsets lie in `[from, to)`, by binary search (the
/// sidecar of a long log is read a few records at a time). A missing sidecar has no records; a
/// partly written last record is ignored.
pub fn read_range(path: &Path, from: u64, to: u64) -> io::Result<Vec<LineTime>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    read_range_in(&file, from, to)
}

/// Records read per `pread` once the first one in range is found.
const SCAN_RECORDS: usize = 256;

/// [`read_range`] on an open sidecar (the shipper keeps it open across chunks).
pub fn read_range_in(file: &File, from: u64, to: u64) -> io::Result<Vec<LineTime>> {
    let count = file.metadata()?.len() / RECORD as u64;
    // First record with offset >= from.
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if record_at(file, mid)?.offset < from {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; SCAN_RECORDS * RECORD];
    let mut i = lo;
    while i < count {
        let n = (count - i).min(SCAN_RECORDS as u64) as usize;
        let block = &mut buf[..n * RECORD];
        file.read_exact_at(block, i * RECORD as u64)?;
        for rec in block.chunks_exact(RECORD) {
            let t = decode(rec);
            if t.offset >= to {
                return Ok(out);
            }
            out.push(t);
        }
        i += n as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_read_that_starts_a_line_and_moves_the_clock() {
        let mut c = LineClock::default();
        // The first byte of the log starts a line.
        assert_eq!(c.observe(0, b"ab", 5).map(|t| t.offset), Some(0));
        // Mid-line, no newline: no line starts here.
        assert_eq!(c.observe(2, b"cd", 6), None);
        // A newline followed by more bytes: the line after it starts at offset 6.
        assert_eq!(c.observe(4, b"e\nf", 7).map(|t| t.offset), Some(6));
        // Ends with a newline: the next line starts with the next read, not this one.
        assert_eq!(c.observe(7, b"g\n", 8), None);
        let t = c.observe(9, b"h\ni\n", 9).unwrap();
        assert_eq!((t.offset, t.unix_ms), (9, 9));
        // Same millisecond: covered by the previous record.
        assert_eq!(c.observe(13, b"j\n", 9), None);
        assert_eq!(c.observe(15, b"", 10), None);
    }

    #[test]
    fn range_reads_find_records_by_binary_search() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.times");
        let mut bytes = Vec::new();
        for i in 0..100u64 {
            bytes.extend_from_slice(&encode(&LineTime {
                offset: i * 10,
                unix_ms: 1000 + i as i64,
            }));
        }
        // A torn last record is ignored.
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        let got = read_range(&path, 35, 71).unwrap();
        let offsets: Vec<u64> = got.iter().map(|t| t.offset).collect();
        assert_eq!(offsets, vec![40, 50, 60, 70]);
        assert_eq!(got[0].unix_ms, 1004);
        assert!(read_range(&path, 2000, 3000).unwrap().is_empty());
        assert_eq!(read_range(&path, 0, 1).unwrap().len(), 1);
        assert!(read_range(&dir.path().join("none"), 0, 10)
            .unwrap()
            .is_empty());
    }
}
