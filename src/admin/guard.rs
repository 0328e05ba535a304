//! Who may call the admin API, checked before routing: the token (`admin.token_file`)
//! and, on writes, the checks that keep a web page open in an operator's browser from
//! changing anything (cross-site request forgery): a write needs the bearer token,
//! comes from no other site, and carries no body an HTML form can send.

use base64::Engine as _;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, ORIGIN, WWW_AUTHENTICATE};
use hyper::{Method, Request, StatusCode};

use super::{Reply, error};

const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// The content types a plain HTML form (or a `no-cors` fetch) sends cross-site
/// without a CORS preflight.
const FORM_CONTENT_TYPES: [&str; 3] = [
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "text/plain",
];

/// Why a request was refused before it reached its endpoint; it changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("missing or wrong token: send Authorization: Bearer <token> (admin.token_file)")]
    Unauthorized,
    #[error(
        "{method} needs Authorization: Bearer <token> (raftlb ctl sends it): basic auth is accepted for reads only, because a browser resends it by itself, from other sites too"
    )]
    BasicAuthOnWrite { method: Method },
    #[error(
        "Sec-Fetch-Site: {value}: a write from another site is refused (cross-site request forgery); use raftlb ctl or another client that is not a web page"
    )]
    CrossSiteFetch { value: String },
    #[error(
        "Origin: {origin} is not this server ({host}): a write from another origin is refused (cross-site request forgery); use raftlb ctl or another client that is not a web page"
    )]
    CrossOrigin { origin: String, host: String },
    #[error(
        "Host: {host} is not a name of this loopback server (refused: a web page using DNS rebinding would send that): over loopback use 127.0.0.1, [::1], localhost or this machine's hostname"
    )]
    ForeignHost { host: String },
    #[error(
        "Content-Type: {content_type} is what an HTML form sends, refused on writes (cross-site request forgery): send {wanted}"
    )]
    FormContentType {
        content_type: String,
        wanted: &'static str,
    },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthorized | Refusal::BasicAuthOnWrite { .. } => StatusCode::UNAUTHORIZED,
            Refusal::CrossSiteFetch { .. }
            | Refusal::CrossOrigin { .. }
            | Refusal::ForeignHost { .. } => StatusCode::FORBIDDEN,
            Refusal::FormContentType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// `{"error": ...}` with the status; a 401 says which scheme to use (Basic lets a
    /// browser ask for the token on reads; a write is never answered with a login prompt).
    pub fn reply(&self) -> Reply {
        let mut reply = error(self.status(), &self.to_string());
        let challenge = match self {
            Refusal::Unauthorized => "Basic realm=\"raftlb\"",
            Refusal::BasicAuthOnWrite { .. } => "Bearer realm=\"raftlb\"",
            _ => return reply,
        };
        reply
            .headers_mut()
            .insert(WWW_AUTHENTICATE, challenge.parse().expect("static header"));
        reply
    }
}

/// Admits `req` or says why not. `token` is `admin.token_file`'s token, `None` when
/// there is none. `local`: the request came over loopback, where only an address,
/// `localhost` or the machine's hostname names this server: a page whose own name
/// was made to resolve to 127.0.0.1 (DNS rebinding) is same-origin to the browser,
/// but not in `Host`.
pub fn check<B>(token: Option<&str>, req: &Request<B>, local: bool) -> Result<(), Refusal> {
    if local {
        loopback_host(req)?;
    }
    let write = !is_safe(req.method());
    if write {
        same_origin(req)?;
    }
    if let Some(token) = token {
        authorize(token, req, write)?;
    }
    if write {
        no_form_body(req)?;
    }
    Ok(())
}

/// Methods that change nothing (RFC 9110 §9.2.1).
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The bearer token for everything; the token as the password of basic auth for
/// reads only (so a browser can open the API, but cannot be made to write with it).
fn authorize<B>(token: &str, req: &Request<B>, write: bool) -> Result<(), Refusal> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or(Refusal::Unauthorized)?;
    // The scheme's name is case-insensitive (RFC 9110 §11.1).
    let (scheme, credentials) = header.split_once(' ').ok_or(Refusal::Unauthorized)?;
    if scheme.eq_ignore_ascii_case("bearer") {
        if constant_time_eq(credentials.trim().as_bytes(), token.as_bytes()) {
            return Ok(());
        }
        return Err(Refusal::Unauthorized);
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Refusal::Unauthorized);
    }
    let basic = credentials;
    // A browser sends user:password; the token is the password, any user name.
    let pair = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .map_err(|_| Refusal::Unauthorized)?;
    let password = pair
        .splitn(2, |&b| b == b':')
        .nth(1)
        .ok_or(Refusal::Unauthorized)?;
    if !constant_time_eq(password, token.as_bytes()) {
        return Err(Refusal::Unauthorized);
    }
    if write {
        return Err(Refusal::BasicAuthOnWrite {
            method: req.method().clone(),
        });
    }
    Ok(())
}

/// A browser says where a request comes from: `Sec-Fetch-Site` (same-origin, or none
/// for one the user typed) and `Origin` (scheme://host:port of the page, or `null`),
/// which must name this server as the request's `Host` does.
fn same_origin<B>(req: &Request<B>) -> Result<(), Refusal> {
    for value in req.headers().get_all(SEC_FETCH_SITE) {
        let value = String::from_utf8_lossy(value.as_bytes()).trim().to_string();
        let site = value.to_ascii_lowercase();
        if site != "same-origin" && site != "none" {
            return Err(Refusal::CrossSiteFetch { value });
        }
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(str::trim);
    for origin in req.headers().get_all(ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes())
            .trim()
            .to_string();
        // `null` (a sandboxed frame, a file: page) has no authority: never this server.
        let authority = origin
            .split_once("://")
            .map(|(_, authority)| authority.trim_end_matches('/'));
        let same = matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h));
        if !same {
            return Err(Refusal::CrossOrigin {
                origin,
                host: host.unwrap_or("no Host header").to_string(),
            });
        }
    }
    Ok(())
}

/// Over loopback, `Host` is an IP address, `localhost` or this machine's hostname
/// (Debian resolves it to 127.0.1.1), any port, or absent (HTTP/1.0 clients).
fn loopback_host<B>(req: &Request<B>) -> Result<(), Refusal> {
    let Some(host) = req.headers().get(HOST) else {
        return Ok(());
    };
    let host = String::from_utf8_lossy(host.as_bytes()).trim().to_string();
    let name = match host.parse::<hyper::http::uri::Authority>() {
        Ok(a) => a
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        Err(_) => return Err(Refusal::ForeignHost { host }),
    };
    static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hostname = HOSTNAME.get_or_init(crate::config::hostname);
    if name.eq_ignore_ascii_case("localhost")
        || name.eq_ignore_ascii_case(hostname)
        || name.parse::<std::net::IpAddr>().is_ok()
    {
        return Ok(());
    }
    Err(Refusal::ForeignHost { host })
}

/// A write whose body an HTML form could have sent. No content type at all (a POST
/// without a body, like `ctl backend drain`) is fine.
fn no_form_body<B>(req: &Request<B>) -> Result<(), Refusal> {
    for value in req.headers().get_all(CONTENT_TYPE) {
        let content_type = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let essence = content_type
            .split_once(';')
            .map_or(content_type.as_str(), |(essence, _)| essence)
            .trim()
            .to_ascii_lowercase();
        if FORM_CONTENT_TYPES.contains(&essence.as_str()) {
            let wanted = if req.uri().path() == "/api/v1/config" {
                "JSON (Content-Type: application/json) or YAML (Content-Type: application/yaml)"
            } else {
                "JSON (Content-Type: application/json), or no body and no Content-Type"
            };
            return Err(Refusal::FormContentType {
                content_type,
                wanted,
            });
        }
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret";

    fn request(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "127.0.0.1:9090");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request")
    }

    fn basic(user_password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    }

    const DRAIN: &str = "/api/v1/pools/web/backends/a/drain";

    #[test]
    fn over_loopback_only_addresses_and_localhost_name_this_server() {
        for (host, admitted) in [
            ("127.0.0.1:9090", true),
            ("[::1]:9090", true),
            ("localhost:9090", true),
            ("LOCALHOST", true),
            (&format!("{}:9090", crate::config::hostname()), true),
            ("10.0.0.1:9090", true),
            ("evil.example:9090", false),
            ("localhost.evil.example:9090", false),
            ("not a host", false),
        ] {
            let req = Request::builder()
                .method(Method::GET)
                .uri("/api/v1/status")
                .header(HOST, host)
                .body(())
                .expect("request");
            let checked = check(None, &req, true);
            assert_eq!(checked.is_ok(), admitted, "{host}: {checked:?}");
            // Reached over another address, a name is how operators call it.
            assert!(check(None, &req, false).is_ok() || host == "not a host");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
    }

    #[test]
    fn basic_auth_reads_but_does_not_write() {
        let right = basic(&format!("admin:{TOKEN}"));
        let auth = [("authorization", right.as_str())];
        let read = request(Method::GET, "/api/v1/status", &auth);
        assert!(check(Some(TOKEN), &read, true).is_ok());
        let write = request(Method::POST, DRAIN, &auth);
        let refused = check(Some(TOKEN), &write, true).expect_err("basic auth on a write");
        assert!(matches!(refused, Refusal::BasicAuthOnWrite { .. }));
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let bearer = format!("Bearer {TOKEN}");
        let write = request(Method::POST, DRAIN, &[("authorization", &bearer)]);
        assert!(check(Some(TOKEN), &write, true).is_ok());
        // The scheme's name is case-insensitive; the token is not.
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            let header = format!("{scheme} {TOKEN}");
            let write = request(Method::POST, DRAIN, &[("authorization", &header)]);
            assert!(check(Some(TOKEN), &write, true).is_ok(), "{scheme}");
        }
        let upper = format!("Bearer {}", TOKEN.to_uppercase());
        let write = request(Method::POST, DRAIN, &[("authorization", &upper)]);
        assert!(check(Some(TOKEN), &write, true).is_err());
        let lower_basic = right.replacen("Basic", "basic", 1);
        let read = request(
            Method::GET,
            "/api/v1/status",
            &[("authorization", &lower_basic)],
        );
        assert!(check(Some(TOKEN), &read, true).is_ok());
        // A wrong basic password on a write does not say the scheme is the problem.
        let wrong = basic("admin:nope");
        let write = request(Method::POST, DRAIN, &[("authorization", &wrong)]);
        assert!(matches!(
            check(Some(TOKEN), &write, true),
            Err(Refusal::Unauthorized)
        ));
    }

    #[test]
    fn writes_from_another_site_are_refused() {
        for (header, value, refused) in [
            ("origin", "http://127.0.0.1:9090", false),
            ("origin", "https://127.0.0.1:9090/", false),
            ("origin", "http://evil.example", true),
            ("origin", "http://127.0.0.1:9091", true),
            ("origin", "http://127.0.0.1", true),
            ("origin", "null", true),
            ("sec-fetch-site", "same-origin", false),
            ("sec-fetch-site", "none", false),
            ("sec-fetch-site", "same-site", true),
            ("sec-fetch-site", "cross-site", true),
        ] {
            let post = request(Method::POST, DRAIN, &[(header, value)]);
            let result = check(None, &post, true);
            assert_eq!(result.is_err(), refused, "{header}: {value}: {result:?}");
            if let Err(e) = result {
                assert_eq!(e.status(), StatusCode::FORBIDDEN);
            }
            // Reads are not writes: a cross-site page cannot read the answer anyway.
            let get = request(Method::GET, "/api/v1/status", &[(header, value)]);
            assert!(
                check(None, &get, true).is_ok(),
                "GET with {header}: {value}"
            );
        }
        let no_host = Request::builder()
            .method(Method::POST)
            .uri(DRAIN)
            .header(ORIGIN, "http://127.0.0.1:9090")
            .body(())
            .expect("request");
        assert!(matches!(
            check(None, &no_host, true),
            Err(Refusal::CrossOrigin { .. })
        ));
    }

    #[test]
    fn form_bodies_are_refused_on_writes() {
        for (path, content_type, refused) in [
            (DRAIN, "application/x-www-form-urlencoded", true),
            (DRAIN, "multipart/form-data; boundary=x", true),
            (DRAIN, "Text/Plain; charset=utf-8", true),
            (DRAIN, "application/json", false),
            ("/api/v1/config", "text/plain", true),
            ("/api/v1/config", "application/yaml", false),
        ] {
            let result = check(
                None,
                &request(Method::POST, path, &[("content-type", content_type)]),
                true,
            );
            assert_eq!(
                result.is_err(),
                refused,
                "{path} {content_type}: {result:?}"
            );
            if let Err(e) = result {
                assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
            }
        }
        assert!(check(None, &request(Method::POST, DRAIN, &[]), true).is_ok());
        let get = request(
            Method::GET,
            "/api/v1/status",
            &[("content-type", "text/plain")],
        );
        assert!(check(None, &get, true).is_ok());
    }
}
