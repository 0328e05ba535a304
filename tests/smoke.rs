mod common;
use common::*;
use std::net::SocketAddr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_to_a_backend() {
    raise_nofile();
    let b = named_backend("one").await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _lb = Raftlb::start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("one", b)]),
        admin,
    );
    assert_eq!(which_backend(listen, None).await.unwrap(), "one");
}

#[test]
fn test_pki_issues_usable_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Pki::new(dir.path(), "smoke");
    let server = ca.server("server", &["kubernetes"]);
    let client = ca.client("admin");
    let _ = ca.server_config(&server, true, &[b"h2"]);
    let _ = ca.client_config(Some(&client), &[b"h2"]);
    assert!(
        std::fs::read_to_string(&server.cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
}

/// The README's showcase: `raftlb demo` runs to the end and shows what it claims.
#[test]
fn the_demo_runs_both_parts() {
    let (code, out, err) = raftlb_cmd_timeout(&["demo", "--requests", "40"], 120);
    assert_eq!(code, 0, "{out}\n{err}");
    for expected in [
        "backend-2's /readyz answers 500",
        "raftlb took backend-2 out of rotation",
        "restarted backend-2 on",
        "status page http://",
        "cluster initialised",
        "SIGKILL to replica",
        "committed by the two survivors",
        "SIGTERM to replica",
        "no lease to wait out",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // The drain went to a standby that is a Raft follower, which forwarded it.
    let posted = out
        .lines()
        .find(|l| l.contains("(a standby): 200"))
        .unwrap_or_else(|| panic!("no drain line in:\n{out}"));
    let on = number_after(posted, "on replica ");
    let to = number_after(posted, "forwarded the write to the Raft leader, replica ");
    assert!(on.is_some() && to.is_some() && on != to, "{posted}");
    // A SIGTERM hands the lease over: the next replica is active well inside the
    // demo's 2 s lease (a standby that waited it out would take 2 s or more).
    let handed = out
        .lines()
        .find(|l| l.contains("ms after SIGTERM (no lease to wait out)"))
        .unwrap_or_else(|| panic!("no SIGTERM takeover line in:\n{out}"));
    let took = number_after(handed, "took over ").unwrap_or(u64::MAX);
    assert!(took < 2000, "{handed}");
    // backend-2 turned unready, was ejected, then exited: no request failed.
    let failed = out
        .lines()
        .find(|l| l.trim_start().starts_with("failed "))
        .unwrap_or_default();
    assert_eq!(
        failed.split_whitespace().collect::<Vec<_>>(),
        ["failed", "0", "0", "0"],
        "{out}"
    );
    let ejected = out
        .lines()
        .find(|l| l.trim_start().starts_with("backend-2 "))
        .unwrap_or_default();
    assert!(
        ejected.trim_end().ends_with(" 0"),
        "backend-2 served after it exited:\n{out}"
    );
    // The drain's version as the replicas applied it (the seed is 1, the drain 2).
    assert!(
        out.contains("config_version 2 applied on every replica"),
        "{out}"
    );
    // After the drain, no replica sends a new connection to the drained backend.
    let drained: Vec<&str> = out
        .split("only the active accepts, and it sends new connections elsewhere:")
        .nth(1)
        .and_then(|rest| rest.split("SIGKILL").next())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("through replica"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(drained.len(), 3, "{out}");
    assert!(drained.iter().all(|l| !l.contains("backend-3")), "{out}");
    // Exactly one replica accepts; the standbys refuse.
    let serving = drained.iter().filter(|l| !l.contains("refused")).count();
    assert_eq!(serving, 1, "{out}");
}

/// The number that follows `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
