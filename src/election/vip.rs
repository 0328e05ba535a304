//! The floating IP (SPEC.md, "VIP"; DESIGN-lease.md, "The VIP cannot outlive its holder").
//!
//! The address is added with a kernel lifetime that every winning renew refreshes, so a
//! holder that is killed, hangs or is paused loses it by itself. Addresses go through the
//! `ip` command (iproute2), SPEC's fallback for rtnetlink: one RTM_NEWADDR with
//! NLM_F_CREATE | NLM_F_REPLACE per refresh (`ip addr replace`). Announcements: IPv4 a
//! gratuitous ARP request through `arping -U` (iputils-arping); IPv6 an unsolicited
//! neighbour advertisement with the Override flag, written here on a raw ICMPv6 socket
//! (Debian ships no command for it: `ndsend` came with vzctl, which Debian dropped).
//! Everything here needs CAP_NET_ADMIN and CAP_NET_RAW; every command is killed after
//! [`COMMAND_TIMEOUT`].

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};
use std::num::NonZeroU32;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::process::Command;

use crate::config::schema;
use crate::config::vip::{check_address, parse_address, valid_interface};

/// How long one `ip` or `arping` run may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What `ip -j` prints for a lifetime of "forever".
const FOREVER: u64 = u32::MAX as u64;

/// The virtual IP of `leader_election.vip`: an address with its prefix, on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    ip: IpAddr,
    prefix: u8,
    interface: String,
}

/// The VIP as the kernel has it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipState {
    /// Seconds left before the kernel deletes the address; `None` for "forever".
    pub valid_lft: Option<Duration>,
    pub preferred_lft: Option<Duration>,
    /// IPv6 duplicate address detection still running (never with `nodad`).
    pub tentative: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("leader_election.vip.address: {value:?} {reason}")]
    BadAddress { value: String, reason: String },
    #[error(
        "leader_election.vip.interface: {value:?} is not an interface name: use 1-15 characters without spaces, '/' or ':', not starting with '-'"
    )]
    BadInterface { value: String },
    #[error("VIP {vip} on {interface}: cannot run `{command}`: {source}{hint}")]
    Spawn {
        vip: String,
        interface: String,
        command: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("VIP {vip} on {interface}: `{command}` did not finish within {timeout:?}; killed it")]
    Timeout {
        vip: String,
        interface: String,
        command: String,
        timeout: Duration,
    },
    #[error("VIP {vip} on {interface}: `{command}` failed ({status}): {stderr}{hint}")]
    Failed {
        vip: String,
        interface: String,
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
        hint: &'static str,
    },
    #[error("VIP {vip} on {interface}: cannot read what `{command}` printed: {reason}")]
    Output {
        vip: String,
        interface: String,
        command: String,
        reason: String,
    },
    #[error(
        "VIP {vip} on {interface}: cannot send the unsolicited neighbour advertisement: {source}{}",
        permission_hint(source.kind() == std::io::ErrorKind::PermissionDenied)
    )]
    Advertise {
        vip: String,
        interface: String,
        source: std::io::Error,
    },
}

fn permission_hint(denied: bool) -> &'static str {
    if denied {
        " (the VIP needs CAP_NET_ADMIN and CAP_NET_RAW: run as root or grant them, as packaging/raftlb.service does)"
    } else {
        ""
    }
}

impl Vip {
    pub fn new(ip: IpAddr, prefix: u8, interface: &str) -> Result<Vip, VipError> {
        check_address(ip, prefix).map_err(|reason| VipError::BadAddress {
            value: format!("{ip}/{prefix}"),
            reason,
        })?;
        if !valid_interface(interface) {
            return Err(VipError::BadInterface {
                value: interface.to_string(),
            });
        }
        Ok(Vip {
            ip,
            prefix,
            interface: interface.to_string(),
        })
    }

    pub fn from_config(v: &schema::Vip) -> Result<Vip, VipError> {
        let (ip, prefix) =
            parse_address(&v.address.value).map_err(|reason| VipError::BadAddress {
                value: v.address.value.clone(),
                reason,
            })?;
        Vip::new(ip, prefix, &v.interface)
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.ip, self.prefix)
    }

    /// Adds the address, or refreshes it, with valid_lft = preferred_lft = `lifetime` in
    /// whole seconds (at least 1): `ip addr replace` (NLM_F_CREATE | NLM_F_REPLACE), with
    /// `nodad` for IPv6 so it is usable at once. Returns whether the address was absent
    /// before (never added, expired or removed by someone), so the caller announces it
    /// again and counts a re-add. If it expires between the check and the replace, it is
    /// back at once and reported present: no one else held it meanwhile.
    pub async fn add_or_refresh(&self, lifetime: Duration) -> Result<bool, VipError> {
        let absent = !self.is_present().await?;
        self.run("ip", &self.replace_args(lifetime)).await?;
        Ok(absent)
    }

    fn replace_args(&self, lifetime: Duration) -> Vec<String> {
        let secs = lifetime.as_secs().clamp(1, FOREVER - 1).to_string();
        let cidr = self.cidr();
        let mut args = [
            "addr",
            "replace",
            &cidr,
            "dev",
            &self.interface,
            "valid_lft",
            &secs,
            "preferred_lft",
            &secs,
        ]
        .map(String::from)
        .to_vec();
        if self.ip.is_ipv6() {
            args.push("nodad".into());
        }
        args
    }

    /// Announces that this host now answers for the address, once: a gratuitous ARP
    /// request (IPv4; `arping` returns about a second after it sent the packet) or an
    /// unsolicited neighbour advertisement to all nodes with the Override flag (IPv6).
    /// The address must be present.
    pub async fn announce(&self) -> Result<(), VipError> {
        match self.ip {
            IpAddr::V4(ip) => {
                let args =
                    ["-U", "-c", "1", "-I", &self.interface, &ip.to_string()].map(String::from);
                self.run("arping", &args).await.map(drop)
            }
            IpAddr::V6(ip) => {
                let link = self.link().await?;
                let mac = link.address.as_deref().and_then(parse_mac);
                let ifindex = NonZeroU32::new(link.ifindex).ok_or_else(|| VipError::Output {
                    vip: self.cidr(),
                    interface: self.interface.clone(),
                    command: "ip -j link show".into(),
                    reason: "interface index 0".into(),
                })?;
                send_advertisement(ip, mac, ifindex).map_err(|source| VipError::Advertise {
                    vip: self.cidr(),
                    interface: self.interface.clone(),
                    source,
                })
            }
        }
    }

    /// Removes the address at once (stepping down, or a VIP this replica does not own at
    /// start). An address that is not there is fine.
    pub async fn remove(&self) -> Result<(), VipError> {
        let args = ["addr", "del", &self.cidr(), "dev", &self.interface].map(String::from);
        match self.run("ip", &args).await {
            Ok(_) => Ok(()),
            Err(e) => match self.is_present().await {
                Ok(false) => Ok(()),
                _ => Err(e),
            },
        }
    }

    pub async fn is_present(&self) -> Result<bool, VipError> {
        Ok(self.state().await?.is_some())
    }

    /// The address's lifetimes and flags, or `None` if the interface does not have it.
    pub async fn state(&self) -> Result<Option<VipState>, VipError> {
        let args = ["-j", "addr", "show", "dev", &self.interface].map(String::from);
        let out = self.run("ip", &args).await?;
        let links = self.parse_links(&out, "ip -j addr show")?;
        Ok(find_address(&links, self.ip, self.prefix))
    }

    /// Whether the interface is administratively up and has a carrier (UP and LOWER_UP,
    /// as keepalived checks). A missing interface is down. Rule 7: an active whose VIP
    /// interface goes down gives the lease up.
    pub async fn interface_up(&self) -> Result<bool, VipError> {
        match self.link().await {
            Ok(link) => Ok(["UP", "LOWER_UP"]
                .iter()
                .all(|f| link.flags.iter().any(|g| g == f))),
            Err(VipError::Failed { stderr, .. }) if stderr.contains("does not exist") => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn link(&self) -> Result<Link, VipError> {
        let args = ["-j", "link", "show", "dev", &self.interface].map(String::from);
        let out = self.run("ip", &args).await?;
        self.parse_links(&out, "ip -j link show")?
            .into_iter()
            .next()
            .ok_or_else(|| VipError::Output {
                vip: self.cidr(),
                interface: self.interface.clone(),
                command: "ip -j link show".into(),
                reason: "no interface in the answer".into(),
            })
    }

    fn parse_links(&self, json: &[u8], command: &str) -> Result<Vec<Link>, VipError> {
        serde_json::from_slice(json).map_err(|e| VipError::Output {
            vip: self.cidr(),
            interface: self.interface.clone(),
            command: command.into(),
            reason: e.to_string(),
        })
    }

    /// Runs `program args` with C messages and a bounded time; its stdout on success.
    async fn run(&self, program: &'static str, args: &[String]) -> Result<Vec<u8>, VipError> {
        let command = std::iter::once(program)
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let child = Command::new(program)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| VipError::Spawn {
                vip: self.cidr(),
                interface: self.interface.clone(),
                command: command.clone(),
                hint: if source.kind() == std::io::ErrorKind::NotFound {
                    match program {
                        "arping" => " (install iputils-arping)",
                        _ => " (install iproute2)",
                    }
                } else {
                    ""
                },
                source,
            })?;
        // Dropping the future on timeout drops the child, which kills it (kill_on_drop).
        match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
            Err(_) => Err(VipError::Timeout {
                vip: self.cidr(),
                interface: self.interface.clone(),
                command,
                timeout: COMMAND_TIMEOUT,
            }),
            Ok(Err(source)) => Err(VipError::Spawn {
                vip: self.cidr(),
                interface: self.interface.clone(),
                command,
                source,
                hint: "",
            }),
            Ok(Ok(out)) if out.status.success() => Ok(out.stdout),
            Ok(Ok(out)) => {
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                Err(VipError::Failed {
                    vip: self.cidr(),
                    interface: self.interface.clone(),
                    command,
                    status: out.status,
                    hint: permission_hint(stderr.contains("Operation not permitted")),
                    stderr,
                })
            }
        }
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} on {}", self.ip, self.prefix, self.interface)
    }
}

/// One interface as `ip -j link show` / `ip -j addr show` print it (only what we read).
#[derive(Debug, Deserialize)]
struct Link {
    ifindex: u32,
    #[serde(default)]
    flags: Vec<String>,
    /// The MAC address; absent on interfaces without one.
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    local: Option<String>,
    #[serde(default)]
    prefixlen: Option<u8>,
    #[serde(default)]
    valid_life_time: Option<u64>,
    #[serde(default)]
    preferred_life_time: Option<u64>,
    #[serde(default)]
    tentative: bool,
}

fn find_address(links: &[Link], ip: IpAddr, prefix: u8) -> Option<VipState> {
    let secs = |s: Option<u64>| s.filter(|&s| s < FOREVER).map(Duration::from_secs);
    links
        .iter()
        .flat_map(|l| &l.addr_info)
        .find(|a| {
            a.prefixlen == Some(prefix)
                && a.local.as_deref().and_then(|s| s.parse::<IpAddr>().ok()) == Some(ip)
        })
        .map(|a| VipState {
            valid_lft: secs(a.valid_life_time),
            preferred_lft: secs(a.preferred_life_time),
            tentative: a.tentative,
        })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// An ICMPv6 neighbour advertisement for `target` (RFC 4861, 4.4): not a router, not
/// solicited, Override set, with the Target Link-Layer Address option when there is a
/// MAC. The kernel fills in the checksum on an ICMPv6 raw socket.
fn neighbour_advertisement(target: Ipv6Addr, mac: Option<[u8; 6]>) -> Vec<u8> {
    const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
    const OVERRIDE: u8 = 0x20;
    const TARGET_LINK_LAYER_ADDRESS: u8 = 2;
    let mut packet = vec![NEIGHBOUR_ADVERTISEMENT, 0, 0, 0, OVERRIDE, 0, 0, 0];
    packet.extend_from_slice(&target.octets());
    if let Some(mac) = mac {
        // Option length counts units of 8 bytes: type, length and a 6-byte MAC.
        packet.extend_from_slice(&[TARGET_LINK_LAYER_ADDRESS, 1]);
        packet.extend_from_slice(&mac);
    }
    packet
}

/// Sends the advertisement from `target` itself (as the kernel's own unsolicited NAs
/// do) to all nodes (ff02::1) on the interface, hop limit 255 as receivers require.
fn send_advertisement(
    target: Ipv6Addr,
    mac: Option<[u8; 6]>,
    ifindex: NonZeroU32,
) -> std::io::Result<()> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.set_nonblocking(true)?;
    socket.bind_device_by_index_v6(Some(ifindex))?;
    socket.set_multicast_if_v6(ifindex.get())?;
    socket.set_multicast_hops_v6(255)?;
    socket.set_multicast_loop_v6(false)?;
    socket.bind(&SockAddr::from(SocketAddrV6::new(target, 0, 0, 0)))?;
    let all_nodes = SocketAddrV6::new(
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        0,
        0,
        ifindex.get(),
    );
    let packet = neighbour_advertisement(target, mac);
    let sent = socket.send_to(&packet, &SockAddr::from(all_nodes))?;
    if sent != packet.len() {
        return Err(std::io::Error::other(format!(
            "sent {sent} of {} bytes",
            packet.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_config_names_the_field_and_value() {
        let cfg = |address: &str, interface: &str| schema::Vip {
            address: schema::unplaced(address.into()),
            interface: interface.into(),
        };
        let vip = Vip::from_config(&cfg("192.0.2.50/24", "eth0")).expect("valid");
        assert_eq!(vip.to_string(), "192.0.2.50/24 on eth0");
        let e = Vip::from_config(&cfg("192.0.2.50", "eth0")).expect_err("no prefix");
        assert!(
            e.to_string().contains("leader_election.vip.address")
                && e.to_string().contains("192.0.2.50"),
            "{e}"
        );
        let e = Vip::from_config(&cfg("192.0.2.50/24", "eth 0")).expect_err("space");
        assert!(
            e.to_string().contains("leader_election.vip.interface"),
            "{e}"
        );
    }

    #[test]
    fn refresh_replaces_with_the_lifetime_and_nodad_for_ipv6() {
        let v4 = Vip::new("192.0.2.50".parse().unwrap(), 24, "eth0").unwrap();
        assert_eq!(
            v4.replace_args(Duration::from_millis(2_900)).join(" "),
            "addr replace 192.0.2.50/24 dev eth0 valid_lft 2 preferred_lft 2"
        );
        assert_eq!(
            v4.replace_args(Duration::ZERO).join(" "),
            "addr replace 192.0.2.50/24 dev eth0 valid_lft 1 preferred_lft 1",
            "0 would mean gone"
        );
        let v6 = Vip::new("2001:db8::50".parse().unwrap(), 64, "eth0").unwrap();
        assert_eq!(
            v6.replace_args(Duration::from_secs(10)).join(" "),
            "addr replace 2001:db8::50/64 dev eth0 valid_lft 10 preferred_lft 10 nodad"
        );
    }

    #[test]
    fn reads_the_address_from_ip_json() {
        let json = br#"[{"ifindex":2,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],
            "address":"02:d2:05:f5:67:02","addr_info":[
            {"family":"inet","local":"192.0.2.11","prefixlen":24,"valid_life_time":4294967295,"preferred_life_time":4294967295},
            {"family":"inet","local":"192.0.2.50","prefixlen":24,"secondary":true,"dynamic":true,"valid_life_time":2,"preferred_life_time":2},
            {"family":"inet6","local":"2001:db8::50","prefixlen":64,"tentative":true,"valid_life_time":5,"preferred_life_time":4}]}]"#;
        let links: Vec<Link> = serde_json::from_slice(json).expect("parse");
        assert_eq!(
            find_address(&links, "192.0.2.50".parse().unwrap(), 24),
            Some(VipState {
                valid_lft: Some(Duration::from_secs(2)),
                preferred_lft: Some(Duration::from_secs(2)),
                tentative: false
            })
        );
        assert_eq!(
            find_address(&links, "192.0.2.11".parse().unwrap(), 24).map(|s| s.valid_lft),
            Some(None),
            "forever"
        );
        assert!(find_address(&links, "192.0.2.50".parse().unwrap(), 32).is_none());
        assert!(find_address(&links, "192.0.2.51".parse().unwrap(), 24).is_none());
        let v6 = find_address(&links, "2001:db8::50".parse().unwrap(), 64).expect("v6");
        assert!(v6.tentative);
        assert_eq!(
            links[0].address.as_deref().and_then(parse_mac),
            Some([0x02, 0xd2, 0x05, 0xf5, 0x67, 0x02])
        );
        assert_eq!(parse_mac("02:d2:05:f5:67"), None);
        assert_eq!(parse_mac("02:d2:05:f5:67:02:03"), None);
    }

    #[test]
    fn advertisement_has_override_and_the_target_mac() {
        let target: Ipv6Addr = "2001:db8::50".parse().unwrap();
        let p = neighbour_advertisement(target, Some([2, 0, 0, 0, 0, 0x11]));
        assert_eq!(p.len(), 32);
        assert_eq!(p[0], 136, "type: neighbour advertisement");
        assert_eq!(
            p[4] & 0xe0,
            0x20,
            "Override set; Router and Solicited clear"
        );
        assert_eq!(&p[8..24], &target.octets());
        assert_eq!(&p[24..32], &[2, 1, 2, 0, 0, 0, 0, 0x11]);
        assert_eq!(neighbour_advertisement(target, None).len(), 24);
    }
}
