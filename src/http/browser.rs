//! Browser guard for open mode.
//!
//! In open mode the gateway spends its Poe key for anyone who reaches the socket, and on
//! loopback "anyone" includes every web page the user opens: a page may POST a `text/plain`
//! body to `http://127.0.0.1:8080/v1/chat/completions` without a CORS preflight (spending the
//! key), and a page whose name is rebound to 127.0.0.1 reads the answers as same-origin. The
//! OpenAI SDKs, curl and MCP clients send no `Origin` and a loopback `Host`, so refusing
//! foreign origins and, on loopback, foreign host names stops the pages and no real client.
//! `/mcp` gets the same checks from rmcp, with the same lists (`mcp.allowed_origins` and
//! `mcp.allowed_hosts`).

use http::header;
use http::{HeaderMap, HeaderValue};

use crate::config::Policy;
use crate::error::GatewayError;

pub(crate) struct BrowserGuard {
    /// `Host` names accepted (each with an optional port); `None`: any, because the
    /// gateway listens on the network, where its name is not known.
    hosts: Option<Vec<(String, Option<u16>)>>,
    origins: Origins,
}

/// The browser origins the policy trusts (`mcp.allowed_origins`).
pub(crate) struct Origins {
    /// Scheme, host, and a port (`None`: any, written `:*`).
    list: Vec<(String, String, Option<u16>)>,
    allow_null: bool,
}

impl Origins {
    pub(crate) fn new(policy: &Policy) -> Origins {
        let mut list = Vec::new();
        let mut allow_null = false;
        for o in &policy.mcp.allowed_origins {
            let o = o.trim();
            if o == "null" {
                allow_null = true;
            } else if let Some((scheme, host, port)) = parse_origin(o, true) {
                list.push((scheme.to_string(), host.to_string(), port));
            }
        }
        Origins { list, allow_null }
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty() && !self.allow_null
    }

    /// Whether a request's `Origin` (as sent) is one the policy lists.
    fn trusts(&self, text: &str) -> bool {
        if text == "null" {
            return self.allow_null;
        }
        parse_origin(text, false).is_some_and(|(scheme, host, port)| {
            self.list.iter().any(|(s, h, p)| {
                s.eq_ignore_ascii_case(scheme)
                    && h.eq_ignore_ascii_case(host)
                    && (p.is_none() || *p == port)
            })
        })
    }
}

impl BrowserGuard {
    pub(crate) fn new(policy: &Policy) -> BrowserGuard {
        let hosts = policy.server.listen.ip().is_loopback().then(|| {
            let mut hosts: Vec<(String, Option<u16>)> = ["localhost", "127.0.0.1", "::1"]
                .iter()
                .map(|h| (h.to_string(), None))
                .collect();
            // Read with the parser that reads `Host`, so both sides agree on what a name is.
            for h in &policy.mcp.allowed_hosts {
                if let Some((name, port)) = split_authority(h.trim()) {
                    hosts.push((name.to_string(), port));
                }
            }
            hosts
        });
        BrowserGuard {
            hosts,
            origins: Origins::new(policy),
        }
    }

    /// Refuses a request from a browser page the policy does not trust.
    pub(crate) fn check(&self, uri: &http::Uri, headers: &HeaderMap) -> Result<(), GatewayError> {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let text = origin.to_str().unwrap_or("").trim();
            if !self.origins.trusts(text) {
                return Err(GatewayError::ForeignOrigin(format!(
                    "this gateway runs in open mode and refuses requests from web pages \
                     (Origin: {}); list the origin in mcp.allowed_origins to trust it",
                    shown(text)
                )));
            }
        }
        let Some(hosts) = &self.hosts else {
            return Ok(());
        };
        // The name asked for comes in the Host header, or in the target itself: HTTP/2's
        // `:authority`, an absolute-form target (`POST http://name/...`). Each there counts.
        let authority = uri.authority().map(|a| a.as_str());
        let host = headers.get(header::HOST).map(|h| h.to_str().unwrap_or(""));
        for text in [authority, host].into_iter().flatten() {
            let text = text.trim();
            // Every request passes here in open mode: no allocation.
            let known = split_authority(text).is_some_and(|(name, port)| {
                hosts
                    .iter()
                    .any(|(h, p)| h.eq_ignore_ascii_case(name) && (p.is_none() || *p == port))
            });
            if !known {
                return Err(GatewayError::ForeignOrigin(format!(
                    "this gateway listens on loopback in open mode and answers only to its \
                     loopback names (Host: {}); list a public name in mcp.allowed_hosts",
                    shown(text)
                )));
            }
        }
        Ok(())
    }
}

/// CORS for the origins the policy lists, in every auth mode: a page at a listed origin (a
/// team's web app, an MCP client running in a browser) may call the gateway and read its
/// answers. Any other page gets no CORS headers, so its browser withholds the answers, and in
/// open mode `BrowserGuard` refuses it outright.
pub(crate) struct Cors {
    origins: Origins,
}

/// What a page may read besides the CORS-safelisted headers: the ids, cache and retry
/// signals the SDKs and MCP clients act on.
const EXPOSED: HeaderValue = HeaderValue::from_static(
    "x-request-id, x-cache, x-poe-gateway-bot, x-poe-gateway-attempts, x-should-retry, \
     retry-after, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, \
     x-ratelimit-reset-requests, mcp-session-id, mcp-protocol-version, www-authenticate",
);

impl Cors {
    pub(crate) fn new(policy: &Policy) -> Cors {
        Cors {
            origins: Origins::new(policy),
        }
    }

    /// The request's `Origin` when the policy lists it. With no origins listed (the default)
    /// this is one branch per request.
    pub(crate) fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        if self.origins.is_empty() {
            return None;
        }
        let origin = headers.get(header::ORIGIN)?;
        self.origins
            .trusts(origin.to_str().ok()?.trim())
            .then(|| origin.clone())
    }

    /// A browser asks before a request that is not "simple" (a JSON body, an
    /// `Authorization` header, DELETE): `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`.
    pub(crate) fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
        method == http::Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The headers of a successful preflight's answer (the origin's are added with every
    /// answer's, by `expose`): the methods the routes use, and the request headers asked for.
    /// Those are echoed because the SDKs send their own (`x-stainless-*`, `mcp-*`), and a
    /// wildcard would not cover `Authorization`.
    pub(crate) fn preflight_headers(request: &HeaderMap, answer: &mut HeaderMap) {
        answer.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, POST, DELETE"),
        );
        if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            answer.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        answer.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        answer.append(
            header::VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
    }

    /// Lets the page at `origin` read this answer.
    pub(crate) fn expose(origin: HeaderValue, answer: &mut HeaderMap) {
        answer.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        answer.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, EXPOSED);
        answer.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// A listed origin as rmcp should read it for `/mcp`: with its port written out. rmcp takes
/// an origin without a port to mean any port, where the rest of the gateway (and rmcp's
/// announced future) takes the scheme's default port; written out, both agree.
pub(crate) fn with_port(origin: &str) -> String {
    let o = origin.trim();
    match parse_origin(o, true) {
        Some((scheme, host, Some(port)))
            if !o.trim_end_matches('/').ends_with(&format!(":{port}")) =>
        {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            format!("{scheme}://{host}:{port}")
        }
        _ => o.to_string(),
    }
}

/// A header value for an error message: bounded, printable.
pub(super) fn shown(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `host[:port]` or `[v6][:port]` to the host (no brackets, no trailing dot) and port.
fn split_authority(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?.parse().ok()?)),
        }
    } else {
        match s.split_once(':') {
            None => (s, None),
            Some((host, p)) => (host, Some(p.parse().ok()?)),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

/// `scheme://host[:port]` to its parts, with the scheme's default port filled in. With
/// `wildcard`, `:*` means any port (`None`). Compared without regard to ASCII case.
fn parse_origin(s: &str, wildcard: bool) -> Option<(&str, &str, Option<u16>)> {
    let (scheme, rest) = s.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    if wildcard && let Some(host) = rest.strip_suffix(":*") {
        return Some((scheme, split_authority(host)?.0, None));
    }
    let (host, port) = split_authority(rest)?;
    let port = port.or(if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    });
    Some((scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(
            parse_origin("https://App.example.com", false),
            Some(("https", "App.example.com", Some(443)))
        );
        assert_eq!(
            parse_origin("http://localhost:*", true),
            Some(("http", "localhost", None))
        );
        assert_eq!(
            parse_origin("http://[::1]:3000", false),
            Some(("http", "::1", Some(3000)))
        );
        assert_eq!(parse_origin("localhost", false), None);
    }

    #[test]
    fn listed_origins_get_their_port_written_out_for_rmcp() {
        for (listed, given) in [
            ("https://app.example.com", "https://app.example.com:443"),
            ("https://app.example.com/", "https://app.example.com:443"),
            ("http://[::1]", "http://[::1]:80"),
            ("https://a.example:8443", "https://a.example:8443"),
            ("http://localhost:*", "http://localhost:*"),
            ("null", "null"),
            ("app://local", "app://local"),
        ] {
            assert_eq!(with_port(listed), given, "{listed}");
        }
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("localhost"), Some(("localhost", None)));
        assert_eq!(
            split_authority("127.0.0.1:8080"),
            Some(("127.0.0.1", Some(8080)))
        );
        assert_eq!(split_authority("[::1]:80"), Some(("::1", Some(80))));
        assert_eq!(split_authority("[::1]"), Some(("::1", None)));
        assert_eq!(
            split_authority("Gw.Example.com."),
            Some(("Gw.Example.com", None))
        );
        assert_eq!(split_authority("evil.example:x"), None);
        assert_eq!(split_authority("a:1:2"), None);
        assert_eq!(split_authority(":80"), None);
        assert_eq!(split_authority("[::1]x"), None);
    }
}
