//! Whether this replica may accept new connections: the only thing the data path
//! knows of its role. The process sets it (from the election: until the active
//! lease's deadline, on the lease's clock); the accept loop checks it on every
//! wake-up, so a process resumed after a pause past its deadline never accepts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock;

const ALWAYS: u64 = u64::MAX;
const NEVER: u64 = 0;

/// Until when (nanoseconds on [`clock::now`]) accepting is allowed.
#[derive(Clone, Debug)]
pub struct Gate(Arc<AtomicU64>);

impl Gate {
    /// Always open: standalone, election off, or `standby: serve`.
    pub fn always() -> Gate {
        Gate(Arc::new(AtomicU64::new(ALWAYS)))
    }

    /// Closed until [`Gate::open_until`].
    pub fn closed() -> Gate {
        Gate(Arc::new(AtomicU64::new(NEVER)))
    }

    pub fn open_until(&self, deadline: Duration) {
        let nanos = u64::try_from(deadline.as_nanos()).unwrap_or(ALWAYS - 1);
        self.0.store(nanos.max(1), Ordering::Release);
    }

    pub fn close(&self) {
        self.0.store(NEVER, Ordering::Release);
    }

    /// Open now.
    pub fn is_open(&self) -> bool {
        match self.0.load(Ordering::Acquire) {
            ALWAYS => true,
            NEVER => false,
            until => clock::now().as_nanos() < u128::from(until),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_until_a_deadline_on_the_boot_clock() {
        let gate = Gate::closed();
        assert!(!gate.is_open());
        gate.open_until(clock::now() + Duration::from_secs(60));
        assert!(gate.is_open());
        gate.open_until(clock::now());
        assert!(!gate.is_open(), "a deadline that passed closes it");
        gate.close();
        assert!(!gate.is_open());
        assert!(Gate::always().is_open());
    }
}
