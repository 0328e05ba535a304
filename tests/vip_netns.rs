//! The VIP module against real interfaces in network namespaces (tests/common/netns.rs):
//! the address comes with a kernel lifetime that a refresh extends and that the kernel
//! enforces by itself, announcements override a client's stale neighbour entry (the
//! previous holder's MAC), and the interface's state is read right. The VIP code runs
//! on a thread inside the replica's namespace; the checks look from outside.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::eventually;
use common::netns::{Netns, Topology};
use raftlb::election::vip::Vip;

/// The MAC the client believes the VIP has before the announcement: another holder's.
const PREVIOUS_HOLDER_MAC: &str = "02:00:00:00:00:99";

fn vip(ip: &str, prefix: u8) -> Vip {
    Vip::new(ip.parse().expect("VIP literal"), prefix, "eth0").expect("valid VIP")
}

/// The whole life of a VIP on replica 1 with `lifetime` (2 s): add, announce, refresh,
/// expire, add again, remove. Returns how long after the last refresh the kernel
/// deleted it.
fn lifecycle(topo: &Topology, vip: &Vip) -> Duration {
    let (replica, client) = (topo.replica(0), topo.client());
    let ip = vip.ip();
    let lifetime = Duration::from_secs(2);
    client.set_neighbour(ip, PREVIOUS_HOLDER_MAC);

    replica.block_on(|| async {
        assert!(!vip.is_present().await.expect("state"), "not there yet");
        assert!(
            vip.add_or_refresh(lifetime).await.expect("add"),
            "an absent address reports true"
        );
        let state = vip.state().await.expect("state").expect("present");
        let valid = state.valid_lft.expect("a lifetime, not forever");
        assert!(
            valid <= lifetime && valid >= Duration::from_secs(1),
            "{state:?}"
        );
        assert!(
            state.preferred_lft.is_some_and(|p| p <= lifetime),
            "{state:?}"
        );
        assert!(!state.tentative, "usable at once: {state:?}");
        assert!(
            !vip.add_or_refresh(lifetime).await.expect("refresh"),
            "a present address reports false"
        );
        vip.announce().await.expect("announce");
    });
    assert!(replica.has_addr(ip));
    let mac = replica.mac();
    assert!(
        eventually(Duration::from_secs(3), || client.neighbour(ip).as_deref()
            == Some(&mac)),
        "the client's neighbour entry for {ip} is {:?}, not the replica's {mac}: the announcement did not override {PREVIOUS_HOLDER_MAC}",
        client.neighbour(ip)
    );

    // Refreshed every 500 ms for longer than two lifetimes: it never goes away.
    let last_refresh = replica.block_on(|| async {
        let until = Instant::now() + lifetime * 2 + Duration::from_millis(500);
        let mut last = Instant::now();
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                vip.is_present().await.expect("state"),
                "lost while refreshed"
            );
            last = Instant::now();
            assert!(
                !vip.add_or_refresh(lifetime).await.expect("refresh"),
                "refreshed before it lapsed, so it was present"
            );
        }
        last
    });

    // No more refreshes: the kernel deletes it on its own, about when the lifetime ends.
    let gone = eventually(lifetime + Duration::from_secs(4), || !replica.has_addr(ip));
    let after = last_refresh.elapsed();
    assert!(gone, "{vip} still present {after:?} after its last refresh");
    assert!(
        after <= lifetime + Duration::from_millis(2_500),
        "{vip} outlived its {lifetime:?} lifetime by too much: gone {after:?} after the last refresh"
    );
    assert!(
        after >= lifetime - Duration::from_millis(500),
        "{vip} went away {after:?} after a refresh to {lifetime:?}"
    );

    replica.block_on(|| async {
        assert!(
            vip.add_or_refresh(lifetime).await.expect("add again"),
            "an expired address reports true (a re-add)"
        );
        vip.remove().await.expect("remove");
        assert!(!vip.is_present().await.expect("state"));
        vip.remove().await.expect("removing an absent VIP is fine");
    });
    assert!(!replica.has_addr(ip));
    after
}

#[test]
fn ipv4_vip_is_announced_refreshed_and_expires_by_itself() {
    let topo = Topology::builder().replicas(1).build();
    let after = lifecycle(&topo, &vip("192.0.2.50", 24));
    eprintln!(
        "IPv4 VIP with a 2 s lifetime: the kernel deleted it {after:?} after the last refresh"
    );
}

#[test]
fn ipv6_vip_is_usable_at_once_announced_refreshed_and_expires_by_itself() {
    let topo = Topology::builder().replicas(1).build();
    // Duplicate address detection on, as on a real host: without `nodad` the VIP would
    // be tentative (unusable) for a second.
    topo.replica(0).sysctl("net/ipv6/conf/eth0/accept_dad", "1");
    let v = vip("2001:db8::50", 64);
    let ip = v.ip();
    topo.replica(0).block_on(|| async {
        v.add_or_refresh(Duration::from_secs(5)).await.expect("add");
        let bound = std::net::TcpListener::bind((ip, 0));
        assert!(bound.is_ok(), "cannot bind the new VIP: {bound:?}");
        v.remove().await.expect("remove");
    });
    let after = lifecycle(&topo, &v);
    eprintln!(
        "IPv6 VIP with a 2 s lifetime: the kernel deleted it {after:?} after the last refresh"
    );
}

#[test]
fn interface_up_follows_the_link_and_the_carrier() {
    let topo = Topology::builder().replicas(1).build();
    let replica = topo.replica(0);
    let up = |r: &Netns| r.block_on(|| async { vip("192.0.2.50", 24).interface_up().await });
    assert!(up(replica).expect("state"), "eth0 is up");
    replica.link_down();
    assert!(!up(replica).expect("state"), "`ip link set eth0 down`");
    replica.link_up();
    assert!(
        eventually(Duration::from_secs(3), || up(replica).expect("state")),
        "up again"
    );
    topo.unplug(replica);
    assert!(!up(replica).expect("state"), "no carrier");
    topo.plug(replica);
    assert!(
        eventually(Duration::from_secs(3), || up(replica).expect("state")),
        "carrier back"
    );
    let missing = replica.block_on(|| async {
        Vip::new("192.0.2.50".parse().expect("ip"), 24, "eth9")
            .expect("valid")
            .interface_up()
            .await
    });
    assert!(!missing.expect("a missing interface is down, not an error"));
}

#[test]
fn errors_name_the_address_the_interface_and_the_cause() {
    let topo = Topology::builder().replicas(1).build();
    let replica = topo.replica(0);
    let messages = replica.block_on(|| async {
        let wrong_if = Vip::new("192.0.2.50".parse().expect("ip"), 24, "eth9").expect("valid");
        let add = wrong_if.add_or_refresh(Duration::from_secs(2)).await;
        let v4 = vip("192.0.2.50", 24);
        let announce4 = v4.announce().await;
        let v6 = vip("2001:db8::50", 64);
        let announce6 = v6.announce().await;
        [add, announce4.map(|()| true), announce6.map(|()| true)]
            .map(|r| r.expect_err("must fail").to_string())
    });
    let [add, announce4, announce6] = messages;
    assert!(
        add.contains("192.0.2.50/24") && add.contains("eth9") && add.contains("does not exist"),
        "{add}"
    );
    assert!(
        announce4.contains("192.0.2.50/24")
            && announce4.contains("eth0")
            && announce4.contains("arping")
            && announce4.contains("Cannot assign requested address"),
        "announcing an address this host does not have: {announce4}"
    );
    assert!(
        announce6.contains("2001:db8::50/64")
            && announce6.contains("eth0")
            && announce6
                .to_lowercase()
                .contains("cannot assign requested address"),
        "{announce6}"
    );
    assert!(!replica.has_addr("192.0.2.50".parse::<IpAddr>().expect("ip")));
}
