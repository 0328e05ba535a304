//! Health checking: active probes (tcp, tls, https) per backend with rise/fall
//! hysteresis, and passive checks from connect failures on the data path.
//! A flip is logged once, published as `backend_up`, and takes effect at once:
//! the proxy reads health from the backend's state on every pick.

pub mod probe;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::balancer::health::{CheckRecord, Detail, Health, Hysteresis};

use crate::balancer::{Backend, Balancer, Pool};
use crate::config::schema::OnDown;
use crate::metrics as m;
use probe::Outcome;

/// Consecutive data-path connect failures that mark a backend down when the pool has no `fall`.
pub const DEFAULT_FALL: u32 = 3;

/// Runs the probes of the balancer's pools for as long as the process runs: one
/// task per backend of every pool that has `health_check`, all replaced when a
/// new snapshot is swapped in (a config applied).
pub async fn follow(balancer: Arc<Balancer>) {
    let mut swapped = balancer.swapped();
    loop {
        swapped.borrow_and_update();
        let round = CancellationToken::new();
        let pools: Vec<Arc<Pool>> = balancer.snapshot().pools.values().cloned().collect();
        start_probes(&balancer, &pools, &round);
        let changed = swapped.changed().await;
        round.cancel();
        if changed.is_err() {
            return;
        }
    }
}

fn start_probes(balancer: &Arc<Balancer>, pools: &[Arc<Pool>], stop: &CancellationToken) {
    for pool in pools {
        if pool.health_check.is_none() {
            continue;
        }
        for index in 0..pool.backends.len() {
            tokio::spawn(probe_loop(
                balancer.clone(),
                pool.clone(),
                index,
                stop.clone(),
            ));
        }
    }
}

async fn probe_loop(
    balancer: Arc<Balancer>,
    pool: Arc<Pool>,
    index: usize,
    stop: CancellationToken,
) {
    let Some(check) = pool.health_check.clone() else {
        return;
    };
    let interval = check.interval.value.get();
    let mut wait = first_wait(&pool.backends[index], interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let backend = &pool.backends[index];
        let started = Instant::now();
        let Ok(epoch) = backend.state.detail.lock().map(|mut detail| {
            detail.probe_started = Some(started.into_std());
            detail.probe_epoch
        }) else {
            return;
        };
        let header = balancer.probe_header(&pool.name);
        let outcome = probe::run(&pool, backend, &check, header.as_deref()).await;
        let took = started.elapsed();
        // A config applied while it ran still counts it, unless it removed the check.
        record_probe(&pool, index, outcome, took, epoch);
        wait = next_wait(interval, took, fastrand::f64());
    }
}

/// The wait before a backend's first probe of a round. A backend probed before keeps
/// its pace across the config writes that start a new round (a write every second
/// must not starve a 3 s interval); a new one starts at a random point of the
/// interval, so replicas and backends do not probe in lockstep.
fn first_wait(backend: &Backend, interval: Duration) -> Duration {
    let last = backend
        .state
        .detail
        .lock()
        .ok()
        .and_then(|d| d.probe_started);
    match last {
        Some(started) => interval.saturating_sub(started.elapsed()),
        None => interval.mul_f64(fastrand::f64()),
    }
}

/// The wait before the next probe: one probe starts every interval (not an
/// interval after the last one ended, so a hanging backend is found within
/// fall x interval + timeout, as documented), with ±10% jitter from `random`
/// (0 to 1) to keep the probes apart over time.
fn next_wait(interval: Duration, took: Duration, random: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * random).saturating_sub(took)
}

/// Applies one probe result: counters, last check, and a flip when rise/fall is reached.
/// A probe that started at `epoch` of the backend's probes; dropped if the pool's
/// check was removed since.
pub fn record_probe(pool: &Pool, index: usize, outcome: Outcome, latency: Duration, epoch: u64) {
    let backend = &pool.backends[index];
    let Some(check) = &pool.health_check else {
        return;
    };
    let ok = matches!(outcome, Outcome::Ok);
    let (from, flip) = {
        let Ok(mut detail) = backend.state.detail.lock() else {
            return;
        };
        if detail.probe_epoch != epoch {
            return;
        }
        detail.last_check = Some(CheckRecord {
            ok,
            latency,
            at: SystemTime::now(),
            error: match &outcome {
                Outcome::Ok => None,
                Outcome::Fail(why) => Some(why.clone()),
                Outcome::Timeout => Some(format!("no answer within {}", check.timeout.value)),
            },
        });
        let from = backend.state.health();
        let flip = detail
            .probes
            .record(from, ok, check.rise.value, check.fall.value);
        (from, flip)
    };
    let result = match outcome {
        Outcome::Ok => "ok",
        Outcome::Fail(_) => "fail",
        Outcome::Timeout => "timeout",
    };
    metrics::counter!(m::HEALTH_CHECKS_TOTAL, "pool" => pool.name.to_string(), "backend" => backend.name.to_string(), "result" => result)
        .increment(1);
    if from == Health::Unknown && flip == Some(Health::Down) && ok {
        // A first probe that passed, with `rise` still to go: routed as down, as it
        // was, so no flip to warn about.
        backend.state.set_health(Health::Down);
        tracing::info!(pool = %pool.name, backend = %backend.name, "its first probe passed; the backend is up once {} pass in a row", check.rise.value);
        return;
    }
    if let Some(to) = flip {
        let probes = |n: u32, what: &str| match n {
            1 => format!("the probe {what}"),
            n => format!("{n} consecutive probes {what}"),
        };
        let why = match (&outcome, from) {
            (Outcome::Ok, _) => probes(check.rise.value, "passed"),
            (Outcome::Fail(e), Health::Unknown) => format!("its first probe failed: {e}"),
            (Outcome::Timeout, Health::Unknown) => "its first probe timed out".to_string(),
            (Outcome::Fail(e), _) => {
                format!("{}, last: {e}", probes(check.fall.value, "failed"))
            }
            (Outcome::Timeout, _) => {
                format!("{}, last: timeout", probes(check.fall.value, "failed"))
            }
        };
        set_health(pool, index, to, &why);
    }
}

/// A connect failure on the data path: `fall` in a row mark the backend down at once.
pub fn passive_failure(pool: &Pool, index: usize) {
    let backend = &pool.backends[index];
    let fall = pool
        .health_check
        .as_ref()
        .map_or(DEFAULT_FALL, |c| c.fall.value);
    let failures = match backend.state.detail.lock() {
        Ok(mut detail) => {
            detail.passive_failures = detail.passive_failures.saturating_add(1);
            detail.passive_failures
        }
        Err(_) => return,
    };
    if failures >= fall && backend.state.health() != Health::Down {
        set_health(
            pool,
            index,
            Health::Down,
            &format!("{failures} consecutive connect failures on the data path"),
        );
    }
}

/// A successful connect on the data path.
pub fn passive_success(backend: &Backend) {
    if let Ok(mut detail) = backend.state.detail.lock() {
        detail.passive_failures = 0;
    }
}

/// Flips a backend's health: logged once, metric updated, and the consequences:
/// `on_down: close` closes its connections, and without probes a backend marked
/// down by passive checks is tried again after `passive_hold`.
pub fn set_health(pool: &Pool, index: usize, to: Health, why: &str) {
    let backend = &pool.backends[index];
    let from = backend.state.health();
    if from == to {
        return;
    }
    let generation = match backend.state.detail.lock() {
        Ok(mut detail) => {
            detail.flips += 1;
            detail.last_flip = Some(SystemTime::now());
            detail.passive_failures = 0;
            if to == Health::Down {
                detail.probes.ok_run = 0;
            }
            detail.flips
        }
        Err(_) => return,
    };
    backend.state.set_health(to);
    metrics::gauge!(m::BACKEND_UP, "pool" => pool.name.to_string(), "backend" => backend.name.to_string())
        .set(if to == Health::Up { 1.0 } else { 0.0 });
    match to {
        Health::Up => {
            tracing::info!(pool = %pool.name, backend = %backend.name, from = from.as_str(), "backend is up: {why}")
        }
        _ => {
            tracing::warn!(pool = %pool.name, backend = %backend.name, from = from.as_str(), to = to.as_str(), "backend is down: {why}")
        }
    }
    if to != Health::Up {
        if pool.on_down == OnDown::Close {
            backend.state.close_connections();
        }
        if !pool.backends.iter().any(Backend::takes_new_connections) {
            tracing::warn!(pool = %pool.name, "no backend of the pool is up: new connections are closed at once");
        }
        if pool.health_check.is_none() {
            retry_after_hold(pool, index, generation);
        }
    }
}

/// Without probes, nothing else would bring a passively failed backend back.
fn retry_after_hold(pool: &Pool, index: usize, generation: u64) {
    let state = pool.backends[index].state.clone();
    let (hold, pool_name, backend) = (
        pool.passive_hold,
        pool.name.clone(),
        pool.backends[index].name.clone(),
    );
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        let unchanged = state.detail.lock().is_ok_and(|d| d.flips == generation);
        if unchanged && state.health() == Health::Down {
            state.set_health(Health::Up);
            if let Ok(mut d) = state.detail.lock() {
                d.flips += 1;
                d.last_flip = Some(SystemTime::now());
            }
            metrics::gauge!(m::BACKEND_UP, "pool" => pool_name.to_string(), "backend" => backend.to_string()).set(1.0);
            tracing::info!(pool = %pool_name, %backend, "passive_hold is over: the backend takes new connections again");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_start_one_interval_apart_whatever_each_took() {
        let second = Duration::from_secs(1);
        assert_eq!(next_wait(second, Duration::ZERO, 0.5), second);
        assert_eq!(
            next_wait(second, Duration::from_millis(400), 0.5),
            Duration::from_millis(600)
        );
        assert_eq!(
            next_wait(second, Duration::from_secs(2), 0.5),
            Duration::ZERO
        );
        assert_eq!(
            next_wait(second, Duration::ZERO, 0.0),
            Duration::from_millis(900)
        );
        assert_eq!(
            next_wait(second, Duration::ZERO, 1.0),
            Duration::from_millis(1100)
        );
    }
}
