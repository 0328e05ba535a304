//! Value types of the config file: durations and addresses. Each parses in its
//! `Deserialize`, so a bad value is reported by the YAML reader at its line and column.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written in humantime syntax: `500ms`, `2s`, `1m`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn ms(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

/// The longest duration a config takes (`check` and writes refuse more): every
/// setting is a timeout, an interval or a lease, for which more than a year is a
/// typo. Parsing does not refuse it, so stored state always decodes.
pub const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| format!("invalid duration {s:?}: {e} (write e.g. 500ms, 2s, 1m, 1h)"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&humantime::format_duration(self.0), f)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A socket address to bind: `IP:port` or `[IPv6]:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BindAddr(pub SocketAddr);

impl FromStr for BindAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        // Port 0 would bind wherever the kernel chooses: nobody could reach it.
        match s.trim().parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(BindAddr(addr)),
            _ => Err(format!(
                "invalid address {s:?}: expected IP:port or [IPv6]:port with a port of 1-65535, e.g. 0.0.0.0:6443"
            )),
        }
    }
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for BindAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for BindAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A backend address: `IP:port`, `[IPv6]:port` or `hostname:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPort {
    Ip(SocketAddr),
    Name(String, u16),
}

impl HostPort {
    /// The host part: the IP as text, or the hostname (for TLS server names).
    pub fn host(&self) -> String {
        match self {
            HostPort::Ip(a) => a.ip().to_string(),
            HostPort::Name(h, _) => h.clone(),
        }
    }

    /// The same address, whatever the spelling (an IPv4-mapped IPv6 address is its
    /// IPv4 one; hostnames are compared as written, lower-cased).
    pub fn same_as(&self, other: &HostPort) -> bool {
        match (self, other) {
            (HostPort::Ip(a), HostPort::Ip(b)) => {
                a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
            }
            (HostPort::Name(a, p), HostPort::Name(b, q)) => a == b && p == q,
            _ => false,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            HostPort::Ip(a) => a.port(),
            HostPort::Name(_, port) => *port,
        }
    }

    /// The literal socket address, if this is not a hostname.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            HostPort::Ip(a) => Some(*a),
            HostPort::Name(..) => None,
        }
    }
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "invalid address {s:?}: expected IP:port, [IPv6]:port or hostname:port with a port of 1-65535, e.g. 10.0.0.11:6443"
            )
        };
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return if addr.port() == 0 {
                Err(bad())
            } else {
                Ok(HostPort::Ip(addr))
            };
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host.parse::<IpAddr>().is_err()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !valid_host || port == 0 {
            return Err(bad());
        }
        Ok(HostPort::Name(host.to_ascii_lowercase(), port))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPort::Ip(a) => fmt::Display::fmt(a, f),
            HostPort::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_humantime_syntax() {
        assert_eq!("500ms".parse::<Dur>(), Ok(Dur::ms(500)));
        assert_eq!("2s".parse::<Dur>(), Ok(Dur::secs(2)));
        assert_eq!("1m".parse::<Dur>(), Ok(Dur::secs(60)));
        assert!("2 parsecs".parse::<Dur>().is_err());
        assert!("".parse::<Dur>().is_err());
        assert_eq!(Dur::ms(1500).to_string(), "1s 500ms");
    }

    #[test]
    fn a_duration_over_the_cap_still_parses_so_stored_state_decodes() {
        // `check` and writes refuse it (validate); a store or backup holding one
        // from before the cap must still load.
        let long: Dur = serde_json::from_str("\"2y\"").expect("parses");
        assert!(long.get() > LONGEST);
        assert!("1y".parse::<Dur>().is_ok_and(|d| d.get() <= LONGEST));
    }

    #[test]
    fn backend_addresses_accept_ip_ipv6_and_hostnames() {
        assert!(matches!("10.0.0.1:6443".parse(), Ok(HostPort::Ip(_))));
        assert!(matches!("[::1]:6443".parse(), Ok(HostPort::Ip(_))));
        assert_eq!(
            "Master-1.example:6443".parse::<HostPort>(),
            Ok(HostPort::Name("master-1.example".into(), 6443))
        );
        for bad in [
            "10.0.0.1",
            "host:",
            ":80",
            "host:99999",
            "a b:80",
            "-x:80",
            "::1:80x",
            "h:0",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad} should not parse");
        }
    }
}
