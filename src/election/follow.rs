//! What follows the role besides the listeners: the VIP (DESIGN-lease.md, "The VIP
//! cannot outlive its holder") and nothing else that could block the lease task.
//! The lease task says what it wants (the VIP up until a deadline, or down); this
//! task makes it so, and reports a fault (rule 7) when it cannot.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::vip::Vip;
use crate::clock;
use crate::config::vip;
use crate::metrics as m;

/// What the lease task wants of the VIP.
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    Down,
    /// Held by this replica for `epoch`, whose term ends at `deadline` (boot clock);
    /// `since` is when it became active.
    Up {
        epoch: u64,
        since: Duration,
        deadline: Duration,
    },
}

/// The VIP's task: follows `want` (with a generation number), reports each
/// generation handled on `done`, sends a fault's reason on `faults`.
pub async fn run(
    vip: Vip,
    settings: super::lease::Settings,
    mut want: watch::Receiver<(u64, Want)>,
    done: watch::Sender<u64>,
    faults: mpsc::UnboundedSender<String>,
) {
    // At start this replica holds nothing: a VIP left by an earlier process is not its own.
    if vip.is_present().await.unwrap_or(false) {
        tracing::warn!(%vip, "removing a VIP this replica does not hold (left by an earlier process?)");
        if let Err(e) = vip.remove().await {
            tracing::error!("{e}");
        }
    }
    let mut held: Option<u64> = None;
    let mut failing_since: Option<Duration> = None;
    // When the address held lapses unless refreshed (boot clock): the last refresh's
    // lifetime, counted from before it ran.
    let mut lapses_at = Duration::ZERO;
    // The pending announcements of the current hold, cancelled when it ends.
    let mut announcing = CancellationToken::new();
    loop {
        let (generation, current) = want.borrow_and_update().clone();
        match current {
            Want::Down => {
                announcing.cancel();
                failing_since = None;
                // Held until it is gone: a removal that fails is tried again, and the
                // lease task waits (rule 5) until it succeeds or the address's kernel
                // lifetime has run out, which `remove` then reports as gone too.
                if held.is_some() {
                    match vip.remove().await {
                        Ok(()) => {
                            held = None;
                            tracing::info!(%vip, "VIP removed");
                        }
                        Err(e) => tracing::error!(
                            "{e}; trying again (the kernel deletes it by itself when its lifetime ends)"
                        ),
                    }
                }
            }
            Want::Up {
                epoch,
                since,
                deadline,
            } => {
                let now = clock::now();
                if deadline <= now {
                    // The lease task steps down at once; never refresh past the term.
                } else if !vip.interface_up().await.unwrap_or(false) {
                    let _ = faults.send(format!("the VIP's interface {} is down", vip.interface()));
                } else {
                    let lifetime = vip::lifetime(deadline - now);
                    match vip.add_or_refresh(lifetime).await {
                        Ok(absent) => {
                            failing_since = None;
                            lapses_at = now + lifetime;
                            if held != Some(epoch) {
                                held = Some(epoch);
                                tracing::info!(%vip, epoch, "VIP added");
                                announcing.cancel();
                                announcing = CancellationToken::new();
                                takeover_announcements(&vip, settings, &announcing);
                            } else if absent {
                                // Expired while held (a stall longer than its lifetime).
                                metrics::counter!(m::VIP_READDS_TOTAL).increment(1);
                                tracing::warn!(%vip, epoch, "VIP had expired; added again");
                                announce(&vip, Duration::ZERO, &announcing);
                            }
                        }
                        Err(e) => {
                            let first = *failing_since.get_or_insert(now);
                            tracing::error!("{e}");
                            if held != Some(epoch) {
                                // Rule 7: not added within retry_period of becoming active.
                                if now.saturating_sub(since.max(first)) >= settings.retry_period {
                                    let _ = faults.send(format!("cannot add the VIP: {e}"));
                                }
                            } else if now + settings.retry_period >= lapses_at {
                                // Held, but the kernel drops it within a retry_period:
                                // an active without its address serves no one.
                                let _ = faults.send(format!(
                                    "cannot refresh the VIP before its lifetime ends: {e}"
                                ));
                            }
                        }
                    }
                }
            }
        }
        let up = matches!(current, Want::Up { .. });
        if up || held.is_none() {
            done.send_replace(generation);
        }
        // An add or a refresh that failed, or a removal not done yet.
        let retry = if up {
            held.is_none() || failing_since.is_some()
        } else {
            held.is_some()
        };
        tokio::select! {
            changed = want.changed() => if changed.is_err() {
                // The lease task is gone (shutdown): nothing holds the VIP any more.
                announcing.cancel();
                if held.is_some() {
                    let _ = vip.remove().await;
                }
                return;
            },
            // Interface checks and add retries while active, removal retries after.
            () = tokio::time::sleep(if retry { settings.retry_period / 5 } else { settings.retry_period }),
                if up || retry => {}
        }
    }
}

/// Three gratuitous ARPs / neighbour advertisements at takeover, and one more
/// when a previous holder's address must have expired by itself (its lifetime
/// was at most its renew_deadline, counted from before this replica's lease
/// began, plus the kernel's one-second sweep).
fn takeover_announcements(vip: &Vip, settings: super::lease::Settings, hold: &CancellationToken) {
    for i in 0..3 {
        announce(vip, Duration::from_millis(200) * i, hold);
    }
    let expired = (settings.renew_deadline + Duration::from_secs(2))
        .saturating_sub(settings.lease_duration)
        .max(Duration::from_secs(1));
    announce(vip, expired, hold);
}

/// One announcement after `delay`, on its own task (arping waits a second),
/// unless the hold ends first.
fn announce(vip: &Vip, delay: Duration, hold: &CancellationToken) {
    let (vip, hold) = (vip.clone(), hold.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = hold.cancelled() => {}
            () = tokio::time::sleep(delay) => {
                if let Err(e) = vip.announce().await {
                    tracing::warn!("{e}");
                }
            }
        }
    });
}
