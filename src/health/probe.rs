//! One probe of one backend: TCP connect, TLS handshake, or HTTPS GET (2xx only).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::balancer::{Backend, Pool};
use crate::config::schema::{CheckKind, HealthCheck};

#[derive(Debug)]
pub enum Outcome {
    Ok,
    Fail(String),
    Timeout,
}

/// Runs one probe within the check's `timeout`, sending `header` (a PROXY header)
/// first when there is one.
pub async fn run(
    pool: &Pool,
    backend: &Backend,
    check: &HealthCheck,
    header: Option<&[u8]>,
) -> Outcome {
    let Some(addr) = backend.connect_addr() else {
        return Outcome::Fail("no resolved address".into());
    };
    let probe = probe(pool, backend, addr, check, header);
    match tokio::time::timeout(check.timeout.value.get(), probe).await {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(e)) => Outcome::Fail(e),
        Err(_) => Outcome::Timeout,
    }
}

async fn probe(
    pool: &Pool,
    backend: &Backend,
    addr: SocketAddr,
    check: &HealthCheck,
    header: Option<&[u8]>,
) -> Result<(), String> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if let Some(header) = header {
        tcp.write_all(header)
            .await
            .map_err(|e| format!("PROXY header to {addr}: {e}"))?;
    }
    match check.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Tls => handshake(pool, backend, tcp).await.map(drop),
        CheckKind::Https => {
            let tls = handshake(pool, backend, tcp).await?;
            get(tls, &check.path.value, &host_header(check, backend)).await
        }
    }
}

async fn handshake(
    pool: &Pool,
    backend: &Backend,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, String> {
    let Some(config) = &pool.probe_tls else {
        return Err("no TLS config for probes".into());
    };
    let host = backend.address.host();
    let tls_settings = pool.health_check.as_ref().and_then(|c| c.tls.as_ref());
    let name = crate::tls::server_name(tls_settings, &host)?;
    TlsConnector::from(Arc::clone(&config.get()))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

fn host_header(check: &HealthCheck, backend: &Backend) -> String {
    check
        .tls
        .as_ref()
        .and_then(|t| t.server_name.clone())
        .unwrap_or_else(|| backend.address.to_string())
}

/// `GET path`; healthy on 2xx only (kube-apiserver answers /readyz with 500 while it shuts down).
async fn get(stream: TlsStream<TcpStream>, path: &str, host: &str) -> Result<(), String> {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    let mut driver = tokio::spawn(conn);
    let request = Request::get(path)
        .header(hyper::header::HOST, host)
        .header(
            hyper::header::USER_AGENT,
            concat!("raftlb/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| format!("bad probe request: {e}"))?;
    let status = match sender.send_request(request).await {
        Ok(response) => {
            driver.abort();
            response.status()
        }
        // The connection's own error says why (a TLS alert such as "certificate
        // required" arrives after the handshake, on the first read).
        Err(e) => {
            let ended = tokio::time::timeout(Duration::from_millis(100), &mut driver).await;
            driver.abort();
            let why = match ended {
                Ok(Ok(Err(conn))) => causes(&conn),
                _ => causes(&e),
            };
            return Err(format!("HTTP: {why}"));
        }
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("GET {path}: HTTP {}", status.as_u16()))
    }
}

/// An error with its causes, `outer: inner: innermost` (hyper's "connection error"
/// alone does not say which).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}
