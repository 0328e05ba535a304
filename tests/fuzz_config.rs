//! Generated bad input for the config reader and validator: arbitrary YAML-ish text
//! and near-valid mutations of every fixture and example config. Each input ends in
//! a config or in an error naming file, line and column; never a panic or a hang.
//!
//! Cases: FUZZ_CONFIG_CASES, else PROPTEST_CASES, else 256 (per property).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};

const LABEL: &str = "fuzz.yaml";

/// How many cases a property runs.
fn cases() -> u32 {
    ["FUZZ_CONFIG_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(256)
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// Every fixture and example config: (path, text).
fn seeds() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["tests/fixtures/valid", "tests/fixtures/invalid", "config"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .expect("read seed dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read seed");
            out.push((f, text));
        }
    }
    assert!(out.len() > 40, "fixtures found: {}", out.len());
    out
}

/// Parses `text` on a thread of its own: the verdict (for a config, whether it round
/// trips), or an error if it took over 10 s.
type Verdict = Result<Result<(), String>, Vec<String>>;

fn parse_bounded(text: String) -> Result<Verdict, TestCaseError> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // A config it accepts prints as YAML that parses back to the same config.
        let verdict = raftlb::config::parse(&text, LABEL, 20_000)
            .map(|config| {
                let printed = raftlb::config::to_yaml(&config);
                match raftlb::config::parse(&printed, LABEL, 20_000) {
                    Ok(again) if raftlb::config::same(&config, &again) => Ok(()),
                    Ok(_) => Err(format!("printed, it parses to another config:\n{printed}")),
                    Err(e) => Err(format!("printed, it is refused: {e}\n{printed}")),
                }
            })
            .map_err(|e| {
                e.to_string()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<String>>()
            });
        let _ = tx.send(verdict);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(verdict) => Ok(verdict),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(TestCaseError::fail("parsing took over 10 s")),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(TestCaseError::fail("the parser panicked"))
        }
    }
}

/// A config, or errors that all name file, line and column.
fn check(text: String) -> Result<(), TestCaseError> {
    let verdict = parse_bounded(text.clone())?;
    if let Ok(Err(why)) = &verdict {
        return Err(TestCaseError::fail(format!("{why}\ninput:\n{text}")));
    }
    if let Err(lines) = verdict {
        prop_assert!(!lines.is_empty(), "an error without a message");
        // The place is inside the input (or just past its end).
        let last_line = text.lines().count() as u64 + 1;
        for line in &lines {
            let rest = line.strip_prefix(&format!("{LABEL}:"));
            let placed = rest.is_some_and(|r| {
                let mut parts = r.splitn(3, ':');
                let line_no = parts.next().and_then(|n| n.parse::<u64>().ok());
                let col = parts.next().and_then(|n| n.parse::<u64>().ok());
                line_no.is_some_and(|n| (1..=last_line).contains(&n))
                    && col.is_some()
                    && parts.next().is_some_and(|m| m.len() > 1)
            });
            prop_assert!(
                placed,
                "an error without file:line:column: {line:?}\ninput:\n{text}"
            );
        }
    }
    Ok(())
}

/// Values a field may be given by mistake or malice.
fn hostile_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("".to_string()),
        Just("~".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e400".to_string()),
        Just("-9223372036854775809".to_string()),
        Just(".nan".to_string()),
        Just("999999999999h".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]".to_string()),
        Just("{a: {b: {c: {d: {e: {f: {}}}}}}}".to_string()),
        Just("*undefined".to_string()),
        Just("&a [*a]".to_string()),
        Just("!!binary aGVsbG8=".to_string()),
        Just("!custom 3".to_string()),
        Just("yes".to_string()),
        Just("256.256.256.256:99999".to_string()),
        Just("[::1]:0".to_string()),
        Just("|\n  block".to_string()),
        "[ -~]{0,40}",
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
    ]
}

/// A near-valid variant of `text`.
fn mutate(text: &str) -> BoxedStrategy<String> {
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    let len = text.len().max(1);
    let text = text.to_string();
    prop_oneof![
        // Drop, duplicate or swap lines.
        (0..n).prop_map({
            let lines = lines.clone();
            move |i| {
                let mut l = lines.clone();
                if i < l.len() {
                    l.remove(i);
                }
                l.join("\n")
            }
        }),
        (0..n).prop_map({
            let lines = lines.clone();
            move |i| {
                let mut l = lines.clone();
                if let Some(line) = l.get(i).cloned() {
                    l.insert(i, line);
                }
                l.join("\n")
            }
        }),
        (0..n, 0..n).prop_map({
            let lines = lines.clone();
            move |(i, j)| {
                let mut l = lines.clone();
                if i < l.len() && j < l.len() {
                    l.swap(i, j);
                }
                l.join("\n")
            }
        }),
        // Re-indent a line.
        (0..n, 0..6usize).prop_map({
            let lines = lines.clone();
            move |(i, indent)| {
                let mut l = lines.clone();
                if let Some(line) = l.get_mut(i) {
                    *line = format!("{}{}", " ".repeat(indent), line.trim_start());
                }
                l.join("\n")
            }
        }),
        // Replace the value after a line's first colon.
        (0..n, hostile_value()).prop_map({
            let lines = lines.clone();
            move |(i, value)| {
                let mut l = lines.clone();
                if let Some(line) = l.get_mut(i)
                    && let Some((key, _)) = line.split_once(':')
                {
                    *line = format!("{key}: {value}");
                }
                l.join("\n")
            }
        }),
        // Truncate, or splice random characters in.
        (0..len).prop_map({
            let text = text.clone();
            move |at| text.chars().take(at).collect()
        }),
        (0..len, "[ -~\n\t]{1,8}").prop_map({
            let text = text.clone();
            move |(at, insert)| {
                let at = text.char_indices().nth(at).map_or(text.len(), |(i, _)| i);
                format!("{}{insert}{}", &text[..at], &text[at..])
            }
        }),
        (0..len).prop_map(move |at| {
            let mut t: Vec<char> = text.chars().collect();
            if at < t.len() {
                t[at] = match t[at] {
                    ':' => ' ',
                    ' ' => ':',
                    '-' => '[',
                    c if c.is_ascii_digit() => 'x',
                    _ => '"',
                };
            }
            t.into_iter().collect()
        }),
    ]
    .boxed()
}

/// Inputs the generated cases found wrong once, kept as fixed cases.
const REGRESSIONS: &[(&str, &str)] = &[(
    "a config without pools (a fixture's last line cut): the error had no line and column",
    "listeners:\n  api:\n    bind: 127.0.0.1:6443\n    pool: a",
)];

#[test]
fn regressions_found_by_the_generated_cases() {
    for (what, text) in REGRESSIONS {
        check(text.to_string()).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn arbitrary_yaml_is_a_config_or_a_placed_error() {
    let yamlish = "([a-z_]{1,12}:|[ \n\t:{}\\[\\],\\-#&*!|>'\"0-9.]|[a-z]{1,8}){0,60}";
    runner()
        .run(&yamlish, check)
        .unwrap_or_else(|e| panic!("{e}"));
    runner()
        .run(&any::<String>(), check)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn mutations_of_every_fixture_are_a_config_or_a_placed_error() {
    let seeds = seeds();
    let strategy = (0..seeds.len()).prop_flat_map(move |i| mutate(&seeds[i].1));
    runner()
        .run(&strategy, check)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The text of a "billion laughs": ten levels of nine aliases each, under `key`.
pub fn laughs(indent: &str) -> String {
    let mut out = format!(
        "{indent}a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
    );
    let mut prev = 'a';
    for name in 'b'..='j' {
        out.push_str(&format!(
            "{indent}{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = name;
    }
    out
}

/// Alias expansion ("billion laughs") and deep nesting are refused in bounded time,
/// with a placed error (the strict schema refuses the first node it does not expect;
/// serde-saphyr's budget bounds depth and aliases besides).
#[test]
fn alias_bombs_and_deep_nesting_end_in_a_placed_error() {
    let head = "admin: { bind: 127.0.0.1:9000 }\nlisteners: { front: { bind: 127.0.0.1:9001, pool: web } }\n";
    let at_top = format!("{head}{}", laughs(""));
    let in_pools = format!("{head}pools:\n{}", laughs("  "));
    let in_backends = format!(
        "{head}pools:\n  web:\n    backends: [{}]\n",
        vec!["*x"; 60_000].join(",")
    )
    .replacen("*x", "&x { name: b, address: \"127.0.0.1:1\" }", 1);
    let deep_flow = format!(
        "{head}pools: {}{}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_block: String = (0..5_000)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    for (what, text) in [
        ("billion laughs at the top", at_top),
        ("billion laughs as pools", in_pools),
        ("60,000 aliases of one backend", in_backends),
        ("deep flow nesting", deep_flow),
        ("deep block nesting", format!("{head}pools:\n{deep_block}")),
    ] {
        let started = std::time::Instant::now();
        match parse_bounded(text.clone()) {
            Ok(Err(lines)) => {
                println!("{what}: {:?}: {}", started.elapsed(), lines.join(" / "));
                check(text).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            Ok(Ok(_)) => panic!("{what}: accepted"),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}
