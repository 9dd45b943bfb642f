//! `drover logs --timestamps`: each line prefixed with the time its first byte was read,
//! `2026-12-03T08:00:00.123Z line`. The log bytes themselves (ANSI colours included) pass through
//! unchanged; only the prefixes are added.

use drover_proto::v1::{LineTime, LogEvent};

/// Formats Unix milliseconds as RFC 3339 in UTC with milliseconds: `2026-12-03T08:00:00.123Z`.
pub(crate) fn format_ms(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Inserts a timestamp before every line of a stream of log events.
#[derive(Debug, Default)]
pub(crate) struct Stamper {
    /// Step the previous event belonged to.
    step: Option<u32>,
    /// The next byte starts a line.
    at_line_start: bool,
    /// Time of the line being printed, once known.
    current: Option<i64>,
}

impl Stamper {
    /// The bytes to print for `ev`: its data with a `TIME ` prefix at each line start. A line whose
    /// time is unknown (a log stored before times were kept) gets no prefix.
    pub(crate) fn stamp(&mut self, ev: &LogEvent) -> Vec<u8> {
        if self.step != Some(ev.step_index) {
            // Each step's log starts with its own first line.
            self.step = Some(ev.step_index);
            self.at_line_start = true;
            self.current = None;
        }
        let mut out = Vec::with_capacity(ev.data.len() + 32);
        let mut times = ev.times.iter().peekable();
        let mut time_at = |pos: u64, current: &mut Option<i64>| {
            while let Some(LineTime { offset, unix_ms }) = times.peek() {
                if *offset > pos {
                    break;
                }
                *current = Some(*unix_ms);
                times.next();
            }
        };
        let mut start = 0usize;
        while start < ev.data.len() {
            if self.at_line_start {
                time_at(ev.offset + start as u64, &mut self.current);
                if let Some(ms) = self.current {
                    out.extend_from_slice(format_ms(ms).as_bytes());
                    out.push(b' ');
                }
            }
            let end = match memchr::memchr(b'\n', &ev.data[start..]) {
                Some(i) => start + i + 1,
                None => ev.data.len(),
            };
            out.extend_from_slice(&ev.data[start..end]);
            self.at_line_start = ev.data[end - 1] == b'\n';
            start = end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(step: u32, offset: u64, data: &[u8], times: &[(u64, i64)]) -> LogEvent {
        LogEvent {
            step_index: step,
            offset,
            data: data.to_vec(),
            times: times
                .iter()
                .map(|&(offset, unix_ms)| LineTime { offset, unix_ms })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn formats_rfc3339_utc_with_milliseconds() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_796_284_800_123), "2026-12-03T08:00:00.123Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn prefixes_each_line_with_its_start_time_and_keeps_bytes() {
        let mut s = Stamper::default();
        let red = b"\x1b[31mred\x1b[0m\nsame ms\npart";
        let out = s.stamp(&ev(0, 0, red, &[(0, 0)]));
        assert_eq!(
            out,
            [
                &b"1970-01-01T00:00:00.000Z \x1b[31mred\x1b[0m\n"[..],
                b"1970-01-01T00:00:00.000Z same ms\n",
                b"1970-01-01T00:00:00.000Z part",
            ]
            .concat()
        );
        // The rest of the partial line gets no new prefix; the next line gets its own time.
        let out = s.stamp(&ev(
            0,
            red.len() as u64,
            b"ial\nnext\n",
            &[(25, 1), (29, 2)],
        ));
        assert_eq!(out, b"ial\n1970-01-01T00:00:00.002Z next\n".to_vec());
        // A new step starts a new line and forgets the previous step's time.
        let out = s.stamp(&ev(1, 0, b"x\n", &[]));
        assert_eq!(out, b"x\n".to_vec());
    }
}
