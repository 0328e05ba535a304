//! The network-namespace topology that VIP and failover tests build on
//! (tests/common/netns.rs): every namespace reaches the others over the bridge on IPv4
//! and IPv6, and the partition helpers cut exactly what they say.

mod common;

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::netns::{Netns, Topology};

const PORT: u16 = 7000;

/// Whether `from` completes a TCP handshake with `to` within a second.
fn connects(from: &Netns, to: IpAddr) -> bool {
    from.run_inside(|| {
        TcpStream::connect_timeout(&SocketAddr::new(to, PORT), Duration::from_secs(1)).is_ok()
    })
}

#[test]
fn namespaces_reach_each_other_until_partitioned() {
    let topo = Topology::builder().replicas(2).build();
    let (a, b, client) = (topo.replica(0), topo.replica(1), topo.client());
    assert_eq!(a.ipv4.to_string(), "192.0.2.11");
    assert_eq!(b.ipv6.to_string(), "2001:db8::12");
    assert_eq!(topo.backends().ipv4.to_string(), "192.0.2.200");
    for ip in [IpAddr::V4(a.ipv4), IpAddr::V6(a.ipv6)] {
        // A socket belongs to the namespace it was made in, whichever thread uses it later.
        let _listener = a
            .run_inside(|| TcpListener::bind((ip, PORT)))
            .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        assert!(connects(client, ip), "client -> {ip}");
        assert!(connects(b, ip), "replica 2 -> {ip}");

        a.partition();
        assert!(!connects(client, ip), "client -> {ip} while partitioned");
        assert!(!connects(b, ip), "replica 2 -> {ip} while partitioned");
        a.heal();
        assert!(connects(client, ip), "client -> {ip} healed");

        let client_ip = if ip.is_ipv4() {
            IpAddr::V4(client.ipv4)
        } else {
            IpAddr::V6(client.ipv6)
        };
        a.block(client_ip);
        assert!(!connects(client, ip), "client -> {ip} blocked");
        assert!(connects(b, ip), "replica 2 -> {ip} not blocked");
        a.heal();
    }
}

#[test]
fn processes_run_inside_and_die_with_the_topology() {
    let topo = Topology::builder().replicas(1).build();
    let r = topo.replica(0);
    let shown = r.exec_ok(&["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        shown.contains("192.0.2.11/24") && shown.contains("2001:db8::11/64"),
        "{shown}"
    );
    assert!(
        !shown.contains("tentative"),
        "no duplicate address detection: {shown}"
    );
    assert!(r.has_addr(IpAddr::V4(r.ipv4)));
    assert!(!r.has_addr(IpAddr::V4(topo.client().ipv4)));

    let mut sleeper = r.spawn(&["sleep", "30"]);
    let names: Vec<String> = [
        r.name.clone(),
        topo.client().name.clone(),
        topo.bridge().to_string(),
    ]
    .into();
    drop(topo);
    assert!(
        common::eventually(Duration::from_secs(5), || matches!(
            sleeper.try_wait(),
            Ok(Some(_))
        )),
        "a process inside outlived the topology"
    );
    let left = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    for name in names {
        assert!(!left.contains(&name), "{name} is still there:\n{left}");
    }
}
