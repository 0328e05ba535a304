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
