//! `raftlb ctl` against a running standalone raftlb: tables, `-o json`, writes, the
//! token file, and exit codes (1 when the server refuses or is unreachable).

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reads_and_changes_backends_through_the_admin_api() {
    raise_nofile();
    let a = named_backend("a").await;
    let b = named_backend("b").await;
    let (admin, listen) = (loopback(), loopback());
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write token");
    let yaml = Raftlb::standalone_yaml(admin, listen, "", "", &[("a", a), ("b", b)]).replacen(
        "admin:\n",
        &format!("admin:\n  token_file: \"{}\"\n", token.display()),
        1,
    );
    let _lb = blocking(|| Raftlb::start(&yaml, admin));
    let server = format!("http://{admin}");
    let token = token.to_str().expect("utf-8");
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--server", server.as_str(), "--token-file", token];
        all.extend_from_slice(args);
        blocking(|| raftlb_cmd(&all))
    };

    let (code, out, err) = ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("role            active") && out.contains("standalone"),
        "{out}"
    );

    let (code, out, err) = ctl(&["backend", "drain", "web", "b"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("drained true"), "{out}");
    let (code, out, _) = ctl(&["backends"]);
    assert_eq!(code, 0);
    let row_b = out
        .lines()
        .find(|l| l.starts_with("web") && l.contains(" b "))
        .expect("a row for b");
    assert!(row_b.contains("true"), "{out}");
    assert_eq!(which_backend(listen, None).await.expect("request"), "a");

    let (code, _, err) = ctl(&["backend", "weight", "web", "a", "7"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = ctl(&["-o", "json", "backends"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("-o json prints JSON");
    assert_eq!(v["pools"][0]["backends"][0]["weight"], 7, "{v}");

    let (code, _, err) = ctl(&["backend", "remove", "web", "a"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("edit the file"),
        "{err}"
    );
    let (code, _, err) = ctl(&["backend", "weight", "web", "a", "0"]);
    assert_eq!(code, 1, "{err}");

    let (code, _, err) = blocking(|| raftlb_cmd(&["ctl", "--server", server.as_str(), "status"]));
    assert_eq!(code, 1, "without the token: {err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) =
        blocking(|| raftlb_cmd(&["ctl", "--server", "http://127.0.0.1:1", "status"]));
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
    let (code, _, _) = blocking(|| raftlb_cmd(&["ctl", "--server", "not a url", "status"]));
    assert_eq!(code, 2);
}
