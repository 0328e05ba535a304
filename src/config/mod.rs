//! Reading the config file: YAML (serde-saphyr) into the schema, then the semantic
//! pass. Every error names the file, line and column, the field and the fix.

pub mod schema;
pub mod types;
pub mod validate;
pub mod vip;

use std::fmt;
use std::path::{Path, PathBuf};

pub use schema::Config;
pub use validate::{Findings, default_max_connections};

/// Where in the file a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    At { line: u64, column: u64 },
    Unknown,
}

/// One problem found in a config: an error or a warning.
#[derive(Clone, Debug)]
pub struct Issue {
    pub at: Place,
    /// The field, e.g. `leader_election.renew_deadline`.
    pub path: String,
    pub message: String,
}

impl Issue {
    /// `file:line:column: field: message`.
    pub fn render(&self, file: &str) -> String {
        match self.at {
            Place::At { line, column } => {
                format!("{file}:{line}:{column}: {}: {}", self.path, self.message)
            }
            Place::Unknown => format!("{file}: {}: {}", self.path, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{}", .issue.render(.file))]
    Yaml { file: String, issue: Issue },
    #[error("{}", render_all(.file, .errors))]
    Invalid { file: String, errors: Vec<Issue> },
}

fn render_all(file: &str, issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| i.render(file))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A config that passed validation, with its defaults filled in.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub file: PathBuf,
    pub config: Config,
    pub warnings: Vec<Issue>,
    /// The file as read, to place errors found after validation.
    text: String,
}

impl Loaded {
    /// The warnings, one line each; with `files`, also those about the files the
    /// config names (hook programs), which `check --syntax-only` leaves out.
    pub fn warning_lines(&self, files: bool) -> Vec<String> {
        let file = self.file.display().to_string();
        let named = files.then(|| validate::hook_warnings(&self.config));
        self.warnings
            .iter()
            .chain(named.iter().flatten())
            .map(|w| w.render(&file))
            .collect()
    }

    /// An error found after validation (a file the config names that does not load,
    /// ...), written `field: message`, rendered `file:line:column: field: message`
    /// with the field's place in the file.
    pub fn refusal_line(&self, error: &str) -> String {
        let file = self.file.display().to_string();
        let field = error.split_once(": ").filter(|(path, _)| {
            !path.is_empty()
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        });
        match field {
            Some((path, message)) => Issue {
                at: place_of_path(&self.text, path),
                path: path.to_string(),
                message: message.to_string(),
            }
            .render(&file),
            None => format!("{file}: {error}"),
        }
    }
}

/// Command-line flags that override the file (`raftlb run --leader-elect*`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    pub leader_elect: Option<bool>,
    pub lease_duration: Option<types::Dur>,
    pub renew_deadline: Option<types::Dur>,
    pub retry_period: Option<types::Dur>,
}

impl Overrides {
    fn apply(&self, config: &mut Config) {
        let set = self.leader_elect.is_some()
            || self.lease_duration.is_some()
            || self.renew_deadline.is_some()
            || self.retry_period.is_some();
        if !set {
            return;
        }
        let le = config.leader_election.get_or_insert_with(Default::default);
        if let Some(on) = self.leader_elect {
            le.enabled = on;
        }
        if let Some(d) = self.lease_duration {
            le.lease_duration = schema::unplaced(d);
        }
        if let Some(d) = self.renew_deadline {
            le.renew_deadline = schema::unplaced(d);
        }
        if let Some(d) = self.retry_period {
            le.retry_period = schema::unplaced(d);
        }
    }

    /// The flags given, as typed: `--leader-elect-lease-duration 3s`, ...
    fn given(&self) -> Vec<String> {
        let durations = [
            ("--leader-elect-lease-duration", self.lease_duration),
            ("--leader-elect-renew-deadline", self.renew_deadline),
            ("--leader-elect-retry-period", self.retry_period),
        ];
        self.leader_elect
            .map(|on| format!("--leader-elect={on}"))
            .into_iter()
            .chain(
                durations
                    .into_iter()
                    .filter_map(|(flag, d)| d.map(|d| format!("{flag} {d}"))),
            )
            .collect()
    }

    /// An error about `leader_election` says which of its values came from flags:
    /// its place in the file may hold a value the flags replaced.
    fn annotate(&self, mut issues: Vec<Issue>) -> Vec<Issue> {
        let given = self.given();
        if !given.is_empty() {
            for issue in issues
                .iter_mut()
                .filter(|i| i.path.starts_with("leader_election"))
            {
                issue.message = format!(
                    "{} (with {} from the command line)",
                    issue.message,
                    given.join(" ")
                );
            }
        }
        issues
    }
}

/// Reads, parses and validates `file`; `open_files` is the limit the process runs with.
pub fn load(file: &Path, open_files: u64) -> Result<Loaded, ConfigError> {
    load_with(file, open_files, Overrides::default())
}

/// [`load`], with command-line flags overriding the file before validation.
pub fn load_with(
    file: &Path,
    open_files: u64,
    overrides: Overrides,
) -> Result<Loaded, ConfigError> {
    let label = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: label.clone(),
        source,
    })?;
    let (config, warnings) = parse_with(&text, &label, open_files, overrides)?;
    Ok(Loaded {
        file: file.to_path_buf(),
        config,
        warnings,
        text,
    })
}

/// Parses and validates YAML text; `file` only labels the messages.
pub fn parse(text: &str, file: &str, open_files: u64) -> Result<Config, ConfigError> {
    parse_with(text, file, open_files, Overrides::default()).map(|(config, _)| config)
}

/// The config with its defaults filled in, and the warnings about it as written
/// (before the defaults, so that a default is never what a warning blames).
fn parse_with(
    text: &str,
    file: &str,
    open_files: u64,
    overrides: Overrides,
) -> Result<(Config, Vec<Issue>), ConfigError> {
    let mut config: Config = from_yaml(text).map_err(|e| ConfigError::Yaml {
        file: file.to_string(),
        issue: yaml_issue(&e, text),
    })?;
    // In cluster mode election is on unless the file or a flag says otherwise.
    if config.cluster.is_some() && config.leader_election.is_none() {
        config.leader_election = Some(Default::default());
    }
    overrides.apply(&mut config);
    let findings = validate::validate(&config, open_files);
    if !findings.errors.is_empty() {
        return Err(ConfigError::Invalid {
            file: file.to_string(),
            errors: overrides.annotate(placed(findings.errors, text)),
        });
    }
    fill_defaults(&mut config, open_files);
    Ok((config, findings.warnings))
}

/// Parses and validates the replicated part of a config, a document with only
/// `pools:` (`PUT /api/v1/config`, `raftlb ctl config apply`); every error names
/// `file`, line and column like [`parse`]. Nothing is filled in: what a write
/// replicates is what the operator wrote.
pub fn parse_pools(
    text: &str,
    file: &str,
) -> Result<std::collections::BTreeMap<String, schema::Pool>, ConfigError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PoolsDoc {
        pools: std::collections::BTreeMap<String, schema::Pool>,
    }
    let yaml_error = |e: YamlError| ConfigError::Yaml {
        file: file.to_string(),
        issue: yaml_issue(&e, text),
    };
    let invalid = |errors: Vec<Issue>| ConfigError::Invalid {
        file: file.to_string(),
        errors,
    };
    // The node-local sections get their own message: they are not unknown fields.
    let doc: serde_json::Value = from_yaml(text).map_err(yaml_error)?;
    let Some(doc) = doc.as_object() else {
        return Err(invalid(vec![Issue {
            at: Place::At { line: 1, column: 1 },
            path: "yaml".into(),
            message: "the document must be a map with pools:".into(),
        }]));
    };
    let local: Vec<Issue> = doc
        .keys()
        .filter(|k| *k != "pools")
        .map(|key| Issue {
            at: place_of_path(text, key),
            path: key.clone(),
            message: NODE_LOCAL.into(),
        })
        .collect();
    if !local.is_empty() {
        return Err(invalid(local));
    }
    let PoolsDoc { pools } = from_yaml(text).map_err(yaml_error)?;
    if pools.is_empty() {
        return Err(invalid(vec![Issue {
            at: place_of_path(text, "pools"),
            path: "pools".into(),
            message: "define at least one pool".into(),
        }]));
    }
    check_replicated(pools).map_err(|errors| invalid(placed(errors, text)))
}

/// Checks pools as the replicated part of a config, with `raftlb check`'s rules:
/// a write's body, and the pools a backup restores. None at all is the caller's
/// to refuse (a write) or take (a backup of a store that held none).
pub fn check_replicated(
    pools: std::collections::BTreeMap<String, schema::Pool>,
) -> Result<std::collections::BTreeMap<String, schema::Pool>, Vec<Issue>> {
    if pools.is_empty() {
        return Ok(pools);
    }
    let config = Config {
        node: Default::default(),
        admin: Default::default(),
        runtime: Default::default(),
        cluster: None,
        leader_election: None,
        listeners: Default::default(),
        pools,
    };
    let errors = validate::validate(&config, u64::MAX).errors;
    if errors.is_empty() {
        Ok(config.pools)
    } else {
        Err(errors)
    }
}

/// The validator's issues, each given the place of its field in `text` when the
/// schema kept none.
fn placed(issues: Vec<Issue>, text: &str) -> Vec<Issue> {
    issues
        .into_iter()
        .map(|mut issue| {
            if issue.at == Place::Unknown {
                issue.at = place_of_path(text, &issue.path);
            }
            issue
        })
        .collect()
}

/// Why a replicated config (`PUT /api/v1/config`) may not name another section.
pub const NODE_LOCAL: &str = "only pools are replicated; listeners and the other sections are node-local (each replica's own file)";

/// Alias expansions a YAML document may replay, in parser events: a real config
/// needs a handful, a "billion laughs" is stopped here.
const MAX_REPLAYED_EVENTS: usize = 20_000;

/// Reads YAML (a config file, or a `PUT /api/v1/config` body) within serde-saphyr's
/// budget (nesting depth 64, 250,000 nodes) and at most [`MAX_REPLAYED_EVENTS`] events
/// replayed from aliases.
/// A value that does not fit the schema is named by its whole path
/// (`pools.web.backends[1].weight`, from serde_path_to_error).
pub fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut options = serde_saphyr::Options::default();
    options.alias_limits.max_total_replayed_events = MAX_REPLAYED_EVENTS;
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = config_path(e.path());
            e.into_inner()
        })
    })
    .map_err(|error| YamlError {
        error: Box::new(error),
        path,
    })
}

/// A path as the config names it, e.g. `pools.web.backends[1].weight`: a
/// `Spanned` field is read through its `value`, which is not one of the config's
/// names; right after `pools` or `listeners` a key is a name someone chose, which
/// may be `value` too.
pub fn config_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let mut parent = "";
    for segment in path.iter() {
        let key = match segment {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Map { key } | Segment::Enum { variant: key } => key.as_str(),
            // A key that did not parse (a peer id that is not a number): the
            // place names it; the path stops at its map.
            Segment::Unknown => continue,
        };
        if key != "value" || matches!(parent, "pools" | "listeners") {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(key);
        }
        parent = key;
    }
    out
}

/// What [`from_yaml`] could not read, and where in the document it was.
#[derive(Debug)]
pub struct YamlError {
    pub error: Box<serde_saphyr::Error>,
    /// The field's whole path, e.g. `pools.web.backends[1].weight`; empty when the
    /// error is not about one value (a YAML syntax error).
    pub path: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.path.as_str() {
            "" => write!(f, "{}", self.error),
            path => write!(f, "{path}: {}", self.error),
        }
    }
}

fn yaml_issue(failure: &YamlError, text: &str) -> Issue {
    let e = &failure.error;
    let at = e.location().map_or(Place::Unknown, Place::of);
    let rendered = e.without_snippet().to_string();
    let mut message = rendered.lines().next().unwrap_or("invalid YAML").trim();
    // The reader ends its message with the location, which we print in front instead.
    if let Some(i) = message.rfind(" at line ") {
        message = &message[..i];
    }
    let message = message.replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    let message = for_operators(message);
    let path = match (failure.path.as_str(), at) {
        ("", Place::At { line, column }) => key_before(text, line, column),
        ("", Place::Unknown) => None,
        (path, _) => Some(path.to_string()),
    };
    Issue {
        at,
        path: path.unwrap_or_else(|| "yaml".into()),
        message,
    }
}

/// The reader's messages that speak of Rust types, in the words of the config.
fn for_operators(message: String) -> String {
    // The field's own range is checked, and named, once the number is read.
    let whole = || "expected a whole number".to_string();
    match message.as_str() {
        m if m.starts_with("multiple YAML documents detected") => {
            "a second YAML document (after ---): a config file is one document; remove the --- and merge it".into()
        }
        m if m.starts_with("cannot deserialize null into") => {
            "has no value: write one after the colon, or remove the key".into()
        }
        "invalid u8" | "invalid u16" | "invalid u32" | "invalid u64" => whole(),
        "expected string scalar" => {
            "expected a single value, not a list or a map; quote a value that starts with [ or {, e.g. an IPv6 address with its port: \"[::1]:6443\"".into()
        }
        _ => message,
    }
}

/// The mapping key written before `line:column`, to name the field of a bad value.
/// Only a label for the message: the YAML itself was read by serde-saphyr.
fn key_before(text: &str, line: u64, column: u64) -> Option<String> {
    let src = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let upto: String = src
        .chars()
        .take(usize::try_from(column).ok()?.saturating_sub(1))
        .collect();
    let before_colon = upto.trim_end().strip_suffix(':')?;
    let key: String = before_colon
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (!key.is_empty()).then_some(key)
}

/// Where the field `path` (e.g. `leader_election.on_fault`) is written, for an error
/// about a field the schema keeps no position for: the line of its last key found in
/// order, or of the nearest parent, or the start of the file for a missing section.
/// Only a label for the message, like [`key_before`]: the YAML was read by serde-saphyr.
fn place_of_path(text: &str, path: &str) -> Place {
    let mut at = Place::At { line: 1, column: 1 };
    let mut from = 0;
    let lines: Vec<&str> = text.lines().collect();
    for key in path.split('.').filter(|k| *k != "*") {
        let pattern = format!("{key}:");
        let found = lines.iter().enumerate().skip(from).find_map(|(i, l)| {
            let col = l.find(&pattern)?;
            let before = l[..col].chars().next_back();
            matches!(before, None | Some(' ' | '{' | ',' | '\t')).then_some((i, col))
        });
        let Some((i, col)) = found else { break };
        at = Place::At {
            line: i as u64 + 1,
            column: col as u64 + 1,
        };
        from = i;
    }
    at
}

/// Defaults that depend on the machine: node name, worker threads, max_connections.
fn fill_defaults(config: &mut Config, open_files: u64) {
    if config.node.name.is_none() {
        config.node.name = Some(hostname());
    }
    if config.runtime.worker_threads.is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        config.runtime.worker_threads = Some(schema::unplaced(cores));
    }
    let max = u32::try_from(default_max_connections(open_files)).unwrap_or(u32::MAX);
    for listener in config.listeners.values_mut() {
        listener
            .max_connections
            .get_or_insert_with(|| schema::unplaced(max));
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "raftlb".to_string())
}

/// Whether two parts of a config say the same (the spans of the YAML they came
/// from do not count): a change to what is there already changes nothing.
pub fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    matches!((serde_json::to_value(a), serde_json::to_value(b)), (Ok(a), Ok(b)) if a == b)
}

/// Any serializable value as YAML.
pub fn to_yaml_value<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_saphyr::to_string(value).map_err(|e| e.to_string())
}

/// The effective config as YAML, as `raftlb check` prints it.
pub fn to_yaml(config: &Config) -> String {
    serde_saphyr::to_string(config).unwrap_or_else(|e| format!("# cannot print the config: {e}\n"))
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::At { line, column } => write!(f, "{line}:{column}"),
            Place::Unknown => f.write_str("?"),
        }
    }
}
