//! Log setup: text or JSON on stderr, openraft quiet by default, and repeats of
//! one warning folded into one line with a count.
//!
//! openraft logs every failed heartbeat to an unreachable peer (ten a second at a
//! 100 ms heartbeat) and dumps its whole state in INFO lines. A warning or error
//! identical to one logged within [`FOLD_WINDOW`] (same target and fields) is
//! counted instead of written; once the window is over, one line says how often
//! it repeated. A change of state (a `to` field) is always written, and so is the
//! answer to a reload (a `reload` field).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::cli::LogFormat;

/// Identical warnings within this long after the first are counted, not written.
pub const FOLD_WINDOW: Duration = Duration::from_secs(10);

/// The target of the "repeated N times" lines (never folded themselves).
const FOLD_TARGET: &str = "raftlb::log";

static FOLD: OnceLock<Arc<Fold>> = OnceLock::new();

/// The filter directive actually used: `level` plus `openraft=warn` when `level` is
/// a plain level more verbose than warn and says nothing about openraft.
pub fn directive(level: &str) -> String {
    let verbose = level
        .split(',')
        .any(|d| matches!(d.trim(), "info" | "debug" | "trace"));
    if verbose && !level.contains("openraft") {
        format!("{level},openraft=warn")
    } else {
        level.to_string()
    }
}

/// Installs the global subscriber.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(directive(level)).map_err(|e| e.to_string())?;
    use std::io::IsTerminal as _;
    let fold = FOLD
        .get_or_init(|| Arc::new(Fold::new(FOLD_WINDOW)))
        .clone();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(Folding(fold));
    let result = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// Writes the counts of warnings that stopped repeating; call it every few seconds.
pub fn flush() {
    if let Some(fold) = FOLD.get() {
        fold.flush(FOLD_WINDOW);
    }
}

/// What one folded line has seen.
struct Seen {
    since: Instant,
    repeats: u64,
    level: Level,
    text: String,
}

/// The layer that folds repeated warnings (see the module doc).
pub struct Fold {
    window: Duration,
    seen: Mutex<HashMap<String, Seen>>,
}

impl Fold {
    pub fn new(window: Duration) -> Fold {
        Fold {
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Writes one line for each folded warning last seen at least `quiet` ago.
    pub fn flush(&self, quiet: Duration) {
        let done: Vec<Seen> = match self.seen.lock() {
            Ok(mut seen) => {
                let keys: Vec<String> = seen
                    .iter()
                    .filter(|(_, s)| s.since.elapsed() >= quiet)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.iter().filter_map(|k| seen.remove(k)).collect()
            }
            Err(_) => return,
        };
        for s in done.into_iter().filter(|s| s.repeats > 0) {
            repeated(&s);
        }
    }
}

/// The line that tells how often a folded warning repeated.
fn repeated(s: &Seen) {
    let secs = s.since.elapsed().as_secs();
    if s.level == Level::ERROR {
        tracing::error!(target: FOLD_TARGET, repeats = s.repeats, "repeated {} more times in {secs}s: {}", s.repeats, s.text);
    } else {
        tracing::warn!(target: FOLD_TARGET, repeats = s.repeats, "repeated {} more times in {secs}s: {}", s.repeats, s.text);
    }
}

/// The fields of an event as one line of text: the key that tells repeats apart.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?} ");
        } else {
            let _ = write!(self.0, "{}={value:?} ", field.name());
        }
    }
}

/// The layer of a shared [`Fold`] (shared so that [`flush`] reaches it).
pub struct Folding(pub Arc<Fold>);

impl<S: Subscriber> Layer<S> for Folding {
    fn event_enabled(&self, event: &Event<'_>, _cx: Context<'_, S>) -> bool {
        self.0.admit(event)
    }
}

impl Fold {
    /// False for a repeat to fold; writes the count of the last window when a new one starts.
    fn admit(&self, event: &Event<'_>) -> bool {
        let meta = event.metadata();
        // Level order: ERROR < WARN < INFO; INFO and below are never folded. Nor
        // is a change of state (an event with a `to` field: a backend going down,
        // a replica stepping down): each one happened, at its own time. Nor the
        // answer to a reload (a `reload` field): the operator who sent the SIGHUP
        // looks for it now.
        if *meta.level() > Level::WARN
            || meta.target() == FOLD_TARGET
            || meta.fields().field("to").is_some()
            || meta.fields().field("reload").is_some()
        {
            return true;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let text = text.0.trim_end().to_string();
        let key = format!("{} {}", meta.target(), text);
        let ended = {
            let Ok(mut seen) = self.seen.lock() else {
                return true;
            };
            match seen.get_mut(&key) {
                Some(s) if s.since.elapsed() < self.window => {
                    s.repeats += 1;
                    return false;
                }
                Some(s) => {
                    // A new window starts with this line, after the count of the last one.
                    let ended = Seen {
                        since: s.since,
                        repeats: s.repeats,
                        level: s.level,
                        text: s.text.clone(),
                    };
                    s.since = Instant::now();
                    s.repeats = 0;
                    ended
                }
                None => {
                    seen.insert(
                        key,
                        Seen {
                            since: Instant::now(),
                            repeats: 0,
                            level: *meta.level(),
                            text,
                        },
                    );
                    return true;
                }
            }
        };
        if ended.repeats > 0 {
            repeated(&ended);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    #[test]
    fn identical_warnings_are_folded_into_one_line_with_a_count() {
        let out = Buffer::default();
        let fold = Arc::new(Fold::new(Duration::from_secs(3600)));
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(Folding(fold.clone()))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                tracing::warn!(peer = 3, "failed to send a heartbeat: connection refused");
            }
            tracing::warn!(peer = 2, "failed to send a heartbeat: connection refused");
            for _ in 0..2 {
                tracing::warn!(backend = "b3", to = "down", "backend is down: HTTP 500");
            }
            for _ in 0..2 {
                tracing::error!(reload = "refused", "reload: the file is invalid");
            }
            for i in 0..5 {
                tracing::info!(i, "info lines are never folded");
                tracing::info!("info lines are never folded");
            }
            assert_eq!(out.lines().len(), 16, "{:#?}", out.lines());
            fold.flush(Duration::ZERO);
        });
        let lines = out.lines();
        assert_eq!(lines.len(), 17, "{lines:#?}");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("the file is invalid"))
                .count(),
            2,
            "the answer to a reload is never folded: {lines:#?}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("backend is down"))
                .count(),
            2,
            "a change of state is never folded: {lines:#?}"
        );
        let count = &lines[16];
        assert!(
            count.contains("repeated 49 more times")
                && count.contains("failed to send a heartbeat")
                && count.contains("peer=3"),
            "{count}"
        );
    }

    #[test]
    fn openraft_is_quiet_unless_the_level_names_it() {
        assert_eq!(directive("info"), "info,openraft=warn");
        assert_eq!(directive("debug"), "debug,openraft=warn");
        assert_eq!(directive("warn"), "warn");
        assert_eq!(directive("error"), "error");
        assert_eq!(directive("info,openraft=info"), "info,openraft=info");
        assert_eq!(directive("raftlb=debug"), "raftlb=debug");
    }
}
