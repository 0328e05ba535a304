//! The lease's decisions (DESIGN-lease.md), as a plain state machine in the shape of
//! quinn-proto: no sockets, no timers. The caller passes `now` (CLOCK_BOOTTIME, or a
//! test's clock) and every applied record in, sends the compare-and-sets it is asked
//! for and reports their results, and asks [`Elector::poll`] what to do next and
//! [`Elector::next_wake`] when to ask again.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use crate::clock::millis;
use crate::store::types::{Claim, Lease, LeaseOp, NodeId};

/// A point on the lease's clock: time since an origin (boot, in production).
pub type Time = Duration;

/// `leader_election`'s timing, as in Kubernetes' `--leader-elect-*` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// This process: its node_id, its name, and the instance it drew at start.
#[derive(Clone, Debug)]
pub struct Me {
    pub node: NodeId,
    pub name: String,
    pub instance: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Standby,
    Active,
    /// Keepalived's FAULT (rule 7): could not serve, gave the lease up, sits out.
    Fault,
}

impl Role {
    /// As `/api/v1/status`, the metrics and `RAFTLB_ROLE` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Active => "active",
            Role::Fault => "fault",
        }
    }

    /// The config key of its hook, also the `hook` label of the failure metric.
    pub fn hook_name(self) -> &'static str {
        match self {
            Role::Active => "on_active",
            Role::Standby => "on_standby",
            Role::Fault => "on_fault",
        }
    }
}

/// Why a replica stopped being active.
#[derive(Clone, Debug, PartialEq)]
pub enum Cause {
    /// No renew won within renew_deadline (cut off from the quorum, or Raft stalled).
    DeadlinePassed,
    /// The applied record no longer carries this process's instance.
    Superseded(Lease),
    /// Shutdown or a planned transfer (rule 5).
    Releasing,
    /// Rule 7: listeners or the VIP could not be brought up.
    Fault(String),
    /// The fault's sit-out is over.
    FaultOver,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::DeadlinePassed => write!(f, "no renew won within renew_deadline"),
            Cause::Superseded(lease) => write!(f, "the lease is no longer this process's: {lease}"),
            Cause::Releasing => write!(f, "releasing the lease"),
            Cause::Fault(why) => write!(f, "fault: {why}"),
            Cause::FaultOver => write!(f, "the fault's sit-out is over"),
        }
    }
}

/// What the caller does next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send this compare-and-set through the store, giving up after `retry_period`;
    /// report what came of it with [`Elector::on_result`] and this `id`.
    Send { id: u64, expect: u64, op: LeaseOp },
    /// Start accepting (add the VIP, run on_active): the lease is this process's,
    /// term until `deadline`.
    BecomeActive { epoch: u64, deadline: Time },
    /// A renew won, or a shorter renew_deadline cut the term: it now ends at
    /// `deadline` (refresh the VIP's lifetime).
    Renewed { deadline: Time },
    /// Stop accepting now, withdraw the VIP, run the hook of `role`.
    StepDown { role: Role, cause: Cause },
    /// A release finished (or its time ran out): go on with rule 5.
    Released,
}

/// What came of a compare-and-set.
#[derive(Clone, Debug, PartialEq)]
pub enum CasResult {
    Won(Lease),
    Lost(Lease),
    /// Not committed in time, or no answer: it may still commit.
    Failed,
    /// Refused before it was proposed (no Raft leader, a leader change under way):
    /// nothing changed, so it is tried again soon rather than a retry_period later.
    NotProposed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Acquire,
    Renew,
    Release,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    id: u64,
    kind: Kind,
    /// `s` in rule 1: noted before sending; the term counts from here.
    sent: Time,
    /// The renew_deadline in force when it was sent (a reload changes the next one).
    renew_deadline: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Releasing {
    to: Option<NodeId>,
    until: Time,
}

pub struct Elector {
    me: Me,
    settings: Settings,
    /// The newest record known, applied or returned by a compare-and-set.
    record: Lease,
    /// When `record.version` was first seen here (rule 2).
    t_obs: Time,
    role: Role,
    epoch: u64,
    /// End of the active term.
    deadline: Time,
    in_flight: Option<InFlight>,
    /// No attempt before this (the next renew, a retry after a lost or failed one).
    next_attempt: Time,
    /// No acquire before this (a fault's or a transfer's sit-out).
    hold_off_until: Time,
    releasing: Option<Releasing>,
    /// Shutting down: never acquire again.
    stopped: bool,
    next_id: u64,
    actions: VecDeque<Action>,
    rng: fastrand::Rng,
}

impl Elector {
    /// A standby that has seen nothing yet: `record` is the applied one at `now`.
    pub fn new(me: Me, settings: Settings, record: Lease, now: Time, seed: u64) -> Self {
        Elector {
            me,
            settings,
            record,
            t_obs: now,
            role: Role::Standby,
            epoch: 0,
            deadline: now,
            in_flight: None,
            next_attempt: now,
            hold_off_until: now,
            releasing: None,
            stopped: false,
            next_id: 0,
            actions: VecDeque::new(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn instance(&self) -> &str {
        &self.me.instance
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The newest record known and when its version was first seen.
    pub fn record(&self) -> (&Lease, Time) {
        (&self.record, self.t_obs)
    }

    /// The end of the active term, while active.
    pub fn deadline(&self) -> Option<Time> {
        (self.role == Role::Active).then_some(self.deadline)
    }

    /// A reload: later attempts use these; one already sent keeps its renew_deadline.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Rule 2: a record applied by the state machine.
    pub fn on_applied(&mut self, record: &Lease, now: Time) {
        self.observe(record, now);
        // Rule 6: an active whose instance is gone from the record steps down at once.
        if self.role == Role::Active && !self.holds(&self.record) {
            let cause = Cause::Superseded(self.record.clone());
            self.step_down(Role::Standby, cause);
        }
        // Rule 4: a lease handed to this replica is taken at once, not at the next try.
        if self.record.handed_over() && self.record.holder == Some(self.me.node) {
            self.next_attempt = self.next_attempt.min(now);
        }
    }

    /// The result of the compare-and-set `id` (a late one still teaches the record).
    pub fn on_result(&mut self, id: u64, result: CasResult, now: Time) {
        if let CasResult::Won(lease) | CasResult::Lost(lease) = &result {
            self.observe(lease, now);
        }
        let Some(sent) = self.in_flight.filter(|f| f.id == id) else {
            return;
        };
        self.in_flight = None;
        match (sent.kind, result) {
            (Kind::Acquire, CasResult::Won(lease)) => {
                let deadline = sent.sent + sent.renew_deadline;
                // Rule 4: active only on its own write, counted from `s`; not while
                // releasing (the release takes it back) nor if the term is over.
                if self.releasing.is_none() && !self.stopped && deadline > now {
                    self.role = Role::Active;
                    self.epoch = lease.epoch;
                    self.deadline = deadline;
                    self.next_attempt = sent.sent + self.settings.retry_period;
                    self.actions.push_back(Action::BecomeActive {
                        epoch: lease.epoch,
                        deadline,
                    });
                }
            }
            (Kind::Renew, CasResult::Won(_)) => {
                if self.role == Role::Active {
                    self.deadline = self.deadline.max(sent.sent + sent.renew_deadline);
                    self.actions.push_back(Action::Renewed {
                        deadline: self.deadline,
                    });
                }
            }
            (Kind::Acquire, CasResult::Lost(_)) => {
                // Jitter only here: replicas that raced do not race again in step.
                let jitter = self.settings.retry_period.mul_f64(self.rng.f64());
                self.next_attempt = now + jitter;
            }
            (Kind::Renew, CasResult::Lost(_)) => {
                // Lost because a renew whose reply was lost committed: still ours, and
                // the next renew goes out on the version just learnt, at its time.
                // Otherwise it is someone else's now.
                if self.role == Role::Active && !self.holds(&self.record) {
                    let cause = Cause::Superseded(self.record.clone());
                    self.step_down(Role::Standby, cause);
                }
            }
            (_, CasResult::NotProposed) => {
                self.next_attempt = now + self.settings.retry_period / 5;
            }
            (Kind::Release, _) | (_, CasResult::Failed) => {}
        }
    }

    /// Rule 5 (shutdown, `stop`) or a planned transfer to `to` (rule 4: only that
    /// replica may take it; `None`: any standby). Stops accepting first.
    pub fn release(&mut self, to: Option<NodeId>, stop: bool, now: Time) {
        self.stopped |= stop;
        let until = if self.role == Role::Active {
            self.deadline
        } else {
            now + self.settings.renew_deadline
        };
        // A standby may hold the lease without being active: an acquire in flight
        // (its outcome is awaited, and a win released), or one that won after it
        // gave up waiting for the answer (the record says so).
        let may_hold =
            self.role == Role::Active || self.in_flight.is_some() || self.holds(&self.record);
        if self.role == Role::Active {
            self.step_down(Role::Standby, Cause::Releasing);
        }
        // One that held the lease does not race its successor for it: it sits out
        // a lease_duration from the end of its term, since a release that cannot
        // be sent in time (a VIP that will not go) leaves the standbys waiting the
        // lease out from when they saw its last renew, which may be late. A standby
        // that held nothing (a reload releasing first, rule 8) takes a freed lease
        // at once, as any standby does.
        if may_hold {
            self.hold_off_until = self
                .hold_off_until
                .max(until.max(now) + self.settings.lease_duration);
        }
        self.start_release(to, until, now);
    }

    /// Sends the release at once; a renew in flight is abandoned (its result still
    /// teaches the record). An acquire in flight is waited for: if it won, the
    /// release gives back what it took, instead of leaving a record that names
    /// this replica while no one renews it.
    fn start_release(&mut self, to: Option<NodeId>, until: Time, now: Time) {
        if self.in_flight.is_some_and(|f| f.kind != Kind::Acquire) {
            self.in_flight = None;
        }
        self.next_attempt = now;
        self.releasing = Some(Releasing { to, until });
    }

    /// Rule 7: the active cannot serve (listeners, VIP): give the lease up and sit
    /// out for lease_duration.
    pub fn fault(&mut self, why: String, now: Time) {
        let until = if self.role == Role::Active {
            self.deadline
        } else {
            now + self.settings.renew_deadline
        };
        self.role = Role::Fault;
        self.actions.push_back(Action::StepDown {
            role: Role::Fault,
            cause: Cause::Fault(why),
        });
        self.hold_off_until = now + self.settings.lease_duration;
        self.start_release(None, until, now);
    }

    /// What to do now; call until it answers `None`, then wait until
    /// [`Elector::next_wake`] or the next event.
    pub fn poll(&mut self, now: Time) -> Option<Action> {
        if let Some(action) = self.actions.pop_front() {
            return Some(action);
        }
        if self.role == Role::Active && now >= self.deadline {
            self.step_down(Role::Standby, Cause::DeadlinePassed);
            return self.actions.pop_front();
        }
        if self.role == Role::Fault && now >= self.hold_off_until {
            self.role = Role::Standby;
            return Some(Action::StepDown {
                role: Role::Standby,
                cause: Cause::FaultOver,
            });
        }
        let acquiring = self.in_flight.is_some_and(|f| f.kind == Kind::Acquire);
        if let Some(r) = self.releasing
            && ((!self.holds(&self.record) && !acquiring) || now >= r.until)
        {
            self.releasing = None;
            self.in_flight = None;
            return Some(Action::Released);
        }
        // Each attempt gives up after retry_period (its write's deadline too).
        if let Some(f) = self.in_flight {
            if now < f.sent + self.settings.retry_period {
                return None;
            }
            self.in_flight = None;
        }
        if let Some(r) = self.releasing {
            if now < self.next_attempt {
                return None;
            }
            let op = LeaseOp::Release {
                node: self.me.node,
                instance: self.me.instance.clone(),
                to: r.to,
                now_ms: 0,
            };
            return Some(self.send(Kind::Release, op, now));
        }
        if now < self.next_attempt {
            return None;
        }
        match self.role {
            Role::Active => {
                // This renew may commit whether or not its answer comes back, and
                // then the standbys wait the lease_duration it writes, counted from
                // no earlier than now. After a reload that shortened the timing, a
                // term won earlier would outlast that wait: cut it first (rule 1).
                let cut = now + self.settings.renew_deadline;
                if cut < self.deadline {
                    self.deadline = cut;
                    return Some(Action::Renewed { deadline: cut });
                }
                let claim = self.claim();
                Some(self.send(Kind::Renew, LeaseOp::Renew { claim }, now))
            }
            Role::Standby if !self.stopped && now >= self.may_acquire_at() => {
                let claim = self.claim();
                Some(self.send(Kind::Acquire, LeaseOp::Acquire { claim }, now))
            }
            Role::Standby | Role::Fault => None,
        }
    }

    /// When [`Elector::poll`] may have something new to say, without an event.
    pub fn next_wake(&self) -> Option<Time> {
        if !self.actions.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut wake = Vec::new();
        if let Some(f) = self.in_flight {
            wake.push(f.sent + self.settings.retry_period);
        }
        match self.role {
            Role::Active => {
                wake.push(self.deadline);
                wake.push(self.next_attempt);
            }
            Role::Fault => wake.push(self.hold_off_until),
            Role::Standby if self.releasing.is_some() => {}
            Role::Standby if !self.stopped => {
                wake.push(self.may_acquire_at().max(self.next_attempt))
            }
            Role::Standby => {}
        }
        if let Some(r) = self.releasing {
            wake.push(r.until);
            wake.push(self.next_attempt);
        }
        wake.into_iter().min()
    }

    /// Rule 3: when a standby may try to take the lease as it stands.
    fn may_acquire_at(&self) -> Time {
        let r = &self.record;
        let free_for_me = match (r.holder, &r.instance) {
            (None, _) => true,
            // Handed over to this replica: taken at once, even within the hold-off of
            // its own last hand-over (no one else may take it, so there is no race to
            // stay out of, and waiting would leave nobody active).
            (Some(h), None) if h == self.me.node => return self.t_obs,
            (Some(_), None) => false,
            // Its own lease, which it stopped serving (a term that ran out): nobody
            // else is active on it, so taking it again is safe at once.
            (Some(_), Some(_)) => self.holds(r),
        };
        let at = if free_for_me {
            self.t_obs
        } else {
            let theirs = Duration::from_millis(r.lease_duration_ms);
            self.t_obs + self.settings.lease_duration.max(theirs)
        };
        at.max(self.hold_off_until)
    }

    fn holds(&self, lease: &Lease) -> bool {
        lease.held_by(self.me.node, &self.me.instance)
    }

    fn observe(&mut self, record: &Lease, now: Time) {
        if record.version > self.record.version {
            self.record = record.clone();
            self.t_obs = now;
        }
    }

    fn step_down(&mut self, role: Role, cause: Cause) {
        self.role = role;
        self.actions.push_back(Action::StepDown { role, cause });
    }

    fn claim(&self) -> Claim {
        Claim {
            node: self.me.node,
            name: self.me.name.clone(),
            instance: self.me.instance.clone(),
            lease_duration_ms: millis(self.settings.lease_duration),
            renew_deadline_ms: millis(self.settings.renew_deadline),
            now_ms: 0,
        }
    }

    fn send(&mut self, kind: Kind, op: LeaseOp, now: Time) -> Action {
        self.next_id += 1;
        self.in_flight = Some(InFlight {
            id: self.next_id,
            kind,
            sent: now,
            renew_deadline: self.settings.renew_deadline,
        });
        self.next_attempt = now + self.settings.retry_period;
        Action::Send {
            id: self.next_id,
            expect: self.record.version,
            op,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(15);
    const RENEW: Duration = Duration::from_secs(10);
    const RETRY: Duration = Duration::from_secs(2);

    fn settings() -> Settings {
        Settings {
            lease_duration: LEASE,
            renew_deadline: RENEW,
            retry_period: RETRY,
        }
    }

    fn me(node: NodeId, instance: &str) -> Me {
        Me {
            node,
            name: format!("lb-{node}"),
            instance: instance.into(),
        }
    }

    fn s(secs: f64) -> Time {
        Duration::from_secs_f64(secs)
    }

    /// Every action `poll` has at `now`.
    fn poll_all(e: &mut Elector, now: Time) -> Vec<Action> {
        std::iter::from_fn(|| e.poll(now)).collect()
    }

    /// The one Send among `actions`: (id, expect, op).
    fn sent(actions: &[Action]) -> (u64, u64, LeaseOp) {
        let sends: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { id, expect, op } => Some((*id, *expect, op.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(sends.len(), 1, "one send expected in {actions:?}");
        sends[0].clone()
    }

    /// The lease as the state machine would hold it after `op` won at `expect`.
    fn applied(before: &Lease, expect: u64, op: LeaseOp) -> (bool, Lease) {
        let mut lease = before.clone();
        match lease.apply(expect, op) {
            crate::store::types::Outcome::Lease { won, lease } => (won, lease),
            other => panic!("not a lease outcome: {other}"),
        }
    }

    /// The active `e` sends a renew at `sent_at` on `record`, it wins, and the win is
    /// handled at `won_at`: what `e` does then.
    fn renew_won(e: &mut Elector, record: &Lease, sent_at: Time, won_at: Time) -> Vec<Action> {
        let (id, expect, op) = sent(&poll_all(e, sent_at));
        assert!(matches!(op, LeaseOp::Renew { .. }));
        let (won, after) = applied(record, expect, op);
        assert!(won);
        e.on_result(id, CasResult::Won(after), won_at);
        poll_all(e, won_at)
    }

    /// A standby elector that acquires a free lease at `now`, and the record.
    fn active_at(now: Time) -> (Elector, Lease) {
        let mut e = Elector::new(me(1, "a"), settings(), Lease::default(), now, 1);
        let (id, expect, op) = sent(&poll_all(&mut e, now));
        assert!(matches!(op, LeaseOp::Acquire { .. }));
        let (won, lease) = applied(&Lease::default(), expect, op);
        assert!(won);
        e.on_result(id, CasResult::Won(lease.clone()), now);
        assert_eq!(
            poll_all(&mut e, now),
            vec![Action::BecomeActive {
                epoch: 1,
                deadline: now + RENEW
            }]
        );
        (e, lease)
    }

    #[test]
    fn a_free_lease_is_taken_at_once_and_renewed_every_retry_period() {
        let (mut e, mut lease) = active_at(s(0.0));
        assert_eq!(e.role(), Role::Active);
        assert!(
            poll_all(&mut e, s(1.9)).is_empty(),
            "no renew before retry_period"
        );
        assert_eq!(e.next_wake(), Some(s(2.0)));
        for round in 1..=5 {
            let at = s(2.0 * round as f64);
            let (id, expect, op) = sent(&poll_all(&mut e, at));
            assert_eq!(expect, lease.version, "renews on the applied version");
            assert!(matches!(op, LeaseOp::Renew { .. }));
            let (won, after) = applied(&lease, expect, op);
            assert!(won);
            lease = after;
            e.on_applied(&lease, at);
            // The ack comes late: the term still counts from the send.
            e.on_result(id, CasResult::Won(lease.clone()), at + s(0.5));
            assert_eq!(
                poll_all(&mut e, at + s(0.5)),
                vec![Action::Renewed {
                    deadline: at + RENEW
                }]
            );
        }
        assert_eq!(e.epoch(), 1, "renewals keep the epoch");
    }

    #[test]
    fn an_active_that_cannot_renew_steps_down_at_its_deadline() {
        let (mut e, _) = active_at(s(0.0));
        // Cut off from the quorum: every attempt fails after retry_period.
        let mut t = 2.0;
        while t < 10.0 {
            let actions = poll_all(&mut e, s(t));
            let (id, _, _) = sent(&actions);
            e.on_result(id, CasResult::Failed, s(t + 1.9));
            t += 2.0;
        }
        assert_eq!(e.role(), Role::Active);
        assert_eq!(e.next_wake(), Some(s(10.0)));
        let actions = poll_all(&mut e, s(10.0));
        assert_eq!(
            actions[0],
            Action::StepDown {
                role: Role::Standby,
                cause: Cause::DeadlinePassed
            }
        );
        assert_eq!(e.role(), Role::Standby);
    }

    #[test]
    fn an_attempt_that_was_not_proposed_is_tried_again_soon() {
        let (mut e, _) = active_at(s(0.0));
        e.release(None, true, s(1.0));
        let actions = poll_all(&mut e, s(1.0));
        let (id, _, _) = sent(&actions[1..]);
        // A Raft leader change was under way: nothing was proposed.
        e.on_result(id, CasResult::NotProposed, s(1.01));
        assert_eq!(e.next_wake(), Some(s(1.01) + RETRY / 5));
        let (_, _, op) = sent(&poll_all(&mut e, s(1.01) + RETRY / 5));
        assert!(matches!(op, LeaseOp::Release { .. }));
    }

    #[test]
    fn a_hung_attempt_costs_one_retry_period_not_the_deadline() {
        let (mut e, lease) = active_at(s(0.0));
        let (_, _, _) = sent(&poll_all(&mut e, s(2.0)));
        // No answer at all: the next renew goes out at 4 s with its own `s`.
        assert!(poll_all(&mut e, s(3.9)).is_empty());
        let (id, expect, op) = sent(&poll_all(&mut e, s(4.0)));
        let (_, after) = applied(&lease, expect, op);
        e.on_result(id, CasResult::Won(after), s(4.1));
        assert_eq!(
            poll_all(&mut e, s(4.1)),
            vec![Action::Renewed {
                deadline: s(4.0) + RENEW
            }]
        );
    }

    #[test]
    fn a_renew_whose_reply_was_lost_does_not_fail_the_next() {
        let (mut e, lease) = active_at(s(0.0));
        let (id, expect, op) = sent(&poll_all(&mut e, s(2.0)));
        let (_, v2) = applied(&lease, expect, op);
        // It committed, but the reply was lost and this replica has not applied it yet.
        e.on_result(id, CasResult::Failed, s(3.0));
        let (id, expect, op) = sent(&poll_all(&mut e, s(4.0)));
        assert_eq!(expect, lease.version, "sent on the applied (older) version");
        let (won, current) = applied(&v2, expect, op);
        assert!(!won);
        e.on_result(id, CasResult::Lost(current.clone()), s(4.1));
        assert_eq!(e.role(), Role::Active, "still its own lease");
        assert!(poll_all(&mut e, s(4.1)).is_empty());
        let (_, expect, _) = sent(&poll_all(&mut e, s(6.0)));
        assert_eq!(
            expect, current.version,
            "the next renew uses the version it learnt"
        );
    }

    #[test]
    fn a_standby_waits_the_longer_lease_from_when_it_first_saw_the_version() {
        let holder = {
            let mut l = Lease::default();
            applied(
                &l.clone(),
                0,
                LeaseOp::Acquire {
                    claim: Claim {
                        node: 2,
                        name: "lb-2".into(),
                        instance: "b".into(),
                        lease_duration_ms: 20_000,
                        renew_deadline_ms: 10_000,
                        now_ms: 0,
                    },
                },
            )
            .1
            .clone_into(&mut l);
            l
        };
        let mut e = Elector::new(me(1, "a"), settings(), Lease::default(), s(0.0), 1);
        e.on_applied(&holder, s(3.0));
        assert!(poll_all(&mut e, s(3.0)).is_empty());
        // max(15 s, the holder's 20 s) after t_obs = 3 s.
        assert_eq!(e.next_wake(), Some(s(23.0)));
        assert!(poll_all(&mut e, s(22.9)).is_empty());
        let (_, expect, op) = sent(&poll_all(&mut e, s(23.0)));
        assert_eq!(expect, holder.version);
        assert!(matches!(op, LeaseOp::Acquire { .. }));
        // The same version seen again later does not move t_obs back or forward.
        let mut e = Elector::new(me(1, "a"), settings(), Lease::default(), s(0.0), 1);
        e.on_applied(&holder, s(3.0));
        e.on_applied(&holder, s(10.0));
        assert_eq!(e.next_wake(), Some(s(23.0)));
    }

    #[test]
    fn the_cas_race_one_wins_the_loser_learns_and_retries_with_jitter() {
        let free = Lease::default();
        let mut a = Elector::new(me(1, "a"), settings(), free.clone(), s(0.0), 1);
        let mut b = Elector::new(me(2, "b"), settings(), free.clone(), s(0.0), 2);
        let (ida, ea, opa) = sent(&poll_all(&mut a, s(0.0)));
        let (idb, eb, opb) = sent(&poll_all(&mut b, s(0.0)));
        let (won_a, after_a) = applied(&free, ea, opa);
        let (won_b, after_b) = applied(&after_a, eb, opb);
        assert!(won_a && !won_b);
        a.on_result(ida, CasResult::Won(after_a), s(0.1));
        b.on_result(idb, CasResult::Lost(after_b.clone()), s(0.1));
        assert_eq!(a.role(), Role::Active);
        assert_eq!(b.role(), Role::Standby);
        // B now waits a whole lease from when it learnt A's version.
        assert_eq!(b.record().0, &after_b);
        assert_eq!(b.next_wake(), Some(s(0.1) + LEASE));
        assert!(poll_all(&mut b, s(10.0)).is_empty());
    }

    #[test]
    fn a_lost_race_on_a_free_lease_retries_after_jitter_only() {
        // The lease was released, two standbys race; the loser sees it held.
        let mut b = Elector::new(me(2, "b"), settings(), Lease::default(), s(0.0), 7);
        let (id, _, _) = sent(&poll_all(&mut b, s(0.0)));
        // Lost, but the record it learns is still free (a release raced in).
        let freed = Lease {
            version: 5,
            ..Lease::default()
        };
        b.on_result(id, CasResult::Lost(freed), s(0.1));
        let wake = b.next_wake().expect("a retry");
        assert!(wake >= s(0.1) && wake <= s(0.1) + RETRY, "{wake:?}");
    }

    #[test]
    fn a_record_replayed_after_restart_is_someone_elses_lease() {
        // This node's previous process held it; the new process has another instance.
        let (_, old) = applied(
            &Lease::default(),
            0,
            LeaseOp::Acquire {
                claim: Claim {
                    node: 1,
                    name: "lb-1".into(),
                    instance: "before".into(),
                    lease_duration_ms: 15_000,
                    renew_deadline_ms: 10_000,
                    now_ms: 0,
                },
            },
        );
        let mut e = Elector::new(me(1, "after"), settings(), old.clone(), s(100.0), 1);
        assert!(
            poll_all(&mut e, s(100.0)).is_empty(),
            "never active on replay"
        );
        assert_eq!(e.role(), Role::Standby);
        assert_eq!(e.next_wake(), Some(s(115.0)));
        let (id, expect, op) = sent(&poll_all(&mut e, s(115.0)));
        let (won, lease) = applied(&old, expect, op);
        assert!(won);
        e.on_result(id, CasResult::Won(lease), s(115.1));
        assert_eq!(
            poll_all(&mut e, s(115.1)),
            vec![Action::BecomeActive {
                epoch: 2,
                deadline: s(115.0) + RENEW
            }]
        );
    }

    #[test]
    fn two_processes_with_one_node_id_never_both_active() {
        let free = Lease::default();
        let mut a = Elector::new(me(1, "x"), settings(), free.clone(), s(0.0), 1);
        let mut b = Elector::new(me(1, "y"), settings(), free.clone(), s(0.0), 2);
        let (ida, ea, opa) = sent(&poll_all(&mut a, s(0.0)));
        let (idb, eb, opb) = sent(&poll_all(&mut b, s(0.0)));
        let (_, after_a) = applied(&free, ea, opa);
        let (won_b, after_b) = applied(&after_a, eb, opb);
        assert!(!won_b);
        a.on_result(ida, CasResult::Won(after_a.clone()), s(0.1));
        b.on_result(idb, CasResult::Lost(after_b), s(0.1));
        assert_eq!(poll_all(&mut b, s(0.1)), vec![]);
        assert_eq!(b.role(), Role::Standby);
        // B's renew of "node 1's" lease with its own instance would lose too.
        let (won, _) = applied(
            &after_a,
            after_a.version,
            LeaseOp::Renew {
                claim: Claim {
                    node: 1,
                    name: "lb-1".into(),
                    instance: "y".into(),
                    lease_duration_ms: 15_000,
                    renew_deadline_ms: 10_000,
                    now_ms: 0,
                },
            },
        );
        assert!(!won);
    }

    #[test]
    fn an_active_superseded_in_the_applied_record_steps_down_at_once() {
        let (mut e, lease) = active_at(s(0.0));
        let mut other = lease.clone();
        other.version += 1;
        other.epoch += 1;
        other.holder = Some(2);
        other.instance = Some("b".into());
        e.on_applied(&other, s(1.0));
        assert!(matches!(
            poll_all(&mut e, s(1.0))[0],
            Action::StepDown {
                role: Role::Standby,
                cause: Cause::Superseded(_)
            }
        ));
    }

    #[test]
    fn release_stops_accepting_first_then_gives_the_lease_up() {
        let (mut e, lease) = active_at(s(0.0));
        e.release(None, true, s(1.0));
        let actions = poll_all(&mut e, s(1.0));
        assert_eq!(
            actions[0],
            Action::StepDown {
                role: Role::Standby,
                cause: Cause::Releasing
            },
            "stop accepting before the release is sent"
        );
        let (id, expect, op) = sent(&actions[1..]);
        assert!(matches!(op, LeaseOp::Release { to: None, .. }));
        let (won, freed) = applied(&lease, expect, op);
        assert!(won);
        e.on_result(id, CasResult::Won(freed.clone()), s(1.1));
        assert_eq!(poll_all(&mut e, s(1.1)), vec![Action::Released]);
        // Stopped: it never takes the free lease again.
        e.on_applied(&freed, s(1.2));
        assert!(poll_all(&mut e, s(100.0)).is_empty());
    }

    #[test]
    fn a_standby_that_released_nothing_takes_a_freed_lease_at_once() {
        // A holds the lease; B, a standby, goes through a reload that releases
        // first (rule 8) while holding nothing.
        let (mut a, held) = active_at(s(0.0));
        let mut b = Elector::new(me(2, "b"), settings(), held.clone(), s(0.5), 7);
        assert!(poll_all(&mut b, s(0.5)).is_empty());
        b.release(None, false, s(1.0));
        assert_eq!(
            poll_all(&mut b, s(1.0)),
            vec![Action::Released],
            "nothing held, nothing sent"
        );
        // A releases (SIGTERM): B acts on it as soon as it applies it.
        a.release(None, true, s(2.0));
        let (id, expect, op) = sent(&poll_all(&mut a, s(2.0))[1..]);
        let (won, freed) = applied(&held, expect, op);
        assert!(won);
        a.on_result(id, CasResult::Won(freed.clone()), s(2.1));
        b.on_applied(&freed, s(2.1));
        let wake = b.next_wake().expect("an acquire");
        assert!(
            wake <= s(2.1) + RETRY,
            "{wake:?}: sat out after releasing nothing"
        );
        let (_, _, op) = sent(&poll_all(&mut b, wake));
        assert!(matches!(op, LeaseOp::Acquire { .. }), "{op:?}");
    }

    #[test]
    fn a_release_during_an_acquire_waits_for_it_and_gives_back_a_win() {
        // B sends an acquire on a free lease; a reload releases before it is answered.
        let free = Lease::default();
        let mut b = Elector::new(me(2, "b"), settings(), free.clone(), s(0.0), 7);
        let (id, expect, op) = sent(&poll_all(&mut b, s(0.0)));
        assert!(matches!(op, LeaseOp::Acquire { .. }));
        b.release(None, false, s(0.05));
        assert!(
            poll_all(&mut b, s(0.05)).is_empty(),
            "waits for the acquire's answer"
        );
        // It won: not active (releasing), and the release gives it back.
        let (won, taken) = applied(&free, expect, op);
        assert!(won);
        b.on_result(id, CasResult::Won(taken.clone()), s(0.1));
        let actions = poll_all(&mut b, s(0.1));
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::BecomeActive { .. })),
            "{actions:?}"
        );
        let (id, expect, op) = sent(&actions);
        assert!(matches!(op, LeaseOp::Release { .. }));
        let (won, freed) = applied(&taken, expect, op);
        assert!(won, "the win is given back");
        b.on_result(id, CasResult::Won(freed.clone()), s(0.2));
        assert_eq!(poll_all(&mut b, s(0.2)), vec![Action::Released]);
        assert_eq!(freed.holder, None);
    }

    #[test]
    fn a_release_that_cannot_be_sent_in_time_keeps_the_sender_out_past_its_term() {
        // Active from 0, its term runs to RENEW. Released at once, the release is
        // never answered (here: never sent in time), so the record still names it,
        // and a standby that saw its last renew late waits until up to its term's
        // end plus a lease: the sender must not come back before that.
        let (mut e, _) = active_at(s(0.0));
        e.release(None, false, s(0.1));
        let mut acquired_at = None;
        let mut t = s(0.1);
        while t < RENEW + LEASE + s(1.0) && acquired_at.is_none() {
            let acquires = poll_all(&mut e, t).iter().any(|a| {
                matches!(
                    a,
                    Action::Send {
                        op: LeaseOp::Acquire { .. },
                        ..
                    }
                )
            });
            if acquires {
                acquired_at = Some(t);
            }
            t += s(0.05);
        }
        let at = acquired_at.expect("it campaigns again in the end");
        assert!(
            at >= RENEW + LEASE,
            "back at {at:?}, before its term's end plus a lease"
        );
    }

    #[test]
    fn a_release_is_retried_on_the_returned_version_until_the_deadline() {
        let (mut e, lease) = active_at(s(0.0));
        e.release(Some(2), false, s(1.0));
        let actions = poll_all(&mut e, s(1.0));
        let (id, _, _) = sent(&actions[1..]);
        // A renew of ours committed meanwhile: lost, but still ours.
        let mut newer = lease.clone();
        newer.version += 1;
        e.on_result(id, CasResult::Lost(newer.clone()), s(1.1));
        let (_, expect, op) = sent(&poll_all(&mut e, s(3.0)));
        assert_eq!(expect, newer.version);
        assert!(matches!(op, LeaseOp::Release { to: Some(2), .. }));
        // Nothing commits: it gives up at its renew deadline (10 s).
        let mut t = 5.0;
        while t < 10.0 {
            let _ = poll_all(&mut e, s(t));
            t += 2.0;
        }
        assert!(poll_all(&mut e, s(10.0)).contains(&Action::Released));
    }

    #[test]
    fn a_transfer_is_taken_at_once_by_the_successor_only() {
        let (mut a, lease) = active_at(s(0.0));
        a.release(Some(3), false, s(1.0));
        let actions = poll_all(&mut a, s(1.0));
        let (_, expect, op) = sent(&actions[1..]);
        let (_, handed) = applied(&lease, expect, op);
        assert_eq!((handed.holder, handed.instance.clone()), (Some(3), None));
        // The successor takes it as soon as it applies it.
        let mut c = Elector::new(me(3, "c"), settings(), lease.clone(), s(0.0), 3);
        c.on_applied(&handed, s(1.2));
        let (id, expect, op) = sent(&poll_all(&mut c, s(1.2)));
        let (won, taken) = applied(&handed, expect, op);
        assert!(won);
        c.on_result(id, CasResult::Won(taken.clone()), s(1.3));
        assert_eq!(
            poll_all(&mut c, s(1.3)),
            vec![Action::BecomeActive {
                epoch: 2,
                deadline: s(1.2) + RENEW
            }]
        );
        // Anyone else treats it as held: a whole lease.
        let mut b = Elector::new(me(2, "b"), settings(), lease, s(0.0), 2);
        b.on_applied(&handed, s(1.2));
        assert_eq!(b.next_wake(), Some(s(1.2) + LEASE));
        // And the sender does not race back for it.
        a.on_applied(&taken, s(1.4));
        assert_eq!(poll_all(&mut a, s(5.0)), vec![Action::Released]);
        assert!(poll_all(&mut a, s(15.0)).is_empty());
    }

    #[test]
    fn a_lease_handed_back_within_the_hold_off_is_taken_at_once() {
        // A hands the lease to node 3 (and holds off a lease_duration), then node 3
        // hands it straight back: A is the named successor and takes it at once.
        let (mut a, lease) = active_at(s(0.0));
        a.release(Some(3), false, s(1.0));
        let actions = poll_all(&mut a, s(1.0));
        let (_, expect, op) = sent(&actions[1..]);
        let (_, to_c) = applied(&lease, expect, op);
        a.on_applied(&to_c, s(1.1));
        assert_eq!(poll_all(&mut a, s(1.1)), vec![Action::Released]);
        let taken_by_c = Lease {
            holder: Some(3),
            instance: Some("c".into()),
            epoch: to_c.epoch + 1,
            version: to_c.version + 1,
            ..to_c.clone()
        };
        a.on_applied(&taken_by_c, s(1.2));
        let back = Lease {
            holder: Some(1),
            instance: None,
            version: taken_by_c.version + 1,
            ..taken_by_c.clone()
        };
        a.on_applied(&back, s(2.0));
        let (id, expect, op) = sent(&poll_all(&mut a, s(2.0)));
        assert!(matches!(op, LeaseOp::Acquire { .. }), "{op:?}");
        let (won, retaken) = applied(&back, expect, op);
        assert!(won);
        a.on_result(id, CasResult::Won(retaken), s(2.1));
        assert_eq!(
            poll_all(&mut a, s(2.1)),
            vec![Action::BecomeActive {
                epoch: back.epoch + 1,
                deadline: s(2.0) + RENEW
            }]
        );
    }

    #[test]
    fn a_lease_handed_to_a_successor_that_never_takes_it_is_taken_a_lease_later() {
        // A hands the lease to node 3, which dies before it takes it.
        let (mut a, lease) = active_at(s(0.0));
        a.release(Some(3), false, s(1.0));
        let actions = poll_all(&mut a, s(1.0));
        let (_, expect, op) = sent(&actions[1..]);
        let (_, handed) = applied(&lease, expect, op);
        // B treats it as held: nothing for a whole lease after it saw it...
        let mut b = Elector::new(me(2, "b"), settings(), lease, s(0.0), 2);
        b.on_applied(&handed, s(1.2));
        assert!(poll_all(&mut b, s(16.1)).is_empty());
        // ...then it takes it, and it is B's: a new epoch, B's instance.
        let (id, expect, op) = sent(&poll_all(&mut b, s(16.2)));
        assert!(matches!(op, LeaseOp::Acquire { .. }));
        let (won, taken) = applied(&handed, expect, op);
        assert!(won, "a dead successor keeps the lease from everyone else");
        assert_eq!(
            (taken.holder, taken.instance.as_deref(), taken.epoch),
            (Some(2), Some("b"), 2)
        );
        b.on_result(id, CasResult::Won(taken), s(16.3));
        assert_eq!(
            poll_all(&mut b, s(16.3)),
            vec![Action::BecomeActive {
                epoch: 2,
                deadline: s(16.2) + RENEW
            }]
        );
    }

    #[test]
    fn a_reload_between_send_and_win_keeps_the_sent_renew_deadline() {
        let (mut e, lease) = active_at(s(0.0));
        let (id, expect, op) = sent(&poll_all(&mut e, s(2.0)));
        e.set_settings(Settings {
            lease_duration: Duration::from_secs(60),
            renew_deadline: Duration::from_secs(40),
            retry_period: RETRY,
        });
        let (_, after) = applied(&lease, expect, op);
        e.on_result(id, CasResult::Won(after), s(2.1));
        assert_eq!(
            poll_all(&mut e, s(2.1)),
            vec![Action::Renewed {
                deadline: s(2.0) + RENEW
            }]
        );
        // The next renew carries the new deadline.
        let record = e.record().0.clone();
        assert_eq!(
            renew_won(&mut e, &record, s(4.0), s(4.1)),
            vec![Action::Renewed { deadline: s(44.0) }]
        );
    }

    #[test]
    fn a_reload_that_shortens_the_timing_cuts_the_term_before_the_next_renew() {
        let (mut e, lease) = active_at(s(0.0));
        assert_eq!(
            renew_won(&mut e, &lease, s(2.0), s(2.1)),
            vec![Action::Renewed {
                deadline: s(2.0) + RENEW
            }]
        );
        // The design's reference profile: a standby that sees the next renew's record
        // may take the lease 2 s after it, long before the term above (12 s) ends.
        let short = Settings {
            lease_duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(250),
        };
        e.set_settings(short);
        let actions = poll_all(&mut e, s(4.0));
        assert_eq!(
            actions[0],
            Action::Renewed { deadline: s(5.5) },
            "{actions:?}"
        );
        let (id, _, op) = sent(&actions);
        match op {
            LeaseOp::Renew { claim } => assert_eq!(claim.lease_duration_ms, 2000),
            other => panic!("expected a renew, got {other:?}"),
        }
        // Its answer never comes (cut off): it stops by 5.5 s, before a standby that
        // saw the record at 4 s may acquire at 6 s.
        e.on_result(id, CasResult::Failed, s(4.3));
        let _ = poll_all(&mut e, s(5.4));
        assert_eq!(e.role(), Role::Active);
        assert_eq!(
            poll_all(&mut e, s(5.5)),
            vec![Action::StepDown {
                role: Role::Standby,
                cause: Cause::DeadlinePassed
            }]
        );
    }

    #[test]
    fn a_renew_won_while_paused_past_the_old_term_resumes_on_the_new_one() {
        let (mut e, lease) = active_at(s(0.0));
        // Paused from 9.0 s to 10.5 s: the gate shut at 10 s (and the accept loops with
        // it); the win, handled first, counts from 9.0 s, so the term runs to 19 s and
        // the process serves again (app.rs reopens a listener whose loop closed it).
        assert_eq!(
            renew_won(&mut e, &lease, s(9.0), s(10.5)),
            vec![Action::Renewed { deadline: s(19.0) }]
        );
        assert_eq!(e.role(), Role::Active);
    }

    #[test]
    fn an_acquire_won_too_late_does_not_make_it_active() {
        // An acquire sent at 0 s: its term would end at the renew deadline, 10 s.
        let sent_at_zero = || {
            let mut e = Elector::new(me(1, "a"), settings(), Lease::default(), s(0.0), 1);
            let (id, expect, op) = sent(&poll_all(&mut e, s(0.0)));
            let (_, lease) = applied(&Lease::default(), expect, op);
            (e, id, lease)
        };
        // A win that comes back after that is no term at all.
        let (mut e, id, lease) = sent_at_zero();
        e.on_result(id, CasResult::Won(lease), s(11.0));
        assert!(
            !poll_all(&mut e, s(11.0))
                .iter()
                .any(|a| matches!(a, Action::BecomeActive { .. }))
        );
        assert_eq!(e.role(), Role::Standby);
        // The same win just inside the deadline is a term that ends at 10 s.
        let (mut e, id, lease) = sent_at_zero();
        e.on_result(id, CasResult::Won(lease), s(9.9));
        assert!(poll_all(&mut e, s(9.9)).contains(&Action::BecomeActive {
            epoch: 1,
            deadline: s(10.0)
        }));
        assert_eq!(e.role(), Role::Active);
    }

    #[test]
    fn a_fault_gives_the_lease_up_and_sits_out_a_lease_duration() {
        let (mut e, lease) = active_at(s(0.0));
        e.fault("cannot bind 0.0.0.0:6443".into(), s(0.5));
        let actions = poll_all(&mut e, s(0.5));
        assert!(matches!(
            actions[0],
            Action::StepDown {
                role: Role::Fault,
                ..
            }
        ));
        assert_eq!(e.role(), Role::Fault);
        let (id, expect, op) = sent(&actions[1..]);
        let (_, freed) = applied(&lease, expect, op);
        e.on_result(id, CasResult::Won(freed.clone()), s(0.6));
        assert_eq!(poll_all(&mut e, s(0.6)), vec![Action::Released]);
        e.on_applied(&freed, s(0.7));
        assert!(poll_all(&mut e, s(10.0)).is_empty(), "sits out");
        let actions = poll_all(&mut e, s(15.5));
        assert_eq!(
            actions[0],
            Action::StepDown {
                role: Role::Standby,
                cause: Cause::FaultOver
            }
        );
        assert!(matches!(sent(&actions[1..]).2, LeaseOp::Acquire { .. }));
    }
}
