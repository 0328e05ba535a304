// A measurement prototype, not part of raftlb (no Cargo target builds it): the
// plainest tokio relay, two `read` / `write_all` loops per connection, to tell what
// tokio costs per request from what raftlb's own relay adds. To build it, copy it to
// examples/ and run `cargo build --release --example tokio_relay`; then
//   tokio_relay LISTEN_PORT BACKEND_PORT   (one worker; CURRENT=1: current-thread)
// docs/PERFORMANCE.md (eleventh session) has what it measured. Loopback only.
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen: u16 = args[1].parse().expect("LISTEN_PORT");
    let backend: u16 = args[2].parse().expect("BACKEND_PORT");
    let rt = if std::env::var("CURRENT").is_ok() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()
    }
    .expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(("127.0.0.1", listen)).await.expect("bind");
        loop {
            let Ok((c, _)) = l.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(b) = TcpStream::connect(("127.0.0.1", backend)).await else { return };
                let _ = (c.set_nodelay(true), b.set_nodelay(true));
                let (mut cr, mut cw) = c.into_split();
                let (mut br, mut bw) = b.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if bw.write_all(&buf[..n]).await.is_err() { return; }
                    }
                    let _ = bw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 16384];
                    while let Ok(n @ 1..) = br.read(&mut buf).await {
                        if cw.write_all(&buf[..n]).await.is_err() { return; }
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
}
