//! The Prometheus and Grafana files in `config/`: `promtool check rules` and
//! `promtool test rules` pass, and every metric and label that the alert rules and
//! the dashboard use exists in the `/metrics` of a running 3-replica cluster
//! (promtool itself accepts a misspelt metric name, and so would Grafana).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};

const RULES: &str = "config/prometheus/raftlb-alerts.yml";
const RULE_TESTS: &str = "tests/prometheus/alerts_test.yml";
const SCRAPE_CONFIG: &str = "config/prometheus/prometheus.yml";
const DASHBOARD: &str = "config/grafana/raftlb-dashboard.json";

/// Labels that Prometheus adds to every series it scrapes: never in `/metrics`.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// Series Prometheus makes itself for every target: never in `/metrics`.
const SCRAPE_SERIES: [&str; 1] = ["up"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it (Debian/Ubuntu: apt-get install prometheus)"
            )
        });
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_the_scrape_config() {
    promtool(&["check", "rules", RULES]);
    promtool(&["check", "config", SCRAPE_CONFIG]);
}

#[test]
fn promtool_unit_tests_of_every_alert_pass() {
    promtool(&["test", "rules", RULE_TESTS]);
    // Every alert has a unit test that expects it firing and one where it does not.
    let rules = rules_file(&read(RULES));
    let tests: serde_json::Value =
        serde_saphyr::from_str(&read(RULE_TESTS)).unwrap_or_else(|e| panic!("{RULE_TESTS}: {e}"));
    let checks: Vec<&serde_json::Value> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    for rule in rules.groups.iter().flat_map(|g| &g.rules) {
        let of_it = || {
            checks
                .iter()
                .filter(|c| c["alertname"] == rule.alert.as_str())
        };
        let expected = |c: &&&serde_json::Value| {
            c["exp_alerts"]
                .as_array()
                .is_some_and(|alerts| !alerts.is_empty())
        };
        let firing = of_it().filter(expected).count();
        let quiet = of_it().count() - firing;
        assert!(
            firing >= 1 && quiet >= 1,
            "{RULE_TESTS} checks alert {} firing {firing} times and not firing {quiet} times: test both",
            rule.alert
        );
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[derive(serde::Deserialize)]
struct RulesFile {
    groups: Vec<Group>,
}

#[derive(serde::Deserialize)]
struct Group {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rules_file(yaml: &str) -> RulesFile {
    serde_saphyr::from_str(yaml).unwrap_or_else(|e| panic!("{RULES}: {e}"))
}

/// One PromQL expression of the rules or the dashboard, and where it is.
struct Use {
    place: String,
    expr: String,
    /// Labels named outside the expression (`$labels.x` in annotations).
    extra_labels: BTreeSet<String>,
}

/// The metric names and label names an expression reads.
#[derive(Debug, Default, PartialEq)]
struct Used {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

impl ExprVisitor for Used {
    type Error = String;

    fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
        let mut labels = |l: &promql_parser::label::Labels| {
            self.labels.extend(l.labels.iter().cloned());
        };
        match expr {
            Expr::VectorSelector(vs) => self.selector(vs),
            Expr::MatrixSelector(ms) => self.selector(&ms.vs),
            Expr::Aggregate(a) => {
                if let Some(m) = &a.modifier {
                    labels(m.labels());
                }
            }
            Expr::Binary(b) => {
                if let Some(m) = &b.modifier {
                    if let Some(on) = &m.matching {
                        labels(on.labels());
                    }
                    if let Some(group) = m.card.labels() {
                        labels(group);
                    }
                }
            }
            _ => {}
        }
        Ok(true)
    }
}

impl Used {
    fn selector(&mut self, vs: &promql_parser::parser::VectorSelector) {
        self.metrics.extend(vs.name.iter().cloned());
        let matchers = vs
            .matchers
            .matchers
            .iter()
            .chain(vs.matchers.or_matchers.iter().flatten());
        for m in matchers {
            if m.name == "__name__" {
                self.metrics.insert(m.value.clone());
            } else {
                self.labels.insert(m.name.clone());
            }
        }
    }
}

/// The metrics and labels of a PromQL expression, with Grafana's variables given
/// values first (`$__rate_interval` is not PromQL).
fn used_by(expr: &str) -> Result<Used, String> {
    let promql = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*");
    let parsed = parser::parse(&promql).map_err(|e| format!("{expr}: {e}"))?;
    let mut used = Used::default();
    walk_expr(&mut used, &parsed)?;
    Ok(used)
}

/// The label names that `$labels.NAME` in an alert's annotation refers to.
fn template_labels(text: &str) -> BTreeSet<String> {
    text.split("$labels.")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

fn rule_uses(yaml: &str) -> Vec<Use> {
    rules_file(yaml)
        .groups
        .into_iter()
        .flat_map(|g| g.rules)
        .map(|r| Use {
            place: format!("alert {}", r.alert),
            expr: r.expr,
            extra_labels: r
                .annotations
                .values()
                .flat_map(|t| template_labels(t))
                .collect(),
        })
        .collect()
}

fn dashboard_uses(json: &str) -> Vec<Use> {
    let dashboard: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let mut uses = Vec::new();
    let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
        .as_array()
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    while let Some(panel) = panels.pop() {
        if let Some(inner) = panel["panels"].as_array() {
            panels.extend(inner);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                uses.push(Use {
                    place: format!("panel {:?}", panel["title"].as_str().unwrap_or("?")),
                    expr: expr.to_string(),
                    extra_labels: BTreeSet::new(),
                });
            }
        }
    }
    // Variables: label_values(SELECTOR, LABEL).
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(query) = var["query"]["query"].as_str() else {
            continue;
        };
        let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            panic!("{DASHBOARD}: variable query {query:?} is not label_values(selector, label)");
        };
        let (selector, label) = args
            .rsplit_once(',')
            .unwrap_or_else(|| panic!("{DASHBOARD}: {query:?}: no label"));
        uses.push(Use {
            place: format!("variable {:?}", var["name"].as_str().unwrap_or("?")),
            expr: selector.trim().to_string(),
            extra_labels: [label.trim().to_string()].into(),
        });
    }
    uses
}

/// Every series name in a scrape and the label names it has.
type Exported = BTreeMap<String, BTreeSet<String>>;

fn exported(text: &str, into: &mut Exported) -> prometheus_parse::Scrape {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("a /metrics text that parses");
    for sample in &scrape.samples {
        let mut labels: BTreeSet<String> = sample.labels.keys().cloned().collect();
        let name = match sample.value {
            prometheus_parse::Value::Histogram(_) => {
                labels.insert("le".into());
                format!("{}_bucket", sample.metric)
            }
            _ => sample.metric.clone(),
        };
        into.entry(name).or_default().extend(labels);
    }
    scrape
}

/// What the uses read that `exported` lacks, one line each.
fn missing(uses: &[Use], exported: &Exported) -> Vec<String> {
    let mut problems = Vec::new();
    for u in uses {
        let used = match used_by(&u.expr) {
            Ok(used) => used,
            Err(e) => {
                problems.push(format!("{}: does not parse: {e}", u.place));
                continue;
            }
        };
        if used.metrics.is_empty() {
            problems.push(format!("{}: selects no metric: {}", u.place, u.expr));
        }
        for metric in &used.metrics {
            if !exported.contains_key(metric) && !SCRAPE_SERIES.contains(&metric.as_str()) {
                problems.push(format!("{}: metric {metric} is not exported", u.place));
            }
        }
        for label in used.labels.iter().chain(&u.extra_labels) {
            let known = TARGET_LABELS.contains(&label.as_str())
                || used
                    .metrics
                    .iter()
                    .any(|m| exported.get(m).is_some_and(|l| l.contains(label)));
            if !known {
                problems.push(format!(
                    "{}: label {label:?} is on none of {:?}",
                    u.place, used.metrics
                ));
            }
        }
    }
    problems
}

fn all_uses() -> Vec<Use> {
    let mut uses = rule_uses(&read(RULES));
    uses.extend(dashboard_uses(&read(DASHBOARD)));
    uses
}

#[test]
fn the_extractor_finds_names_in_selectors_aggregations_matching_and_templates() {
    let used = used_by(
        r#"sum by (pool) (rate(raftlb_connections_total{result="ok", listener=~"$instance"}[$__rate_interval]))
           / on (pool) group_left (backend) max without (member) ({__name__="raftlb_backend_up"})"#,
    )
    .expect("parses");
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        used.metrics,
        set(&["raftlb_connections_total", "raftlb_backend_up"])
    );
    assert_eq!(
        used.labels,
        set(&["pool", "result", "listener", "backend", "member"])
    );
    assert_eq!(
        template_labels("{{ $labels.pool }}/{{$labels.backend}} on {{ $value }}"),
        set(&["pool", "backend"])
    );
    assert!(
        used_by("sum(rate(x[5m])").is_err(),
        "unbalanced parenthesis"
    );
}

#[test]
fn a_misspelt_metric_or_label_is_reported() {
    let mut scrape = Exported::new();
    exported(
        "# TYPE raftlb_backend_up gauge\nraftlb_backend_up{pool=\"web\",backend=\"b1\"} 1\n\
         # TYPE raftlb_raft_apply_duration_seconds histogram\n\
         raftlb_raft_apply_duration_seconds_bucket{le=\"0.5\"} 1\n\
         raftlb_raft_apply_duration_seconds_bucket{le=\"+Inf\"} 1\n\
         raftlb_raft_apply_duration_seconds_sum 0.1\nraftlb_raft_apply_duration_seconds_count 1\n",
        &mut scrape,
    );
    let rule = |expr: &str, annotation: &str| Use {
        place: "alert Test".into(),
        expr: expr.into(),
        extra_labels: template_labels(annotation),
    };
    let good = [
        rule(
            r#"max by (job, pool) (raftlb_backend_up{job="raftlb"}) == 0"#,
            "{{ $labels.pool }} on {{ $labels.instance }}",
        ),
        rule(
            "histogram_quantile(0.99, sum by (le) (rate(raftlb_raft_apply_duration_seconds_bucket[5m])))",
            "",
        ),
    ];
    assert_eq!(missing(&good, &scrape), Vec::<String>::new());
    let bad = [
        rule("raftlb_backend_upp == 0", ""),
        rule("max by (pol) (raftlb_backend_up) == 0", ""),
        rule("raftlb_backend_up == 0", "{{ $labels.bakend }}"),
        rule("raftlb_backend_up{bakend=\"b1\"} == 0", ""),
    ];
    for u in &bad {
        let problems = missing(std::slice::from_ref(u), &scrape);
        assert_eq!(problems.len(), 1, "{}: {problems:?}", u.expr);
    }
}

/// A replica of the cluster: its addresses.
struct Replica {
    admin: SocketAddr,
    peer: SocketAddr,
    listen: SocketAddr,
}

fn cluster_yaml(replicas: &[Replica], i: usize, data: &Path, backend: SocketAddr) -> String {
    let peers: Vec<String> = replicas
        .iter()
        .enumerate()
        .map(|(j, r)| format!("{}: {}", j + 1, r.peer))
        .collect();
    let r = &replicas[i];
    format!(
        "node: {{ name: lb-{id} }}\n\
         admin: {{ bind: {admin} }}\n\
         runtime: {{ shutdown_grace: 2s }}\n\
         cluster:\n  cluster_id: prometheus\n  node_id: {id}\n  bind: {peer}\n  data_dir: {data}\n  \
         peers: {{ {peers} }}\n  heartbeat_interval: 100ms\n  election_timeout: 500ms\n\
         leader_election:\n  lease_duration: 4s\n  renew_deadline: 3s\n  retry_period: 500ms\n  standby: serve\n\
         listeners:\n  front: {{ bind: {listen}, pool: web }}\n\
         pools:\n  web:\n    health_check: {{ kind: tcp, interval: 200ms, timeout: 1s, rise: 1, fall: 2 }}\n    \
         backends:\n      - {{ name: b1, address: {backend} }}\n",
        id = i + 1,
        admin = r.admin,
        peer = r.peer,
        listen = r.listen,
        data = data.display(),
        peers = peers.join(", "),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_of_the_rules_and_dashboard_is_exported_by_a_cluster() {
    raise_nofile();
    let uses = all_uses();
    let backend = echo_backend().await;
    let replicas: Vec<Replica> = (0..3)
        .map(|_| Replica {
            admin: loopback(),
            peer: loopback(),
            listen: loopback(),
        })
        .collect();
    let data: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut running: Vec<Raftlb> = (0..3)
        .map(|i| {
            Raftlb::spawn(
                &cluster_yaml(&replicas, i, data[i].path(), backend),
                replicas[i].admin,
            )
        })
        .collect();
    blocking(|| running.iter_mut().for_each(Raftlb::wait_ready));
    let one_active = blocking(|| {
        eventually(Duration::from_secs(20), || {
            let active: f64 = running
                .iter()
                .map(|r| r.metric("raftlb_leader_election_is_active "))
                .sum();
            active == 1.0
        })
    });
    assert!(one_active, "no single active replica");

    // Traffic through every replica (standby: serve), so the connect histograms exist.
    for r in &replicas {
        let delivered = blocking(|| {
            eventually(Duration::from_secs(10), || {
                std::net::TcpStream::connect(r.listen)
                    .and_then(|mut s| {
                        use std::io::{Read, Write};
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"ping")?;
                        let mut back = [0u8; 4];
                        s.read_exact(&mut back)
                    })
                    .is_ok()
            })
        });
        assert!(delivered, "no echo through {}", r.listen);
    }

    let mut scrape = Exported::new();
    let mut problems = Vec::new();
    // Metrics appear as things happen (the first probe, the first apply): wait for them.
    blocking(|| {
        eventually(Duration::from_secs(20), || {
            scrape.clear();
            for r in &running {
                let parsed = exported(&r.metrics(), &mut scrape);
                check_peer_error_help(&parsed);
            }
            problems = missing(&uses, &scrape);
            problems.is_empty()
        })
    });
    assert!(
        problems.is_empty(),
        "the rules or the dashboard use what the cluster does not export:\n{}\nexported: {:#?}",
        problems.join("\n"),
        scrape
    );
    assert!(uses.len() >= 30, "only {} expressions found", uses.len());

    // The same check fails on the real scrape once a name is misspelt.
    let rules = read(RULES);
    for (right, wrong) in [
        (
            "raftlb_raft_quorum_reachable",
            "raftlb_raft_quorum_reachble",
        ),
        ("(job, instance, pool)", "(job, instance, poool)"),
        ("$labels.member", "$labels.membr"),
    ] {
        assert!(rules.contains(right), "{right} not in {RULES}");
        let misspelt = rule_uses(&rules.replacen(right, wrong, 1));
        let problems = missing(&misspelt, &scrape);
        assert_eq!(problems.len(), 1, "{wrong}: {problems:?}");
    }
}

/// `peer_rpc_errors_total`'s HELP names every kind it is exported with, and no other.
fn check_peer_error_help(scrape: &prometheus_parse::Scrape) {
    let help = scrape
        .docs
        .get("raftlb_peer_rpc_errors_total")
        .expect("HELP of raftlb_peer_rpc_errors_total");
    let kinds: BTreeSet<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "raftlb_peer_rpc_errors_total")
        .filter_map(|s| s.labels.get("kind"))
        .collect();
    assert!(!kinds.is_empty(), "no peer_rpc_errors_total series at 0");
    for kind in &kinds {
        assert!(
            help.contains(&format!("{kind} (")),
            "{kind} not in {help:?}"
        );
    }
    let named = help.matches(" (").count();
    assert_eq!(named, kinds.len(), "HELP names other kinds: {help:?}");
}
