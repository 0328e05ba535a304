//! `raftlb check` over every fixture: valid files pass (and their printed effective
//! config passes again), invalid files exit 2 with the message each one expects;
//! the example configs in config/ pass; the CLI's exit codes.

mod common;

use std::path::{Path, PathBuf};

use common::{check, check_syntax, raftlb_cmd};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_valid_fixture_passes_and_its_effective_config_round_trips() {
    let files = yaml_files("tests/fixtures/valid");
    assert!(
        files.len() >= 8,
        "expected at least 8 valid fixtures, found {}",
        files.len()
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    // The fixtures name certificate files that do not exist: the file alone.
    for file in &files {
        let (code, stdout, stderr) = check_syntax(file);
        if code != 0 {
            failures.push(format!("{}: exit {code}\n{stderr}", file.display()));
            continue;
        }
        // The printed config has every default filled in; it must itself be valid.
        let again = tmp.path().join(file.file_name().expect("file name"));
        std::fs::write(&again, &stdout).expect("write effective config");
        let (code2, stdout2, stderr2) = check_syntax(&again);
        if code2 != 0 || stdout2 != stdout {
            failures.push(format!(
                "{}: the effective config does not round-trip (exit {code2})\n{stderr2}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_invalid_fixture_exits_2_and_names_the_problem() {
    let files = yaml_files("tests/fixtures/invalid");
    assert!(
        files.len() >= 20,
        "expected at least 20 invalid fixtures, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read fixture");
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        if expects.is_empty() {
            failures.push(format!("{}: no `# expect:` line", file.display()));
            continue;
        }
        let (code, stdout, stderr) = check(file);
        if code != 2 {
            failures.push(format!(
                "{}: exit {code}, expected 2\n{stderr}",
                file.display()
            ));
        }
        if !stdout.is_empty() {
            failures.push(format!(
                "{}: printed a config for an invalid file",
                file.display()
            ));
        }
        for expect in expects {
            if !stderr.contains(expect) {
                failures.push(format!(
                    "{}: message lacks {expect:?}:\n{stderr}",
                    file.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_example_config_passes_check() {
    let files = yaml_files("config");
    assert!(files.len() >= 3, "config/ should hold the example configs");
    for file in files {
        // The kubeadm examples name /etc/raftlb files of the masters they are for.
        let for_another_machine = file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("kubeadm-"));
        let (code, _, stderr) = match for_another_machine {
            true => check_syntax(&file),
            false => check(&file),
        };
        assert_eq!(code, 0, "{}: {stderr}", file.display());
    }
}

/// `check` refuses what `run` refuses beyond the file itself: files it names that
/// cannot be read (every one listed), exit 2; `--syntax-only` checks the file alone.
#[test]
fn check_refuses_what_run_refuses_and_names_every_unreadable_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty_token = dir.path().join("token");
    std::fs::write(&empty_token, "\n").expect("token");
    let file = dir.path().join("raftlb.yaml");
    std::fs::write(
        &file,
        format!(
            "admin: {{ bind: 127.0.0.1:19999, token_file: {} }}\n\
             listeners:\n  secure:\n    bind: 127.0.0.1:18443\n    pool: web\n    tls: terminate\n    \
             terminate: {{ cert: /nonexistent/lb.crt, key: /nonexistent/lb.key }}\n\
             pools:\n  web:\n    backends:\n      - {{ name: b, address: 127.0.0.1:1 }}\n",
            empty_token.display()
        ),
    )
    .expect("config");
    let (code, _, stderr) = check(&file);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("empty"),
        "{stderr}"
    );
    assert!(stderr.contains("/nonexistent/lb.crt"), "{stderr}");
    // Each names its field's place in the file, as the validator's errors do.
    let file_s = file.to_string_lossy().to_string();
    assert!(
        stderr.contains(&format!("{file_s}:1:33: admin.token_file: ")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{file_s}:7:5: listeners.secure.terminate: ")),
        "{stderr}"
    );
    let (code, _, stderr) = common::raftlb_cmd_timeout(&["run", "--config", &file_s], 10);
    assert_eq!(code, 2, "run refuses the same file: {stderr}");
    let (code, _, stderr) = check_syntax(&file);
    assert_eq!(code, 0, "the file alone is valid: {stderr}");
}

/// A config whose TLS files all load passes the whole check (it once panicked
/// building the listener's certificate watcher outside a runtime).
#[test]
fn check_passes_a_terminating_listener_whose_files_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::Pki::new(dir.path(), "lb");
    let lb = pki.server("lb", &[]);
    let file = dir.path().join("raftlb.yaml");
    std::fs::write(
        &file,
        format!(
            "listeners:\n  secure:\n    bind: 127.0.0.1:18443\n    pool: web\n    tls: terminate\n    \
             terminate: {{ cert: {}, key: {}, client_ca: {} }}\n\
             pools:\n  web:\n    backends:\n      - {{ name: b, address: 127.0.0.1:1 }}\n",
            lb.cert.display(),
            lb.key.display(),
            pki.ca.display()
        ),
    )
    .expect("config");
    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("terminate:"), "{stdout}");
}

/// The user's report: three copies of config/cluster-loopback.yaml, the second with
/// its ports, name and data_dir changed but `node_id: 1` left as it was.
#[test]
fn a_copied_config_that_keeps_node_id_1_is_refused_by_check_and_run() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cluster-loopback.yaml");
    let text = std::fs::read_to_string(&example).expect("read the example");
    let second = text
        .replace("name: lb-1", "name: lb-2")
        .replace("bind: 127.0.0.1:9091", "bind: 127.0.0.1:9092")
        .replace("bind: 127.0.0.1:7401", "bind: 127.0.0.1:7402")
        .replace("/tmp/raftlb-1", "/tmp/raftlb-2")
        .replace("bind: 127.0.0.1:16443", "bind: 127.0.0.1:16444");
    assert_eq!(
        second.matches("127.0.0.1:7402").count(),
        2,
        "the example changed: the test no longer makes replica 2's copy\n{second}"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("lb-2.yaml");
    std::fs::write(&file, &second).expect("write");
    let line = second
        .lines()
        .position(|l| l.trim_start().starts_with("node_id:"))
        .expect("node_id line")
        + 1;
    let field = format!("lb-2.yaml:{line}:12: cluster.node_id: node_id is 1");

    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains(&field) && stderr.contains("peers[2]"),
        "{stderr}"
    );
    let (code, _, stderr) = raftlb_cmd(&["run", "--config", file.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&field), "{stderr}");
}

#[test]
fn check_prints_defaults_filled_in() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/minimal.yaml");
    let (code, stdout, _) = check(&file);
    assert_eq!(code, 0);
    for default in [
        "bind: 127.0.0.1:9090",
        "shutdown_grace: 30s",
        "balance: round_robin",
        "idle_timeout: 1h",
        "max_connections:",
        "retries: 3",
    ] {
        assert!(
            stdout.contains(default),
            "effective config lacks {default:?}:\n{stdout}"
        );
    }
}

#[test]
fn warnings_name_quorum_and_lease_margin_but_do_not_fail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let four = tmp.path().join("four.yaml");
    std::fs::write(
        &four,
        "cluster:\n  node_id: 1\n  bind: 127.0.0.1:7400\n  peers: { 1: 127.0.0.1:7400, 2: 127.0.0.1:7401, 3: 127.0.0.1:7402, 4: 127.0.0.1:7403 }\nlisteners:\n  a: { bind: 127.0.0.1:7001, pool: p }\npools:\n  p: { backends: [ { name: a, address: 127.0.0.1:8001 } ] }\n",
    )
    .expect("write");
    let (code, _, stderr) = check(&four);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("quorum is 3")
            && stderr.contains("fault tolerance 1"),
        "{stderr}"
    );

    let margin = tmp.path().join("margin.yaml");
    std::fs::write(
        &margin,
        "leader_election: { lease_duration: 10s, renew_deadline: 9s, retry_period: 1s }\nlisteners:\n  a: { bind: 127.0.0.1:7001, pool: p }\npools:\n  p: { backends: [ { name: a, address: 127.0.0.1:8001 } ] }\n",
    )
    .expect("write");
    let (code, _, stderr) = check(&margin);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("under 20% of the lease"), "{stderr}");

    let probe = tmp.path().join("probe.yaml");
    std::fs::write(
        &probe,
        "listeners:\n  a: { bind: 127.0.0.1:7001, pool: p }\npools:\n  p:\n    \
         health_check: { kind: tcp, interval: 1s, timeout: 3s, tls: { server_name: api } }\n    \
         backends: [ { name: a, address: 127.0.0.1:8001 } ]\n",
    )
    .expect("write");
    let (code, _, stderr) = check(&probe);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("pools.p.health_check.tls: ignored: a tcp check makes no TLS handshake"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pools.p.health_check.timeout: 3s is longer than interval (1s)"),
        "{stderr}"
    );
}

#[test]
fn cli_exit_codes() {
    let (code, stdout, _) = raftlb_cmd(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("check") && stdout.contains("run"),
        "{stdout}"
    );
    let (code, stdout, _) = raftlb_cmd(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");

    let (code, _, stderr) = raftlb_cmd(&["check", "--config", "/nonexistent/raftlb.yaml"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/raftlb.yaml"), "{stderr}");
    let (code, _, stderr) = raftlb_cmd(&["frobnicate"]);
    assert_eq!(code, 2, "unknown subcommand is a usage error");
    assert!(
        stderr.contains("unrecognized subcommand 'frobnicate'"),
        "{stderr}"
    );
    let (code, _, stderr) = raftlb_cmd(&["run", "--no-such-flag"]);
    assert_eq!(code, 2, "unknown flag is a usage error");
    assert!(
        stderr.contains("unexpected argument '--no-such-flag'"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_invalid_config_and_unsupported_sections() {
    let invalid = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/invalid/listener_pool_missing.yaml");
    let (code, _, stderr) = raftlb_cmd(&["run", "--config", invalid.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    // An external etcd store is validated but not built: run refuses it by name.
    let cluster =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/cluster_three_peers.yaml");
    let yaml = std::fs::read_to_string(cluster).expect("fixture").replace(
        "store: embedded",
        "store: etcd\n  etcd_servers: [\"http://127.0.0.1:2379\"]",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = dir.path().join("etcd.yaml");
    std::fs::write(&etcd, yaml).expect("write");
    let (code, _, stderr) = raftlb_cmd(&["run", "--config", etcd.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("not supported by this build yet") && stderr.contains("cluster.store"),
        "{stderr}"
    );
    // file:line:column: the store key's place.
    let line = stderr
        .lines()
        .find(|l| l.contains("cluster.store: etcd is not supported"))
        .unwrap_or_default();
    let place = line
        .split_once("etcd.yaml:")
        .and_then(|(_, rest)| rest.split_once(": cluster.store: etcd is not supported"))
        .map(|(place, _)| place.to_string());
    assert!(
        place.as_deref().is_some_and(|p| p
            .split(':')
            .all(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
            && p.split(':').count() == 2),
        "{stderr}"
    );
}

#[test]
fn check_prints_every_role_hook() {
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/vip_ipv6_and_hooks.yaml");
    let (code, stdout, stderr) = check(&file);
    assert_eq!(code, 0, "{stderr}");
    for hook in [
        "on_active: /usr/local/bin/notify active",
        "on_standby: /usr/local/bin/notify standby",
        "on_fault: /usr/local/bin/notify fault",
    ] {
        assert!(
            stdout.contains(hook),
            "effective config lacks {hook:?}:\n{stdout}"
        );
    }
}

/// DESIGN-lease.md: the kernel deletes a lapsed VIP up to about a second after its
/// lifetime of max(1 s, floor(renew_deadline)), so a shorter lease lets a killed
/// holder's VIP coexist with the new holder's for a moment.
#[test]
fn a_vip_with_a_lease_shorter_than_its_kernel_lifetime_is_a_warning() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("600ms", "450ms", "100ms", true),
        ("2900ms", "2s", "250ms", true),
        ("2s", "1500ms", "250ms", false),
        ("3s", "2500ms", "250ms", false),
        ("15s", "10s", "2s", false),
    ];
    for (lease, renew, retry, warns) in cases {
        let file = tmp.path().join(format!("lease-{lease}.yaml"));
        std::fs::write(
            &file,
            format!(
                "cluster:\n  node_id: 1\n  bind: 127.0.0.1:7400\n  peers: {{ 1: 127.0.0.1:7400, 2: 127.0.0.1:7401, 3: 127.0.0.1:7402 }}\n  heartbeat_interval: 30ms\n  election_timeout: 100ms\nleader_election:\n  lease_duration: {lease}\n  renew_deadline: {renew}\n  retry_period: {retry}\n  vip: {{ address: 192.0.2.50/24, interface: eth0 }}\nlisteners:\n  a: {{ bind: 127.0.0.1:7001, pool: p }}\npools:\n  p: {{ backends: [ {{ name: a, address: 127.0.0.1:8001 }} ] }}\n"
            ),
        )
        .expect("write");
        let (code, _, stderr) = check(&file);
        assert_eq!(code, 0, "lease {lease}: {stderr}");
        let warned = stderr.contains("warning:")
            && stderr.contains("leader_election.lease_duration")
            && stderr.contains("can briefly coexist");
        assert_eq!(warned, warns, "lease {lease} renew {renew}:\n{stderr}");
    }
}

#[test]
fn leader_elect_flags_override_the_file_and_are_validated_with_it() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cluster-loopback.yaml");
    let file = file.to_str().expect("utf-8");
    // The file says 15s / 10s / 2s: a renew deadline above the lease is refused, naming both.
    let (code, _, stderr) = raftlb_cmd(&[
        "run",
        "--config",
        file,
        "--leader-elect-renew-deadline",
        "20s",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("renew_deadline (20s) must be less than lease_duration (15s)"),
        "{stderr}"
    );
    // The error names the flag: the file's renew_deadline is not what was refused.
    assert!(
        stderr.contains("(with --leader-elect-renew-deadline 20s from the command line)"),
        "{stderr}"
    );
    let (code, _, stderr) = raftlb_cmd(&[
        "run",
        "--config",
        file,
        "--leader-elect-lease-duration",
        "30s",
        "--leader-elect-renew-deadline",
        "20s",
        "--leader-elect-retry-period",
        "25s",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("retry_period (25s) must be less than renew_deadline (20s)")
            && stderr.contains(
                "--leader-elect-lease-duration 30s --leader-elect-renew-deadline 20s --leader-elect-retry-period 25s from the command line"
            ),
        "{stderr}"
    );
    let (code, _, stderr) = raftlb_cmd(&["run", "--config", file, "--leader-elect=maybe"]);
    assert_eq!(code, 2, "a bad boolean is a usage error: {stderr}");
}

/// The systemd unit passes `systemd-analyze verify` (with ExecStart pointed at this
/// build: verify checks the binary exists), without a warning.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/raftlb.service"),
    )
    .expect("packaging/raftlb.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/raftlb run"));
    let dir = tempfile::tempdir().expect("tempdir");
    let here = dir.path().join("raftlb.service");
    std::fs::write(
        &here,
        unit.replace("/usr/local/bin/raftlb", env!("CARGO_BIN_EXE_raftlb")),
    )
    .expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&here)
        .output()
        .expect("systemd-analyze (Debian package systemd; scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warns: {stderr}"
    );
}

/// Listeners left at the default max_connections count once together against the
/// open-files limit (each may take the whole budget, and they share it): defaults
/// alone never warn; limits that together exceed it do, a default among them too.
#[test]
fn listeners_at_the_default_max_connections_count_once_against_the_open_files_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = |a: &str, b: &str| {
        format!(
            "listeners:\n  a: {{ bind: 127.0.0.1:7001, pool: p{a} }}\n  b: {{ bind: 127.0.0.1:7002, pool: p{b} }}\npools:\n  p: {{ backends: [ {{ name: a, address: 127.0.0.1:8001 }} ] }}\n"
        )
    };
    for (name, a, b, warns) in [
        ("defaults", "", "", false),
        (
            "set",
            ", max_connections: 2000000000",
            ", max_connections: 2000000000",
            true,
        ),
        // A limit set beside a default: the default may take the whole budget.
        (
            "beside a default",
            ", max_connections: 2000000000",
            "",
            true,
        ),
    ] {
        let file = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml(a, b)).expect("write");
        let (code, _, stderr) = check(&file);
        assert_eq!(code, 0, "{name}: {stderr}");
        assert_eq!(
            stderr.contains("open files with the reserve"),
            warns,
            "{name}:\n{stderr}"
        );
    }
}

/// A wildcard cluster.bind listens on its own port only: a peers entry for this
/// replica on another port is a warning (nothing would answer there), unless
/// cluster.advertise says where the peers reach it (NAT).
#[test]
fn a_wildcard_peer_bind_on_another_port_than_its_peers_entry_warns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = |extra: &str| {
        format!(
            "cluster:\n  node_id: 1\n  bind: 0.0.0.0:7400\n{extra}  peers: {{ 1: 127.0.0.1:7500, 2: 127.0.0.1:7401, 3: 127.0.0.1:7402 }}\nlisteners:\n  a: {{ bind: 127.0.0.1:7001, pool: p }}\npools:\n  p: {{ backends: [ {{ name: a, address: 127.0.0.1:8001 }} ] }}\n"
        )
    };
    for (name, extra, warns) in [
        ("plain", "", true),
        ("nat", "  advertise: 127.0.0.1:7500\n", false),
    ] {
        let file = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml(extra)).expect("write");
        let (code, _, stderr) = check(&file);
        assert_eq!(code, 0, "{name}: {stderr}");
        assert_eq!(
            stderr.contains("listens on port 7400, but peers[1]"),
            warns,
            "{name}:\n{stderr}"
        );
    }
}

/// A role hook whose program cannot be run is a warning from `check`, as at start;
/// `check --syntax-only` reads the file alone, so it does not look for the program.
#[test]
fn a_missing_hook_program_warns_except_with_syntax_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("hook.yaml");
    std::fs::write(
        &file,
        "leader_election: { on_active: /nonexistent/notify active }\nlisteners:\n  a: { bind: 127.0.0.1:7001, pool: p }\npools:\n  p: { backends: [ { name: a, address: 127.0.0.1:8001 } ] }\n",
    )
    .expect("write");
    let (code, _, stderr) = check(&file);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("leader_election.on_active: /nonexistent/notify cannot be run"),
        "{stderr}"
    );
    let (code, _, stderr) = check_syntax(&file);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("on_active"), "{stderr}");
}
