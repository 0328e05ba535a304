mod common;
use common::*;
use std::net::SocketAddr;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_to_a_backend() {
    raise_nofile();
    let b = named_backend("one").await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _lb = Raftlb::start(
        &Raftlb::standalone_yaml(admin, listen, "", "", &[("one", b)]),
        admin,
    );
    assert_eq!(which_backend(listen, None).await.unwrap(), "one");
}

#[test]
fn test_pki_issues_usable_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Pki::new(dir.path(), "smoke");
    let server = ca.server("server", &["kubernetes"]);
    let client = ca.client("admin");
    let _ = ca.server_config(&server, true, &[b"h2"]);
    let _ = ca.client_config(Some(&client), &[b"h2"]);
    assert!(
        std::fs::read_to_string(&server.cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
}
