//! Hardening (issue 10): `/metrics` behind the admin key, the OpenAPI document against the
//! router, and hostile input over real sockets. Every hostile request must get a clear
//! OpenAI-shaped error with the right status (or, where hyper refuses the request head before
//! the gateway sees it, hyper's bare 400), reach Poe never, and leave no charged ledger row.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A request whose body is arbitrary bytes (not necessarily UTF-8).
async fn request_bytes(
    gw: &TestGateway,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> http::Response<hyper::body::Incoming> {
    let mut req = http::Request::builder().method(method).uri(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    client()
        .request(req.body(Full::new(body)).unwrap())
        .await
        .expect("gateway answered")
}

/// Writes `raw` on a fresh connection and reads until the gateway closes it (or 30 s pass: a
/// hang guard, not a timing assertion).
async fn raw_exchange(gw: &TestGateway, raw: &[u8]) -> Vec<u8> {
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut buf)).await;
    buf
}

/// Response headers as (lower-cased name, raw value).
type RawHeaders = Vec<(String, Vec<u8>)>;

/// A raw HTTP/1.1 response: status, headers, and what follows the head.
fn parse_head(raw: &[u8]) -> (u16, RawHeaders, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = &raw[..end];
    let mut lines = head.split(|b| *b == b'\n');
    let status_line = String::from_utf8_lossy(lines.next().unwrap()).to_string();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            let colon = l.iter().position(|b| *b == b':').unwrap();
            let name = String::from_utf8_lossy(&l[..colon]).to_ascii_lowercase();
            let mut value = &l[colon + 1..];
            while value.first() == Some(&b' ') {
                value = &value[1..];
            }
            (name, value.to_vec())
        })
        .collect();
    (status, headers, raw[end + 4..].to_vec())
}

fn header<'a>(headers: &'a RawHeaders, name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// Every row so far, flushed first.
async fn totals(core: &poe_gateway::Gateway) -> poe_gateway::ledger::Totals {
    core.flush().await;
    core.ledger()
        .store()
        .report(&everything())
        .await
        .unwrap()
        .totals
}

/// Refused requests are accounted as `rejected` rows (by design: see
/// `rejected_requests_are_accounted`), but never as charged ones.
async fn assert_nothing_charged(core: &poe_gateway::Gateway, refused: i64) {
    let t = totals(core).await;
    assert_eq!(t.requests, refused, "one rejected row per refused request");
    assert_eq!(t.errors, refused, "every row is an error row");
    assert_eq!(t.prompt_tokens + t.completion_tokens + t.total_tokens, 0);
    assert_eq!(t.cost_usd, 0.0);
}

async fn ledger_gateway(up: &MockUpstream, policy: &str) -> (TestGateway, poe_gateway::Gateway) {
    let db = databases().await.remove(0);
    TestGateway::with_ledger(up, policy, &[], &db).await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn create_key(gw: &TestGateway, name: &str) -> String {
    let resp = request(
        gw,
        "POST",
        "/admin/keys",
        &[("authorization", &bearer(ADMIN_KEY))],
        &serde_json::json!({ "name": name }).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 201);
    body_json(resp).await["key"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// A. /metrics behind the admin key
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_can_require_the_admin_key() {
    let up = MockUpstream::start().await;
    let policy = "[server]\nmetrics_require_admin = true\n[auth]\nmode = \"keys\"\n";
    let (gw, _core) = ledger_gateway(&up, policy).await;
    let gateway_key = create_key(&gw, "metrics-reader").await;

    let metrics = |auth: Option<String>| {
        let gw = &gw;
        async move {
            let auth = auth.unwrap_or_default();
            let headers: Vec<(&str, &str)> = if auth.is_empty() {
                vec![]
            } else {
                vec![("authorization", auth.as_str())]
            };
            request(gw, "GET", "/metrics", &headers, "").await
        }
    };

    // No key, a gateway key, a wrong key, the admin key under another scheme: all 401.
    for auth in [
        None,
        Some(bearer(&gateway_key)),
        Some(bearer("admin-test-key-987654321")),
        Some(format!("Basic {ADMIN_KEY}")),
        Some(bearer(&format!("{ADMIN_KEY}x"))),
    ] {
        let resp = metrics(auth.clone()).await;
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let e = expect_error(resp, 401, "authentication_error").await;
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("/metrics") && msg.contains("admin key"),
            "{msg}"
        );
        assert!(!msg.contains(ADMIN_KEY) && !msg.contains(&gateway_key));
    }
    // The admin key, with any case of the scheme.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let resp = metrics(Some(format!("{scheme} {ADMIN_KEY}"))).await;
        assert_eq!(resp.status(), 200, "{scheme}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
        assert!(text.contains("poe_gateway_"), "{text}");
        assert!(!text.contains(ADMIN_KEY) && !text.contains(&gateway_key));
    }
}

#[tokio::test]
async fn metrics_requiring_an_admin_key_that_is_not_configured_is_refused() {
    let up = MockUpstream::start().await;
    // `TestGateway::start` configures no admin key.
    let gw = TestGateway::start(&up, "[server]\nmetrics_require_admin = true\n", &[]).await;
    for auth in ["", "Bearer anything-at-all-here"] {
        let headers: Vec<(&str, &str)> = if auth.is_empty() {
            vec![]
        } else {
            vec![("authorization", auth)]
        };
        let e = expect_error(
            request(&gw, "GET", "/metrics", &headers, "").await,
            403,
            "permission_error",
        )
        .await;
        assert_eq!(e["code"], "admin_disabled");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("POE_GATEWAY_ADMIN_KEY"),
            "{e}"
        );
    }
    // The admin API says the same.
    let e = expect_error(get(&gw, "/admin/keys").await, 403, "permission_error").await;
    assert_eq!(e["code"], "admin_disabled");
}

#[tokio::test]
async fn metrics_are_open_by_default() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;
    let resp = get(&gw, "/metrics").await;
    assert_eq!(resp.status(), 200);
    assert!(
        String::from_utf8_lossy(&body_bytes(resp).await).contains("poe_gateway_requests_in_flight")
    );
}

// ---------------------------------------------------------------------------------------------
// B. The OpenAPI document against the router
// ---------------------------------------------------------------------------------------------

/// Every (method, path) the router in src/http/routes.rs and src/http/admin.rs answers,
/// written out by hand: adding a route without documenting it fails here.
/// HEAD is answered wherever GET is outside `/admin` and `/mcp` (RFC 9110: GET without the
/// body), and is not listed as operations of its own.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/chat/completions"),
    ("post", "/v1/responses"),
    ("post", "/v1/messages"),
    ("post", "/v1/messages/count_tokens"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{id}"),
    ("get", "/v1/usage"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/admin/keys"),
    ("post", "/admin/keys"),
    ("delete", "/admin/keys/{id}"),
    ("post", "/admin/keys/{id}/rotate"),
    ("get", "/admin/usage"),
    ("delete", "/admin/cache"),
    ("get", "/mcp"),
    ("post", "/mcp"),
    ("delete", "/mcp"),
];

/// Resolves a local `$ref` (`#/a/b/c`).
fn resolve<'a>(doc: &'a serde_json::Value, r: &str) -> &'a serde_json::Value {
    let ptr = r
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("non-local $ref {r}"));
    doc.pointer(ptr)
        .unwrap_or_else(|| panic!("$ref {r} does not resolve"))
}

fn deref<'a>(doc: &'a serde_json::Value, v: &'a serde_json::Value) -> &'a serde_json::Value {
    match v.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => deref(doc, resolve(doc, r)),
        None => v,
    }
}

fn all_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    out.push(v.as_str().unwrap().to_string());
                } else {
                    all_refs(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| all_refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, _core) = ledger_gateway(&up, "").await;

    let resp = get(&gw, "/openapi.json").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc = body_json(resp).await;
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "{version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());

    // Every $ref resolves.
    let mut refs = Vec::new();
    all_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in &refs {
        resolve(&doc, r);
    }

    // The router's routes and the document's operations are the same set.
    let methods = ["get", "post", "put", "patch", "delete", "head", "options"];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if methods.contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, routed, "documented operations != routed ones");

    // Every operation: a success response, and every error status documented with a JSON
    // schema (`default` and the MCP protocol's own answers aside).
    let mut statuses = BTreeSet::new();
    for (method, path) in &routed {
        let op = &doc["paths"][path][method];
        assert!(op["operationId"].is_string(), "{method} {path}");
        assert!(op["security"].is_array(), "{method} {path}: security");
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no success response"
        );
        for (status, resp) in responses {
            if status == "default" {
                continue;
            }
            let code: u16 = status.parse().unwrap();
            statuses.insert(code);
            let resp = deref(&doc, resp);
            assert!(resp["description"].is_string(), "{method} {path} {status}");
            if code >= 400 {
                let schema = &resp["content"]["application/json"]["schema"];
                assert!(
                    schema.is_object(),
                    "{method} {path} {status}: no JSON error schema"
                );
                let schema = deref(&doc, schema);
                let names: Vec<String> = match schema.get("anyOf") {
                    Some(list) => list
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s["$ref"].as_str().unwrap().to_string())
                        .collect(),
                    None => vec![String::new()],
                };
                // The Messages API's own errors are Anthropic-shaped (`MessagesError`).
                assert!(
                    names
                        .iter()
                        .any(|n| n.ends_with("/Error") || n.ends_with("/MessagesError"))
                        || schema == deref(&doc, &doc["components"]["schemas"]["Error"])
                        || schema == deref(&doc, &doc["components"]["schemas"]["MessagesError"])
                        || schema == deref(&doc, &doc["components"]["schemas"]["UpstreamError"]),
                    "{method} {path} {status}: not an error schema: {schema}"
                );
            }
        }
        // Each documented operation is really routed: neither an unknown-route 404 nor a 405.
        let concrete = path.replace("{id}", "nobody");
        let resp = request(
            &gw,
            &method.to_ascii_uppercase(),
            &concrete,
            &[
                ("authorization", &bearer(ADMIN_KEY)),
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
            ],
            "{}",
        )
        .await;
        let status = resp.status().as_u16();
        let body = body_bytes(resp).await;
        assert_ne!(status, 405, "{method} {path}: {body:?}");
        assert!(
            !String::from_utf8_lossy(&body).contains("Unknown request URL"),
            "{method} {path} is documented but not routed: {body:?}"
        );
    }
    // The statuses the gateway makes itself (src/error.rs), plus Poe's pass-through ones.
    for s in [
        200, 201, 400, 401, 402, 403, 404, 408, 413, 429, 500, 502, 503, 504, 529,
    ] {
        assert!(statuses.contains(&s), "status {s} is not documented");
    }
    // 405 is documented as a component (it answers methods no operation has).
    let allow = &doc["components"]["responses"]["MethodNotAllowed"];
    assert!(allow["headers"]["allow"].is_object());
    // The error schema is the one `GatewayError::to_json` writes.
    let err = &doc["components"]["schemas"]["Error"]["properties"]["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(
            err["required"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!(field))
        );
    }
    // A usage report's totals are the fields `UsageTotals` lists and requires.
    let report = body_json(
        request(
            &gw,
            "GET",
            "/admin/usage",
            &[("authorization", &bearer(ADMIN_KEY))],
            "",
        )
        .await,
    )
    .await;
    let names = |v: &serde_json::Value| -> BTreeSet<String> {
        match v {
            serde_json::Value::Object(o) => o.keys().cloned().collect(),
            v => v
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect(),
        }
    };
    let totals = &doc["components"]["schemas"]["UsageTotals"];
    assert_eq!(names(&report["totals"]), names(&totals["properties"]));
    assert_eq!(names(&totals["required"]), names(&totals["properties"]));
    // Keys are bearer tokens, or Anthropic's `x-api-key` header.
    let security = doc["components"]["securitySchemes"].as_object().unwrap();
    assert!(
        security
            .values()
            .all(|s| s["scheme"] == "bearer" || (s["in"] == "header" && s["name"] == "x-api-key"))
    );
}

#[tokio::test]
async fn unknown_paths_get_404_and_wrong_methods_405_with_allow() {
    let up = MockUpstream::start().await;
    let (gw, _core) = ledger_gateway(&up, "").await;
    for path in [
        "/v2/chat/completions",
        "/openapi.yaml",
        "/",
        "/v1",
        "/v1/models2",
    ] {
        let e = expect_error(
            request(&gw, "GET", path, &[], "").await,
            404,
            "invalid_request_error",
        )
        .await;
        assert_eq!(e["code"], "not_found", "{path}");
    }
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/openapi.json", "GET, HEAD"),
        ("POST", "/v1/usage", "GET, HEAD"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/models/gpt-5", "GET, HEAD"),
        ("GET", "/v1/chat/completions", "POST"),
        ("PATCH", "/admin/keys", "GET, POST"),
        ("GET", "/admin/keys/key_123", "DELETE"),
        ("POST", "/admin/usage", "GET"),
        ("GET", "/admin/cache", "DELETE"),
    ] {
        let resp = request(
            &gw,
            method,
            path,
            &[("authorization", &bearer(ADMIN_KEY))],
            "",
        )
        .await;
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let e = expect_error(resp, 405, "invalid_request_error").await;
        assert_eq!(e["code"], "method_not_allowed");
    }
    // Unknown admin paths need the admin key before they are reported unknown.
    expect_error(
        get(&gw, "/admin/nothing").await,
        401,
        "authentication_error",
    )
    .await;
    let e = expect_error(
        request(
            &gw,
            "GET",
            "/admin/nothing",
            &[("authorization", &bearer(ADMIN_KEY))],
            "",
        )
        .await,
        404,
        "invalid_request_error",
    )
    .await;
    assert_eq!(e["code"], "not_found");

    // HEAD is GET without the body (uptime monitors, `curl -I`).
    for path in ["/healthz", "/readyz", "/openapi.json", "/v1/models"] {
        let got = body_bytes(get(&gw, path).await).await;
        let resp = request(&gw, "HEAD", path, &[], "").await;
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()["content-length"],
            got.len().to_string().as_str(),
            "{path}"
        );
        assert!(body_bytes(resp).await.is_empty(), "{path}");
    }
    let resp = request(&gw, "HEAD", "/v1/chat/completions", &[], "").await;
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
}

#[tokio::test]
async fn admin_key_bodies_are_bounded_and_checked() {
    let up = MockUpstream::start().await;
    let (gw, _core) = ledger_gateway(&up, "").await;
    let admin = bearer(ADMIN_KEY);
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(100 * 1024));
    expect_error(
        request(
            &gw,
            "POST",
            "/admin/keys",
            &[("authorization", &admin)],
            &big,
        )
        .await,
        413,
        "invalid_request_error",
    )
    .await;
    for body in [
        "",
        "{",
        r#"{"name":7}"#,
        r#"{"name":"  "}"#,
        r#"{"name":"a","rpm":0}"#,
        r#"{"name":"a","rpm":0.0}"#,
        r#"{"name":"a","rpm":82.5}"#,
        r#"{"name":"a","rpm":-3}"#,
        r#"{"name":"a","rpm":4294967296}"#,
        // Fits a u32, not Postgres's integer column (it wrapped to a negative limit).
        r#"{"name":"a","rpm":4294967295}"#,
        r#"{"name":"a","rpm":"82"}"#,
        // An empty list would mean every model; a comma would split a name once stored.
        r#"{"name":"a","models":[]}"#,
        r#"{"name":"a","models":[" "]}"#,
        r#"{"name":"a","models":["gpt",""]}"#,
        r#"{"name":"a","models":["a,b"]}"#,
        // Control characters; names that read as a key id or as a key.
        r#"{"name":"a\u001b[2Jb"}"#,
        r#"{"name":"line\nbreak"}"#,
        r#"{"name":"key_0123456789abcdef"}"#,
        r#"{"name":"pgw_0123456789abcdef"}"#,
    ] {
        expect_error(
            request(
                &gw,
                "POST",
                "/admin/keys",
                &[("authorization", &admin)],
                body,
            )
            .await,
            400,
            "invalid_request_error",
        )
        .await;
    }
    // A whole number written as a float is still a whole number (JSON Schema's `integer`).
    let resp = request(
        &gw,
        "POST",
        "/admin/keys",
        &[("authorization", &admin)],
        r#"{"name":"floaty","rpm":82.0}"#,
    )
    .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let created = body_json(resp).await;
    assert_eq!(created["rpm"], 82, "{created}");

    // One active key per name; a revoked key's name is free again.
    let auth = [("authorization", admin.as_str())];
    let again = || request(&gw, "POST", "/admin/keys", &auth, r#"{"name":"floaty"}"#);
    let e = expect_error(again().await, 400, "invalid_request_error").await;
    assert_eq!(e["param"], "name", "{e}");
    let resp = request(
        &gw,
        "DELETE",
        "/admin/keys/floaty",
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(again().await.status(), 201);
}

// ---------------------------------------------------------------------------------------------
// D. Hostile input
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn compressed_bodies_get_415_saying_so() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, core) = ledger_gateway(&up, "").await;
    // Gzip's magic bytes: read as JSON this was a confusing "invalid JSON" 400.
    let gzip = Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03");
    for (path, auth) in [
        ("/v1/chat/completions", String::new()),
        ("/admin/keys", bearer(ADMIN_KEY)),
    ] {
        let mut headers = vec![
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ];
        if !auth.is_empty() {
            headers.push(("authorization", &auth));
        }
        let resp = request_bytes(&gw, "POST", path, &headers, gzip.clone()).await;
        let e = expect_error(resp, 415, "invalid_request_error").await;
        assert_eq!(e["code"], "unsupported_content_encoding", "{path}: {e}");
        assert!(e["message"].as_str().unwrap().contains("gzip"), "{e}");
    }
    // `identity` is no encoding at all.
    let resp = request(
        &gw,
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("content-encoding", "identity"),
        ],
        &chat_body("gpt-5", false),
    )
    .await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    assert_eq!(up.chat_calls(), 1);
    // The refused chat request has its rejected row; only the good one is a success.
    let t = totals(&core).await;
    assert_eq!((t.requests, t.errors), (2, 1), "{t:?}");
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_chunked() {
    let up = MockUpstream::start().await;
    let (gw, core) = ledger_gateway(&up, "[server]\nmax_body_bytes = 4096\n").await;

    // Declared up front.
    let big = format!(
        r#"{{"model":"gpt","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(8192)
    );
    let e = expect_error(post(&gw, &big, &[]).await, 413, "invalid_request_error").await;
    assert_eq!(e["code"], "request_too_large");
    assert!(e["message"].as_str().unwrap().contains("4096"), "{e}");

    // Declared small but only as big as declared: fine. A lying Content-Length larger than the
    // body is the client's problem (the body read times out); one over the limit is refused
    // before any byte of the body is read, on a raw socket.
    let raw = raw_exchange(
        &gw,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 99999999999\r\nconnection: close\r\n\r\n{\"model\":",
    )
    .await;
    let (status, headers, body) = parse_head(&raw);
    assert_eq!(status, 413);
    assert_eq!(
        header(&headers, "content-type"),
        vec![&b"application/json"[..]]
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");

    // Chunked, no Content-Length: 64 chunks of 1 KiB.
    let resp = post_chunked(
        &gw,
        vec![Bytes::from(vec![b' '; 1024]); 64],
        &[("content-type", "application/json")],
    )
    .await;
    let e = expect_error(resp, 413, "invalid_request_error").await;
    assert_eq!(e["code"], "request_too_large");

    assert_eq!(up.chat_calls(), 0, "nothing reached Poe");
    assert_nothing_charged(&core, 3).await;
}

/// A client still sending a body over the limit when the 413 comes can read it: the rest
/// of the body is read (and dropped) first. The connection was closed under the client as
/// it wrote, and it got a reset instead of the answer (Python's async client raised
/// `ReadError`, and took the MCP SDK's session down with it).
#[tokio::test]
async fn a_client_still_sending_an_oversized_body_reads_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nmax_body_bytes = 65536\n", &[]).await;
    for path in ["/v1/chat/completions", "/mcp"] {
        let total = 32 * 1024 * 1024;
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             accept: application/json, text/event-stream\r\ncontent-length: {total}\r\n\r\n"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..total / chunk.len() {
            sock.write_all(&chunk)
                .await
                .unwrap_or_else(|e| panic!("{path}: the body could not be sent whole: {e}"));
        }
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "{path}: closed before an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(
            answer.starts_with(b"HTTP/1.1 413"),
            "{path}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[tokio::test]
async fn invalid_utf8_is_a_400() {
    let up = MockUpstream::start().await;
    let (gw, core) = ledger_gateway(&up, "").await;
    for body in [
        &b"{\"model\":\"gpt\xff\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"[..],
        &b"{\"model\":\"gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\x28\"}]}"[..],
        // A lone surrogate as UTF-8 bytes (CESU), and an overlong encoding of '/'.
        &b"{\"model\":\"gpt\",\"messages\":[{\"content\":\"\xed\xa0\x80\"}]}"[..],
        &b"{\"model\":\"gpt\",\"messages\":[{\"content\":\"\xc0\xaf\"}]}"[..],
    ] {
        let e = expect_error(
            request_bytes(
                &gw,
                "POST",
                "/v1/chat/completions",
                &[("content-type", "application/json")],
                Bytes::copy_from_slice(body),
            )
            .await,
            400,
            "invalid_request_error",
        )
        .await;
        assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");
    }
    assert_eq!(up.chat_calls(), 0);
    assert_nothing_charged(&core, 4).await;
}

#[tokio::test]
async fn duplicate_top_level_keys_are_a_400() {
    let up = MockUpstream::start().await;
    let (gw, core) = ledger_gateway(&up, "").await;
    let cases = [
        (
            r#"{"model":"gpt","model":"claude","messages":[{"role":"user","content":"hi"}]}"#,
            "model",
        ),
        (
            r#"{"model":"gpt","messages":[{"content":"a"}],"messages":[{"content":"b"}]}"#,
            "messages",
        ),
        (
            r#"{"model":"gpt","messages":[{"content":"a"}],"stream":false,"stream":true}"#,
            "stream",
        ),
        // The same key spelt with an escape is still the same key.
        (
            r#"{"model":"gpt","mod\u0065l":"claude","messages":[{"content":"a"}]}"#,
            "model",
        ),
    ];
    for (body, key) in cases {
        let e = expect_error(post(&gw, body, &[]).await, 400, "invalid_request_error").await;
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("duplicate key `{key}`")),
            "{body}: {msg}"
        );
    }
    // Nested duplicates are the bot's business and pass through untouched.
    up.push(Reply::completion("gpt-5", "ok"));
    let nested = r#"{"model":"gpt","messages":[{"role":"user","role":"user","content":"hi"}]}"#;
    assert_eq!(post(&gw, nested, &[]).await.status(), 200);
    assert_eq!(
        up.chat_calls(),
        1,
        "only the nested-duplicate request went upstream"
    );
    let t = totals(&core).await;
    assert_eq!(t.requests, 5);
    assert_eq!(t.errors, 4);
}

#[tokio::test]
async fn model_of_the_wrong_type_is_a_400_naming_model() {
    let up = MockUpstream::start().await;
    let (gw, core) = ledger_gateway(&up, "").await;
    let bodies = [
        r#"{"model":7,"messages":[{"content":"a"}]}"#,
        r#"{"model":null,"messages":[{"content":"a"}]}"#,
        r#"{"model":["gpt"],"messages":[{"content":"a"}]}"#,
        r#"{"model":{"name":"gpt"},"messages":[{"content":"a"}]}"#,
        r#"{"model":true,"messages":[{"content":"a"}]}"#,
        r#"{"model":"","messages":[{"content":"a"}]}"#,
        r#"{"model":"   ","messages":[{"content":"a"}]}"#,
        // Control characters: a NUL (which Postgres refuses in a ledger row) and a newline.
        r#"{"model":"gpt\u0000","messages":[{"content":"a"}]}"#,
        r#"{"model":"gpt\nlevel=INFO forged","messages":[{"content":"a"}]}"#,
    ];
    let long = format!(
        r#"{{"model":"{}","messages":[{{"content":"a"}}]}}"#,
        "b".repeat(300)
    );
    for body in bodies.into_iter().chain([long.as_str()]) {
        let e = expect_error(post(&gw, body, &[]).await, 400, "invalid_request_error").await;
        assert_eq!(e["param"], "model", "{body}");
        assert!(e["message"].as_str().unwrap().contains("`model`"), "{e}");
    }
    // The other fields the gateway reads, mistyped.
    for (body, param) in [
        (r#"{"model":"gpt","messages":"hi"}"#, "messages"),
        (r#"{"model":"gpt","messages":[]}"#, "messages"),
        (
            r#"{"model":"gpt","messages":[{}],"stream":"yes"}"#,
            "stream",
        ),
        (
            r#"{"model":"gpt","messages":[{}],"stream_options":1}"#,
            "stream_options",
        ),
        (
            r#"{"model":"gpt","messages":[{}],"temperature":"hot"}"#,
            "temperature",
        ),
        (
            r#"{"model":"gpt","messages":[{}],"max_tokens":[1]}"#,
            "max_tokens",
        ),
    ] {
        let e = expect_error(post(&gw, body, &[]).await, 400, "invalid_request_error").await;
        assert_eq!(e["param"], param, "{body}");
    }
    // Not an object at all.
    for body in ["[]", "\"gpt\"", "null", "7", ""] {
        expect_error(post(&gw, body, &[]).await, 400, "invalid_request_error").await;
    }
    assert_eq!(up.chat_calls(), 0);
    assert_nothing_charged(&core, (bodies.len() + 1 + 6 + 5) as i64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_messages_array_is_forwarded_cleanly() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "that was a lot"));
    // No aliases: `gpt` goes to Poe as it is, so the body is forwarded unchanged.
    let (gw, core) = ledger_gateway(&up, "[aliases]\n").await;
    // 200,000 small messages: about 6 MB, under the default 50 MiB limit.
    let mut body = String::from(r#"{"model":"gpt","messages":["#);
    for i in 0..200_000 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(r#"{"role":"user","content":"x"}"#);
    }
    body.push_str("]}");
    let resp = post(&gw, &body, &[]).await;
    assert_eq!(resp.status(), 200);
    let _ = body_bytes(resp).await;
    let chats = up.chats();
    assert_eq!(chats.len(), 1);
    assert_eq!(chats[0].body.len(), body.len(), "forwarded byte for byte");
    assert_eq!(chats[0].body, Bytes::from(body));
    let t = totals(&core).await;
    assert_eq!((t.requests, t.errors), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_top_level_keys_are_checked_for_duplicates_and_a_flood_is_refused() {
    // Up to 1,024 top-level members pass, and a duplicate at the very end is still found.
    // Past that the body is refused at once: 300,000 keys (~5 MB) used to be read whole, and
    // a 50 MiB body of millions cost seconds of a serving thread and 13 times its size in
    // memory. The hang guard is generous.
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "ok"));
    let (gw, _core) = ledger_gateway(&up, "").await;
    let body = |keys: usize| {
        let mut body = String::from(r#"{"model":"gpt","messages":[{"content":"hi"}]"#);
        for i in 0..keys {
            body.push_str(&format!(",\"k{i}\":0"));
        }
        body.push('}');
        body
    };
    let post_within = |body: String| {
        let gw = &gw;
        async move {
            tokio::time::timeout(Duration::from_secs(120), post(gw, &body, &[]))
                .await
                .expect("the gateway is stuck reading keys")
        }
    };
    let most = body(1022);
    assert_eq!(post_within(most.clone()).await.status(), 200);
    let dup = format!("{},\"k1021\":1}}", &most[..most.len() - 1]);
    let e = expect_error(post_within(dup).await, 400, "invalid_request_error").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key `k1021`"),
        "{e}"
    );
    let e = expect_error(
        post_within(body(300_000)).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("more than 1024 top-level members"),
        "{e}"
    );
    assert_eq!(up.chat_calls(), 1);
}

#[tokio::test]
async fn unsafe_request_ids_are_never_echoed() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, core) = ledger_gateway(&up, "").await;
    let body = chat_body("gpt", false);
    let raw = |id_line: &[u8]| {
        let mut r = Vec::new();
        r.extend_from_slice(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\nconnection: close\r\n");
        r.extend_from_slice(id_line);
        r.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
        r
    };

    // A bare CR or a NUL inside the value: hyper refuses the head itself with a bare 400 and
    // closes; the gateway never sees it. Nothing is echoed and nothing reaches Poe.
    for line in [
        &b"x-request-id: abc\rx-injected: 1\r\n"[..],
        &b"x-request-id: abc\0def\r\n"[..],
        &b"x-request-id: abc\r\r\n"[..],
        &b"x-request-id: abc\x7fdef\r\n"[..],
    ] {
        let out = raw_exchange(&gw, &raw(line)).await;
        let (status, headers, _) = parse_head(&out);
        assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(&out));
        assert!(header(&headers, "x-injected").is_empty());
        for (_, v) in &headers {
            assert!(!v.windows(3).any(|w| w == b"abc"), "echoed: {headers:?}");
        }
    }
    assert_eq!(up.chat_calls(), 0);

    // A bare LF ends the header line (HTTP/1.1 parsers accept LF line ends): the id is `abc`
    // and the rest is a header of its own, which is not echoed.
    let out = raw_exchange(&gw, &raw(b"x-request-id: abc\nx-injected: 1\r\n")).await;
    let (status, headers, _) = parse_head(&out);
    assert_eq!(status, 200, "{:?}", String::from_utf8_lossy(&out));
    assert_eq!(header(&headers, "x-request-id"), vec![&b"abc"[..]]);
    assert!(header(&headers, "x-injected").is_empty());
    assert_eq!(up.chats()[0].headers["x-request-id"], "abc");

    // Values that parse but are not plain tokens are replaced by a fresh UUID, which is what
    // the client and Poe both see.
    let long = "a".repeat(129);
    let cases: Vec<Vec<u8>> = vec![
        b"x-request-id: a b\r\n".to_vec(),
        b"x-request-id: a\tb\r\n".to_vec(),
        b"x-request-id: caf\xc3\xa9\r\n".to_vec(),
        b"x-request-id: \xff\xfe\r\n".to_vec(),
        format!("x-request-id: {long}\r\n").into_bytes(),
        b"x-request-id: \r\n".to_vec(),
        // Two ids: the first is taken; it is a plain token.
        b"x-request-id: one\r\nx-request-id: two\r\n".to_vec(),
    ];
    for (i, line) in cases.iter().enumerate() {
        let before = up.chat_calls();
        let out = raw_exchange(&gw, &raw(line)).await;
        let (status, headers, _) = parse_head(&out);
        assert_eq!(status, 200, "{:?}", String::from_utf8_lossy(line));
        let ids = header(&headers, "x-request-id");
        assert_eq!(ids.len(), 1, "exactly one id: {ids:?}");
        let id = std::str::from_utf8(ids[0]).unwrap();
        if i == cases.len() - 1 {
            assert_eq!(id, "one");
        } else {
            assert_eq!(id.len(), 36, "a UUID, not {id:?}");
            assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        }
        assert_eq!(up.chat_calls(), before + 1);
        assert_eq!(
            up.chats().last().unwrap().headers["x-request-id"],
            id,
            "Poe sees the same id"
        );
    }
    // Only the requests that reached the gateway were accounted, none charged to anyone else.
    let t = totals(&core).await;
    assert_eq!(t.requests as usize, up.chat_calls());
}

#[tokio::test]
async fn client_headers_are_not_reflected() {
    // The only client header the gateway echoes is x-request-id (checked above). Other client
    // headers (including ones that look like the gateway's own) never come back.
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let resp = post(
        &gw,
        &chat_body("gpt", false),
        &[
            ("x-poe-gateway-bot", "evil"),
            ("x-cache", "HIT"),
            ("x-evil", "1"),
            ("set-cookie", "a=b"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["x-poe-gateway-bot"], "gpt-5");
    assert_eq!(h["x-cache"], "BYPASS");
    assert!(h.get("x-evil").is_none() && h.get("set-cookie").is_none());
    let sent = &up.chats()[0].headers;
    assert!(sent.get("x-evil").is_none() && sent.get("set-cookie").is_none());
}

/// The soft limit on open files, from /proc (no libc needed).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Established TCP sockets on 127.0.0.1 whose local port is `port`: the server side of the
/// gateway's connections, accepted or still in the accept queue (Linux only).
fn server_side_established(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!(":{port:04X}");
    Some(
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "01"
            })
            .count(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_wedge_the_gateway() {
    const IDLE: usize = 10_000;
    // Client sockets, the gateway's own (at most max_connections) and some slack.
    let need = (IDLE + 1_000) as u64;
    match open_files_limit() {
        Some(n) if n >= need => {}
        other => {
            eprintln!(
                "SKIPPED ten_thousand_idle_connections_do_not_wedge_the_gateway: the open-files \
                 limit is {other:?}, {need} needed (raise it with `ulimit -n {need}`)"
            );
            return;
        }
    }
    if server_side_established(1).is_none() {
        eprintln!(
            "SKIPPED ten_thousand_idle_connections_do_not_wedge_the_gateway: it reads the \
             server side's sockets from /proc/net/tcp (Linux)"
        );
        return;
    }
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(
        &up,
        "[server]\nmax_connections = 200\nheader_read_timeout = \"300ms\"\n",
        &[],
    )
    .await;
    let addr = gw.addr;

    // All 10,000 sockets are opened and held at once; only the handshakes in flight are
    // bounded, below the kernel's SYN backlog.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(512));
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IDLE {
        let (handshakes, connected, failed, closed) = (
            handshakes.clone(),
            connected.clone(),
            failed.clone(),
            closed.clone(),
        );
        tasks.spawn(async move {
            let permit = handshakes.acquire_owned().await.unwrap();
            let Ok(Ok(mut sock)) = tokio::time::timeout(
                Duration::from_secs(120),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            else {
                failed.fetch_add(1, Ordering::SeqCst);
                return;
            };
            connected.fetch_add(1, Ordering::SeqCst);
            drop(permit);
            let mut buf = [0u8; 64];
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
                Ok(n) => panic!(
                    "the gateway sent {:?} to a client that sent nothing",
                    String::from_utf8_lossy(&buf[..n])
                ),
            }
        });
    }
    // Done when every handshake has resolved and the server side holds no connection on the
    // port: none accepted and idle, none waiting in the accept queue. Client sockets still
    // open then are ones whose last handshake ACK the kernel dropped on a full accept queue
    // (it retransmits its SYN-ACK a few times, then forgets): half-open on the client's side
    // only, which no server can close.
    let drained = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let resolved = connected.load(Ordering::SeqCst) + failed.load(Ordering::SeqCst);
            if resolved == IDLE && server_side_established(addr.port()) == Some(0) {
                break;
            }
        }
    })
    .await;
    let (c, f, cl) = (
        connected.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        closed.load(Ordering::SeqCst),
    );
    eprintln!(
        "{IDLE} idle connections: {c} connected ({cl} closed by the gateway, {} half-open), {f} never connected; server side still holds {:?}",
        c - cl,
        server_side_established(addr.port())
    );
    assert!(
        drained.is_ok(),
        "the gateway still holds idle connections (or handshakes never resolved)"
    );
    assert!(
        cl >= IDLE / 4,
        "most idle connections were accepted, then closed"
    );
    tasks.abort_all();

    // The gateway still serves.
    let resp = tokio::time::timeout(Duration::from_secs(60), get(&gw, "/healthz"))
        .await
        .expect("the gateway answered after the flood");
    assert_eq!(resp.status(), 200);
    up.push(Reply::completion("gpt-5", "still here"));
    let resp = tokio::time::timeout(
        Duration::from_secs(60),
        post(&gw, &chat_body("gpt", false), &[]),
    )
    .await
    .expect("the gateway answered after the flood");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_connection_that_sends_part_of_a_head_is_closed_too() {
    // Slowloris: a few bytes, then silence; and the h2 preface with nothing after it. With one
    // connection slot, either would block every later client unless it is closed.
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(
        &up,
        "[server]\nmax_connections = 1\nheader_read_timeout = \"200ms\"\n",
        &[],
    )
    .await;
    for opening in [
        &b"GET /hea"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &b"P"[..],
        &b""[..],
    ] {
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        sock.write_all(opening).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), sock.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "{:?}: the connection was never closed",
            String::from_utf8_lossy(opening)
        );
        // The slot is free again: a normal client is served.
        let resp = tokio::time::timeout(Duration::from_secs(60), get(&gw, "/healthz"))
            .await
            .expect("served after the stalled connection");
        assert_eq!(resp.status(), 200);
    }
}

/// Frames of `n` bytes of `x`, none with a newline.
fn endless_line(reply: Reply, frames: usize, size: usize) -> Reply {
    let frame = Bytes::from(vec![b'x'; size]);
    (0..frames).fold(reply, |r, _| r.send(frame.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_sse_line_ends_the_stream_with_one_error_event() {
    for include_usage in [true, false] {
        let up = MockUpstream::start().await;
        // One good event, then 40 MiB with no newline: past the tap's 16 MiB line cap.
        let reply = Reply::sse().send(chunk("gpt-5", "hello"));
        let reply = endless_line(reply.send("data: "), 40, 1024 * 1024);
        up.push(reply);
        let (gw, core) = ledger_gateway(&up, "").await;
        let mut body: serde_json::Value = serde_json::from_str(&chat_body("gpt", true)).unwrap();
        if include_usage {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        let resp = post(&gw, &body.to_string(), &[]).await;
        assert_eq!(resp.status(), 200);
        let got = tokio::time::timeout(Duration::from_secs(120), body_bytes(resp))
            .await
            .expect("the stream ended");
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with(&chunk("gpt-5", "hello")),
            "{}",
            &text[..100]
        );
        assert_eq!(
            text.matches("data: {\"error\"").count(),
            1,
            "exactly one error event"
        );
        let tail = &text[text.rfind("data: {\"error\"").unwrap()..];
        assert!(tail.ends_with("\n\n"), "{tail}");
        let event: serde_json::Value =
            serde_json::from_str(tail.trim_start_matches("data: ").trim_end()).unwrap();
        assert_eq!(event["error"]["type"], "upstream_error");
        assert!(!text.contains("[DONE]"), "no faked [DONE]");
        // The client got at most the cap (plus the good event), never the whole 40 MiB.
        assert!(got.len() < 17 * 1024 * 1024, "{} bytes", got.len());
        if !include_usage {
            // Holding whole events, the half line is dropped rather than sent.
            assert!(got.len() < 1024, "{} bytes", got.len());
        }
        // The gateway stopped reading from Poe.
        tokio::time::timeout(Duration::from_secs(60), up.wait_disconnect())
            .await
            .expect("the upstream stream was closed");
        let t = totals(&core).await;
        assert_eq!(
            (t.requests, t.errors),
            (1, 1),
            "accounted as one incomplete request"
        );
    }
}

/// One event of many `data:` lines, none over the line cap, is capped as a whole: it was
/// held whole however large (200 MiB took the gateway to 650 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_sse_event_ends_the_stream_with_one_error_event() {
    let up = MockUpstream::start().await;
    let line = Bytes::from([&b"data: "[..], &vec![b'x'; 1024 * 1024], b"\n"].concat());
    let reply = (0..40).fold(Reply::sse().send(chunk("gpt-5", "hello")), |r, _| {
        r.send(line.clone())
    });
    up.push(reply);
    // And one of other fields' lines (held as they are, until the event ends).
    let line = Bytes::from([&b"id: "[..], &vec![b'x'; 1024 * 1024], b"\n"].concat());
    let reply = (0..40).fold(Reply::sse().send(chunk("gpt-5", "hello")), |r, _| {
        r.send(line.clone())
    });
    up.push(reply);
    let (gw, core) = ledger_gateway(&up, "").await;
    for _ in 0..2 {
        let resp = post(&gw, &chat_body("gpt", true), &[]).await;
        assert_eq!(resp.status(), 200);
        let got = tokio::time::timeout(Duration::from_secs(120), body_bytes(resp))
            .await
            .expect("the stream ended");
        let text = String::from_utf8_lossy(&got);
        assert_eq!(
            text.matches("data: {\"error\"").count(),
            1,
            "one error event"
        );
        assert!(
            text.contains("line or event longer"),
            "{}",
            &text[text.len() - 300..]
        );
        assert!(got.len() < 1024 * 1024, "{} bytes", got.len());
    }
    tokio::time::timeout(Duration::from_secs(60), up.wait_disconnect())
        .await
        .expect("the upstream stream was closed");
    assert_eq!(totals(&core).await.errors, 2);
}

#[tokio::test]
async fn hostile_paths_and_methods_get_json_errors() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;
    // Percent-encoded junk, a NUL, and a very long model id.
    for path in [
        "/v1/models/%00%ff%fe",
        "/v1/models/..%2f..%2fetc%2fpasswd",
        &format!("/v1/models/{}", "a".repeat(4000)),
    ] {
        let e = expect_error(get(&gw, path).await, 404, "invalid_request_error").await;
        assert!(e["message"].is_string());
    }
    // An unknown method token.
    let out = raw_exchange(
        &gw,
        b"BREW /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (status, headers, body) = parse_head(&out);
    assert_eq!(status, 405);
    assert_eq!(header(&headers, "allow"), vec![&b"POST"[..]]);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed");
    assert_eq!(up.chat_calls(), 0);
}

#[tokio::test]
async fn bodies_that_arrive_in_pieces_are_still_parsed() {
    // Not hostile, the control case: a body split at every byte boundary is one request.
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let body = chat_body("gpt-5", false);
    // One frame per byte.
    let pieces = body.bytes().map(|b| Bytes::from(vec![b])).collect();
    let resp = post_chunked(&gw, pieces, &[]).await;
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    assert_eq!(up.chats()[0].body, Bytes::from(body));
}

/// hyper has no idle limit for HTTP/2: a client that made one request and then went quiet
/// kept its connection (and its `server.max_connections` slot) for ever. Now it gets GOAWAY
/// once `server.idle_timeout` passes with no new request, and a stream still running then
/// finishes first.
#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_its_stream_finishes() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = MockUpstream::start().await;
    up.push(Reply::dripping("gpt-5", 5, Duration::from_millis(150)));
    let gw = TestGateway::start(
        &up,
        "[server]\nmax_connections = 1\nidle_timeout = \"300ms\"\n",
        &[],
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body("gpt", true))))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The stream runs for about 750 ms, past the 300 ms idle limit.
    let body = tokio::time::timeout(Duration::from_secs(30), body_bytes(resp))
        .await
        .expect("the stream ended");
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("part 4"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The gateway closes the quiet connection by itself (a hang guard, not a timing check).
    tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("the idle h2 connection was closed")
        .unwrap()
        .ok();
    // Its slot is free again: another client is served.
    let resp = tokio::time::timeout(Duration::from_secs(30), get(&gw, "/healthz"))
        .await
        .expect("served once the idle connection was gone");
    assert_eq!(resp.status(), 200);
}

/// `check` (a unit's `ExecStartPre`) catches a SQLite ledger that `serve` could not write,
/// and leaves nothing behind where it can.
#[test]
fn check_refuses_a_ledger_path_it_cannot_write() {
    let check = |url: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
            .arg("check")
            .env_clear()
            .env("POE_API_KEY", "test-key-not-real")
            .env("POE_GATEWAY_DATABASE_URL", url)
            .output()
            .expect("the binary runs")
    };
    // Not even root may make a file in /proc.
    let out = check("sqlite:///proc/poe-gateway-check/ledger.db");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("/proc/poe-gateway-check/ledger.db") && err.contains("cannot be written"),
        "{err}"
    );
    // A ledger file that opens for writing in a directory that takes no new file: SQLite's
    // WAL could not make its files beside it. (/proc/self/... files are writable, their
    // directory is not.)
    let out = check("sqlite:///proc/self/oom_score_adj");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be written"), "{err}");
    let dir = std::env::temp_dir().join(format!("pgw-check-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&dir).unwrap();
    let ok = |url: String| {
        let out = check(&url);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(format!("sqlite://{}/sub/ledger.db", dir.display()));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "check left a file"
    );
    std::fs::write(dir.join("ledger.db"), b"").unwrap();
    ok(format!("sqlite://{}/ledger.db", dir.display()));
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "check left a file"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `policies/default.toml` in the working directory that is there but cannot be read is
/// an error naming it: it was skipped for the built-in policy, and a file that says
/// `mode = "keys"` served in open mode, on the server's key.
#[test]
fn an_unreadable_default_policy_file_is_an_error() {
    let dir = std::env::temp_dir().join(format!("pgw-policy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("policies/default.toml"),
        b"# caf\xe9\n[auth]\nmode = \"keys\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .arg("check")
        .current_dir(&dir)
        .env_clear()
        .env("POE_API_KEY", "test-key-not-real")
        .env("POE_GATEWAY_DATABASE_URL", "sqlite::memory:")
        .output()
        .expect("the binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("policies/default.toml") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Postgres that refuses the connection is quoted: the error said only `db error`.
#[test]
fn a_refused_postgres_connection_says_why() {
    let Ok(base) = std::env::var("POE_GATEWAY_TEST_POSTGRES_URL") else {
        return;
    };
    let Some((server, _)) = base.rsplit_once('/') else {
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .args(["keys", "list"])
        .env_clear()
        .env(
            "POE_GATEWAY_DATABASE_URL",
            format!("{server}/no_such_database_here"),
        )
        .output()
        .expect("the binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no_such_database_here\" does not exist"),
        "{err}"
    );
}

/// `check` shows the upstream URL without a password in it (a unit's journal keeps it).
#[test]
fn check_masks_a_password_in_the_upstream_url() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .arg("check")
        .env_clear()
        .env("POE_API_KEY", "test-key-not-real")
        .env("POE_GATEWAY_DATABASE_URL", "sqlite::memory:")
        .env("POE_BASE_URL", "https://user:hunter2secret@proxy.example")
        .output()
        .expect("the binary runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("proxy.example") && !text.contains("hunter2secret"),
        "{text}"
    );
}

#[test]
fn an_environment_variable_that_is_not_utf8_is_no_panic() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = OsStr::from_bytes(b"caf\xe9");
    let check = |name: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
            .arg("check")
            .env_clear()
            .env("POE_API_KEY", "test-key-not-real")
            .env(name, not_utf8)
            .output()
            .expect("the binary runs")
    };
    // Someone else's variable: ignored, as before it panicked the whole binary.
    let out = check("LC_SOMETHING");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One of ours: a configuration error that names it.
    let out = check("POE_GATEWAY_LISTEN");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("POE_GATEWAY_LISTEN") && err.contains("not valid UTF-8"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Open mode on loopback: a web page the user happens to open must not spend the Poe key
/// (a cross-site `text/plain` POST needs no CORS preflight) or read answers through a name
/// rebound to 127.0.0.1. Real clients send no `Origin` and a loopback `Host`.
#[tokio::test]
async fn open_mode_refuses_web_pages_and_rebound_names() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "hi"));
    let gw = TestGateway::start(&up, "", &[]).await;
    let body = chat_body("gpt-5", false);

    let refused: [&[(&str, &str)]; 4] = [
        &[("origin", "https://evil.example")],
        &[("origin", "null")],
        &[
            ("content-type", "text/plain"),
            ("origin", "http://localhost:3000"),
        ],
        &[("host", "evil.example:8080")],
    ];
    for headers in refused {
        let resp = request(&gw, "POST", "/v1/chat/completions", headers, &body).await;
        assert_eq!(resp.status(), 403, "{headers:?}");
        let e = body_json(resp).await;
        assert_eq!(e["error"]["code"], "origin_not_allowed", "{headers:?}: {e}");
        assert_eq!(e["error"]["type"], "permission_error");
    }
    let resp = request(&gw, "GET", "/v1/models", &[("host", "rebound.example")], "").await;
    assert_eq!(resp.status(), 403);
    // The name also comes as HTTP/2's `:authority`, or in an absolute-form target: it was
    // served either way, the Host header alone being checked.
    let port = gw.addr.port();
    let to = |name: &str| format!("http://{name}:{port}/v1/models");
    for (uri, status) in [(to("rebound.example"), 403), (to("127.0.0.1"), 200)] {
        let req = http::Request::get(&uri)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        // Sent to the gateway's address, whatever the name.
        let conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let (mut send, driver) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(conn),
        )
        .await
        .unwrap();
        tokio::spawn(driver);
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "h2 {uri}");
    }
    // `/mcp` as well, whose own check (rmcp's) reads the Host header only.
    for (method, path) in [("GET", "/v1/models"), ("POST", "/mcp")] {
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "{method} http://rebound.example:{port}{path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\
             content-type: application/json\r\naccept: application/json, text/event-stream\r\n\
             content-length: 2\r\n\r\n{{}}"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = sock.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 403"),
            "absolute form, {path}: {text}"
        );
    }
    // On the Messages API's paths, the refusal is in Anthropic's shape, as its other errors.
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let headers = [
            ("origin", "https://evil.example"),
            ("anthropic-version", "2023-06-01"),
        ];
        let resp = request(&gw, "POST", path, &headers, "{}").await;
        assert_eq!(resp.status(), 403, "{path}");
        let e = body_json(resp).await;
        assert_eq!(e["type"], "error", "{path}: {e}");
        assert_eq!(e["error"]["type"], "permission_error", "{path}: {e}");
    }
    assert_eq!(up.chat_calls(), 0, "a refused page reached Poe");

    // curl, the SDKs: no Origin, the loopback Host the client derives from the URL.
    for host in [format!("127.0.0.1:{}", gw.addr.port()), "localhost".into()] {
        let resp = post(&gw, &body, &[("host", &host)]).await;
        assert_eq!(resp.status(), 200, "{host}");
        body_bytes(resp).await;
    }

    // Origins and names the policy trusts.
    let gw = TestGateway::start(
        &up,
        "[mcp]\nallowed_origins = [\"http://localhost:*\", \"https://app.example.com\"]\n\
         allowed_hosts = [\"gw.example.com\"]\n",
        &[],
    )
    .await;
    for headers in [
        [
            ("origin", "http://localhost:5173"),
            ("host", "localhost:8080"),
        ],
        [
            ("origin", "https://app.example.com"),
            ("host", "gw.example.com"),
        ],
        // Names compare without regard to ASCII case, as DNS does.
        [
            ("origin", "HTTPS://App.Example.com"),
            ("host", "GW.example.com:8080"),
        ],
    ] {
        let resp = post(&gw, &body, &headers).await;
        assert_eq!(resp.status(), 200, "{headers:?}");
        body_bytes(resp).await;
    }
    let resp = post(&gw, &body, &[("origin", "https://app.example.com:8443")]).await;
    assert_eq!(resp.status(), 403);

    // With gateway keys the key is the guard: a page cannot send one it does not have.
    let gw = TestGateway::start(&up, "[auth]\nmode = \"passthrough\"\n", &[]).await;
    let resp = post(
        &gw,
        &body,
        &[
            ("origin", "https://evil.example"),
            ("authorization", "Bearer poe-user-key"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
}

/// A page at an origin the policy lists may call the gateway from a browser, in either auth
/// mode: its preflight is answered, and every answer (errors too) carries the headers the
/// browser needs before it hands the answer to the page. Other pages get no CORS headers, and
/// their preflights are refused. Headers as Chrome sends them before the OpenAI SDK's POST.
#[tokio::test]
async fn listed_origins_get_cors_and_others_do_not() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "hi"));
    let body = chat_body("gpt-5", false);
    let asked = "authorization,content-type,x-stainless-lang,x-stainless-retry-count";
    let page = "http://localhost:5173";
    let preflight = |origin: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", asked),
        ]
    };
    for mode in ["open", "keys"] {
        let policy = format!(
            "[auth]\nmode = \"{mode}\"\n[mcp]\nallowed_origins = [\"http://localhost:*\"]\n"
        );
        let (gw, _core) = ledger_gateway(&up, &policy).await;
        let auth = if mode == "keys" {
            bearer(&create_key(&gw, "web-app").await)
        } else {
            bearer("unused")
        };
        let calls = up.chat_calls();

        let resp = request(&gw, "OPTIONS", "/v1/chat/completions", &preflight(page), "").await;
        assert_eq!(resp.status(), 204, "{mode}");
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], page, "{mode}");
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        assert_eq!(h["access-control-allow-headers"], asked);
        assert!(h.contains_key("access-control-max-age"));
        assert_eq!(up.chat_calls(), calls, "a preflight reached Poe");

        // The page's request, and an error answer: both readable by the page.
        let resp = post(&gw, &body, &[("origin", page), ("authorization", &auth)]).await;
        assert_eq!(resp.status(), 200, "{mode}");
        let h = resp.headers().clone();
        body_bytes(resp).await;
        assert_eq!(h["access-control-allow-origin"], page);
        let exposed = h["access-control-expose-headers"].to_str().unwrap();
        for name in ["x-request-id", "x-cache", "retry-after", "mcp-session-id"] {
            assert!(exposed.contains(name), "{name} not exposed: {exposed}");
        }
        assert!(
            h.get_all("vary").iter().any(|v| v == "Origin"),
            "{:?}",
            h.get_all("vary")
        );
        let resp = request(
            &gw,
            "GET",
            "/v1/models/no-such-bot",
            &[("origin", page), ("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()["access-control-allow-origin"], page);

        // Another page: its preflight is refused and nothing it gets is readable.
        let evil = "https://evil.example";
        let resp = request(&gw, "OPTIONS", "/v1/chat/completions", &preflight(evil), "").await;
        assert_eq!(resp.status(), 403, "{mode}");
        assert!(!resp.headers().contains_key("access-control-allow-origin"));
        assert_eq!(body_json(resp).await["error"]["code"], "origin_not_allowed");
        let resp = post(&gw, &body, &[("origin", evil), ("authorization", &auth)]).await;
        // Open mode refuses the page; with keys, the key is the guard and the browser
        // withholds the answer.
        assert_eq!(resp.status(), if mode == "open" { 403 } else { 200 });
        assert!(!resp.headers().contains_key("access-control-allow-origin"));
        body_bytes(resp).await;

        // curl and the SDKs send no Origin and get no CORS headers.
        let resp = post(&gw, &body, &[("authorization", &auth)]).await;
        assert_eq!(resp.status(), 200);
        assert!(!resp.headers().contains_key("access-control-allow-origin"));
        body_bytes(resp).await;
    }

    // No origins listed (the default): every preflight is refused.
    let gw = TestGateway::start(&up, "", &[]).await;
    let resp = request(&gw, "OPTIONS", "/v1/chat/completions", &preflight(page), "").await;
    assert_eq!(resp.status(), 403);
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    // A plain OPTIONS (no preflight) still learns the route's methods.
    let resp = request(&gw, "OPTIONS", "/v1/chat/completions", &[], "").await;
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
}

/// A database error can name tables, files, hosts or SQL: the client sees what failed and
/// its request id, and the detail goes to the log.
#[tokio::test]
async fn database_failures_reach_clients_without_their_detail() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, _core) = TestGateway::with_ledger(&up, "[auth]\nmode = \"keys\"\n", &[], &db).await;
    let side = rusqlite::Connection::open(&path).unwrap();
    side.execute_batch(
        "ALTER TABLE gateway_keys RENAME TO keys_away; ALTER TABLE usage RENAME TO usage_away",
    )
    .unwrap();

    let leaks = |msg: &str| {
        ["keys_away", "gateway_keys", "no such table", "usage", &path]
            .iter()
            .any(|s| msg.contains(s))
    };
    let resp = post(
        &gw,
        &chat_body("gpt-5", false),
        &[("authorization", "Bearer pgw_not-a-key-the-database-holds")],
    )
    .await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    // A key the gateway cannot check while its store fails: a 503 to retry, not a 500.
    assert!(resp.headers().contains_key("retry-after"));
    let e = expect_error(resp, 503, "overloaded_error").await;
    let msg = e["message"].as_str().unwrap();
    assert_eq!(e["code"], "shared_state_unavailable");
    assert!(msg.contains("key store"), "{msg}");
    assert!(!leaks(msg), "{msg}");
    assert!(!id.is_empty());

    let resp = request(
        &gw,
        "GET",
        "/admin/usage",
        &[("authorization", &bearer(ADMIN_KEY))],
        "",
    )
    .await;
    let e = expect_error(resp, 500, "server_error").await;
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("usage report"), "{msg}");
    assert!(!leaks(msg.trim_start_matches("the usage report")), "{msg}");
    assert_eq!(up.chat_calls(), 0);
}

/// Each request body is read whole, so their total is bounded too (`server.max_bodies_bytes`):
/// slow clients holding large bodies cannot exhaust the gateway's memory. Past the total a
/// request gets 503 with Retry-After at once, and the room comes back when those bodies go.
#[tokio::test]
async fn request_bodies_in_memory_are_bounded_in_all() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let policy = "[server]\nmax_body_bytes = \"1MiB\"\nmax_bodies_bytes = \"2MiB\"\n";
    let (gw, _core) = ledger_gateway(&up, policy).await;
    // Two clients declare a whole 1 MiB body each and send only the start of it.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"model\":\"gpt-5\",",
            1024 * 1024
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        slow.push(sock);
    }
    // Until both are being read, a third may still fit: wait for the refusal.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        if resp.status() == 503 {
            break resp;
        }
        let _ = body_bytes(resp).await;
        assert!(
            std::time::Instant::now() < deadline,
            "the bodies' total was never reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["retry-after"], "1");
    let e = expect_error(refused, 503, "overloaded_error").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("server.max_bodies_bytes"),
        "{e}"
    );
    // The slow clients go away: their share comes back.
    drop(slow);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        if resp.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the room never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients that make one request per connection and then hold it idle would keep every
/// `server.max_connections` slot for the whole `server.idle_timeout` (300 s) and lock others
/// out. While few slots are free the gateway closes connections idle for 10 s instead, so a
/// new client gets in well before the idle timeout.
#[tokio::test(start_paused = true)]
async fn idle_connections_make_room_when_the_slots_run_out() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nmax_connections = 8\n", &[]).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        held.push(tokio::spawn(conn));
        let req = http::Request::get(gw.url("/healthz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = body_bytes(resp).await;
        held.push(tokio::spawn(async move {
            // Keeps the connection's sender, so only the gateway can end it.
            let _send = send;
            std::future::pending::<Result<(), hyper::Error>>().await
        }));
    }
    // All slots are taken by idle connections; a ninth client waits for one.
    let resp = tokio::time::timeout(Duration::from_secs(60), get(&gw, "/healthz"))
        .await
        .expect("no room before server.idle_timeout: idle connections kept every slot");
    assert_eq!(resp.status(), 200);
}

/// Connections that never send a request held their slots for the whole
/// `server.header_read_timeout` (30 s), however crowded the server: reopened every 30 s, they
/// kept every other client out. While few slots are free a first request must come within
/// 5 s, so a new client gets in well before the header timeout.
#[tokio::test(start_paused = true)]
async fn silent_connections_make_room_when_the_slots_run_out() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nmax_connections = 8\n", &[]).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(gw.addr).await.unwrap());
    }
    let resp = tokio::time::timeout(Duration::from_secs(20), get(&gw, "/healthz"))
        .await
        .expect("no room before server.header_read_timeout: silent connections kept every slot");
    assert_eq!(resp.status(), 200);
}

/// `server.max_connections_per_client`: one address holding its share has its next
/// connections closed at once, and gets a place again once one of its own ends.
#[tokio::test]
async fn one_client_address_holds_at_most_its_share_of_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nmax_connections_per_client = 2\n", &[]).await;
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
    // Answered (bytes read), and kept open: a connection that holds its place. A closed one
    // reads nothing, or is reset (it was sent a request it never read).
    let open = async || {
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let _ = sock.write_all(healthz).await;
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .expect("an answer or a close")
            .unwrap_or(0);
        (sock, n)
    };
    let (first, n) = open().await;
    assert!(n > 0);
    let (_second, n) = open().await;
    assert!(n > 0);
    let (_third, n) = open().await;
    assert_eq!(n, 0, "a third connection from the same address was served");
    // One of its own ends: it gets a place again (once the server has seen the close).
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        let (sock, n) = open().await;
        if n > 0 {
            break sock;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Counted (read on a connection it holds: a new one would be refused too).
    again
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let want = "poe_gateway_client_connections_refused_total ";
    // Until the whole line has come.
    let whole = |seen: &[u8]| {
        let text = String::from_utf8_lossy(seen);
        text.find(want).is_some_and(|at| text[at..].contains('\n'))
    };
    while !whole(&seen) {
        let n = tokio::time::timeout(Duration::from_secs(10), again.read(&mut buf))
            .await
            .expect("the metrics")
            .unwrap();
        assert!(n > 0, "closed before the metrics came");
        seen.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    let refused: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(want))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The third, and any tried while the close was not yet seen.
    assert!(refused >= 1.0, "{refused}");
}
