//! Heartbeat pacing: the heartbeat interval and lease TTL the coordinator tells its agents.
//!
//! A heartbeat costs the coordinator a few microseconds of CPU (an HTTP/2 frame, two task wake-ups, a
//! socket read), so a fleet at a fixed interval costs CPU in proportion to its size. Like Nomad, the
//! coordinator stretches the interval as the fleet grows so that the whole fleet sends at most
//! `max_rate` heartbeats a second, and stretches the lease TTL in the same proportion so an agent still
//! gets the same number of missed heartbeats before it is declared lost. Small fleets keep the
//! configured (base) interval and TTL.
//!
//! Agents learn the interval from their Welcome and, when it changes, from the next HeartbeatAck. An
//! agent too old to read it from the acknowledgement keeps the one of its Welcome and heartbeats faster
//! than asked; the coordinator holds each agent to the longest TTL it has told it (see
//! [`super::LastSeen`]), so a shrinking fleet never shortens a lease an agent does not know about.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The pacing of one coordinator: the configured base and the interval in force now.
#[derive(Debug)]
pub struct Pacing {
    base_interval: Duration,
    base_ttl: Duration,
    /// Heartbeats per second the fleet may send at most; 0: never stretch.
    max_rate: u32,
    /// The interval in force, in milliseconds (the TTL is derived from it, so a reader never sees
    /// the interval of one moment with the TTL of another).
    interval_ms: AtomicU64,
}

/// A heartbeat interval and the lease TTL that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// How often an agent sends a heartbeat.
    pub interval: Duration,
    /// Silence after which an agent's attempts are lost.
    pub lease_ttl: Duration,
}

impl Pacing {
    /// Pacing from the configured base interval and TTL, for at most `max_rate` heartbeats a second
    /// (0: the base always).
    pub fn new(base_interval: Duration, base_ttl: Duration, max_rate: u32) -> Pacing {
        Pacing {
            base_interval,
            base_ttl,
            max_rate,
            interval_ms: AtomicU64::new(millis(base_interval)),
        }
    }

    /// The interval and TTL in force now.
    pub fn current(&self) -> Pace {
        let interval = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed));
        Pace {
            interval,
            lease_ttl: self.ttl_for(interval),
        }
    }

    /// Recompute the pace for `attached` agents; returns the pace in force afterwards.
    pub fn update(&self, attached: usize) -> Pace {
        let current = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed));
        let next = paced_interval(self.base_interval, self.max_rate, attached, current);
        if next != current {
            tracing::info!(
                agents = attached,
                interval_ms = millis(next),
                lease_ttl_ms = millis(self.ttl_for(next)),
                "heartbeat interval changed with the fleet size"
            );
            self.interval_ms.store(millis(next), Ordering::Relaxed);
        }
        self.current()
    }

    /// The TTL that goes with `interval`: the base TTL stretched like the interval.
    fn ttl_for(&self, interval: Duration) -> Duration {
        if interval <= self.base_interval || self.base_interval.is_zero() {
            return self.base_ttl;
        }
        let nanos = self.base_ttl.as_nanos() * interval.as_nanos() / self.base_interval.as_nanos();
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The interval for `attached` agents sending at most `max_rate` heartbeats a second together: the base
/// interval, or longer, in steps of half the base so the agents are not told a new interval for every
/// agent that comes and goes. It grows as soon as the fleet needs it, and comes back down only once
/// the fleet has shrunk by a fifth below what the current interval allows.
pub(crate) fn paced_interval(
    base: Duration,
    max_rate: u32,
    attached: usize,
    current: Duration,
) -> Duration {
    if max_rate == 0 {
        return base;
    }
    let step = (base / 2).max(Duration::from_millis(1));
    let need = |n: usize| -> Duration {
        let raw = Duration::from_secs_f64(n as f64 / f64::from(max_rate));
        if raw <= base {
            return base;
        }
        let steps = raw.as_nanos().div_ceil(step.as_nanos());
        step * u32::try_from(steps).unwrap_or(u32::MAX)
    };
    let wanted = need(attached);
    if wanted >= current || need(attached.saturating_add(attached / 4)) < current {
        wanted
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_small_fleet_keeps_the_base_interval_and_ttl() {
        let p = Pacing::new(2 * S, 10 * S, 2000);
        let pace = p.update(500);
        assert_eq!(pace.interval, 2 * S);
        assert_eq!(pace.lease_ttl, 10 * S);
        // 4,000 agents at 2 s are exactly 2,000 a second.
        assert_eq!(p.update(4000).interval, 2 * S);
    }

    #[test]
    fn the_interval_grows_with_the_fleet_and_the_ttl_in_proportion() {
        let p = Pacing::new(2 * S, 10 * S, 2000);
        let pace = p.update(10_000);
        assert_eq!(pace.interval, 5 * S);
        assert_eq!(pace.lease_ttl, 25 * S);
        assert!(10_000.0 / pace.interval.as_secs_f64() <= 2000.0);
        // One more agent than 5 s allows: the next step of half the base.
        let pace = p.update(10_001);
        assert_eq!(pace.interval, 6 * S);
        assert_eq!(pace.lease_ttl, 30 * S);
        assert_eq!(p.current(), pace);
        // Any size: never more than the rate, the TTL always five intervals.
        for n in [4001, 7777, 20_000, 123_456] {
            let pace = p.update(n);
            assert!(
                n as f64 / pace.interval.as_secs_f64() <= 2000.0,
                "{n}: {pace:?}"
            );
            assert_eq!(pace.lease_ttl, pace.interval * 5, "{n}");
        }
    }

    #[test]
    fn it_comes_back_down_only_once_the_fleet_has_clearly_shrunk() {
        let p = Pacing::new(2 * S, 10 * S, 2000);
        assert_eq!(p.update(10_000).interval, 5 * S);
        // A few agents leaving do not change what ten thousand agents were told.
        assert_eq!(p.update(9_000).interval, 5 * S);
        assert_eq!(p.update(7_000).interval, 5 * S);
        assert_eq!(p.update(6_000).interval, 3 * S);
        assert_eq!(p.update(100).interval, 2 * S);
        assert_eq!(p.current().lease_ttl, 10 * S);
    }

    #[test]
    fn no_rate_means_the_base_always() {
        let p = Pacing::new(500 * Duration::from_millis(1), 3 * S, 0);
        assert_eq!(p.update(1_000_000).interval, Duration::from_millis(500));
        assert_eq!(p.current().lease_ttl, 3 * S);
    }
}
