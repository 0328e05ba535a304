//! `GET /`: the status page, like HAProxy's stats page. Rendered on the server from
//! the same JSON as `/api/v1/status` and `/api/v1/backends`, so the plain page lists
//! everything; `/status.js` (same origin, allowed by the CSP) only refreshes it by
//! fetching `/` again and swapping the `#status` element. Every value is escaped.

use std::fmt::Write as _;
use std::sync::OnceLock;

use base64::Engine as _;
use serde_json::Value;
use sha2::Digest as _;

/// How often the script reloads the page's data.
pub const REFRESH_MS: u64 = 2_000;

const CSS: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.6em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#e8ecf1}td.n{text-align:right;font-variant-numeric:tabular-nums}
.up,.active,.leader,.yes{background:#d8f5d0}.down,.fault,.no{background:#f9d2d0}
.unknown,.standby,.drained{background:#fdf1c7}.follower,.learner{background:#eef}
.meta span{margin-right:1.4em}.err{color:#a00}small{color:#666}
#refresh{color:#666;font-size:.9em}#refresh.stale{color:#a00;font-weight:bold}
";

/// The `Content-Security-Policy` of the page: everything from this origin only, and
/// the one inline stylesheet above by its hash.
pub fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(CSS));
        format!("default-src 'self'; style-src 'self' 'sha256-{hash}'")
    })
}

/// `/status.js`: refreshes `#status` every [`REFRESH_MS`]; says when it cannot.
pub const SCRIPT: &str = r#""use strict";
(function () {
  var every = Number(document.body.getAttribute("data-refresh-ms")) || 2000;
  var note = document.getElementById("refresh");
  function say(text, stale) {
    if (!note) { return; }
    note.textContent = text;
    note.className = stale ? "stale" : "";
  }
  function refresh() {
    // location.origin carries no user:password@ (a fetch refuses URLs with them).
    fetch(location.origin + location.pathname, {cache: "no-store", credentials: "same-origin"})
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var next = doc.getElementById("status");
        var current = document.getElementById("status");
        if (!next || !current) { throw new Error("not a raftlb status page"); }
        current.replaceWith(document.importNode(next, true));
        // The title names the role too (a tab shows it).
        document.title = doc.title;
        say("refreshed " + new Date().toLocaleTimeString() + ", every " + every / 1000 + " s", false);
      })
      .catch(function (e) { say("cannot refresh: " + e.message + " (showing older data)", true); })
      .then(function () { setTimeout(refresh, every); });
  }
  say("refreshing every " + every / 1000 + " s", false);
  setTimeout(refresh, every);
})();
"#;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as escaped text: strings bare, null as "-".
fn v(value: &Value) -> String {
    esc(&match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    })
}

/// A class name for a state word (only the known ones: never an arbitrary value).
fn class(word: &str) -> &'static str {
    match word {
        "up" => "up",
        "down" => "down",
        "unknown" => "unknown",
        "active" => "active",
        "standby" => "standby",
        "fault" => "fault",
        "leader" => "leader",
        "follower" => "follower",
        "learner" => "learner",
        "yes" => "yes",
        "no" => "no",
        "drained" => "drained",
        _ => "",
    }
}

/// A byte count for people: 1.5 KiB, 12.0 MiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Milliseconds for people: 420 ms, 3.2 s, 5 min 3 s.
fn ago(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else {
        return "-".into();
    };
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000)
    }
}

/// The whole page from `/api/v1/status` and `/api/v1/backends`.
pub fn render(status: &Value, backends: &Value) -> String {
    let node = &status["node"];
    let mut out = String::with_capacity(8 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>raftlb {name}: {role}</title><style>{CSS}</style>\
         <script src=\"/status.js\" defer></script></head>\n\
         <body data-refresh-ms=\"{REFRESH_MS}\">\n\
         <p id=\"refresh\">static page (the refresh script has not run)</p>\n",
        name = v(&node["name"]),
        role = v(&status["role"]),
    );
    out.push_str("<main id=\"status\">\n");
    summary(&mut out, status);
    replicas(&mut out, status);
    lease(&mut out, status);
    pools(&mut out, backends);
    out.push_str("</main>\n</body></html>\n");
    out
}

fn summary(out: &mut String, status: &Value) {
    let node = &status["node"];
    let role = status["role"].as_str().unwrap_or("-");
    let _ = writeln!(
        out,
        "<h1>raftlb <span id=\"node-name\">{}</span> <span class=\"{}\" id=\"role\">{}</span></h1>",
        v(&node["name"]),
        class(role),
        esc(role)
    );
    let cluster = &status["cluster"];
    let _ = write!(
        out,
        "<p class=\"meta\"><span>node id {}</span><span>version {}</span>\
         <span>config_version <b id=\"config-version\">{}</b></span>",
        v(&node["id"]),
        v(&node["version"]),
        v(&status["config_version"]),
    );
    if cluster.is_null() {
        out.push_str("<span>standalone (no cluster)</span>");
    } else {
        let quorum = if cluster["quorum_reachable"] == true {
            "<span class=\"yes\">quorum reachable</span>".to_string()
        } else {
            "<span class=\"no\">quorum NOT reachable: writes fail</span>".to_string()
        };
        let _ = write!(
            out,
            "<span>cluster {}</span><span>Raft term <b id=\"term\">{}</b></span>\
             <span>leader {}</span><span>commit {} / applied {}</span>\
             <span>quorum {} of {} voters, fault tolerance {} ({} now)</span>{quorum}",
            v(&cluster["cluster_id"]),
            v(&cluster["term"]),
            v(&cluster["leader_id"]),
            v(&cluster["commit_index"]),
            v(&cluster["applied_index"]),
            v(&cluster["quorum"]),
            cluster["members"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["voter"] == true).count()),
            v(&cluster["fault_tolerance"]),
            v(&cluster["fault_tolerance_now"]),
        );
    }
    out.push_str("</p>\n");
    if let Some(errors) = status["config_apply_errors"].as_array()
        && !errors.is_empty()
    {
        out.push_str("<p class=\"err\">config not applied here:</p><ul class=\"err\">");
        for e in errors {
            let _ = write!(out, "<li>{}</li>", v(e));
        }
        out.push_str("</ul>\n");
    }
}

/// One row per Raft member (cluster mode), or this replica alone (standalone).
fn replicas(out: &mut String, status: &Value) {
    out.push_str(
        "<h2>Replicas</h2>\n<table id=\"replicas\"><tr><th>node id</th><th>name</th><th>address</th>\
         <th>role</th><th>Raft</th><th>voter</th><th>reachable</th></tr>\n",
    );
    let me = status["node"]["id"].as_u64();
    let my_role = status["role"].as_str().unwrap_or("-");
    let holder = status["lease"]["holder_id"].as_u64();
    let members = status["cluster"]["members"].as_array();
    let Some(members) = members else {
        let _ = writeln!(
            out,
            "<tr data-member=\"self\"><td>-</td><td>{} <small>(this replica)</small></td>\
             <td>-</td><td class=\"{}\">{}</td><td>-</td><td>-</td><td>-</td></tr>",
            v(&status["node"]["name"]),
            class(my_role),
            esc(my_role),
        );
        out.push_str("</table>\n");
        return;
    };
    for m in members {
        let id = m["id"].as_u64();
        let this = id.is_some() && id == me;
        // Only this replica knows its own role for sure; the others' follow the lease
        // as this replica sees it (the lease holder is active).
        let role = if this {
            my_role
        } else if holder.is_some() && id == holder {
            "active"
        } else if status["lease"].is_null() {
            "-"
        } else if m["reachable"] == false {
            "unreachable"
        } else {
            "standby"
        };
        let raft = m["role"].as_str().unwrap_or("-");
        let reachable = match &m["reachable"] {
            Value::Bool(true) => "yes",
            Value::Bool(false) => "no",
            _ => "-",
        };
        let name = if this {
            format!(
                "{} <small>(this replica)</small>",
                v(&status["node"]["name"])
            )
        } else if m["name"].is_string() {
            v(&m["name"])
        } else if id.is_some() && id == holder {
            v(&status["lease"]["holder"])
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "<tr data-member=\"{id}\" data-role=\"{role_attr}\"><td class=\"n\">{id}</td><td>{name}</td><td>{address}</td>\
             <td class=\"{role_class}\">{role_text}</td><td class=\"{raft_class}\">{raft_text}</td><td>{voter}</td>\
             <td class=\"{reach_class}\">{reachable}</td></tr>",
            id = v(&m["id"]),
            role_attr = esc(role),
            address = v(&m["address"]),
            role_class = class(role),
            role_text = esc(role),
            raft_class = class(raft),
            raft_text = esc(raft),
            voter = v(&m["voter"]),
            reach_class = class(reachable),
        );
    }
    out.push_str("</table>\n");
}

fn lease(out: &mut String, status: &Value) {
    let lease = &status["lease"];
    out.push_str("<h2>Lease</h2>\n");
    if lease.is_null() {
        out.push_str("<p id=\"lease\">leader election off: no lease</p>\n");
        return;
    }
    let holder = if lease["holder_id"].is_null() {
        "nobody (free)".to_string()
    } else {
        format!("{} (node {})", v(&lease["holder"]), v(&lease["holder_id"]))
    };
    // What the standbys wait out: the longer of this replica's and the holder's.
    let duration = &lease["waited_out_ms"];
    let _ = writeln!(
        out,
        "<table id=\"lease\"><tr><th>holder</th><th>epoch</th><th>renewed</th><th>lease duration</th>\
         <th>this replica's epoch</th></tr>\n<tr><td>{holder}{handed}</td><td class=\"n\">{epoch}</td>\
         <td>{renewed} ago <small>{at}</small></td><td>{duration}</td><td class=\"n\">{mine}</td></tr></table>",
        handed = if lease["handed_over"] == true {
            " <small>(handed over, not yet taken)</small>"
        } else {
            ""
        },
        epoch = v(&lease["epoch"]),
        renewed = esc(&ago(&lease["renewed_ms_ago"])),
        at = v(&lease["renewed_at"]),
        duration = esc(&ago(duration)),
        mine = v(&lease["this_replica_epoch"]),
    );
}

fn pools(out: &mut String, backends: &Value) {
    let pools = backends["pools"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "<h2>Pools ({})</h2>", pools.len());
    for pool in &pools {
        let _ = writeln!(
            out,
            "<h3>{} <small>balance {}</small></h3>\n<table class=\"pool\" data-pool=\"{}\"><tr>\
             <th>backend</th><th>address</th><th>weight</th><th>health</th><th>last check</th>\
             <th>state</th><th>active conns</th><th>bytes to backend</th><th>bytes to client</th>\
             <th>last flip</th></tr>",
            v(&pool["name"]),
            v(&pool["balance"]),
            v(&pool["name"]),
        );
        for b in pool["backends"].as_array().into_iter().flatten() {
            backend_row(out, b);
        }
        out.push_str("</table>\n");
    }
}

fn backend_row(out: &mut String, b: &Value) {
    let health = b["health"].as_str().unwrap_or("-");
    let drained = b["drained"] == true;
    let resolved: Vec<String> = b["resolved"]
        .as_array()
        .into_iter()
        .flatten()
        .map(v)
        .collect();
    let address = if resolved.is_empty() || resolved == [v(&b["address"])] {
        v(&b["address"])
    } else {
        format!(
            "{} <small>({})</small>",
            v(&b["address"]),
            resolved.join(", ")
        )
    };
    let check = &b["last_check"];
    let last_check = if check.is_null() {
        "no probe yet".to_string()
    } else {
        let mut s = format!(
            "{} {} ms <small>{}</small>",
            if check["ok"] == true { "ok" } else { "failed" },
            v(&check["latency_ms"]),
            v(&check["at"]),
        );
        if !check["error"].is_null() {
            let _ = write!(s, "<br><span class=\"err\">{}</span>", v(&check["error"]));
        }
        let _ = write!(
            s,
            "<br><small>{} ok / {} failed in a row</small>",
            v(&b["consecutive_ok"]),
            v(&b["consecutive_fail"])
        );
        s
    };
    let count = |value: &Value| value.as_u64().map_or_else(|| "-".into(), bytes);
    let _ = writeln!(
        out,
        "<tr data-backend=\"{name}\" data-drained=\"{drained}\" data-health=\"{health_attr}\" \
         data-bytes-to-backend=\"{raw_to_backend}\" data-bytes-to-client=\"{raw_to_client}\">\
         <td>{name}</td><td>{address}</td><td class=\"n\">{weight}</td>\
         <td class=\"{health_class}\">{health_text}</td><td>{last_check}</td>\
         <td class=\"{state_class}\">{state}</td><td class=\"n\">{active}</td>\
         <td class=\"n\">{to_backend}</td><td class=\"n\">{to_client}</td><td>{flip}</td></tr>",
        name = v(&b["name"]),
        health_attr = esc(health),
        weight = v(&b["weight"]),
        health_class = class(health),
        health_text = esc(health),
        state_class = if drained { "drained" } else { "" },
        state = if drained { "drained" } else { "in service" },
        active = v(&b["active_connections"]),
        to_backend = esc(&count(&b["bytes"]["to_backend"])),
        to_client = esc(&count(&b["bytes"]["to_client"])),
        flip = v(&b["last_flip"]),
        raw_to_backend = v(&b["bytes"]["to_backend"]),
        raw_to_client = v(&b["bytes"]["to_client"]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EVIL: &str = "<script>alert(1)</script>\"'&";

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            esc(EVIL),
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"
        );
        assert_eq!(esc("plain-1.example:6443"), "plain-1.example:6443");
    }

    #[test]
    fn every_value_on_the_page_is_escaped() {
        let status = json!({
            "node": {"name": EVIL, "id": 1, "version": EVIL},
            "role": EVIL,
            "config_version": 7,
            "config_apply_errors": [EVIL],
            "cluster": {"cluster_id": EVIL, "leader_id": 1, "term": 3, "commit_index": 9,
                        "applied_index": 9, "quorum": 2, "fault_tolerance": 1, "fault_tolerance_now": 0,
                        "quorum_reachable": true,
                        "members": [{"id": 1, "address": EVIL, "role": EVIL, "voter": true, "reachable": true},
                                    {"id": 2, "name": EVIL, "address": EVIL, "role": "follower", "voter": true, "reachable": false}]},
            "lease": {"holder_id": 2, "holder": EVIL, "epoch": 4, "renewed_ms_ago": 1500,
                      "lease_duration_ms": 2000, "holder_lease_duration_ms": 3000, "waited_out_ms": 3000,
                      "renewed_at": EVIL, "this_replica_epoch": 4},
        });
        let backends = json!({"config_version": 7, "pools": [{"name": EVIL, "balance": EVIL, "backends": [
            {"name": EVIL, "address": EVIL, "resolved": [EVIL], "weight": 1, "health": EVIL,
             "drained": true, "active_connections": 0, "bytes": {"to_backend": 2048, "to_client": 5},
             "last_check": {"ok": false, "latency_ms": 1.5, "at": EVIL, "error": EVIL},
             "consecutive_ok": 0, "consecutive_fail": 3, "last_flip": EVIL}]}]});
        let page = render(&status, &backends);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("\"'&<"), "{page}");
        // The only script is the same-origin refresher.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        assert!(page.contains("<script src=\"/status.js\" defer></script>"));
        let escaped = esc(EVIL);
        // name (title, h1, lease holder, member, pool, backend...), all escaped.
        assert!(page.matches(&escaped).count() >= 12, "{page}");
        assert!(page.contains("2.0 KiB") && page.contains("5 B"), "{page}");
        assert!(page.contains("1.5 s ago"), "{page}");
        // The lease's duration is what the standbys wait out, not this replica's own.
        assert!(page.contains("<td>3.0 s</td>"), "{page}");
        // The lease holder (node 2) is active; this replica's role is its own.
        assert!(
            page.contains("data-member=\"2\" data-role=\"active\""),
            "{page}"
        );
    }

    #[test]
    fn standalone_lists_this_replica_and_no_lease() {
        let status = json!({"node": {"name": "lb-1", "id": null, "version": "0.1.0"},
            "role": "active", "config_version": 1, "config_apply_errors": [],
            "cluster": null, "lease": null});
        let page = render(&status, &json!({"config_version": 1, "pools": []}));
        assert!(page.contains("data-member=\"self\""), "{page}");
        assert!(page.contains("standalone"), "{page}");
        assert!(page.contains("leader election off"), "{page}");
    }

    #[test]
    fn the_policy_allows_the_inline_style_by_its_hash() {
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(CSS));
        assert!(csp().starts_with("default-src 'self'; "));
        assert!(csp().contains(&format!("'sha256-{hash}'")));
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
