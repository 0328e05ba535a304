//! `/metrics` as an alert reads it: series of a removed backend leave, a hostname that
//! never resolved is not up, every counter is there at 0 before its first event, and
//! the `process_*` and `raftlb_build_info` metrics.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// The sample lines of `text` whose series name is `name`.
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn backend_status(admin: SocketAddr, backend: &str) -> serde_json::Value {
    let Ok((_, body)) = http_get(admin, "/api/v1/backends") else {
        return serde_json::Value::Null;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["pools"][0]["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == backend).cloned())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_or_listener_leaves_metrics_and_comes_back_when_added_again() {
    raise_nofile();
    let (b1, b2) = (echo_backend().await, echo_backend().await);
    let (admin, listen) = (loopback(), loopback());
    let probe = "    health_check: { kind: tcp, interval: 100ms, timeout: 1s, rise: 1, fall: 1 }\n";
    let second = format!("  second:\n    bind: {}\n    pool: web\n", loopback());
    let both = Raftlb::standalone_yaml(admin, listen, probe, &second, &[("b1", b1), ("b2", b2)]);
    let only_b1 = Raftlb::standalone_yaml(admin, listen, probe, "", &[("b1", b1)]);
    let lb = blocking(|| Raftlb::start(&both, admin));
    let up = r#"raftlb_backend_up{pool="web",backend="b2"}"#;
    let up1 = r#"raftlb_backend_up{pool="web",backend="b1"}"#;
    assert!(
        blocking(|| eventually(Duration::from_secs(10), || {
            let text = lb.metrics();
            value(&text, up) == Some(1.0) && value(&text, up1) == Some(1.0)
        })),
        "{}",
        lb.metrics()
    );
    // Traffic to both, so that every kind of b2 series exists.
    for _ in 0..10 {
        let mut conn = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        echo_once(&mut conn, b"ping").await.expect("echo");
    }
    let text = blocking(|| lb.metrics());
    assert!(
        text.contains(r#"raftlb_connect_duration_seconds_count{pool="web",backend="b2"} "#),
        "{text}"
    );
    assert!(text.contains(r#"listener="second""#), "{text}");

    lb.rewrite_config(&only_b1);
    lb.signal("HUP");
    let gone = blocking(|| {
        eventually(Duration::from_secs(10), || {
            let text = lb.metrics();
            !text.contains(r#"backend="b2""#) && !text.contains(r#"listener="second""#)
        })
    });
    let text = blocking(|| lb.metrics());
    assert!(
        gone,
        "series of the removed backend b2 or listener second stay:\n{text}"
    );
    assert_eq!(
        value(&text, r#"raftlb_backend_up{pool="web",backend="b1"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(text.contains(r#"backend="b1",result="ok"} "#), "{text}");

    lb.rewrite_config(&both);
    lb.signal("HUP");
    assert!(
        blocking(
            || eventually(Duration::from_secs(10), || value(&lb.metrics(), up)
                == Some(1.0))
        ),
        "b2 added again has no backend_up 1:\n{}",
        lb.metrics()
    );
    let text = blocking(|| lb.metrics());
    assert!(
        text.contains(r#"listener="second",pool="web",backend="b2",result="ok"} "#),
        "the listener added again has no series:\n{text}"
    );
}

#[test]
fn a_hostname_that_never_resolved_is_not_up() {
    raise_nofile();
    let (admin, listen) = (loopback(), loopback());
    let yaml = format!(
        "admin:\n  bind: {admin}\nlisteners:\n  front: {{ bind: {listen}, pool: web }}\n\
         pools:\n  web:\n    backends:\n      - {{ name: ghost, address: \"nosuchhost.invalid:80\" }}\n"
    );
    let lb = Raftlb::spawn(&yaml, admin);
    let answered = eventually(Duration::from_secs(20), || {
        !backend_status(admin, "ghost").is_null()
    });
    assert!(answered, "no status for the backend:\n{}", lb.log());
    let status = backend_status(admin, "ghost");
    assert_ne!(status["health"], "up", "{status}");
    assert_eq!(
        value(
            &lb.metrics(),
            r#"raftlb_backend_up{pool="web",backend="ghost"}"#
        ),
        Some(0.0),
        "{}",
        lb.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_is_exported_at_zero_before_its_first_event() {
    raise_nofile();
    let b1 = echo_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let probe = "    health_check: { kind: tcp, interval: 5s, timeout: 1s, rise: 1, fall: 3 }\n";
    let yaml = Raftlb::standalone_yaml(admin, listen, probe, "", &[("b1", b1)]);
    let lb = blocking(|| Raftlb::start(&yaml, admin));
    let text = blocking(|| lb.metrics());
    for series in [
        r#"raftlb_connections_total{listener="front",pool="web",backend="b1",result="ok"}"#,
        r#"raftlb_connections_total{listener="front",pool="web",backend="b1",result="connect_failed"}"#,
        r#"raftlb_connections_total{listener="front",pool="web",backend="none",result="rejected"}"#,
        r#"raftlb_connections_total{listener="front",pool="web",backend="none",result="no_backend"}"#,
        r#"raftlb_bytes_total{listener="front",pool="web",backend="b1",direction="to_backend"}"#,
        r#"raftlb_bytes_total{listener="front",pool="web",backend="b1",direction="to_client"}"#,
        r#"raftlb_health_checks_total{pool="web",backend="b1",result="fail"}"#,
        r#"raftlb_health_checks_total{pool="web",backend="b1",result="timeout"}"#,
        r#"raftlb_config_reloads_total{result="invalid"}"#,
        "raftlb_config_apply_failures_total",
        r#"raftlb_leader_election_transitions_total{to="fault"}"#,
        r#"raftlb_leader_election_hook_failures_total{hook="on_active"}"#,
        "raftlb_leader_election_vip_readds_total",
    ] {
        assert_eq!(
            value(&text, series),
            Some(0.0),
            "{series} not at 0:\n{text}"
        );
    }
    for name in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds_total",
    ] {
        let v = value(&text, name).unwrap_or(-1.0);
        assert!(v >= 0.0, "{name} missing or negative:\n{text}");
    }
    let fds = value(&text, "process_open_fds").unwrap_or(0.0);
    let max = value(&text, "process_max_fds").unwrap_or(0.0);
    assert!(fds >= 3.0 && fds < max, "open {fds} of {max}");
    let info = format!(
        "raftlb_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&text, &info), Some(1.0), "{text}");
    assert_eq!(samples(&text, "raftlb_build_info").len(), 1, "{text}");
}
