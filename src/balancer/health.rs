//! A backend's health as this replica sees it: up, down or unknown, the rise/fall
//! hysteresis that moves it, and what status shows of its probes. No I/O.

use std::time::{Duration, Instant, SystemTime};

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
    /// Records one probe result; returns the new health if it flips. A backend is
    /// `unknown` only until its first probe (SPEC.md): then it is up if `rise` is 1
    /// and that probe passed, and down otherwise, until `rise` pass in a row.
    pub fn record(&mut self, current: Health, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if ok {
            self.ok_run = self.ok_run.saturating_add(1);
            self.fail_run = 0;
        } else {
            self.fail_run = self.fail_run.saturating_add(1);
            self.ok_run = 0;
        }
        match current {
            Health::Unknown if ok && self.ok_run >= rise => Some(Health::Up),
            Health::Unknown => Some(Health::Down),
            Health::Down => (ok && self.ok_run >= rise).then_some(Health::Up),
            Health::Up => (!ok && self.fail_run >= fall).then_some(Health::Down),
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
    /// When the last probe started (its result may have been dropped, by a config
    /// applied while it ran): the next round of probes keeps pace from it.
    pub probe_started: Option<Instant>,
    /// Grows when the pool's probes are removed: a probe that started before does
    /// not record its result.
    pub probe_epoch: u64,
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
    fn unknown_lasts_until_the_first_probe() {
        // Passed, with rise 2: down (as it was routed) until the second passes.
        let mut h = Hysteresis::default();
        assert_eq!(h.record(Health::Unknown, true, 2, 3), Some(Health::Down));
        assert_eq!(h.record(Health::Down, true, 2, 3), Some(Health::Up));
        // Passed, with rise 1: up at once.
        let mut h = Hysteresis::default();
        assert_eq!(h.record(Health::Unknown, true, 1, 3), Some(Health::Up));
        // Failed: down at once, whatever fall is (fall counts from up).
        let mut h = Hysteresis::default();
        assert_eq!(h.record(Health::Unknown, false, 2, 3), Some(Health::Down));
        // Flapping from the start stays down, not unknown.
        let mut h = Hysteresis::default();
        let mut health = Health::Unknown;
        for i in 0..20 {
            if let Some(to) = h.record(health, i % 2 == 0, 2, 2) {
                health = to;
            }
        }
        assert_eq!(health, Health::Down);
    }

    #[test]
    fn flapping_below_the_thresholds_never_flips() {
        let mut h = Hysteresis::default();
        for i in 0..100 {
            assert_eq!(h.record(Health::Up, i % 2 == 0, 2, 2), None);
        }
    }
}
