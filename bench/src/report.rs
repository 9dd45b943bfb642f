//! Result lines (`name value unit (floor X unit, ratio R, target T)`) and percentiles.

use std::fmt;
use std::time::Duration;

/// A measured figure.
#[derive(Debug, Clone)]
pub(crate) struct Figure {
    /// Dotted name, e.g. `dispatch.p50`.
    pub(crate) name: String,
    /// The value in `unit`.
    pub(crate) value: f64,
    /// Unit: `us`, `ms`, `s`, `jobs/s`, `MiB`, `%`.
    pub(crate) unit: &'static str,
}

impl Figure {
    /// A figure named `name` of `value` `unit`.
    pub(crate) fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Self {
        Figure {
            name: name.into(),
            value,
            unit,
        }
    }

    /// A duration in microseconds.
    pub(crate) fn us(name: impl Into<String>, d: Duration) -> Self {
        Figure::new(name, d.as_secs_f64() * 1e6, "us")
    }

    /// A duration in milliseconds.
    pub(crate) fn ms(name: impl Into<String>, d: Duration) -> Self {
        Figure::new(name, d.as_secs_f64() * 1e3, "ms")
    }

    /// A duration in seconds.
    pub(crate) fn secs(name: impl Into<String>, d: Duration) -> Self {
        Figure::new(name, d.as_secs_f64(), "s")
    }
}

/// One printed result: a figure beside the floor it is compared with.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    /// What was measured.
    pub(crate) result: Figure,
    /// The floor measured in the same run.
    pub(crate) floor: Figure,
    /// The target, as printed (`<= 2.0x`, `<= 500 us`, `n/a`).
    pub(crate) target: String,
}

impl Line {
    /// `result` beside `floor`, aiming at `target`.
    pub(crate) fn new(result: Figure, floor: Figure, target: impl Into<String>) -> Self {
        Line {
            result,
            floor,
            target: target.into(),
        }
    }

    /// result / floor, when the floor is not zero.
    pub(crate) fn ratio(&self) -> Option<f64> {
        (self.floor.value != 0.0 && self.floor.value.is_finite())
            .then(|| self.result.value / self.floor.value)
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratio = match self.ratio() {
            Some(r) => fmt_ratio(r),
            None => "n/a".to_string(),
        };
        write!(
            f,
            "{} {} {} (floor {} {} {}, ratio {}, target {})",
            self.result.name,
            fmt_value(self.result.value),
            self.result.unit,
            self.floor.name,
            fmt_value(self.floor.value),
            self.floor.unit,
            ratio,
            self.target
        )
    }
}

/// Three significant digits at most, no exponent: `412`, `70.3`, `3.62`, `0.045`.
pub(crate) fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Ratios: `5.9`, `1.21`, `0.004`.
pub(crate) fn fmt_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.1}")
    } else if r >= 0.1 {
        format!("{r:.2}")
    } else {
        format!("{r:.4}")
    }
}

/// Sorted samples with nearest-rank percentiles.
#[derive(Debug, Clone)]
pub(crate) struct Samples {
    sorted: Vec<Duration>,
}

impl Samples {
    /// Sorts `samples`.
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Samples { sorted: samples }
    }

    /// Nearest-rank percentile `p` in 0..=100; zero when there are no samples.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let n = self.sorted.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    /// The median.
    pub(crate) fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    /// The 99th percentile.
    pub(crate) fn p99(&self) -> Duration {
        self.percentile(99.0)
    }

    /// Number of samples.
    pub(crate) fn len(&self) -> usize {
        self.sorted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples::new((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(s.p50(), Duration::from_micros(50));
        assert_eq!(s.p99(), Duration::from_micros(99));
        assert_eq!(s.percentile(100.0), Duration::from_micros(100));
        assert_eq!(s.percentile(0.0), Duration::from_micros(1));
        assert_eq!(Samples::new(vec![]).p50(), Duration::ZERO);
        let one = Samples::new(vec![Duration::from_millis(3)]);
        assert_eq!(one.p99(), Duration::from_millis(3));
    }

    #[test]
    fn line_format_matches_the_documented_shape() {
        let l = Line::new(
            Figure::new("dispatch.p50", 412.4, "us"),
            Figure::new("echo.p50", 70.0, "us"),
            "<= 2.0x",
        );
        assert_eq!(
            l.to_string(),
            "dispatch.p50 412 us (floor echo.p50 70.0 us, ratio 5.89, target <= 2.0x)"
        );
        let zero = Line::new(
            Figure::new("fleet.cpu", 1.5, "%"),
            Figure::new("fleet.0_agents.cpu", 0.0, "%"),
            "<= 5 %",
        );
        assert!(zero.to_string().contains("ratio n/a"));
    }

    #[test]
    fn values_keep_three_significant_digits() {
        assert_eq!(fmt_value(3.6234), "3.62");
        assert_eq!(fmt_value(12345.6), "12346");
        assert_eq!(fmt_value(0.0451), "0.045");
        assert_eq!(fmt_ratio(0.00412), "0.0041");
        assert_eq!(fmt_ratio(1.214), "1.21");
    }
}
