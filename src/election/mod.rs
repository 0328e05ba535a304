//! Leader election: exactly one active replica, on a lease in the Raft store
//! (DESIGN-lease.md). [`lease`] decides; the task here carries its decisions out:
//! compare-and-sets through the store's write path, the gate the listeners check,
//! and the role the process follows (listeners, VIP, hooks).

mod follow;
pub mod hooks;
pub mod lease;
pub mod vip;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::clock;
use crate::metrics as m;
use crate::proxy::gate::Gate;
use crate::store::types::{Command, Lease, NodeId, Outcome};
use crate::store::{LeaseTransfer, Node};
use follow::Want;
use hooks::Hooks;
use lease::{Action, CasResult, Elector, Me, Role, Settings};
use vip::Vip;

/// What the process and the admin API see of the election.
#[derive(Clone, Debug)]
pub struct Status {
    pub role: Role,
    pub epoch: u64,
    /// The newest lease record known here, and when its version was first seen
    /// (on [`clock::now`]).
    pub record: Lease,
    pub observed_at: Duration,
    pub lease_duration: Duration,
    /// Why this replica is `fault` (rule 7: its listeners or its VIP), while it is.
    pub fault: Option<String>,
}

impl Status {
    /// How long ago this replica first saw the record's current version.
    pub fn renewed_ago(&self) -> Duration {
        clock::now().saturating_sub(self.observed_at)
    }
}

enum Request {
    Release {
        to: Option<NodeId>,
        stop: bool,
        done: oneshot::Sender<()>,
    },
    Fault(String),
    Settings(Settings),
    Transfer(LeaseTransfer),
    SetVip(Option<Vip>),
    /// Election off (a reload, or shutdown): the lease task ends after the hooks
    /// already queued have run, and then says so.
    Stop(oneshot::Sender<()>),
    Hooks(Box<crate::config::schema::LeaderElection>),
}

/// The running election of this replica.
#[derive(Clone)]
pub struct Election {
    status: watch::Receiver<Status>,
    requests: mpsc::UnboundedSender<Request>,
}

impl Election {
    /// Starts electing. `gate` is opened while this replica is active, until its
    /// lease's deadline; the VIP and the hooks follow the role.
    pub fn start(
        node: Arc<Node>,
        name: String,
        settings: Settings,
        gate: Gate,
        vip: Option<Vip>,
        hooks: Hooks,
    ) -> Election {
        let me = Me {
            node: node.id,
            name,
            instance: uuid::Uuid::new_v4().as_u128().to_string(),
        };
        let record = node.applied().borrow().state.lease.clone();
        let now = clock::now();
        let status = Status {
            role: Role::Standby,
            epoch: 0,
            record: record.clone(),
            observed_at: now,
            lease_duration: settings.lease_duration,
            fault: None,
        };
        let (publish, status) = watch::channel(status);
        let (requests, inbox) = mpsc::unbounded_channel();
        let elector = Elector::new(me, settings, record, now, fastrand::u64(..));
        m::revive_metric(m::LEADER_ELECTION_IS_ACTIVE);
        metrics::gauge!(m::LEADER_ELECTION_IS_ACTIVE).set(0.0);
        // Transfers sent to this replica by others (rule 6: only the holder gives it away).
        if let Some(mut transfers) = node.serve_lease_transfers() {
            let requests = requests.clone();
            tokio::spawn(async move {
                // Until the lease task ends (a reload may stop it).
                loop {
                    tokio::select! {
                        () = requests.closed() => return,
                        t = transfers.recv() => match t {
                            Some(t) => { let _ = requests.send(Request::Transfer(t)); }
                            None => return,
                        },
                    }
                }
            });
        }
        let follower = Follower::start(vip, settings, requests.clone());
        // Every replica starts as a standby and runs on_standby, as keepalived runs
        // notify_backup at start: what an on_active did before a crash or kill -9
        // is undone before this replica can become active again. Epoch 0: it has
        // held no lease yet.
        hooks.fire(Role::Standby, 0);
        tokio::spawn(drive(Driver {
            node,
            elector,
            gate,
            follower,
            hooks,
            publish,
            requests: requests.clone(),
            inbox,
        }));
        Election { status, requests }
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Rule 5: stop accepting, then give the lease up (to `to`, or to any standby);
    /// `stop` for shutdown (never acquire again). Returns once released, or when
    /// the renew deadline made it moot.
    pub async fn release(&self, to: Option<NodeId>, stop: bool) {
        let (done, released) = oneshot::channel();
        if self
            .requests
            .send(Request::Release { to, stop, done })
            .is_ok()
        {
            let _ = released.await;
        }
    }

    /// Shutdown, or a reload that turned election off (rules 5 and 8): gives the
    /// lease up (waiting at most `limit`), then ends the lease task; this replica
    /// never campaigns again, and transfers sent to it are answered "election
    /// off". The receiver resolves once the hooks already queued (`on_standby`)
    /// have run, each bounded by its timeout.
    pub async fn stop(&self, limit: Duration) -> oneshot::Receiver<()> {
        if tokio::time::timeout(limit, self.release(None, true))
            .await
            .is_err()
        {
            tracing::warn!("could not release the lease in time");
        }
        let (done, finished) = oneshot::channel();
        let _ = self.requests.send(Request::Stop(done));
        finished
    }

    /// Rule 7: this active cannot serve; it gives the lease up and sits out.
    pub fn fault(&self, why: String) {
        let _ = self.requests.send(Request::Fault(why));
    }

    /// A reload's new timing (a renew already sent keeps its renew_deadline).
    pub fn set_settings(&self, settings: Settings) {
        let _ = self.requests.send(Request::Settings(settings));
    }

    /// A reload's new hook commands, for the transitions that follow.
    pub fn reload_hooks(&self, le: &crate::config::schema::LeaderElection) {
        let _ = self.requests.send(Request::Hooks(Box::new(le.clone())));
    }

    /// A reload's new VIP (release the lease first: rule 8).
    pub fn set_vip(&self, vip: Option<Vip>) {
        let _ = self.requests.send(Request::SetVip(vip));
    }
}

/// The VIP's task, seen from the lease task.
struct Follower {
    want: watch::Sender<(u64, Want)>,
    done: watch::Receiver<u64>,
    generation: u64,
    has_vip: bool,
}

impl Follower {
    fn start(
        vip: Option<Vip>,
        settings: Settings,
        requests: mpsc::UnboundedSender<Request>,
    ) -> Follower {
        let (want, wanted) = watch::channel((0, Want::Down));
        let (done_tx, done) = watch::channel(0);
        let has_vip = vip.is_some();
        if let Some(vip) = vip {
            let (faults, mut fault_rx) = mpsc::unbounded_channel();
            tokio::spawn(follow::run(vip, settings, wanted, done_tx, faults));
            tokio::spawn(async move {
                while let Some(why) = fault_rx.recv().await {
                    let _ = requests.send(Request::Fault(why));
                }
            });
        }
        Follower {
            want,
            done,
            generation: 0,
            has_vip,
        }
    }

    fn set(&mut self, want: Want) {
        self.generation += 1;
        self.want.send_replace((self.generation, want));
    }

    /// Done once the VIP's task has handled the latest `set` (for an up, its first
    /// add or the add's failure), or after two seconds; at once without a VIP.
    fn handled(&self) -> hooks::Ready {
        let mut done = self.done.clone();
        let generation = self.generation;
        let has_vip = self.has_vip;
        Box::pin(async move {
            if has_vip {
                let handled = done.wait_for(|g| *g >= generation);
                let _ = tokio::time::timeout(Duration::from_secs(2), handled).await;
            }
        })
    }

    /// The term of the VIP held: a winning renew moves its deadline.
    fn renewed(&mut self, deadline: Duration) {
        self.want.send_if_modified(|(_, w)| match w {
            Want::Up { deadline: d, .. } => {
                *d = deadline;
                true
            }
            Want::Down => false,
        });
    }

    /// Rule 5's order: the VIP is gone before the lease is released. The VIP's task
    /// retries a removal that fails; the wait ends at the latest when the address's
    /// kernel lifetime must have run out: it was at most the whole seconds left of the
    /// term (at least one), and the kernel sweeps a second after that.
    async fn down(&mut self) {
        let gone_by = match self.want.borrow().1 {
            Want::Up { deadline, .. } => deadline + Duration::from_secs(2),
            Want::Down => Duration::ZERO,
        };
        self.set(Want::Down);
        if self.has_vip {
            let generation = self.generation;
            let removed = self.done.wait_for(|g| *g >= generation);
            let wait = gone_by
                .saturating_sub(clock::now())
                .max(Duration::from_secs(2));
            if tokio::time::timeout(wait, removed).await.is_err() {
                tracing::error!(
                    "the VIP's removal was not confirmed within {wait:?}; going on: its kernel lifetime has ended"
                );
            }
        }
    }
}

/// The lease task's world, handed over once.
struct Driver {
    node: Arc<Node>,
    elector: Elector,
    gate: Gate,
    follower: Follower,
    hooks: Hooks,
    publish: watch::Sender<Status>,
    requests: mpsc::UnboundedSender<Request>,
    inbox: mpsc::UnboundedReceiver<Request>,
}

async fn drive(driver: Driver) {
    let Driver {
        node,
        mut elector,
        gate,
        mut follower,
        hooks,
        publish,
        requests,
        mut inbox,
    } = driver;
    let mut applied = node.applied();
    let mut writes: JoinSet<(u64, CasResult)> = JoinSet::new();
    let mut releases: Vec<oneshot::Sender<()>> = Vec::new();
    let mut transfers: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    // Whether the release under way gives up a lease this replica held (a standby's
    // release at shutdown only makes sure it holds none).
    let mut releasing_held = false;
    // The last fault's reason, shown while the role is fault.
    let mut fault: Option<String> = None;
    loop {
        let now = clock::now();
        while let Some(action) = elector.poll(now) {
            match action {
                Action::Send { id, expect, op } => {
                    let node = node.clone();
                    let deadline = elector.settings().retry_period;
                    let command = Command::Lease {
                        expect,
                        op: op.stamped(wall_ms()),
                    };
                    writes.spawn(async move {
                        let result = match node.write_within(command, deadline).await {
                            Ok(Outcome::Lease { won: true, lease }) => CasResult::Won(lease),
                            Ok(Outcome::Lease { won: false, lease }) => CasResult::Lost(lease),
                            Ok(other) => {
                                tracing::warn!(%other, "unexpected answer to a lease write");
                                CasResult::Failed
                            }
                            Err(e @ crate::store::WriteError::NotProposed(_)) => {
                                tracing::debug!(error = %e, "lease write not proposed");
                                CasResult::NotProposed
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "lease write failed");
                                CasResult::Failed
                            }
                        };
                        (id, result)
                    });
                }
                Action::BecomeActive { epoch, deadline } => {
                    gate.open_until(deadline);
                    follower.set(Want::Up {
                        epoch,
                        since: now,
                        deadline,
                    });
                    // As keepalived's notify_master: once the VIP is there.
                    hooks.fire_when(Role::Active, epoch, follower.handled());
                    tracing::info!(
                        epoch,
                        node_id = node.id,
                        "became active: this replica holds the lease"
                    );
                    metrics::gauge!(m::LEADER_ELECTION_IS_ACTIVE).set(1.0);
                    metrics::counter!(m::LEADER_ELECTION_TRANSITIONS_TOTAL, "to" => "active")
                        .increment(1);
                    // The active holds Raft leadership, so a dying standby never
                    // stalls its renewals.
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = node.move_leader(node.id).await {
                            tracing::info!(error = %e, "could not take Raft leadership yet");
                        }
                    });
                }
                Action::Renewed { deadline } => {
                    gate.open_until(deadline);
                    follower.renewed(deadline);
                }
                Action::StepDown { role, cause } => {
                    gate.close();
                    follower.down().await;
                    hooks.fire(role, elector.epoch());
                    if matches!(cause, lease::Cause::FaultOver) {
                        // Not accepting since the fault: only the role changes now.
                        tracing::info!(
                            epoch = elector.epoch(),
                            to = role.as_str(),
                            "the fault's sit-out is over: a standby again, it may take the lease"
                        );
                    } else {
                        tracing::warn!(
                            epoch = elector.epoch(),
                            to = role.as_str(),
                            %cause,
                            "stepped down: no longer accepting"
                        );
                    }
                    metrics::gauge!(m::LEADER_ELECTION_IS_ACTIVE).set(0.0);
                    metrics::counter!(m::LEADER_ELECTION_TRANSITIONS_TOTAL, "to" => role.as_str())
                        .increment(1);
                }
                Action::Released => {
                    let outcome = if elector.record().0.held_by(node.id, elector.instance()) {
                        Err("the release did not commit before the term ended".to_string())
                    } else {
                        Ok(())
                    };
                    if std::mem::take(&mut releasing_held) {
                        match &outcome {
                            Ok(()) => tracing::info!(epoch = elector.epoch(), "released the lease"),
                            Err(_) => tracing::warn!(
                                epoch = elector.epoch(),
                                "the lease's release did not commit before the term ended (no quorum): the standbys take it once it expires"
                            ),
                        }
                    }
                    for done in releases.drain(..) {
                        let _ = done.send(());
                    }
                    for done in transfers.drain(..) {
                        let _ = done.send(outcome.clone());
                    }
                }
            }
        }
        publish_status(&publish, &elector, fault.as_deref());
        let wake = elector
            .next_wake()
            .map_or(Duration::from_secs(3600), |at| at.saturating_sub(now));
        tokio::select! {
            () = node.stop.cancelled() => return,
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
                let lease = applied.borrow_and_update().state.lease.clone();
                elector.on_applied(&lease, clock::now());
            }
            Some(Ok((id, result))) = writes.join_next(), if !writes.is_empty() => {
                elector.on_result(id, result, clock::now());
            }
            request = inbox.recv() => match request {
                Some(Request::Release { to, stop, done }) => {
                    releases.push(done);
                    releasing_held |= elector.role() == Role::Active;
                    elector.release(to, stop, clock::now());
                }
                // Every fault is an active's (its listeners, its VIP); one that
                // arrives after the step-down (the VIP's task retries on a timer) is
                // stale, and must not step down, run on_fault or count again.
                Some(Request::Fault(why)) if elector.role() == Role::Active => {
                    releasing_held = true;
                    fault = Some(why.clone());
                    elector.fault(why, clock::now());
                }
                Some(Request::Fault(why)) => {
                    tracing::debug!(%why, role = elector.role().as_str(), "fault ignored: not active");
                }
                Some(Request::Stop(done)) => {
                    gate.close();
                    follower.down().await;
                    metrics::gauge!(m::LEADER_ELECTION_IS_ACTIVE).set(0.0);
                    tracing::info!("leader election stopped");
                    hooks.finish().await;
                    let _ = done.send(());
                    return;
                }
                Some(Request::Settings(settings)) => elector.set_settings(settings),
                Some(Request::Hooks(le)) => hooks.reload(&le),
                Some(Request::SetVip(vip)) => {
                    follower.down().await;
                    follower = Follower::start(vip, elector.settings(), requests.clone());
                    // Active again by now (a lone replica retakes what it released):
                    // the new VIP follows the role at once, not from the next term.
                    if let (Role::Active, Some(deadline)) = (elector.role(), elector.deadline()) {
                        follower.set(Want::Up {
                            epoch: elector.epoch(),
                            since: clock::now(),
                            deadline,
                        });
                    }
                }
                Some(Request::Transfer(t)) => {
                    if elector.role() == Role::Active {
                        tracing::info!(to = ?t.to, "transferring the lease");
                        transfers.push(t.done);
                        releasing_held = true;
                        elector.release(t.to, false, clock::now());
                    } else {
                        let _ = t.done.send(Err(format!("node {} is not the active replica", node.id)));
                    }
                }
                None => return,
            },
            () = tokio::time::sleep(wake) => {}
        }
    }
}

/// Publishes the elector's status when it changed (most wake-ups change nothing:
/// the record is cloned only when it did).
fn publish_status(publish: &watch::Sender<Status>, elector: &Elector, fault: Option<&str>) {
    let (record, observed_at) = elector.record();
    // The fencing token in force, as applied here: the same on every replica.
    metrics::gauge!(m::LEADER_ELECTION_EPOCH).set(record.epoch as f64);
    let (role, epoch) = (elector.role(), elector.epoch());
    let lease_duration = elector.settings().lease_duration;
    let fault = fault.filter(|_| role == Role::Fault);
    publish.send_if_modified(|s| {
        if s.role == role
            && s.epoch == epoch
            && s.record == *record
            && s.lease_duration == lease_duration
            && s.fault.as_deref() == fault
        {
            // Keeps the time of observation current without waking anyone.
            s.observed_at = observed_at;
            return false;
        }
        *s = Status {
            role,
            epoch,
            record: record.clone(),
            observed_at,
            lease_duration,
            fault: fault.map(str::to_string),
        };
        true
    });
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, clock::millis)
}
