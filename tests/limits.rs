//! Open-files limits: raftlb raises its soft limit to the hard one, and when it runs
//! out of descriptors its accept loop backs off instead of spinning, then recovers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_backs_off_and_recovers() {
    raise_nofile();
    let backend = echo_backend().await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    // max_connections well above what 128 descriptors allow, so accept() hits EMFILE first.
    let yaml = Raftlb::standalone_yaml(
        admin,
        listen,
        "",
        "    max_connections: 1000\n",
        &[("echo", backend)],
    );
    let mut lb =
        blocking(|| Raftlb::start_wrapped(&["prlimit", "--nofile=128:128", "--"], &yaml, admin));
    assert!(
        lb.log().contains("open_files=128"),
        "the limit in force is logged:\n{}",
        lb.log()
    );

    // Each proxied connection holds two descriptors: 80 connections need 160 > 128.
    let mut held = Vec::new();
    for _ in 0..80 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(listen)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    assert!(
        common::eventually(Duration::from_secs(10), || lb.log().contains("backing off")),
        "accept never hit the descriptor limit:\n{}",
        lb.log()
    );
    let before = cpu_seconds(lb.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(lb.pid()) - before;
    assert!(
        used < 1.0,
        "accept loop spun while out of descriptors: {used:.2} CPU seconds in 2 s"
    );
    assert!(
        !lb.log().contains("backend is down"),
        "a descriptor shortage in raftlb was blamed on the backend:\n{}",
        lb.log()
    );
    assert!(
        lb.child.try_wait().expect("try_wait").is_none(),
        "raftlb died:\n{}",
        lb.log()
    );

    drop(held);
    // Once descriptors return, new connections are served again.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(listen)).await
        else {
            continue;
        };
        let mut buf = [0u8; 5];
        let exchange = async {
            s.write_all(b"hello").await?;
            s.read_exact(&mut buf).await
        };
        if matches!(
            tokio::time::timeout(Duration::from_secs(3), exchange).await,
            Ok(Ok(_))
        ) && &buf == b"hello"
        {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "raftlb did not recover after descriptors were released:\n{}",
        lb.log()
    );
}
