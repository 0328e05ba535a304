//! Backend selection policies: small types behind one trait. Every policy honours
//! `weight`, skips backends that cannot take new connections, and skips the ones
//! already tried for this client connection (retries go to a different backend).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;

use super::Backend;
use crate::config::schema::Balance;

pub trait Policy: Send + Sync {
    /// The index in `backends` of the backend for a new connection from `client`.
    fn pick(&self, backends: &[Backend], client: IpAddr, tried: &[usize]) -> Option<usize>;
}

pub fn for_balance(balance: Balance, backends: &[Backend]) -> Box<dyn Policy> {
    match balance {
        Balance::RoundRobin => Box::new(RoundRobin::new(backends)),
        Balance::LeastConnections => Box::new(LeastConnections::new(backends)),
        Balance::RandomTwo => Box::new(RandomTwo),
        Balance::SourceHash => Box::new(SourceHash),
    }
}

fn candidate(backends: &[Backend], i: usize, tried: &[usize]) -> bool {
    backends[i].takes_new_connections() && !tried.contains(&i)
}

/// Weighted round robin: a smooth interleaved schedule (nginx's algorithm) over the
/// backends that can take connections, walked by one atomic counter. The schedule is
/// rebuilt when that set changes (a health flip, a drain), so the remaining backends
/// keep their weights' proportions; picks in between never lock.
pub struct RoundRobin {
    schedule: ArcSwap<Schedule>,
    next: AtomicUsize,
}

/// A schedule and the set of backends it was built for.
struct Schedule {
    eligible: Vec<bool>,
    order: Vec<usize>,
}

impl RoundRobin {
    pub fn new(backends: &[Backend]) -> Self {
        RoundRobin {
            schedule: ArcSwap::from_pointee(Schedule::build(backends)),
            next: AtomicUsize::new(0),
        }
    }
}

impl Schedule {
    fn build(backends: &[Backend]) -> Schedule {
        let eligible: Vec<bool> = backends
            .iter()
            .map(Backend::takes_new_connections)
            .collect();
        let weight = |i: usize| {
            if eligible[i] {
                i64::from(backends[i].weight)
            } else {
                0
            }
        };
        let total: i64 = (0..backends.len()).map(weight).sum();
        let mut current = vec![0i64; backends.len()];
        let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            for (i, c) in current.iter_mut().enumerate() {
                *c += weight(i);
            }
            let Some((best, _)) = current
                .iter()
                .enumerate()
                .max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i)))
            else {
                break;
            };
            current[best] -= total;
            order.push(best);
        }
        Schedule { eligible, order }
    }

    fn matches(&self, backends: &[Backend]) -> bool {
        self.eligible
            .iter()
            .zip(backends)
            .all(|(e, b)| *e == b.takes_new_connections())
    }
}

impl Policy for RoundRobin {
    fn pick(&self, backends: &[Backend], _client: IpAddr, tried: &[usize]) -> Option<usize> {
        let mut schedule = self.schedule.load_full();
        if !schedule.matches(backends) {
            schedule = Arc::new(Schedule::build(backends));
            self.schedule.store(schedule.clone());
        }
        let len = schedule.order.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Only retries skip entries (the backends they already tried).
        (0..len)
            .map(|k| schedule.order[(start + k) % len])
            .find(|&i| candidate(backends, i, tried))
    }
}

/// Fewest active connections per unit of weight. Ties (every backend idle, say)
/// go by smooth weighted round robin among the tied backends, as nginx's
/// least_conn breaks them, so short connections follow the weights too and a
/// backend that cannot take connections passes none of its turns to a neighbour.
pub struct LeastConnections {
    /// Each backend's smooth round-robin credit (nginx's `current_weight`).
    credit: Vec<AtomicI64>,
}

impl LeastConnections {
    pub fn new(backends: &[Backend]) -> Self {
        LeastConnections {
            credit: backends.iter().map(|_| AtomicI64::new(0)).collect(),
        }
    }
}

impl Policy for LeastConnections {
    fn pick(&self, backends: &[Backend], _client: IpAddr, tried: &[usize]) -> Option<usize> {
        let eligible = |i: usize| i < self.credit.len() && candidate(backends, i, tried);
        let lightest = (0..backends.len())
            .filter(|&i| eligible(i))
            .reduce(|best, i| {
                if lighter(&backends[i], &backends[best]) {
                    i
                } else {
                    best
                }
            })?;
        let tied = |i: usize| eligible(i) && !lighter(&backends[lightest], &backends[i]);
        let mut total = 0;
        let mut best: Option<(usize, i64)> = None;
        for i in (0..backends.len()).filter(|&i| tied(i)) {
            let weight = i64::from(backends[i].weight);
            total += weight;
            let credit = self.credit[i].fetch_add(weight, Ordering::Relaxed) + weight;
            if best.is_none_or(|(_, c)| credit > c) {
                best = Some((i, credit));
            }
        }
        let (chosen, _) = best?;
        self.credit[chosen].fetch_sub(total, Ordering::Relaxed);
        Some(chosen)
    }
}

/// `a` has fewer active connections per weight than `b` (compared without division).
fn lighter(a: &Backend, b: &Backend) -> bool {
    u128::from(a.active()) * u128::from(b.weight) < u128::from(b.active()) * u128::from(a.weight)
}

/// Power of two choices: two weighted random candidates, the lighter one wins.
pub struct RandomTwo;

impl Policy for RandomTwo {
    fn pick(&self, backends: &[Backend], _client: IpAddr, tried: &[usize]) -> Option<usize> {
        let a = weighted_random(backends, tried)?;
        let b = weighted_random(backends, tried)?;
        Some(if lighter(&backends[b], &backends[a]) {
            b
        } else {
            a
        })
    }
}

fn weighted_random(backends: &[Backend], tried: &[usize]) -> Option<usize> {
    let total: u64 = (0..backends.len())
        .filter(|&i| candidate(backends, i, tried))
        .map(|i| u64::from(backends[i].weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(0..total);
    for i in (0..backends.len()).filter(|&i| candidate(backends, i, tried)) {
        let w = u64::from(backends[i].weight);
        if ticket < w {
            return Some(i);
        }
        ticket -= w;
    }
    None
}

/// Weighted rendezvous hashing of the client address: a client keeps its backend
/// while that backend is up, and only the clients of a backend that leaves move.
/// The hash is fixed, so every replica maps a client to the same backend.
pub struct SourceHash;

impl Policy for SourceHash {
    fn pick(&self, backends: &[Backend], client: IpAddr, tried: &[usize]) -> Option<usize> {
        let key = match client {
            IpAddr::V4(v4) => u128::from(v4.to_bits()),
            IpAddr::V6(v6) => v6.to_bits(),
        };
        let mut best: Option<(usize, f64)> = None;
        for i in (0..backends.len()).filter(|&i| candidate(backends, i, tried)) {
            let h = mix(key, &backends[i].name);
            // Uniform in (0, 1); the score -w / ln(u) gives each backend a share proportional to w.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -f64::from(backends[i].weight) / u.ln();
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// FNV-1a over the key and the name, then a splitmix64 finaliser.
fn mix(key: u128, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::test_backends;

    fn counts(p: &dyn Policy, backends: &[Backend], n: usize) -> Vec<usize> {
        let mut c = vec![0; backends.len()];
        for k in 0..n {
            let client = IpAddr::from([10, 0, (k / 256) as u8, (k % 256) as u8]);
            c[p.pick(backends, client, &[]).expect("a backend")] += 1;
        }
        c
    }

    #[test]
    fn round_robin_schedule_is_interleaved_and_weighted() {
        let b = test_backends(&[5, 1, 1]);
        let rr = RoundRobin::new(&b);
        assert_eq!(rr.schedule.load().order, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&rr, &b, 700), vec![500, 100, 100]);
    }

    #[test]
    fn round_robin_keeps_proportions_when_a_backend_leaves() {
        let mut b = test_backends(&[2, 1, 1]);
        let rr = RoundRobin::new(&b);
        assert_eq!(counts(&rr, &b, 400), vec![200, 100, 100]);
        b[1].drained = true;
        // Without a rebuild, backend 1's slots would all go to its neighbour in the schedule.
        assert_eq!(counts(&rr, &b, 300), vec![200, 0, 100]);
        b[1].drained = false;
        assert_eq!(counts(&rr, &b, 400), vec![200, 100, 100]);
    }

    #[test]
    fn policies_skip_tried_and_unavailable_backends() {
        let mut b = test_backends(&[1, 1, 1]);
        b[1].drained = true;
        let ip = IpAddr::from([127, 0, 0, 1]);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::RandomTwo,
            Balance::SourceHash,
        ] {
            let p = for_balance(balance, &b);
            for _ in 0..20 {
                let i = p.pick(&b, ip, &[0]).expect("backend 2 is left");
                assert_eq!(i, 2, "{balance:?}");
            }
            assert_eq!(p.pick(&b, ip, &[0, 2]), None, "{balance:?}");
        }
    }

    #[test]
    fn least_connections_prefers_fewer_per_weight() {
        let b = test_backends(&[1, 2]);
        b[0].state.active.store(3, Ordering::Relaxed);
        b[1].state.active.store(5, Ordering::Relaxed);
        // 3/1 > 5/2, so the weight-2 backend is lighter.
        assert_eq!(
            LeastConnections::new(&b).pick(&b, IpAddr::from([127, 0, 0, 1]), &[]),
            Some(1)
        );
    }

    #[test]
    fn least_connections_ties_follow_the_weights_and_skip_a_drained_backend() {
        // Every backend idle: the weights decide, as round robin's do.
        let mut b = test_backends(&[1, 2, 3]);
        let lc = LeastConnections::new(&b);
        assert_eq!(counts(&lc, &b, 600), vec![100, 200, 300]);
        // A drained backend's turns are not all handed to the one after it.
        for backend in &mut b {
            backend.weight = 1;
        }
        b[0].drained = true;
        let lc = LeastConnections::new(&b);
        assert_eq!(counts(&lc, &b, 300), vec![0, 150, 150]);
        // Load still comes first: the lighter backend wins whatever the credits.
        b[2].state.active.store(1, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(lc.pick(&b, IpAddr::from([127, 0, 0, 1]), &[]), Some(1));
        }
    }

    #[test]
    fn random_and_hash_follow_weights() {
        let b = test_backends(&[3, 1]);
        for p in [&RandomTwo as &dyn Policy, &SourceHash] {
            let c = counts(p, &b, 4000);
            let share = c[0] as f64 / 4000.0;
            assert!((0.65..0.85).contains(&share), "share {share} of weight 3/4");
        }
    }

    #[test]
    fn source_hash_is_sticky_and_moves_only_the_lost_backends_clients() {
        let mut b = test_backends(&[1, 1, 1]);
        let clients: Vec<IpAddr> = (0..300u32)
            .map(|i| IpAddr::from((0x0a00_0000 + i).to_be_bytes()))
            .collect();
        let before: Vec<usize> = clients
            .iter()
            .map(|&c| SourceHash.pick(&b, c, &[]).expect("up"))
            .collect();
        let again: Vec<usize> = clients
            .iter()
            .map(|&c| SourceHash.pick(&b, c, &[]).expect("up"))
            .collect();
        assert_eq!(before, again);
        assert!(before.contains(&2), "backend 2 had clients: {before:?}");
        b[2].drained = true;
        for (c, was) in clients.iter().zip(&before) {
            let now = SourceHash.pick(&b, *c, &[]).expect("up");
            if *was == 2 {
                assert_ne!(now, 2, "a client of the drained backend stayed on it");
            } else {
                assert_eq!(now, *was, "a client of a remaining backend moved");
            }
        }
    }
}
