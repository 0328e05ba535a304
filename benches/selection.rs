//! Backend selection cost per policy, for pools of 3 and 100 backends.

use std::net::IpAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use raftlb::balancer::Balancer;

fn pool_yaml(balance: &str, n: usize) -> String {
    let mut y = format!(
        "listeners:\n  a: {{ bind: 127.0.0.1:7001, pool: p }}\npools:\n  p:\n    balance: {balance}\n    backends:\n"
    );
    for i in 0..n {
        y.push_str(&format!(
            "      - {{ name: b{i}, address: 10.0.{}.{}:6443, weight: {} }}\n",
            i / 250,
            i % 250 + 1,
            i % 3 + 1
        ));
    }
    y
}

fn selection(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("pick");
    for balance in [
        "round_robin",
        "least_connections",
        "random_two",
        "source_hash",
    ] {
        for n in [3usize, 100] {
            let config = raftlb::config::parse(&pool_yaml(balance, n), "bench", 20000)
                .expect("valid config");
            let balancer = Balancer::new();
            runtime
                .block_on(balancer.apply(&config.pools))
                .expect("apply");
            let snapshot = balancer.snapshot();
            let pool = snapshot.pools.get("p").expect("pool p").clone();
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(balance, n), &n, |b, _| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    pool.pick(IpAddr::from(client.to_be_bytes()), &[])
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, selection);
criterion_main!(benches);
