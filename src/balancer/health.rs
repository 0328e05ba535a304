//! Rise/fall hysteresis: pure logic, no I/O and no clock.

use std::time::{Duration, SystemTime};

/// A backend's health as this replica sees it (never replicated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Up = 0,
    Down = 1,
    /// Probes are configured and have not yet passed `rise` times: routed as down.
    Unknown = 2,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Unknown => "unknown",
        }
    }
}

/// Consecutive results and the rule that turns them into up/down.
#[derive(Clone, Debug, Default)]
pub struct Hysteresis {
    pub ok_run: u32,
    pub fail_run: u32,
}

impl Hysteresis {
    /// Records one probe result; returns the new health if it flips.
    pub fn record(&mut self, current: Health, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if ok {
            self.ok_run = self.ok_run.saturating_add(1);
            self.fail_run = 0;
            (current != Health::Up && self.ok_run >= rise).then_some(Health::Up)
        } else {
            self.fail_run = self.fail_run.saturating_add(1);
            self.ok_run = 0;
            (current != Health::Down && self.fail_run >= fall).then_some(Health::Down)
        }
    }

    pub fn reset(&mut self) {
        *self = Hysteresis::default();
    }
}

/// The last probe, for status output.
#[derive(Clone, Debug)]
pub struct CheckRecord {
    pub ok: bool,
    pub latency: Duration,
    pub at: SystemTime,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What status shows about a backend's health besides up/down.
#[derive(Clone, Debug, Default)]
pub struct Detail {
    pub probes: Hysteresis,
    pub last_check: Option<CheckRecord>,
    pub last_flip: Option<SystemTime>,
    /// Consecutive connect failures on the data path.
    pub passive_failures: u32,
    /// Grows on every flip, so a stale passive_hold timer does nothing.
    pub flips: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_fall_failures_and_up_after_rise_successes() {
        let mut h = Hysteresis::default();
        let mut health = Health::Up;
        for (ok, expect) in [(false, None), (false, None), (false, Some(Health::Down))] {
            assert_eq!(h.record(health, ok, 2, 3), expect);
        }
        health = Health::Down;
        assert_eq!(
            h.record(health, false, 2, 3),
            None,
            "already down: no second flip"
        );
        assert_eq!(h.record(health, true, 2, 3), None);
        assert_eq!(
            h.record(health, false, 2, 3),
            None,
            "a failure resets the rise count"
        );
        assert_eq!(h.record(health, true, 2, 3), None);
        assert_eq!(h.record(health, true, 2, 3), Some(Health::Up));
    }

    #[test]
    fn unknown_needs_rise_successes_or_fall_failures() {
        let mut h = Hysteresis::default();
        assert_eq!(h.record(Health::Unknown, true, 2, 3), None);
        assert_eq!(h.record(Health::Unknown, true, 2, 3), Some(Health::Up));
        let mut h = Hysteresis::default();
        assert_eq!(h.record(Health::Unknown, false, 2, 1), Some(Health::Down));
    }

    #[test]
    fn flapping_below_the_thresholds_never_flips() {
        let mut h = Hysteresis::default();
        for i in 0..100 {
            assert_eq!(h.record(Health::Up, i % 2 == 0, 2, 2), None);
        }
    }
}
