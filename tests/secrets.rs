//! Secrets stay secret: the admin token, the private keys and the peer CA never show
//! in logs, status, config dumps, metrics or snapshots, and `raftlb check` warns when
//! a token or key file is readable by every user.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::cluster::*;
use common::*;

const TOKEN: &str = "s3cret-token-7f2c9a61d4";

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The base64 lines of a PEM file (what would show if its content leaked).
fn pem_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read pem")
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_on_a_world_readable_token_or_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new(dir.path(), "admin");
    let server = pki.server("admin", &[]);
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
    let config = dir.path().join("raftlb.yaml");
    std::fs::write(
        &config,
        format!(
            "admin:\n  bind: 127.0.0.1:9090\n  token_file: {}\n  tls: {{ cert: {}, key: {} }}\n\
             listeners:\n  front: {{ bind: 127.0.0.1:6443, pool: web }}\n\
             pools:\n  web:\n    backends:\n      - {{ name: b1, address: \"127.0.0.1:1\" }}\n",
            token.display(),
            server.cert.display(),
            server.key.display()
        ),
    )
    .expect("write config");

    chmod(&token, 0o644);
    chmod(&server.key, 0o604);
    let (code, out, err) = check(&config);
    assert_eq!(code, 0, "a warning is not an error: {err}");
    for field in ["admin.token_file", "admin.tls.key"] {
        assert!(
            err.lines().any(|l| l.starts_with("warning:")
                && l.contains(field)
                && l.contains("readable by every user")),
            "no warning for {field}:\n{err}"
        );
    }
    assert!(
        !out.contains(TOKEN) && !err.contains(TOKEN),
        "check printed the token"
    );

    chmod(&token, 0o600);
    chmod(&server.key, 0o640);
    let (code, _, err) = check(&config);
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("readable by every user"),
        "warned about private files:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_key_or_peer_ca_in_logs_status_dumps_metrics_or_snapshots() {
    raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new(dir.path(), "cluster");
    let peer = pki.peer("peer");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
    chmod(&token, 0o600);
    let b1 = named_backend("b1").await;
    let mut cluster = Cluster::new(3, vec![("b1".to_string(), b1)]);
    cluster.cluster_extra = format!(
        "  tls: {{ cert: {}, key: {}, ca: {} }}\n",
        peer.cert.display(),
        peer.key.display(),
        pki.ca.display()
    );
    let yamls: Vec<String> = (0..3)
        .map(|i| {
            let admin = cluster.addrs[i].admin;
            cluster.yaml_with(i, "").replace(
                &format!("admin: {{ bind: {admin} }}"),
                &format!(
                    "admin: {{ bind: {admin}, token_file: {} }}",
                    token.display()
                ),
            )
        })
        .collect();
    let auth = format!("Bearer {TOKEN}");
    let headers = [("Authorization", auth.as_str())];
    let (replicas, leader) = blocking(|| {
        let mut replicas: Vec<Raftlb> = (0..3)
            .map(|i| Raftlb::spawn(&yamls[i], cluster.addrs[i].admin))
            .collect();
        replicas.iter_mut().for_each(Raftlb::wait_ready);
        let mut leader = None;
        assert!(
            eventually(Duration::from_secs(15), || {
                leader = http_request(
                    cluster.addrs[0].admin,
                    "GET",
                    "/api/v1/status",
                    &headers,
                    "",
                )
                .ok()
                .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|s| s["cluster"]["leader_id"].as_u64());
                leader.is_some()
            }),
            "no leader"
        );
        (replicas, leader.expect("leader") as usize - 1)
    });
    let follower = cluster.addrs[(leader + 1) % 3].admin;

    let mut outputs: Vec<(String, String)> = Vec::new();
    blocking(|| {
        // A write forwarded to the leader, a refused one, reads of every kind.
        let drain = http_request(
            follower,
            "POST",
            "/api/v1/pools/web/backends/b1/drain",
            &headers,
            "",
        );
        assert!(matches!(drain, Ok((200, _))), "{drain:?}");
        let wrong = http_request(
            follower,
            "POST",
            "/api/v1/pools/web/backends/b1/undrain",
            &[("Authorization", "Bearer wrong")],
            "",
        );
        assert!(matches!(wrong, Ok((401, _))), "{wrong:?}");
        for a in &cluster.addrs {
            for path in [
                "/api/v1/status",
                "/api/v1/backends",
                "/api/v1/config",
                "/api/v1/members",
                "/api/v1/snapshot",
                "/metrics",
            ] {
                let r = http_response(a.admin, "GET", path, &headers, "").expect("read");
                // An error page searched instead of the real output would prove nothing.
                assert_eq!(r.status, 200, "GET {path} on {}: {}", a.admin, r.body);
                outputs.push((
                    format!("{} {path}", a.admin),
                    format!("{:?} {}", r.headers, r.body),
                ));
            }
        }
        for (i, yaml) in yamls.iter().enumerate() {
            let file = dir.path().join(format!("check-{i}.yaml"));
            std::fs::write(&file, yaml).expect("write");
            let (_, out, err) = check(&file);
            outputs.push((format!("raftlb check replica {i}"), format!("{out}{err}")));
        }
    });
    let key_der = {
        use tokio_rustls::rustls::pki_types::{PrivateKeyDer, pem::PemObject};
        let key = PrivateKeyDer::from_pem_file(&peer.key).expect("peer key");
        // 32 bytes from inside the key material.
        let der = key.secret_der();
        der[der.len() / 2..der.len() / 2 + 32].to_vec()
    };
    for (i, r) in replicas.iter().enumerate() {
        outputs.push((format!("log of replica {i}"), r.log()));
        for entry in std::fs::read_dir(cluster.data[i].path())
            .expect("data_dir")
            .flatten()
        {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                // The store is binary: the key's DER bytes, not only its PEM text.
                assert!(
                    !bytes.windows(key_der.len()).any(|w| w == key_der),
                    "the peer private key's DER bytes show in {}",
                    entry.path().display()
                );
                outputs.push((
                    format!("{}", entry.path().display()),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
            }
        }
    }

    let mut secrets = vec![("the token".to_string(), TOKEN.to_string())];
    for line in pem_lines(&peer.key) {
        secrets.push(("the peer private key".into(), line));
    }
    for line in pem_lines(&pki.ca) {
        secrets.push(("the peer CA".into(), line));
    }
    let total: usize = outputs.iter().map(|(_, o)| o.len()).sum();
    println!(
        "searched {} outputs, {total} bytes, for {} secret strings",
        outputs.len(),
        secrets.len()
    );
    assert!(total > 10_000, "too little output to search: {total} bytes");
    for (place, text) in &outputs {
        for (what, secret) in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} shows in {place}");
        }
    }
}
