//! The role hooks `leader_election.on_active`, `on_standby` and `on_fault`, run like
//! keepalived's notify scripts: the command is split on whitespace (no shell), and it
//! learns the new role from its environment:
//! `RAFTLB_ROLE` (active | standby | fault), `RAFTLB_EPOCH` (the lease epoch, the fencing
//! token) and `RAFTLB_VIP` (the VIP's address without prefix, or empty).
//!
//! [`Hooks::fire`] never blocks the election: one background task runs the hooks one at
//! a time in the order they were fired. Each gets stdin from /dev/null, the process's
//! stdout and stderr (the journal under systemd), its own process group, and no ambient
//! capabilities (raftlb holds CAP_NET_ADMIN and CAP_NET_RAW as ambient capabilities,
//! which a child would otherwise inherit). A hook still running after the timeout is
//! killed with its process group. A hook that fails is logged and counted
//! (`raftlb_leader_election_hook_failures_total{hook}`), never fatal.

use std::fmt;
use std::net::IpAddr;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{schema, vip};
use crate::metrics::HOOK_FAILURES_TOTAL;

/// How long a hook may run before it is killed, as in production.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

pub use super::lease::Role;

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hook commands, each already split into program and arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookCommands {
    pub on_active: Option<Vec<String>>,
    pub on_standby: Option<Vec<String>>,
    pub on_fault: Option<Vec<String>>,
}

impl HookCommands {
    pub fn from_config(le: &schema::LeaderElection) -> HookCommands {
        let split = |c: &Option<String>| c.as_deref().and_then(split_command);
        HookCommands {
            on_active: split(&le.on_active),
            on_standby: split(&le.on_standby),
            on_fault: split(&le.on_fault),
        }
    }

    fn get(&self, role: Role) -> Option<&[String]> {
        match role {
            Role::Active => self.on_active.as_deref(),
            Role::Standby => self.on_standby.as_deref(),
            Role::Fault => self.on_fault.as_deref(),
        }
    }
}

/// Splits a hook command on whitespace, like keepalived's notify (no shell, no quoting).
/// `None` when there is nothing to run.
pub fn split_command(command: &str) -> Option<Vec<String>> {
    let argv: Vec<String> = command.split_whitespace().map(String::from).collect();
    (!argv.is_empty()).then_some(argv)
}

/// Why one hook run failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start it: {0}")]
    Spawn(std::io::Error),
    #[error("cannot wait for it: {0}")]
    Wait(std::io::Error),
    #[error("it exited with {0}")]
    Exit(ExitStatus),
    #[error("it was still running after {0:?}; killed it and its process group")]
    Timeout(Duration),
}

/// What a hook waits for before it runs (on_active: the VIP's first add).
pub type Ready = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

enum Message {
    Fire {
        role: Role,
        epoch: u64,
        ready: Option<Ready>,
    },
    Reload {
        commands: HookCommands,
        vip: Option<IpAddr>,
    },
}

/// The handle the election holds: [`Hooks::fire`] queues a hook, a background task runs it.
pub struct Hooks {
    queue: mpsc::UnboundedSender<Message>,
    task: JoinHandle<()>,
}

impl Hooks {
    /// Starts the task that runs the hooks (inside a tokio runtime). `timeout` is
    /// [`HOOK_TIMEOUT`] in production.
    pub fn new(commands: HookCommands, vip: Option<IpAddr>, timeout: Duration) -> Hooks {
        let (queue, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_queue(rx, commands, vip, timeout));
        Hooks { queue, task }
    }

    /// The hooks of `leader_election`, with the production timeout.
    pub fn from_config(le: &schema::LeaderElection) -> Hooks {
        Hooks::new(HookCommands::from_config(le), vip_address(le), HOOK_TIMEOUT)
    }

    /// Queues the hook of `role`, if one is configured; returns at once.
    pub fn fire(&self, role: Role, epoch: u64) {
        self.send(Message::Fire {
            role,
            epoch,
            ready: None,
        });
    }

    /// Queues the hook of `role` to run once `ready` is done (the hooks after it wait
    /// too, so the order stays); returns at once.
    pub fn fire_when(&self, role: Role, epoch: u64, ready: Ready) {
        self.send(Message::Fire {
            role,
            epoch,
            ready: Some(ready),
        });
    }

    /// New commands (a SIGHUP reload) for the hooks fired after this call; those
    /// already queued keep their order and run with the commands they were fired under.
    pub fn reload(&self, le: &schema::LeaderElection) {
        self.send(Message::Reload {
            commands: HookCommands::from_config(le),
            vip: vip_address(le),
        });
    }

    fn send(&self, message: Message) {
        if self.queue.send(message).is_err() {
            // Only after the task panicked: the hooks are gone, the election goes on.
            tracing::warn!("the hook queue is closed; hook not run");
        }
    }

    /// Takes no more hooks and waits until the queued ones have run (at shutdown,
    /// after the release fired `on_standby`). Each is bounded by the timeout.
    pub async fn finish(self) {
        drop(self.queue);
        if let Err(e) = self.task.await {
            tracing::warn!("the hook task failed: {e}");
        }
    }
}

fn vip_address(le: &schema::LeaderElection) -> Option<IpAddr> {
    let v = le.vip.as_ref()?;
    vip::parse_address(&v.address.value).ok().map(|(ip, _)| ip)
}

async fn run_queue(
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut commands: HookCommands,
    mut vip: Option<IpAddr>,
    timeout: Duration,
) {
    while let Some(message) = rx.recv().await {
        match message {
            Message::Reload {
                commands: c,
                vip: v,
            } => (commands, vip) = (c, v),
            Message::Fire { role, epoch, ready } => {
                let Some(argv) = commands.get(role) else {
                    continue;
                };
                if let Some(ready) = ready {
                    ready.await;
                }
                let command = argv.join(" ");
                let started = Instant::now();
                tracing::debug!(hook = role.hook_name(), %command, epoch, "running hook");
                match run_hook(argv, role, epoch, vip, timeout).await {
                    Ok(()) => tracing::info!(
                        hook = role.hook_name(),
                        %command,
                        epoch,
                        "hook finished in {:?}",
                        started.elapsed()
                    ),
                    Err(e) => {
                        tracing::warn!(hook = role.hook_name(), %command, epoch, "hook failed: {e}");
                        metrics::counter!(HOOK_FAILURES_TOTAL, "hook" => role.hook_name())
                            .increment(1);
                    }
                }
            }
        }
    }
}

async fn run_hook(
    argv: &[String],
    role: Role,
    epoch: u64,
    vip: Option<IpAddr>,
    timeout: Duration,
) -> Result<(), HookError> {
    let Some((program, args)) = argv.split_first() else {
        return Ok(());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env("RAFTLB_ROLE", role.as_str())
        .env("RAFTLB_EPOCH", epoch.to_string())
        .env(
            "RAFTLB_VIP",
            vip.map(|ip| ip.to_string()).unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    drop_ambient_capabilities(&mut command);
    let mut child = command.spawn().map_err(HookError::Spawn)?;
    // Dropped unfinished (the process exits on a second signal), the hook takes
    // what it started with it, as on a timeout. Declared after `child`, so it runs
    // before `kill_on_drop` reaps the leader.
    let mut group = GroupGuard(child.id());
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    group.0 = None;
    match waited {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(HookError::Exit(status)),
        Ok(Err(e)) => Err(HookError::Wait(e)),
        Err(_) => {
            // The hook leads its own group; what it started goes with it.
            if let Some(pid) = child.id() {
                kill_process_group(pid);
            }
            let _ = child.kill().await;
            Err(HookError::Timeout(timeout))
        }
    }
}

/// Clears the ambient capability set in the child before it runs the hook, so a hook
/// run by a non-root raftlb gets no CAP_NET_ADMIN or CAP_NET_RAW.
#[allow(unsafe_code)]
fn drop_ambient_capabilities(command: &mut Command) {
    let zero: libc::c_ulong = 0;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed: one prctl(2) system call with integer
    // arguments (passed as unsigned long, as the variadic call needs) and a read of
    // errno; it allocates nothing and touches no lock.
    unsafe {
        command.pre_exec(move || {
            let cleared = libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                zero,
                zero,
                zero,
            );
            if cleared != 0 {
                let e = std::io::Error::last_os_error();
                // EINVAL: a kernel before 4.3 has no ambient set, so nothing to clear.
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            Ok(())
        });
    }
}

/// Kills a running hook's process group when dropped, unless the hook was waited for.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            kill_process_group(pgid);
        }
    }
}

/// SIGKILL to the process group `pgid` (a timed-out hook and whatever it started).
#[allow(unsafe_code)]
fn kill_process_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours. The group is
    // the hook's own (process_group(0) made it the leader), and the leader is not
    // reaped yet, so the id cannot belong to anyone else.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_split_on_whitespace_without_a_shell() {
        assert_eq!(
            split_command("  /usr/local/bin/notify  active\t'two words' "),
            Some(vec![
                "/usr/local/bin/notify".into(),
                "active".into(),
                "'two".into(),
                "words'".into()
            ])
        );
        assert_eq!(split_command(" \t "), None);
    }

    #[test]
    fn roles_spell_as_the_status_api_and_the_config() {
        assert_eq!(Role::Active.as_str(), "active");
        assert_eq!(Role::Standby.to_string(), "standby");
        assert_eq!(Role::Fault.hook_name(), "on_fault");
    }
}
