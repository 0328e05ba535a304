//! The Prometheus recorder keeps every sample recorded into a histogram until an
//! upkeep or a scrape folds it into the buckets. raftlb runs the upkeep itself
//! (`metrics::upkeep`, started with the server), so a process that nobody scrapes
//! does not grow by the connect time of every connection it proxies.
//!
//! In-process, with the allocator counting live bytes: the only test in this
//! binary, since the count covers the whole process.

use std::alloc::System;
use std::time::Duration;

use raftlb::metrics as m;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not freed, process-wide.
fn live() -> i64 {
    let s = ALLOC.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

const SAMPLES: usize = 200_000;

#[tokio::test(start_paused = true)]
async fn histogram_samples_are_folded_into_buckets_without_a_scrape() {
    let handle = m::install();
    tokio::spawn(m::upkeep(handle));
    let connect = metrics::histogram!(m::CONNECT_DURATION, "pool" => "p", "backend" => "b");
    // The series exists and has been folded once before the measure starts.
    connect.record(0.001);
    tokio::time::sleep(m::UPKEEP_EVERY + Duration::from_secs(1)).await;

    let before = live();
    for _ in 0..SAMPLES {
        connect.record(0.001);
    }
    let held = live() - before;
    println!("{SAMPLES} samples recorded: {held} bytes held");
    assert!(
        held >= (SAMPLES * 8) as i64,
        "the recorder should hold the raw samples until an upkeep: {held} bytes"
    );
    // Folded at the next upkeep; the buckets' blocks are freed once the recorder's
    // epoch moves on, which a few more samples per period bring about.
    let mut left = held;
    for _ in 0..10 {
        tokio::time::sleep(m::UPKEEP_EVERY).await;
        left = live() - before;
        if left < 100_000 {
            break;
        }
        for _ in 0..1000 {
            connect.record(0.001);
        }
    }
    println!("after the upkeep: {left} bytes held");
    assert!(
        left < 100_000,
        "{left} bytes still held after upkeeps ({held} right after recording)"
    );
}
