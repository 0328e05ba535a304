//! The lease's clock: CLOCK_BOOTTIME, which keeps counting while the host is
//! suspended (CLOCK_MONOTONIC, behind std's and tokio's `Instant`, does not).
//! Below both the election and the proxy, which compare deadlines on it.
#![allow(unsafe_code)]

use std::time::Duration;

/// `d` in whole milliseconds, saturating at u64::MAX (as records and JSON carry it).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Time since boot, suspend included.
pub fn now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration, and
    // CLOCK_BOOTTIME exists on every Linux since 2.6.39; the call has no other effect.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Unreachable on Linux; the monotonic clock is the next best.
        return monotonic_fallback();
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn monotonic_fallback() -> Duration {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    #[test]
    fn boottime_moves_forward() {
        let a = super::now();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = super::now();
        assert!(
            b >= a + std::time::Duration::from_millis(5),
            "{a:?} then {b:?}"
        );
    }
}
