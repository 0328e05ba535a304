//! How many admin connections may be open at once, and which one gives way.
//!
//! At most [`MAX_OPEN`] connections are served at once. When a new one arrives at the
//! limit, the connection that has been idle longest (no request head since accept or
//! since its last response) is closed to make room, as nginx reuses its idle
//! connections when it runs out; when none is idle, the new one is closed. So a
//! flood of idle or slow connections cannot lock `/healthz` out, and the ones that
//! send nothing are also closed by hyper's header read timeout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Admin connections served at once.
pub const MAX_OPEN: usize = 256;

#[derive(Default)]
struct Table {
    open: usize,
    next: u64,
    /// The idle connections, oldest first: key → (connection id, its close token).
    idle: BTreeMap<u64, (u64, CancellationToken)>,
    /// The connections still counted in `open`.
    counted: std::collections::HashSet<u64>,
}

/// The open admin connections.
#[derive(Clone, Default)]
pub struct Conns(Arc<Mutex<Table>>);

/// One open connection: idle or busy; closing it (dropping) gives its place back.
pub struct Slot {
    conns: Conns,
    id: u64,
    idle_key: Mutex<Option<u64>>,
    /// Cancelled when the connection is closed to make room for a newer one.
    pub closed: CancellationToken,
}

impl Conns {
    /// A place for a new connection, or None when every place is busy. Also whether
    /// an idle connection was closed to make room.
    pub fn admit(&self) -> (Option<Arc<Slot>>, bool) {
        let Ok(mut t) = self.0.lock() else {
            return (None, false);
        };
        let mut evicted = false;
        if t.open >= MAX_OPEN {
            let Some((_, (id, token))) = t.idle.pop_first() else {
                return (None, false);
            };
            token.cancel();
            if t.counted.remove(&id) {
                t.open -= 1;
            }
            evicted = true;
        }
        let id = t.next;
        t.next += 1;
        let key = t.next;
        t.next += 1;
        let closed = CancellationToken::new();
        t.idle.insert(key, (id, closed.clone()));
        t.counted.insert(id);
        t.open += 1;
        let slot = Slot {
            conns: self.clone(),
            id,
            idle_key: Mutex::new(Some(key)),
            closed,
        };
        (Some(Arc::new(slot)), evicted)
    }

    /// How many connections are counted as open.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.0.lock().map_or(0, |t| t.open)
    }
}

impl Slot {
    /// A request head arrived: the connection is busy and not closed for room.
    pub fn busy(&self) {
        if let (Ok(mut t), Ok(mut key)) = (self.conns.0.lock(), self.idle_key.lock())
            && let Some(k) = key.take()
        {
            t.idle.remove(&k);
        }
    }

    /// Its response is out: the connection waits for its next request head.
    pub fn idle(&self) {
        if let (Ok(mut t), Ok(mut key)) = (self.conns.0.lock(), self.idle_key.lock())
            && key.is_none()
            && t.counted.contains(&self.id)
        {
            let k = t.next;
            t.next += 1;
            t.idle.insert(k, (self.id, self.closed.clone()));
            *key = Some(k);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.conns.0.lock() {
            if let Ok(mut key) = self.idle_key.lock()
                && let Some(k) = key.take()
            {
                t.idle.remove(&k);
            }
            if t.counted.remove(&self.id) {
                t.open -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_oldest_idle_gives_way_and_busy_ones_never_do() {
        let conns = Conns::default();
        let mut slots: Vec<Arc<Slot>> = (0..MAX_OPEN)
            .map(|_| conns.admit().0.expect("room"))
            .collect();
        assert_eq!(conns.open(), MAX_OPEN);
        // The oldest is busy: the second oldest gives way.
        slots[0].busy();
        let (newer, evicted) = conns.admit();
        assert!(newer.is_some() && evicted);
        assert!(!slots[0].closed.is_cancelled());
        assert!(slots[1].closed.is_cancelled());
        assert_eq!(conns.open(), MAX_OPEN);
        // Dropping the evicted one does not free a second place.
        slots.remove(1);
        assert_eq!(conns.open(), MAX_OPEN);
        // All busy: a new connection is refused.
        let newer = newer.expect("slot");
        newer.busy();
        slots.iter().for_each(|s| s.busy());
        assert!(conns.admit().0.is_none());
        // One answered and idle again: it gives way to the next.
        slots[5].idle();
        let last = conns.admit().0;
        assert!(last.is_some());
        assert!(slots[5].closed.is_cancelled());
        drop(slots);
        drop(newer);
        assert_eq!(conns.open(), 1, "the newest is still open");
    }
}
