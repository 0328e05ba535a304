//! PROXY protocol v1 and v2 towards backends: a backend that parses the header with
//! the `ppp` crate, and nginx (stream, `listen ... proxy_protocol`) as a real peer.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const CLIENT_IP: [u8; 4] = [127, 0, 0, 2];

/// A backend that reads everything a connection sends (until EOF) and reports it.
async fn recording_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
                let _ = tx.send(all);
            });
        }
    });
    (addr, rx)
}

/// Sends `payload` through raftlb from 127.0.0.2 and returns (client address, what the backend got).
async fn send_through(version: &str, payload: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    raise_nofile();
    let (backend, mut got) = recording_backend().await;
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        "",
        &format!("    proxy_protocol: {version}\n"),
        &[("pp", backend)],
    );
    let _lb = tokio::task::block_in_place(|| Raftlb::start(&yaml, admin));
    let mut client = connect_from(Some(IpAddr::from(CLIENT_IP)), listen)
        .await
        .expect("connect from 127.0.0.2");
    let client_addr = client.local_addr().expect("local addr");
    client.write_all(payload).await.expect("write");
    client.shutdown().await.expect("half-close");
    let received = tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .expect("backend got data")
        .expect("channel");
    (client_addr, listen, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_header_names_the_client_then_the_payload_follows_intact() {
    let (client, listen, received) = send_through("v1", b"payload after the header").await;
    let header = ppp::v1::Header::try_from(&received[..]).expect("a PROXY v1 header");
    assert_eq!(header.addresses, ppp::v1::Addresses::from((client, listen)));
    assert_eq!(
        &received[header.header.len()..],
        b"payload after the header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_header_names_the_client_then_the_payload_follows_intact() {
    let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let (client, listen, received) = send_through("v2", &payload).await;
    let header = ppp::v2::Header::try_from(&received[..]).expect("a PROXY v2 header");
    assert_eq!(header.command, ppp::v2::Command::Proxy);
    assert_eq!(header.addresses, ppp::v2::Addresses::from((client, listen)));
    assert_eq!(&received[header.len()..], &payload[..]);
}

/// Health checks to a pool that gets PROXY headers send one first (a backend that
/// requires the header would otherwise fail every probe): the header of a
/// connection the proxy makes itself, v1 `PROXY UNKNOWN`, v2 LOCAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_the_header_of_a_local_connection() {
    raise_nofile();
    for version in ["v1", "v2"] {
        let (backend, mut got) = recording_backend().await;
        let (admin, listen) = (loopback(), loopback());
        let yaml = Raftlb::standalone_yaml(
            admin,
            listen,
            "    health_check: { kind: tcp, interval: 100ms, timeout: 1s, rise: 1, fall: 1 }\n",
            &format!("    proxy_protocol: {version}\n"),
            &[("pp", backend)],
        );
        let _lb = tokio::task::block_in_place(|| Raftlb::start(&yaml, admin));
        let probe = tokio::time::timeout(Duration::from_secs(10), got.recv())
            .await
            .expect("a probe came")
            .expect("channel");
        match version {
            "v1" => assert_eq!(probe, b"PROXY UNKNOWN\r\n", "{probe:?}"),
            _ => {
                let header = ppp::v2::Header::try_from(&probe[..]).expect("a PROXY v2 header");
                assert_eq!(header.command, ppp::v2::Command::Local);
                assert_eq!(header.len(), probe.len(), "nothing after the header");
            }
        }
    }
}

/// nginx answering with the client address it read from the PROXY header.
struct Nginx {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start() -> Nginx {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
        let (Some(nginx), true) = (nginx, std::path::Path::new(module).exists()) else {
            panic!(
                "nginx with the stream module is needed: apt-get install nginx-light libnginx-mod-stream (scripts/test does)"
            );
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "load_module {module};\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\nstream {{\n  server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n    return \"$proxy_protocol_addr:$proxy_protocol_port\\n\";\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
                addr
            )
            .is_ok()),
            "nginx did not listen on {addr}"
        );
        Nginx {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reads_the_client_address_from_v1_and_v2() {
    raise_nofile();
    let nginx = tokio::task::block_in_place(Nginx::start);
    let backend = SocketAddr::from(([127, 0, 0, 1], nginx.port));
    for version in ["v1", "v2"] {
        let (admin, listen) = (loopback(), loopback());
        let yaml = Raftlb::standalone_yaml(
            admin,
            listen,
            "",
            &format!("    proxy_protocol: {version}\n"),
            &[("nginx", backend)],
        );
        let _lb = tokio::task::block_in_place(|| Raftlb::start(&yaml, admin));
        let mut client = connect_from(Some(IpAddr::from(CLIENT_IP)), listen)
            .await
            .expect("connect from 127.0.0.2");
        let me = client.local_addr().expect("local addr");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
            .await
            .expect("nginx answered")
            .expect("read");
        assert_eq!(
            answer.trim(),
            format!("{}:{}", me.ip(), me.port()),
            "nginx with PROXY {version}"
        );
    }
}
