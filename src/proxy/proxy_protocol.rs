//! PROXY protocol headers (v1 text, v2 binary) towards backends, built with `ppp`.

use std::net::SocketAddr;

use ppp::v2;

use crate::config::schema::ProxyProtocol;

/// The header that tells the backend who the client is: `client` connected to `local`.
pub fn header(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
) -> std::io::Result<Option<Vec<u8>>> {
    let addrs = (unmap(client), unmap(local));
    match version {
        ProxyProtocol::Off => Ok(None),
        ProxyProtocol::V1 => Ok(Some(
            ppp::v1::Addresses::from(addrs).to_string().into_bytes(),
        )),
        ProxyProtocol::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            addrs,
        )
        .build()
        .map(Some),
    }
}

/// The header of a connection the proxy makes for itself, a health check: v1
/// `PROXY UNKNOWN`, v2 the LOCAL command, which tell the backend to use the
/// connection's own addresses (as HAProxy sends on checks to a `send-proxy` server).
pub fn local_header(version: ProxyProtocol) -> std::io::Result<Option<Vec<u8>>> {
    match version {
        ProxyProtocol::Off => Ok(None),
        ProxyProtocol::V1 => Ok(Some(ppp::v1::Addresses::Unknown.to_string().into_bytes())),
        ProxyProtocol::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Unspecified,
            v2::Addresses::Unspecified,
        )
        .build()
        .map(Some),
    }
}

/// An IPv4 client on a dual-stack socket shows as `::ffff:a.b.c.d`; send it as IPv4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_headers_parse_back() {
        let client: SocketAddr = "192.0.2.7:51000".parse().expect("addr");
        let local: SocketAddr = "198.18.0.1:6443".parse().expect("addr");
        let v1 = header(ProxyProtocol::V1, client, local)
            .expect("v1")
            .expect("some");
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 198.18.0.1 51000 6443\r\n");
        let v2 = header(ProxyProtocol::V2, client, local)
            .expect("v2")
            .expect("some");
        let parsed = v2::Header::try_from(&v2[..]).expect("a valid v2 header");
        assert_eq!(parsed.addresses, v2::Addresses::from((client, local)));
        assert_eq!(
            header(ProxyProtocol::Off, client, local).expect("off"),
            None
        );
        assert_eq!(
            local_header(ProxyProtocol::V1).expect("v1").as_deref(),
            Some(&b"PROXY UNKNOWN\r\n"[..])
        );
        let own = local_header(ProxyProtocol::V2).expect("v2").expect("some");
        let parsed = v2::Header::try_from(&own[..]).expect("a valid v2 header");
        assert_eq!(parsed.command, v2::Command::Local);
        assert_eq!(parsed.addresses, v2::Addresses::Unspecified);
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51000".parse().expect("addr");
        assert_eq!(
            header(ProxyProtocol::V1, mapped, local).expect("v1"),
            Some(v1)
        );
    }
}
