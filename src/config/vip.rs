//! What a virtual IP may be: its address, its interface's name, and the lifetime the
//! kernel gives it. Pure rules, shared by the config's checks and the election's VIP.

use std::net::IpAddr;
use std::time::Duration;

/// The lifetime to give the address on a refresh: the whole seconds left until the
/// renew deadline, at least one (the kernel counts in seconds, and 0 would be "gone").
pub fn lifetime(until_deadline: Duration) -> Duration {
    Duration::from_secs(until_deadline.as_secs().max(1))
}

/// Parses `IP/prefix` as the config writes it (see [`check_address`]).
pub fn parse_address(value: &str) -> Result<(IpAddr, u8), String> {
    let bad = || "is not IP/prefix, e.g. 10.0.0.100/24 or 2001:db8::100/64".to_string();
    let (ip, prefix) = value.trim().split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    check_address(ip, prefix)?;
    Ok((ip, prefix))
}

/// A VIP is a unicast address other hosts can reach (not loopback, unspecified,
/// multicast, broadcast or link-local) with a prefix that fits its family.
pub fn check_address(ip: IpAddr, prefix: u8) -> Result<(), String> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("has prefix /{prefix}: use /0 to /{max}"));
    }
    let (link_local, broadcast) = match ip {
        IpAddr::V4(v4) => (v4.is_link_local(), v4.is_broadcast()),
        IpAddr::V6(v6) => (v6.is_unicast_link_local(), false),
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || link_local || broadcast {
        return Err(
            "is not a unicast address other hosts can reach: use the address clients connect to"
                .into(),
        );
    }
    Ok(())
}

/// A name the kernel accepts for an interface (IFNAMSIZ - 1 characters) and that no
/// command reads as an option.
pub fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | ':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetime_is_whole_seconds_left_and_at_least_one() {
        assert_eq!(lifetime(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(lifetime(Duration::from_millis(999)), Duration::from_secs(1));
        assert_eq!(
            lifetime(Duration::from_millis(1000)),
            Duration::from_secs(1)
        );
        assert_eq!(
            lifetime(Duration::from_millis(1999)),
            Duration::from_secs(1)
        );
        assert_eq!(
            lifetime(Duration::from_millis(2000)),
            Duration::from_secs(2)
        );
        assert_eq!(
            lifetime(Duration::from_millis(9_750)),
            Duration::from_secs(9)
        );
        assert_eq!(lifetime(Duration::from_secs(10)), Duration::from_secs(10));
    }

    #[test]
    fn addresses_parse_with_their_prefix() {
        assert_eq!(
            parse_address("10.0.0.100/24"),
            Ok(("10.0.0.100".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_address("2001:db8::50/64"),
            Ok(("2001:db8::50".parse().unwrap(), 64))
        );
        for bad in [
            "10.0.0.100",
            "10.0.0.100/33",
            "2001:db8::50/129",
            "10.0.0/24",
            "x/24",
            "10.0.0.100/-1",
            "0.0.0.0/0",
            "127.0.0.1/8",
            "::1/128",
            "224.0.0.1/24",
            "ff02::1/64",
            "fe80::1/64",
            "169.254.1.1/16",
            "255.255.255.255/32",
        ] {
            assert!(parse_address(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn interface_names_are_what_the_kernel_takes() {
        for good in [
            "eth0",
            "enp0s31f6",
            "br-lan",
            "bond0.100",
            "a23456789012345",
        ] {
            assert!(valid_interface(good), "{good}");
        }
        for bad in [
            "",
            "-eth0",
            "eth 0",
            "a/b",
            "eth0:1",
            "a234567890123456",
            "..",
        ] {
            assert!(!valid_interface(bad), "{bad:?}");
        }
    }
}
