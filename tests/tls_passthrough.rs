//! TLS passthrough (SPEC.md "Behaviour: Data path"): raftlb copies the TLS bytes
//! untouched, so a backend that requires client certificates sees the client's own
//! certificate, and ALPN is negotiated end to end between client and backend.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::pki::{self, CertFiles, Pki};
use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TIMEOUT: Duration = Duration::from_secs(10);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the backend saw of one client: the handshake's outcome and, once the client
/// has sent its request, what it answered.
#[derive(Debug)]
enum Seen {
    Served(String),
    HandshakeFailed(String),
}

/// A TLS backend with `config` (which requires client certificates). For each client
/// it reads one line and answers `sha256=<client cert DER hash> alpn=<protocol>
/// request=<line>`, then closes. The hash of the exact bytes shows the certificate
/// arrived untouched (no X.509 parsing needed).
async fn mtls_backend(config: Arc<ServerConfig>) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let seen = seen_tx.clone();
            tokio::spawn(async move {
                let tls = match timeout(TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let _ = seen.send(Seen::HandshakeFailed(e.to_string()));
                        return;
                    }
                    Err(_) => {
                        let _ = seen.send(Seen::HandshakeFailed("timed out".into()));
                        return;
                    }
                };
                let (_, conn) = tls.get_ref();
                let sha = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map_or_else(|| "none".into(), |cert| hex(&Sha256::digest(cert)));
                let alpn = conn.alpn_protocol().map_or_else(
                    || "none".into(),
                    |p| String::from_utf8_lossy(p).into_owned(),
                );
                let mut tls = BufReader::new(tls);
                let mut request = String::new();
                if timeout(TIMEOUT, tls.read_line(&mut request)).await.is_err() {
                    return;
                }
                let reply = format!("sha256={sha} alpn={alpn} request={}\n", request.trim());
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
                let _ = seen.send(Seen::Served(reply));
            });
        }
    });
    (addr, seen_rx)
}

/// A CA, a server certificate for localhost/127.0.0.1, and a client certificate.
struct Setup {
    _dir: tempfile::TempDir,
    pki: Pki,
    server: CertFiles,
    client: CertFiles,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "passthrough");
    let server = pki.server("backend", &[]);
    let client = pki.client("kubelet-node-7");
    Setup {
        _dir: dir,
        pki,
        server,
        client,
    }
}

/// raftlb with one `tls: passthrough` listener in front of `backend`.
fn start_raftlb(backend: SocketAddr) -> (Raftlb, SocketAddr) {
    let (admin, listen) = (loopback(), loopback());
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        "",
        "    tls: passthrough\n",
        &[("tls-backend", backend)],
    );
    let lb = tokio::task::block_in_place(|| Raftlb::start(&yaml, admin));
    (lb, listen)
}

/// Connects through raftlb, handshakes as `localhost`, sends one line and reads the
/// reply to the end. Err with the step that failed.
async fn request_through(
    listen: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(Option<Vec<u8>>, String), String> {
    let tcp = timeout(TIMEOUT, TcpStream::connect(listen))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").expect("server name");
    let mut tls = timeout(TIMEOUT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    tls.write_all(b"GET /version\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = String::new();
    timeout(TIMEOUT, tls.read_to_string(&mut reply))
        .await
        .map_err(|_| "no reply in time".to_string())?
        .map_err(|e| format!("read: {e} (after {reply:?})"))?;
    if reply.is_empty() {
        return Err("closed without a reply".into());
    }
    Ok((alpn, reply))
}

async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    timeout(TIMEOUT, seen.recv())
        .await
        .expect("the backend reported nothing within 10 s")
        .expect("backend channel closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_and_alpn_reach_the_backend_untouched() {
    raise_nofile();
    let s = setup();
    let server_config = s.pki.server_config(&s.server, true, &[b"h2"]);
    let (backend, mut seen) = mtls_backend(server_config).await;
    let (_lb, listen) = start_raftlb(backend);

    let client_config = s.pki.client_config(Some(&s.client), &[b"h2", b"http/1.1"]);
    let (alpn, reply) = request_through(listen, client_config)
        .await
        .expect("mutual TLS through raftlb");

    let client_der = pki::certs(&s.client.cert).remove(0);
    let want = format!(
        "sha256={} alpn=h2 request=GET /version\n",
        hex(&Sha256::digest(&client_der))
    );
    assert_eq!(
        reply, want,
        "the backend did not see the client's certificate or ALPN as sent"
    );
    assert_eq!(
        alpn.as_deref(),
        Some(&b"h2"[..]),
        "ALPN negotiated by the client"
    );
    assert!(matches!(next_seen(&mut seen).await, Seen::Served(r) if r == want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_an_acceptable_certificate_fails_the_handshake() {
    raise_nofile();
    let s = setup();
    let server_config = s.pki.server_config(&s.server, true, &[b"h2"]);
    let (backend, mut seen) = mtls_backend(server_config).await;
    let (_lb, listen) = start_raftlb(backend);

    // No certificate at all.
    let anonymous = s.pki.client_config(None, &[b"h2"]);
    let result = request_through(listen, anonymous).await;
    assert!(
        result.is_err(),
        "a client without a certificate got through: {result:?}"
    );
    match next_seen(&mut seen).await {
        Seen::HandshakeFailed(e) => assert!(
            e.to_lowercase().contains("certificate"),
            "the backend failed the handshake for another reason: {e}"
        ),
        Seen::Served(reply) => panic!("the backend served a client without a cert: {reply}"),
    }

    // A certificate from another CA, which the backend does not trust.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Pki::new(other_dir.path(), "other");
    let stranger = other.client("stranger");
    let foreign = s.pki.client_config(Some(&stranger), &[b"h2"]);
    let result = request_through(listen, foreign).await;
    assert!(
        result.is_err(),
        "a client with a certificate from an unknown CA got through: {result:?}"
    );
    match next_seen(&mut seen).await {
        Seen::HandshakeFailed(e) => assert!(
            e.to_lowercase().contains("certificate"),
            "the backend failed the handshake for another reason: {e}"
        ),
        Seen::Served(reply) => panic!("the backend served a client of another CA: {reply}"),
    }

    // The same listener still carries a valid client through.
    let valid = s.pki.client_config(Some(&s.client), &[b"h2"]);
    let (_, reply) = request_through(listen, valid)
        .await
        .expect("a valid client after the failed ones");
    let client_der = pki::certs(&s.client.cert).remove(0);
    let want = format!("sha256={} ", hex(&Sha256::digest(&client_der)));
    assert!(reply.starts_with(&want), "{reply}");
}
