//! TLS termination on a listener: plaintext to the backend, client certificates
//! required by `client_ca`, re-encryption with `backend_tls`, ALPN carried through to
//! the backend's choice, certificates reloaded from disk, a bad file refused at start.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::pki::{self, CertFiles, Pki};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TIMEOUT: Duration = Duration::from_secs(10);

fn terminate_listener(files: &CertFiles, client_ca: Option<&Path>) -> String {
    let ca = client_ca
        .map(|c| format!(", client_ca: \"{}\"", c.display()))
        .unwrap_or_default();
    format!(
        "    tls: terminate\n    terminate: {{ cert: \"{}\", key: \"{}\"{ca} }}\n",
        files.cert.display(),
        files.key.display()
    )
}

/// raftlb with one terminating listener (`pool_extra` in its pool) in front of
/// `backend`: the running process and the listener's address.
fn terminating(
    files: &CertFiles,
    client_ca: Option<&Path>,
    pool_extra: &str,
    backend: (&str, SocketAddr),
) -> (Raftlb, SocketAddr) {
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        pool_extra,
        &terminate_listener(files, client_ca),
        &[backend],
    );
    let lb = tokio::task::block_in_place(|| Raftlb::start(&yaml, admin));
    (lb, listen)
}

/// Connects through raftlb with TLS, sends `msg`, reads the echo: (echo, negotiated ALPN, server cert).
async fn tls_echo(
    listen: SocketAddr,
    client: Arc<ClientConfig>,
    msg: &[u8],
) -> Result<(Vec<u8>, Option<Vec<u8>>, Vec<u8>), String> {
    let exchange = async {
        let tcp = TcpStream::connect(listen)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(
                ServerName::try_from("localhost").map_err(|e| e.to_string())?,
                tcp,
            )
            .await
            .map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        tls.write_all(msg).await.map_err(|e| e.to_string())?;
        let mut echo = vec![0u8; msg.len()];
        tls.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
        Ok((echo, alpn, cert))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// A TLS echo backend; it answers with the ALPN protocol it negotiated, then echoes.
async fn tls_echo_backend(config: Arc<ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A plain echo backend that also reports the first bytes it received.
async fn plaintext_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = tx.send(buf[..n].to_vec());
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    (addr, rx)
}

fn setup() -> (tempfile::TempDir, Pki, CertFiles) {
    raise_nofile();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "lb");
    let files = pki.server("lb", &[]);
    (dir, pki, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_listener_sends_plaintext_to_the_backend() {
    let (_dir, pki, files) = setup();
    let (backend, mut seen) = plaintext_backend().await;
    let (_lb, listen) = terminating(&files, None, "", ("plain", backend));
    let (echo, _, _) = tls_echo(
        listen,
        pki.client_config(None, &[]),
        b"GET / HTTP/1.1\r\n\r\n",
    )
    .await
    .expect("TLS through raftlb");
    assert_eq!(echo, b"GET / HTTP/1.1\r\n\r\n");
    let received = tokio::time::timeout(TIMEOUT, seen.recv())
        .await
        .expect("backend saw data")
        .expect("channel");
    assert_eq!(
        received, b"GET / HTTP/1.1\r\n\r\n",
        "the backend must see plaintext"
    );
}

/// A TLS client that ends its half with a bare TCP FIN (no close_notify, as many
/// clients do) half-closes: the backend sees the end of the request and its answer,
/// sent after it, still reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_without_close_notify_is_a_half_close() {
    let (_dir, pki, files) = setup();
    // Reads to the end, then answers with how many bytes it got.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s.write_all(format!("got {}\n", got.len()).as_bytes()).await;
                }
            });
        }
    });
    let (_lb, listen) = terminating(&files, None, "", ("counter", backend));
    let exchange = async {
        let tcp = TcpStream::connect(listen).await.expect("connect");
        let mut tls = TlsConnector::from(pki.client_config(None, &[]))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("handshake");
        tls.write_all(&[7u8; 100_000]).await.expect("write");
        tls.flush().await.expect("flush");
        // The TCP FIN alone: no close_notify.
        socket2::SockRef::from(tls.get_ref().0)
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut answer = Vec::new();
        // The answer, then raftlb's FIN without close_notify: what came is the test.
        let _ = tls.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .expect("no answer in time");
    assert_eq!(answer, "got 100000\n");
}

/// A refused client never reaches the backend (towards a plain backend its
/// handshake completes first) and is not counted as a proxied connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ca_requires_a_certificate_from_that_ca() {
    let (dir, pki, files) = setup();
    let (backend, mut seen) = plaintext_backend().await;
    let (lb, listen) = terminating(&files, Some(&pki.ca), "", ("echo", backend));
    let proxied = || {
        tokio::task::block_in_place(|| {
            lb.metric(r#"raftlb_connections_total{listener="front",pool="web",backend="echo",result="ok"}"#)
        })
    };

    // A client that closes before any handshake (a TCP check) is not logged.
    drop(TcpStream::connect(listen).await.expect("connect"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !lb.log().contains("client TLS handshake failed"),
        "{}",
        lb.log()
    );

    let good = pki.client("kubelet");
    let ok = tls_echo(listen, pki.client_config(Some(&good), &[]), b"hi").await;
    assert_eq!(ok.map(|r| r.0), Ok(b"hi".to_vec()));
    let anonymous = tls_echo(listen, pki.client_config(None, &[]), b"hi").await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate got through"
    );
    let other = Pki::new(dir.path(), "other");
    let stranger = other.client("stranger");
    let foreign = tls_echo(listen, pki.client_config(Some(&stranger), &[]), b"hi").await;
    assert!(
        foreign.is_err(),
        "a client with a certificate of another CA got through"
    );
    // Only the good client reached the backend, and only it was counted.
    assert_eq!(seen.recv().await.as_deref(), Some(&b"hi"[..]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        seen.try_recv().is_err(),
        "a refused client reached the backend"
    );
    assert_eq!(
        proxied(),
        1.0,
        "{}",
        tokio::task::block_in_place(|| lb.metrics())
    );
    // A refused handshake is logged at the default level, with the client's address.
    let log = lb.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("client TLS handshake failed")
            && l.contains("client=127.0.0.1")),
        "{log}"
    );
    // So is a client that hangs up after its ClientHello, without an alert.
    let hello = client_hello(pki.client_config(Some(&good), &[])).await;
    let mut s = TcpStream::connect(listen).await.expect("connect");
    s.write_all(&hello).await.expect("ClientHello");
    // Reads the server's flight (a close with it unread would be a reset), then FIN.
    let mut flight = vec![0u8; 16 << 10];
    let _ = tokio::time::timeout(Duration::from_millis(500), s.read(&mut flight)).await;
    s.shutdown().await.expect("FIN");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(s);
    assert!(
        eventually(Duration::from_secs(5), || lb
            .log()
            .contains("closed during the handshake")),
        "{}",
        lb.log()
    );
}

/// The first bytes a TLS client with `config` sends: its ClientHello.
async fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            let name = ServerName::try_from("localhost").expect("name");
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                TlsConnector::from(config).connect(name, tcp),
            )
            .await;
        }
    });
    let (mut tcp, _) = listener.accept().await.expect("accept");
    let mut hello = vec![0u8; 16 << 10];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut hello))
        .await
        .expect("a ClientHello in time")
        .expect("read");
    hello.truncate(n);
    hello
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_tls_reencrypts_with_a_client_certificate_and_checks_the_server_name() {
    let (_dir, pki, files) = setup();
    let backend_cert = pki.server("backend", &["kubernetes"]);
    let raftlb_client = pki.client("raftlb");
    let backend = tls_echo_backend(pki.server_config(&backend_cert, true, &[])).await;
    let pool = |server_name: &str| {
        format!(
            "    backend_tls: {{ ca: \"{}\", server_name: {server_name}, cert: \"{}\", key: \"{}\" }}\n    retries: 0\n",
            pki.ca.display(),
            raftlb_client.cert.display(),
            raftlb_client.key.display()
        )
    };
    let (lb, listen) = terminating(&files, None, &pool("kubernetes"), ("tls", backend));
    let ok = tls_echo(listen, pki.client_config(None, &[]), b"secret").await;
    assert_eq!(ok.map(|r| r.0), Ok(b"secret".to_vec()), "{}", lb.log());
    drop(lb);

    let (lb, listen) = terminating(&files, None, &pool("not-the-backend"), ("tls", backend));
    assert!(
        tls_echo(listen, pki.client_config(None, &[]), b"secret")
            .await
            .is_err(),
        "a wrong server_name was accepted"
    );
    let failed = tokio::task::block_in_place(|| {
        lb.metric("raftlb_connections_total{listener=\"front\",pool=\"web\",backend=\"tls\",result=\"connect_failed\"}")
    });
    assert!(
        failed >= 1.0,
        "the failed backend handshake counts as connect_failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_follows_what_the_backend_chose() {
    let (_dir, pki, files) = setup();
    let backend_cert = pki.server("backend", &[]);
    for (backend_alpn, want) in [
        (&b"h2"[..], &b"h2"[..]),
        (&b"http/1.1"[..], &b"http/1.1"[..]),
    ] {
        let backend =
            tls_echo_backend(pki.server_config(&backend_cert, false, &[backend_alpn])).await;
        let pool = format!(
            "    backend_tls: {{ ca: \"{}\", server_name: localhost }}\n",
            pki.ca.display()
        );
        let (lb, listen) = terminating(&files, None, &pool, ("tls", backend));
        let (_, alpn, _) = tls_echo(listen, pki.client_config(None, &[b"h2", b"http/1.1"]), b"x")
            .await
            .expect("handshake");
        assert_eq!(alpn.as_deref(), Some(want), "{}", lb.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_when_the_files_change() {
    let (_dir, pki, files) = setup();
    let backend = echo_backend().await;
    let (lb, listen) = terminating(&files, None, "", ("echo", backend));
    let client = pki.client_config(None, &[]);
    let first = pki::certs(&files.cert).remove(0).to_vec();
    let (_, _, seen) = tls_echo(listen, client.clone(), b"a")
        .await
        .expect("first handshake");
    assert_eq!(seen, first);

    // A renewed certificate is written over the same paths.
    let renewed = pki.server("renewed", &[]);
    std::fs::copy(&renewed.key, &files.key).expect("copy key");
    std::fs::copy(&renewed.cert, &files.cert).expect("copy cert");
    let second = pki::certs(&files.cert).remove(0).to_vec();
    let mut now_seen = Vec::new();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        now_seen = tls_echo(listen, client.clone(), b"b")
            .await
            .expect("handshake")
            .2;
        if now_seen == second {
            break;
        }
    }
    assert_eq!(
        now_seen,
        second,
        "the renewed certificate was not picked up:\n{}",
        lb.log()
    );

    // A broken file is logged and the last good certificate stays.
    std::fs::write(&files.cert, "not a certificate").expect("break cert");
    assert!(tokio::task::block_in_place(|| eventually(
        Duration::from_secs(10),
        || lb.log().contains("do not load")
    )));
    assert_eq!(
        tls_echo(listen, client, b"c")
            .await
            .expect("still serving")
            .2,
        second
    );
}

#[test]
fn a_missing_certificate_file_is_refused_at_start() {
    let (dir, _pki, _files) = setup();
    let missing = CertFiles {
        cert: dir.path().join("nope.crt"),
        key: dir.path().join("nope.key"),
    };
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        "",
        &terminate_listener(&missing, None),
        &[("a", SocketAddr::from(([127, 0, 0, 1], 1)))],
    );
    let config = dir.path().join("raftlb.yaml");
    std::fs::write(&config, yaml).expect("write");
    let (code, _, stderr) = raftlb_cmd(&["run", "--config", config.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("listeners.front.terminate") && stderr.contains("nope.crt"),
        "{stderr}"
    );
    // Named where `raftlb check` names it: file, line and column.
    let at = format!("{}:", config.display());
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("error: {at}"))
                && l.contains("listeners.front.terminate")),
        "{stderr}"
    );
}
