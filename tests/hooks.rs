//! The role hooks (src/election/hooks.rs) with real processes: order, environment,
//! timeout, failures, the failure metric, and ambient capabilities dropped.
//! Scripts are run as `sh SCRIPT` (hook commands are split on whitespace), so a script
//! just written is never executed while another test's fork holds it open (ETXTBSY).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::running;
use raftlb::config::schema::{self, LeaderElection};
use raftlb::election::hooks::{HookCommands, Hooks, Role};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    path
}

fn sh(script: &Path, args: &str) -> Option<Vec<String>> {
    raftlb::election::hooks::split_command(&format!("/bin/sh {} {args}", script.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_one_at_a_time_in_the_order_fired_and_fire_never_waits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let hook = script(
        dir.path(),
        "hook.sh",
        &format!(
            "echo \"start $RAFTLB_ROLE $RAFTLB_EPOCH\" >> {log}\nsleep 0.05\necho \"end $RAFTLB_ROLE $RAFTLB_EPOCH\" >> {log}",
            log = log.display()
        ),
    );
    let commands = HookCommands {
        on_active: sh(&hook, ""),
        on_standby: sh(&hook, ""),
        on_fault: sh(&hook, ""),
    };
    let hooks = Hooks::new(commands, None, Duration::from_secs(5));
    let roles = [Role::Standby, Role::Active, Role::Fault];
    let started = Instant::now();
    for epoch in 1..=15u64 {
        hooks.fire(roles[epoch as usize % 3], epoch);
    }
    let firing = started.elapsed();
    assert!(
        firing < Duration::from_millis(200),
        "fire waited for the hooks: 15 fires took {firing:?}"
    );
    hooks.finish().await;

    let expected: Vec<String> = (1..=15u64)
        .flat_map(|epoch| {
            let role = roles[epoch as usize % 3].as_str();
            [
                format!("start {role} {epoch}"),
                format!("end {role} {epoch}"),
            ]
        })
        .collect();
    let got: Vec<String> = read(&log).lines().map(String::from).collect();
    assert_eq!(got, expected, "hooks overlapped or ran out of order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_fired_when_ready_waits_for_it_and_the_next_waits_its_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let hook = script(
        dir.path(),
        "hook.sh",
        &format!("echo \"$RAFTLB_ROLE $RAFTLB_EPOCH\" >> {}", log.display()),
    );
    let commands = HookCommands {
        on_active: sh(&hook, ""),
        on_standby: sh(&hook, ""),
        on_fault: None,
    };
    let hooks = Hooks::new(commands, None, Duration::from_secs(5));
    // on_active waits for the VIP (here: a signal), on_standby after it in the queue.
    let (vip_added, added) = tokio::sync::oneshot::channel::<()>();
    hooks.fire_when(
        Role::Active,
        1,
        Box::pin(async move {
            let _ = added.await;
        }),
    );
    hooks.fire(Role::Standby, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read(&log), "", "a hook ran before what it waits for");
    vip_added.send(()).expect("the hook task waits");
    hooks.finish().await;
    assert_eq!(read(&log), "active 1\nstandby 1\n");
}

#[tokio::test]
async fn hooks_get_role_epoch_vip_arguments_and_no_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let hook = script(
        dir.path(),
        "env.sh",
        &format!(
            "echo \"$1 $2|$RAFTLB_ROLE|$RAFTLB_EPOCH|${{RAFTLB_VIP-unset}}|$(readlink /proc/self/fd/0)\" >> {}",
            out.display()
        ),
    );
    let le = LeaderElection {
        on_active: Some(format!("/bin/sh  {}\tone   two", hook.display())),
        on_standby: Some(format!("/bin/sh {} standby", hook.display())),
        on_fault: Some(format!("/bin/sh {} fault", hook.display())),
        vip: Some(schema::Vip {
            address: schema::unplaced("192.0.2.50/24".into()),
            interface: "eth0".into(),
        }),
        ..LeaderElection::default()
    };
    let hooks = Hooks::from_config(&le);
    hooks.fire(Role::Active, 7);
    hooks.fire(Role::Fault, 8);
    // A reload takes effect for the hooks fired after it; no VIP leaves RAFTLB_VIP empty.
    hooks.reload(&LeaderElection { vip: None, ..le });
    hooks.fire(Role::Standby, 9);
    hooks.finish().await;
    assert_eq!(
        read(&out),
        "one two|active|7|192.0.2.50|/dev/null\n\
         fault |fault|8|192.0.2.50|/dev/null\n\
         standby |standby|9||/dev/null\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_past_its_timeout_is_killed_with_what_it_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pids, done) = (dir.path().join("pids"), dir.path().join("done"));
    let forks = script(
        dir.path(),
        "forks.sh",
        &format!("sleep 60 &\necho \"$$ $!\" > {}\nwait", pids.display()),
    );
    let writer = script(
        dir.path(),
        "writer.sh",
        &format!("echo done > {}", done.display()),
    );
    let commands = HookCommands {
        on_fault: Some(vec!["sleep".into(), "60".into()]),
        on_active: sh(&forks, ""),
        on_standby: sh(&writer, ""),
    };
    let timeout = Duration::from_secs(1);
    let hooks = Hooks::new(commands, None, timeout);
    let started = Instant::now();
    hooks.fire(Role::Fault, 1);
    hooks.fire(Role::Active, 2);
    hooks.fire(Role::Standby, 3);
    let finished = tokio::task::spawn_blocking(move || {
        wait_for(Duration::from_secs(15), || done.exists()).then(|| started.elapsed())
    })
    .await
    .expect("join");
    let took = finished.expect("the hook after two stuck ones never ran");
    assert!(
        took >= timeout * 2 && took < timeout * 2 + Duration::from_secs(4),
        "two hooks that never end, each killed after {timeout:?}, then one more: took {took:?}"
    );
    let pids = read(&pids);
    let (script_pid, sleep_pid) = pids.trim().split_once(' ').expect("both pids written");
    assert!(
        !running(script_pid),
        "the timed-out hook {script_pid} still runs"
    );
    assert!(
        wait_for(Duration::from_secs(2), || !running(sleep_pid)),
        "the process the timed-out hook started ({sleep_pid}) still runs"
    );
    hooks.finish().await;
}

#[tokio::test]
async fn a_failing_hook_is_counted_and_does_not_stop_the_next() {
    let metrics = raftlb::metrics::install();
    let failures = || {
        metrics
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix("raftlb_leader_election_hook_failures_total{hook=\"on_standby\"} ")
            })
            .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let done = dir.path().join("done");
    let writer = script(
        dir.path(),
        "writer.sh",
        &format!("echo \"$RAFTLB_EPOCH\" >> {}", done.display()),
    );
    // Only this test makes on_standby hooks fail, so the count moves by its own.
    let before = {
        let hooks = Hooks::new(HookCommands::default(), None, Duration::from_secs(5));
        hooks.fire(Role::Standby, 0);
        hooks.finish().await;
        failures()
    };
    let missing = LeaderElection {
        on_standby: Some("/nonexistent/raftlb-hook".into()),
        on_active: Some(format!("/bin/sh {}", writer.display())),
        ..LeaderElection::default()
    };
    let hooks = Hooks::new(
        HookCommands::from_config(&missing),
        None,
        Duration::from_secs(5),
    );
    hooks.fire(Role::Standby, 1);
    hooks.fire(Role::Active, 2);
    hooks.reload(&LeaderElection {
        on_standby: Some("false".into()),
        ..missing
    });
    hooks.fire(Role::Standby, 3);
    hooks.fire(Role::Active, 4);
    hooks.finish().await;
    assert_eq!(
        read(&done),
        "2\n4\n",
        "the hooks after the failing ones ran"
    );
    assert_eq!(
        failures() - before,
        2,
        "a hook that cannot start and one that exits 1 are both counted"
    );
    let text = metrics.render();
    assert!(
        text.contains("# HELP raftlb_leader_election_hook_failures_total Role hooks that failed"),
        "{text}"
    );
}

/// raftlb runs with CAP_NET_ADMIN and CAP_NET_RAW as ambient capabilities, which every
/// child inherits unless it clears them. This thread raises CAP_NET_RAW as ambient
/// (it runs as root), so a plain child shows it in CapAmb and a hook must not.
#[test]
fn hooks_run_without_ambient_capabilities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("capamb");
    let hook = script(
        dir.path(),
        "caps.sh",
        &format!(
            "grep CapAmb /proc/self/status | tr -d ' \\t' >> {}",
            out.display()
        ),
    );
    let thread = std::thread::spawn(move || {
        raise_ambient(CAP_NET_RAW);
        let plain = std::process::Command::new("/bin/sh")
            .arg(&hook)
            .status()
            .expect("plain child");
        assert!(plain.success());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let hooks = Hooks::new(
                    HookCommands {
                        on_active: sh(&hook, ""),
                        ..HookCommands::default()
                    },
                    None,
                    Duration::from_secs(5),
                );
                hooks.fire(Role::Active, 1);
                hooks.finish().await;
            });
    });
    thread.join().expect("the capability thread");
    assert_eq!(
        read(&out),
        "CapAmb:0000000000002000\nCapAmb:0000000000000000\n",
        "first a plain child (inherits CAP_NET_RAW), then the hook (none)"
    );
}

const CAP_NET_RAW: u32 = 13;

/// Adds `cap` to this thread's inheritable set (capset) and raises it as ambient.
fn raise_ambient(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and the two data structs that
    // version defines; pid 0 is this thread. The pointers live across the calls.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].inheritable |= 1 << cap;
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
    let zero: libc::c_ulong = 0;
    // SAFETY: prctl with integer arguments only, passed as unsigned long.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(cap),
            zero,
            zero,
        )
    };
    assert_eq!(
        rc,
        0,
        "raise ambient CAP_NET_RAW (the test needs root): {}",
        std::io::Error::last_os_error()
    );
}
