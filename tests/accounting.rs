//! Usage accounting over real sockets, on SQLite and on Postgres: tokens from streams and
//! JSON, the injected usage chunk stripped, broken and cancelled streams, cost, gateway keys
//! with RPM, budgets and model lists, the admin API, reports and metrics.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use poe_gateway::ledger::ReportQuery;
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALIASES: &str = "[aliases]\nclaude = \"claude-sonnet-4.5\"\ngpt = \"gpt-5\"\n";
const KEYS: &str =
    "[auth]\nmode = \"keys\"\n[aliases]\nclaude = \"claude-sonnet-4.5\"\ngpt = \"gpt-5\"\n";

fn usage_chunk(p: u64, c: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n",
        p + c
    )
}

/// Waits for queued rows to reach the ledger, then returns the totals.
async fn report(gw: &poe_gateway::Gateway, key: Option<&str>) -> poe_gateway::ledger::Report {
    gw.flush().await;
    gw.ledger()
        .store()
        .report(&ReportQuery {
            since_ms: 0,
            until_ms: i64::MAX,
            key_id: key.map(String::from),
            group_by: None,
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn stream_without_include_usage_is_accounted_and_the_client_sees_its_own_stream() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        // What Poe sends when asked for usage: the usage-only chunk before [DONE].
        let content = [
            chunk("gpt-5", "Hel"),
            chunk("gpt-5", "lo"),
            finish_chunk("gpt-5"),
        ];
        let mut reply = Reply::sse();
        for c in &content {
            reply = reply.send(c.clone());
        }
        up.push(reply.send(usage_chunk(11, 2)).send("data: [DONE]\n\n"));
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;

        let resp = post(&gw, &chat_body("gpt", true), &[]).await;
        let got = body_bytes(resp).await;
        let expected = [content.concat(), "data: [DONE]\n\n".to_string()].concat();
        assert_eq!(
            got,
            Bytes::from(expected),
            "{db}: the client must not see the injected usage"
        );
        let sent = up.chats()[0].json();
        assert_eq!(sent["stream_options"]["include_usage"], true, "{db}");

        let r = report(&core, None).await;
        assert_eq!(r.totals.requests, 1, "{db}");
        assert_eq!(r.totals.prompt_tokens, 11, "{db}");
        assert_eq!(r.totals.completion_tokens, 2, "{db}");
    }
}

#[tokio::test]
async fn stream_with_include_usage_passes_through_untouched() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        let body = [
            chunk("gpt-5", "Hi"),
            finish_chunk("gpt-5"),
            usage_chunk(5, 1),
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        up.push(Reply::sse().send(body.clone()));
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        let req = r#"{"model":"gpt","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#;
        let got = body_bytes(post(&gw, req, &[]).await).await;
        assert_eq!(got, Bytes::from(body), "{db}");
        assert_eq!(
            up.chats()[0].body,
            Bytes::from(req.replace("\"gpt\"", "\"gpt-5\""))
        );
        assert_eq!(report(&core, None).await.totals.prompt_tokens, 5, "{db}");
    }
}

#[tokio::test]
async fn usage_on_a_content_chunk_keeps_the_content() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        let last = r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":9,"total_tokens":13}}"#;
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "Hi"))
                .send(format!("{last}\n\n"))
                .send("data: [DONE]\n\n"),
        );
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        let got = String::from_utf8(
            body_bytes(post(&gw, &chat_body("gpt", true), &[]).await)
                .await
                .to_vec(),
        )
        .unwrap();
        let want = format!(
            "{}data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"!\"}},\"finish_reason\":\"stop\"}}]}}\n\ndata: [DONE]\n\n",
            chunk("gpt-5", "Hi")
        );
        assert_eq!(got, want, "{db}");
        assert_eq!(
            report(&core, None).await.totals.completion_tokens,
            9,
            "{db}"
        );
    }
}

#[tokio::test]
async fn a_stream_opening_with_a_byte_order_mark_is_read_from_its_first_event() {
    // The SSE spec skips a leading BOM. Read as text, it would hide the first event's
    // `data` field: here the one chunk carrying both the answer and the usage.
    for db in databases().await {
        let up = MockUpstream::start().await;
        let only = r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":6,"completion_tokens":3,"total_tokens":9}}"#;
        // Whole in the first frame, and cut inside the mark (its first two bytes alone).
        up.push(
            Reply::sse()
                .send(format!("\u{FEFF}{only}\n\n"))
                .send("data: [DONE]\n\n"),
        );
        up.push(
            Reply::sse()
                .send(Bytes::from_static(b"\xEF\xBB"))
                .sleep(Duration::from_millis(20))
                .send([&b"\xBF"[..], only.as_bytes(), b"\n\ndata: [DONE]\n\n"].concat()),
        );
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        for _ in 0..2 {
            let got = String::from_utf8(
                body_bytes(post(&gw, &chat_body("gpt", true), &[]).await)
                    .await
                    .to_vec(),
            )
            .unwrap();
            // The mark still reaches the client; the usage it did not ask for does not.
            let want = "\u{FEFF}data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
            assert_eq!(got, want, "{db}");
        }
        assert_eq!(up.chats().len(), 2, "{db}: both answers come from upstream");
        let r = report(&core, None).await;
        assert_eq!(r.totals.requests, 2, "{db}");
        assert_eq!(r.totals.prompt_tokens, 12, "{db}");
        assert_eq!(r.totals.completion_tokens, 6, "{db}");
    }
}

#[tokio::test]
async fn non_stream_usage_and_cost_from_the_catalogue() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.push(Reply::completion("claude-sonnet-4.5", "hello"));
        up.push(Reply::completion("mystery-bot", "hello"));
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        assert_eq!(
            post(&gw, &chat_body("claude", false), &[]).await.status(),
            200
        );
        let _ = body_bytes(post(&gw, &chat_body("mystery-bot", false), &[]).await).await;
        assert_eq!(up.chats().len(), 2, "{db}: both answers come from upstream");
        let r = report(&core, None).await;
        assert_eq!(r.totals.requests, 2, "{db}");
        assert_eq!(r.totals.prompt_tokens, 14, "{db}");
        // 7 prompt tokens at $3/M and 3 completion tokens at $15/M; mystery-bot has no price.
        let want = 7.0 * 0.000003 + 3.0 * 0.000015;
        assert!(
            (r.totals.cost_usd - want).abs() < 1e-12,
            "{db}: {}",
            r.totals.cost_usd
        );
        assert_eq!(
            r.totals.unpriced, 1,
            "{db}: an unknown price is null, not 0"
        );
    }
}

#[tokio::test]
async fn pricing_overrides_win() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.push(Reply::completion("mystery-bot", "hello"));
        let policy =
            "[aliases]\n[pricing.mystery-bot]\nprompt = 0.001\ncompletion = 0.002\nrequest = 0.5\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        let _ = body_bytes(post(&gw, &chat_body("mystery-bot", false), &[]).await).await;
        let r = report(&core, None).await;
        assert!(
            (r.totals.cost_usd - (7.0 * 0.001 + 3.0 * 0.002 + 0.5)).abs() < 1e-9,
            "{db}"
        );
        assert_eq!(r.totals.unpriced, 0);
    }
}

/// A `[pricing]` table with only some fields keeps Poe's price for the others: a per-request
/// fee added to a bot Poe prices per token does not make its tokens free.
#[tokio::test]
async fn a_partial_pricing_table_keeps_poes_other_prices() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("claude-sonnet-4.5", "hello"));
    let policy = "[aliases]\n[pricing.\"claude-sonnet-4.5\"]\nrequest = 0.5\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &databases().await[0]).await;
    let _ = body_bytes(post(&gw, &chat_body("claude-sonnet-4.5", false), &[]).await).await;
    let r = report(&core, None).await;
    // Poe's 3e-6 per prompt token and 15e-6 per completion token, plus the table's fee.
    let want = 7.0 * 0.000003 + 3.0 * 0.000015 + 0.5;
    assert!(
        (r.totals.cost_usd - want).abs() < 1e-9,
        "{}",
        r.totals.cost_usd
    );
}

#[tokio::test]
async fn broken_and_cancelled_streams_are_recorded_with_estimates() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "twelve chars"))
                .drop_connection(),
        );
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "eight ch"))
                .gate(&gate)
                .send("data: [DONE]\n\n"),
        );
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;

        let _ = body_bytes(post(&gw, &chat_body("gpt", true), &[]).await).await;

        // Cancelled: read the first event on a raw socket, then hang up.
        let mut sock = raw_chat(&gw, &chat_body("gpt", true)).await;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("eight ch") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        drop(sock);
        tokio::time::timeout(Duration::from_secs(10), up.wait_disconnect())
            .await
            .unwrap();

        // Both rows: outcome and estimated completion tokens (text bytes / 4, rounded up).
        core.flush().await;
        let store = core.ledger().store();
        let all = store.report(&everything()).await.unwrap();
        assert_eq!(all.totals.requests, 2, "{db}");
        assert_eq!(
            all.totals.errors, 2,
            "{db}: incomplete and cancelled count as errors"
        );
        assert_eq!(
            all.totals.completion_tokens,
            3 + 2,
            "{db}: ceil(12/4) + ceil(8/4)"
        );
        // The prompt is estimated too (Poe charges it in full): the request's strings, keys
        // included, are 39 bytes: ceil(39/4) each.
        assert_eq!(all.totals.prompt_tokens, 10 + 10, "{db}");
    }
}

#[tokio::test]
async fn a_cut_off_streams_prompt_is_estimated_and_priced() {
    // A long prompt cut off after the first chunk: its estimated prompt is priced, so a
    // budget cannot be spent by asking big questions and hanging up.
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.push(Reply::sse().send(chunk("gpt-5", "Hi")).drop_connection());
        let policy = "[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        let question = "x".repeat(4000);
        // An attachment's base64 is not text: it is left out of the estimate.
        let image = format!("data:image/png;base64,{}", "A".repeat(40_000));
        let body = serde_json::json!({
            "model": "gpt-5",
            "stream": true,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": image}},
            ]}],
        })
        .to_string();
        let _ = body_bytes(post(&gw, &body, &[]).await).await;
        let r = report(&core, None).await;
        // The strings, keys included, without the data URL: 4,076 bytes, ceil(4076/4).
        assert_eq!(r.totals.prompt_tokens, 1019, "{db}");
        assert_eq!(r.totals.completion_tokens, 1, "{db}");
        let want = 1019.0 * 0.001 + 0.002;
        assert!(
            (r.totals.cost_usd - want).abs() < 1e-9,
            "{db}: {}",
            r.totals.cost_usd
        );
    }
}

/// A chat request written on a raw connection, so the test can hang up whenever it likes.
async fn raw_chat(gw: &TestGateway, body: &str) -> tokio::net::TcpStream {
    raw_chat_with(gw, body, "").await
}

/// [`raw_chat`] with a gateway key.
async fn raw_chat_as(gw: &TestGateway, body: &str, key: &str) -> tokio::net::TcpStream {
    raw_chat_with(gw, body, &format!("authorization: Bearer {key}\r\n")).await
}

async fn raw_chat_with(gw: &TestGateway, body: &str, headers: &str) -> tokio::net::TcpStream {
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    sock
}

/// A request with the admin key.
async fn as_admin(
    gw: &TestGateway,
    method: &str,
    path: &str,
    body: &str,
) -> http::Response<hyper::body::Incoming> {
    let auth = format!("Bearer {ADMIN_KEY}");
    request(gw, method, path, &[("authorization", &auth)], body).await
}

async fn create_key(gw: &TestGateway, body: &str) -> (String, String) {
    let resp = as_admin(gw, "POST", "/admin/keys", body).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(
        resp.headers()["cache-control"],
        "no-store",
        "it holds a key"
    );
    let v = body_json(resp).await;
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn gateway_keys_authenticate_and_revoke() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "ok"));
        let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
        expect_error(
            post(&gw, &chat_body("gpt", false), &[]).await,
            401,
            "authentication_error",
        )
        .await;
        expect_error(
            post(
                &gw,
                &chat_body("gpt", false),
                &[("authorization", "Bearer pgw_not-a-real-key")],
            )
            .await,
            401,
            "authentication_error",
        )
        .await;

        let (id, key) = create_key(&gw, r#"{"name":"alice"}"#).await;
        let auth = format!("Bearer {key}");
        let resp = post(&gw, &chat_body("gpt", false), &[("authorization", &auth)]).await;
        assert_eq!(resp.status(), 200, "{db}");
        assert_eq!(
            up.chats().last().unwrap().headers["authorization"],
            format!("Bearer {UPSTREAM_KEY}").as_str(),
            "upstream is paid by the server key, never the gateway key"
        );
        let _ = body_bytes(resp).await;

        // The caller's own usage.
        let v = body_json(
            request(
                &gw,
                "GET",
                "/v1/usage?group_by=model",
                &[("authorization", &auth)],
                "",
            )
            .await,
        )
        .await;
        assert_eq!(v["totals"]["requests"], 1, "{db}: {v}");
        assert_eq!(v["groups"][0]["group"], "gpt-5");

        let resp = as_admin(&gw, "DELETE", &format!("/admin/keys/{id}"), "").await;
        assert_eq!(resp.status(), 200);
        let e = expect_error(
            post(&gw, &chat_body("gpt", false), &[("authorization", &auth)]).await,
            401,
            "authentication_error",
        )
        .await;
        assert!(e["message"].as_str().unwrap().contains("revoked"));
        assert_eq!(report(&core, Some(&id)).await.totals.requests, 1, "{db}");
    }
}

#[tokio::test]
async fn a_model_list_covers_a_fallback_chain_only_whole() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
        let policy =
            "[auth]\nmode = \"keys\"\n[aliases]\npair = [\"claude-sonnet-4.5\", \"gpt-5\"]\n";
        let (gw, _core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        for (i, (models, allowed)) in [
            // One bot of the chain: the chain would also call the other.
            (r#"["claude-sonnet-4.5"]"#, false),
            (r#"["claude-sonnet-4.5","gpt-5"]"#, true),
            // The alias itself, named by the admin.
            (r#"["pair"]"#, true),
        ]
        .into_iter()
        .enumerate()
        {
            let body = format!(r#"{{"name":"k{i}","models":{models}}}"#);
            let (_, key) = create_key(&gw, &body).await;
            let auth = format!("Bearer {key}");
            let resp = post(&gw, &chat_body("pair", false), &[("authorization", &auth)]).await;
            if allowed {
                assert_eq!(resp.status(), 200, "{db}: {models}");
                let _ = body_bytes(resp).await;
            } else {
                let e = expect_error(resp, 403, "permission_error").await;
                assert_eq!(e["code"], "model_not_allowed", "{db}: {models}");
            }
        }
        assert_eq!(up.chat_calls(), 2, "{db}");
    }
}

#[tokio::test]
async fn key_rpm_model_list_and_budget() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
        let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;

        let (_, key) = create_key(&gw, r#"{"name":"bob","rpm":2,"models":["claude"]}"#).await;
        let auth = format!("Bearer {key}");
        let e = expect_error(
            post(&gw, &chat_body("gpt", false), &[("authorization", &auth)]).await,
            403,
            "permission_error",
        )
        .await;
        assert_eq!(e["code"], "model_not_allowed");
        for _ in 0..2 {
            let r = post(
                &gw,
                &chat_body("claude", false),
                &[("authorization", &auth)],
            )
            .await;
            assert_eq!(r.status(), 200);
            let _ = body_bytes(r).await;
        }
        let r = post(
            &gw,
            &chat_body("claude", false),
            &[("authorization", &auth)],
        )
        .await;
        assert!(r.headers().contains_key("retry-after"));
        let e = expect_error(r, 429, "rate_limit_error").await;
        assert_eq!(e["code"], "rate_limit_exceeded");

        // A budget of 0.0001 USD: one claude call (7*3e-6 + 3*15e-6 = 6.6e-5) fits, the next
        // still fits (checked before, charged after), the third is refused. A client sending
        // one request after another: each is charged as it ends, before its last bytes go out,
        // so the third is refused at once (not a ledger batch later).
        let (_, key) = create_key(
            &gw,
            r#"{"name":"carol","budget_usd":0.0001,"period":"day"}"#,
        )
        .await;
        let auth = format!("Bearer {key}");
        for _ in 0..2 {
            let r = post(
                &gw,
                &chat_body("claude", false),
                &[("authorization", &auth)],
            )
            .await;
            assert_eq!(r.status(), 200, "{db}");
            let _ = body_bytes(r).await;
        }
        let r = post(
            &gw,
            &chat_body("claude", false),
            &[("authorization", &auth)],
        )
        .await;
        let e = expect_error(r, 429, "insufficient_quota").await;
        assert_eq!(e["code"], "insufficient_quota");
        assert_eq!(
            up.chat_calls(),
            2 + 2,
            "{db}: the refused call never reached Poe"
        );
    }
}

/// Requests in flight hold their estimated cost against their key's budget: parallel
/// requests are let through only while the spend plus what the others hold is under it.
/// (Checked before the call and charged as it ended, 20 parallel streams on a $0.05 key all
/// passed and spent $0.36.) Those refused for what is held get a 429 the SDKs retry; once the
/// held requests are charged, the spent budget refuses as before.
#[tokio::test]
async fn parallel_requests_cannot_all_pass_one_budget() {
    let up = MockUpstream::start().await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    // claude-sonnet-4.5 at 3e-6 per prompt token and 15e-6 per output token: 7 + 1000 tokens
    // cost $0.015021.
    up.set_fallback(
        Reply::sse()
            .send(chunk("claude-sonnet-4.5", "Hi"))
            .gate(&gate)
            .send(finish_chunk("claude-sonnet-4.5"))
            .send(usage_chunk(7, 1000))
            .send("data: [DONE]\n\n"),
    );
    let db = databases().await.remove(0);
    let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (key_id, key) = create_key(&gw, r#"{"name":"par","budget_usd":0.05,"period":"day"}"#).await;
    let auth = format!("Bearer {key}");
    // Each is held at about $0.015 (its prompt and `max_tokens`): the fourth still finds
    // $0.045 held, under $0.05; the fifth finds $0.06.
    let body = r#"{"model":"claude","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":1000}"#;
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let addr = gw.addr;
        let auth = auth.clone();
        racing.spawn(async move {
            let gw = TestGateway { addr, handle: None };
            post(&gw, body, &[("authorization", &auth)]).await
        });
    }
    let (mut admitted, mut held_back) = (Vec::new(), 0);
    while let Some(resp) = racing.join_next().await {
        let resp = resp.unwrap();
        match resp.status().as_u16() {
            200 => admitted.push(resp),
            429 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                assert!(!resp.headers().contains_key("x-should-retry"));
                let e = expect_error(resp, 429, "rate_limit_error").await;
                assert_eq!(e["code"], "rate_limit_exceeded", "{e}");
                let m = e["message"].as_str().unwrap();
                assert!(m.contains("held by its 4 requests in flight"), "{m}");
                held_back += 1;
            }
            s => panic!("status {s}"),
        }
    }
    assert_eq!(admitted.len(), 4, "{held_back} held back");
    assert_eq!(
        up.chat_calls(),
        4,
        "the held-back requests never reached Poe"
    );

    // They end and are charged ($0.060): the budget is spent, and says so.
    gate.add_permits(100);
    for resp in admitted {
        let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }
    let r = post(&gw, body, &[("authorization", &auth)]).await;
    let e = expect_error(r, 429, "insufficient_quota").await;
    assert!(
        e["message"].as_str().unwrap().contains("spent $0.06"),
        "{e}"
    );
    let spent = report(&core, Some(&key_id)).await.totals.cost_usd;
    assert!((spent - 4.0 * 0.015021).abs() < 1e-9, "{spent}");

    // A request whose client hangs up lets go of its hold too. And a request refused for
    // what is held spends none of the key's requests per minute (two here: the first, and
    // the one after the hang-up).
    let (_, key) = create_key(
        &gw,
        r#"{"name":"gone","budget_usd":0.015,"period":"day","rpm":2}"#,
    )
    .await;
    let auth = format!("Bearer {key}");
    let stuck = Arc::new(tokio::sync::Semaphore::new(0));
    for _ in 0..2 {
        up.push(
            Reply::sse()
                .send(chunk("claude-sonnet-4.5", "Hi"))
                .gate(&stuck),
        );
    }
    let first = post(&gw, body, &[("authorization", &auth)]).await;
    assert_eq!(first.status(), 200);
    let r = post(&gw, body, &[("authorization", &auth)]).await;
    let e = expect_error(r, 429, "rate_limit_error").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("by its 1 request in flight"),
        "{e}"
    );
    drop(first);
    up.wait_disconnect().await;
    let mut again = None;
    for _ in 0..100 {
        let r = post(&gw, body, &[("authorization", &auth)]).await;
        if r.status() == 200 {
            again = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        again.is_some(),
        "the hold outlived its request, or the refusals spent the key's rpm"
    );
}

/// The binary run as a command (`keys ...`, `usage ...`) on the ledger at `db`, with no other
/// environment.
fn cli(db: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POE_GATEWAY_DATABASE_URL", db)
        .output()
        .expect("the binary runs")
}

/// `keys create` whose output cannot be written (a full disk, a closed pipe) takes the key
/// back: it stayed active, its secret shown to nobody. `keys list` into a full disk does
/// not panic.
#[tokio::test]
async fn a_new_key_that_could_not_be_shown_is_revoked() {
    let (db, _) = sqlite_database().await;
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .args(["keys", "create", "--name", "lost"])
        .env_clear()
        .env("POE_GATEWAY_DATABASE_URL", &db)
        .stdout(full)
        .output()
        .expect("the binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("could not be shown") && err.contains("revoked"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let list = cli(&db, &["keys", "list", "--format", "json"]);
    let keys: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(keys[0]["name"], "lost", "{keys}");
    assert!(keys[0]["revoked_ms"].is_number(), "{keys}");
    // A ledger in the command's own memory is refused alike by every `keys` command (create
    // printed a key stored nowhere; list refused it).
    for args in [
        &["keys", "create", "--name", "x"][..],
        &["keys", "list"][..],
    ] {
        let out = cli("sqlite::memory:", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("sqlite::memory:") && out.stdout.is_empty(),
            "{args:?}: {err}"
        );
    }
}

/// One non-stream `claude` call with a gateway key, read to its end; its status.
async fn claude_as(gw: &TestGateway, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    let r = post(gw, &chat_body("claude", false), &[("authorization", &auth)]).await;
    let status = r.status().as_u16();
    let _ = body_bytes(r).await;
    status
}

/// A key given a new secret (`POST /admin/keys/{id}/rotate`, `keys rotate`) stays the same
/// key: its id, budget and spend carry on, and its reports are one. The old secret is
/// refused at once; the new one works.
#[tokio::test]
async fn a_rotated_key_keeps_its_id_budget_and_history() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
        let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
        // 6.6e-5 a call: 0.00019 is two calls and most of a third.
        let (id, old) = create_key(
            &gw,
            r#"{"name":"leaky","budget_usd":0.00019,"period":"day"}"#,
        )
        .await;
        assert_eq!(claude_as(&gw, &old).await, 200);
        assert_eq!(claude_as(&gw, &old).await, 200);

        let r = as_admin(&gw, "POST", "/admin/keys/leaky/rotate", "").await;
        assert_eq!(r.status(), 200, "{db}");
        assert_eq!(
            r.headers()["cache-control"],
            "no-store",
            "{db}: it holds a key"
        );
        let v = body_json(r).await;
        assert_eq!(v["id"], id.as_str(), "{db}: the same key");
        assert_eq!(v["budget_usd"], 0.00019);
        let new = v["key"].as_str().unwrap().to_string();
        assert_ne!(new, old);

        assert_eq!(
            claude_as(&gw, &old).await,
            401,
            "{db}: the old secret is refused at once"
        );
        assert_eq!(claude_as(&gw, &new).await, 200, "{db}");
        // The budget's spend carried over: the fourth call is over it.
        assert_eq!(claude_as(&gw, &new).await, 429, "{db}");
        core.flush().await;
        let report = report(&core, Some(&id)).await;
        assert_eq!(report.totals.requests, 4, "{db}: one key's history");

        let r = as_admin(&gw, "POST", "/admin/keys/nobody/rotate", "").await;
        expect_error(r, 404, "invalid_request_error").await;
        let r = as_admin(&gw, "GET", "/admin/keys/leaky/rotate", "").await;
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "POST");

        // The CLI does the same; it prints the new key on its last line.
        let out = cli(&db, &["keys", "rotate", &id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let newest = stdout.lines().last().unwrap();
        assert!(newest.starts_with("pgw_") && newest != new, "{stdout}");
        let rec = core
            .ledger()
            .store()
            .key_by_hash(&poe_gateway::gateway::keys::hash_key(newest))
            .await
            .unwrap()
            .expect("the new key is stored");
        assert_eq!(rec.id, id);
    }
}

/// A key rotated by another process (the CLI, a replica) stays out during a ledger outage:
/// once a look-up has found its secret gone, the copy kept for outages is dropped too. It
/// was kept, and the old secret worked again while the ledger was down.
#[tokio::test]
async fn a_key_rotated_elsewhere_stays_out_when_the_ledger_fails() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (id, old) = create_key(&gw, r#"{"name":"dave"}"#).await;
    assert_eq!(claude_as(&gw, &old).await, 200);
    let out = cli(&db, &["keys", "rotate", &id]);
    assert!(out.status.success());
    // Past the key cache's 5 s: the old secret is looked up, and not found.
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    assert_eq!(claude_as(&gw, &old).await, 401);
    // Past it again, with the ledger failing: the old secret is not let in from memory.
    tokio::time::sleep(Duration::from_millis(5_100)).await;
    let side = rusqlite::Connection::open(&path).unwrap();
    side.execute_batch("ALTER TABLE gateway_keys RENAME TO keys_away")
        .unwrap();
    assert_ne!(claude_as(&gw, &old).await, 200);
}

/// Two gateways on one ledger without Redis (replicas on one Postgres, two processes on one
/// SQLite file) spend one budget: each reads the key's spend from the ledger again every few
/// seconds while it is in use, so one stops once the other has spent the rest. It read the
/// ledger once per period, and each let the key spend the whole budget.
#[tokio::test]
async fn gateways_on_one_ledger_see_each_others_spend() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
        let (a, core_a) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
        let (b, core_b) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
        // 6.6e-5 a call (7 * 3e-6 + 3 * 15e-6): 0.0003 is four calls and a half.
        let (_, key) = create_key(
            &a,
            r#"{"name":"shared","budget_usd":0.0003,"period":"day"}"#,
        )
        .await;
        for _ in 0..2 {
            assert_eq!(claude_as(&a, &key).await, 200, "{db}");
        }
        core_a.flush().await;
        // B reads A's two calls when it first checks the key, then spends the rest.
        for _ in 0..3 {
            assert_eq!(claude_as(&b, &key).await, 200, "{db}");
        }
        assert_eq!(claude_as(&b, &key).await, 429, "{db}: B counts A's calls");
        core_b.flush().await;
        // A knew only its own two calls. Once its figure is older than the re-read interval
        // it reads the ledger again, and refuses.
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        assert_eq!(claude_as(&a, &key).await, 429, "{db}: A counts B's calls");
        assert_eq!(up.chat_calls(), 5, "{db}");
    }
}

#[tokio::test]
async fn admin_api_needs_the_admin_key() {
    let up = MockUpstream::start().await;
    let db = databases().await.remove(0);
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    expect_error(
        request(&gw, "GET", "/admin/keys", &[], "").await,
        401,
        "authentication_error",
    )
    .await;
    expect_error(
        request(
            &gw,
            "GET",
            "/admin/keys",
            &[("authorization", "Bearer wrong")],
            "",
        )
        .await,
        401,
        "authentication_error",
    )
    .await;
    let (_, key) = create_key(&gw, r#"{"name":"dave"}"#).await;
    // A gateway key is not an admin key.
    expect_error(
        request(
            &gw,
            "GET",
            "/admin/keys",
            &[("authorization", &format!("Bearer {key}"))],
            "",
        )
        .await,
        401,
        "authentication_error",
    )
    .await;
    let v = body_json(as_admin(&gw, "GET", "/admin/keys", "").await).await;
    assert_eq!(v["data"][0]["name"], "dave");
    assert!(
        v["data"][0].get("hash").is_none() && v["data"][0].get("key").is_none(),
        "{v}"
    );
    expect_error(
        as_admin(&gw, "POST", "/admin/keys", r#"{"name":""}"#).await,
        400,
        "invalid_request_error",
    )
    .await;
    // A budget past any team's (1e300 was taken, and listed with 300 digits), or below 0.
    for budget in ["1e300", "1000000001", "-1"] {
        let body = format!(r#"{{"name":"rich","budget_usd":{budget}}}"#);
        let e = expect_error(
            as_admin(&gw, "POST", "/admin/keys", &body).await,
            400,
            "invalid_request_error",
        )
        .await;
        assert_eq!(e["param"], "budget_usd", "{budget}: {e}");
    }
    for (query, param) in [
        ("since=whenever", "since"),
        // An empty or backwards window is a mistake, not an empty report.
        ("since=2026-11-02&until=2026-11-01", "until"),
        ("since=2026-11-01&until=2026-11-01", "until"),
    ] {
        let e = expect_error(
            as_admin(&gw, "GET", &format!("/admin/usage?{query}"), "").await,
            400,
            "invalid_request_error",
        )
        .await;
        assert_eq!(e["param"], param, "{query}: {e}");
    }
    // An unescaped `+` offset reads as a space in a query string, and still works.
    let resp = as_admin(
        &gw,
        "GET",
        "/admin/usage?since=2026-11-01T00:00:00+01:00",
        "",
    )
    .await;
    let r = body_json(resp).await;
    assert_eq!(r["since_ms"], 1_793_487_600_000i64, "{r}");
}

#[tokio::test]
async fn admin_usage_sees_everyone_and_metrics_are_exported() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
    let db = databases().await.remove(0);
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    for name in ["erin", "frank"] {
        let (_, key) = create_key(&gw, &format!(r#"{{"name":"{name}"}}"#)).await;
        let _ = body_bytes(
            post(
                &gw,
                &chat_body("claude", false),
                &[("authorization", &format!("Bearer {key}"))],
            )
            .await,
        )
        .await;
    }
    let v = body_json(as_admin(&gw, "GET", "/admin/usage?group_by=key&since=1d", "").await).await;
    assert_eq!(v["totals"]["requests"], 2, "{v}");
    assert_eq!(v["groups"].as_array().unwrap().len(), 2, "{v}");

    let text = String::from_utf8(body_bytes(get(&gw, "/metrics").await).await.to_vec()).unwrap();
    for series in [
        "poe_gateway_requests_total{bot=\"claude-sonnet-4.5\"",
        "poe_gateway_prompt_tokens_total{bot=\"claude-sonnet-4.5\"} 14",
        "poe_gateway_cost_usd_total",
        "poe_gateway_request_duration_seconds_bucket",
        "poe_gateway_time_to_first_byte_seconds_bucket",
        "poe_gateway_ledger_written_total 2",
        "poe_gateway_upstream_attempts_total{result=\"ok\"} 2",
        "poe_gateway_streams_in_flight 0",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    assert!(!text.contains(UPSTREAM_KEY) && !text.contains(ADMIN_KEY));
}

#[tokio::test]
async fn rejected_requests_are_accounted() {
    let up = MockUpstream::start().await;
    let db = databases().await.remove(0);
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    let _ = body_bytes(post(&gw, "{nope", &[]).await).await;
    let r = report(&core, None).await;
    assert_eq!(r.totals.requests, 1);
    assert_eq!(r.totals.errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_wait_out_a_failing_database_instead_of_being_lost() {
    // The usage table goes away for a while (as a database that is down, locked or full
    // would fail every write): the rows are held and written once it is back.
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    let side = rusqlite::Connection::open(&path).unwrap();
    side.execute_batch("ALTER TABLE usage RENAME TO usage_away")
        .unwrap();
    for _ in 0..3 {
        let _ = body_bytes(post(&gw, &chat_body("gpt", false), &[]).await).await;
    }
    core.flush().await;
    side.execute_batch("ALTER TABLE usage_away RENAME TO usage")
        .unwrap();
    let r = report_once(&core, 3, "the held rows never reached the ledger").await;
    assert_eq!(r.totals.requests, 3);
}

/// Rows, keys and the migrations table of the SQLite ledger at `path`, read the way a
/// restarted gateway would: a connection of its own, opened read-only so that a missing file
/// is an error here instead of a new empty ledger.
fn ledger_file(path: &str) -> Result<(i64, Vec<String>, String), String> {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{path}: {e}"))?;
    let rows = c
        .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
        .map_err(|e| format!("{path}: {e}"))?;
    let mut stmt = c
        .prepare("SELECT name FROM gateway_keys ORDER BY name")
        .map_err(|e| format!("{path}: {e}"))?;
    let keys = stmt
        .query_map([], |r| r.get(0))
        .and_then(|r| r.collect::<Result<Vec<String>, _>>())
        .map_err(|e| format!("{path}: {e}"))?;
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("{path}: {e}"))?;
    Ok((rows, keys, check))
}

/// An operator deletes the SQLite ledger under a running gateway (its `-wal` and `-shm` left
/// behind, as `rm ledger.db` leaves them), then rotates it away with `mv`, then restores a
/// backup by renaming it into place. The gateway notices each time and counts it: a file gone
/// from the path is written back there whole (rows and keys from before and after), a moved
/// file keeps the rows it had, and a file renamed into place is adopted. None twice.
#[tokio::test]
async fn a_sqlite_ledger_deleted_or_moved_under_the_gateway_is_written_back() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    let chat = |n: usize| {
        let gw = &gw;
        async move {
            for _ in 0..n {
                let resp = post(gw, &chat_body("gpt", false), &[]).await;
                assert_eq!(resp.status(), 200);
                let _ = body_bytes(resp).await;
            }
        }
    };
    chat(2).await;
    let _ = create_key(&gw, r#"{"name":"before-the-delete"}"#).await;
    core.flush().await;
    assert_eq!(ledger_file(&path).unwrap().0, 2);

    // Deleted: the database file only. It is written back, with what it had.
    std::fs::remove_file(&path).unwrap();
    chat(3).await;
    let _ = create_key(&gw, r#"{"name":"after-the-delete"}"#).await;
    core.flush().await;
    let (rows, keys, check) = ledger_file(&path).expect("a ledger at the path again");
    assert_eq!(rows, 5, "the rows from before and after the delete");
    assert_eq!(keys, ["after-the-delete", "before-the-delete"]);
    assert_eq!(check, "ok");
    assert_eq!(report(&core, None).await.totals.requests, 5);
    assert_eq!(
        metric(&gw, "poe_gateway_ledger_reopened_total").await,
        Some(1.0)
    );
    assert!(!Path::new(&format!("{path}.copy")).exists());

    // Moved away (a rotation): the moved file keeps its rows up to the move, the path gets
    // the whole ledger back and goes on.
    let moved = format!("{path}.1");
    std::fs::rename(&path, &moved).unwrap();
    chat(1).await;
    core.flush().await;
    let (rows, keys, check) = ledger_file(&moved).expect("the moved ledger");
    assert_eq!((rows, keys.len(), check.as_str()), (5, 2, "ok"), "{moved}");
    let (rows, keys, check) = ledger_file(&path).expect("a ledger at the path again");
    assert_eq!((rows, keys.len(), check.as_str()), (6, 2, "ok"), "{path}");
    assert_eq!(report(&core, None).await.totals.requests, 6);
    assert_eq!(
        metric(&gw, "poe_gateway_ledger_reopened_total").await,
        Some(2.0)
    );

    // Restored from a backup, swapped in with a rename: the gateway goes on in the restored
    // file, which must not take the pages the replaced file left in the `-wal`.
    let restored = format!("{path}.restore");
    std::fs::copy(&moved, &restored).unwrap();
    std::fs::rename(&restored, &path).unwrap();
    chat(1).await;
    core.flush().await;
    let (rows, keys, check) = ledger_file(&path).expect("the restored ledger");
    assert_eq!((rows, check.as_str()), (6, "ok"), "{path}");
    assert_eq!(keys, ["after-the-delete", "before-the-delete"]);
    assert_eq!(report(&core, None).await.totals.requests, 6);
    assert_eq!(
        metric(&gw, "poe_gateway_ledger_reopened_total").await,
        Some(3.0)
    );
}

/// A chat with a gateway key, its status.
async fn chat_as(gw: &TestGateway, key: &str) -> u16 {
    let auth = format!("Bearer {key}");
    let resp = request(
        gw,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &chat_body("gpt", false),
    )
    .await;
    let status = resp.status().as_u16();
    let _ = body_bytes(resp).await;
    status
}

/// Keys mode, `rm ledger.db` while serving: the clients' keys keep working, and the keys, the
/// usage and the spend are in the file at the path afterwards (before, the gateway made an
/// empty ledger there and every key was refused).
#[tokio::test]
async fn keys_mode_survives_rm_of_the_sqlite_ledger() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (_, key) = create_key(&gw, r#"{"name":"client"}"#).await;
    assert_eq!(chat_as(&gw, &key).await, 200);
    core.flush().await;

    std::fs::remove_file(&path).unwrap();
    for _ in 0..3 {
        assert_eq!(chat_as(&gw, &key).await, 200);
    }
    // A key made after the delete works too.
    let (_, later) = create_key(&gw, r#"{"name":"later"}"#).await;
    assert_eq!(chat_as(&gw, &later).await, 200);
    core.flush().await;
    let (rows, keys, check) = ledger_file(&path).expect("the ledger at its path");
    assert_eq!((rows, check.as_str()), (5, "ok"));
    assert_eq!(keys, ["client", "later"]);
    assert_eq!(report(&core, None).await.totals.requests, 5);
}

/// Another process holds a read transaction on the ledger (Litestream, a `sqlite3` shell) when
/// the file is deleted: the gateway does not wait on it to put the ledger back, and key
/// look-ups and key creation complete (guarded by a generous timeout only).
#[tokio::test]
async fn a_reader_of_the_old_sqlite_file_does_not_hold_up_the_gateway() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (_, key) = create_key(&gw, r#"{"name":"client"}"#).await;
    assert_eq!(chat_as(&gw, &key).await, 200);
    core.flush().await;

    let reader = rusqlite::Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let seen: i64 = reader
        .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seen, 1);
    // More rows in the log, which the reader keeps from being checkpointed.
    assert_eq!(chat_as(&gw, &key).await, 200);
    core.flush().await;

    std::fs::remove_file(&path).unwrap();
    let guard = Duration::from_secs(60);
    for _ in 0..3 {
        let status = tokio::time::timeout(guard, chat_as(&gw, &key)).await;
        assert_eq!(status.expect("a key look-up completes"), 200);
    }
    let made = tokio::time::timeout(guard, create_key(&gw, r#"{"name":"later"}"#)).await;
    made.expect("a key is made");
    core.flush().await;
    let (rows, keys, check) = ledger_file(&path).expect("the ledger at its path");
    assert_eq!((rows, check.as_str()), (5, "ok"));
    assert_eq!(keys, ["client", "later"]);
    reader.execute_batch("COMMIT").unwrap();
}

/// The report once it counts `rows` requests, polled for up to a minute: rows that wait on
/// something outside the test's control (a writer's retry, a hang-up noticed).
async fn report_once(
    core: &poe_gateway::Gateway,
    rows: i64,
    what: &str,
) -> poe_gateway::ledger::Report {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = report(core, None).await;
        if r.totals.requests == rows {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} ({} rows)",
            r.totals.requests
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_row_the_database_refuses_does_not_sink_its_batch() {
    // Postgres cannot store a NUL in text. The request parser refuses such a model name, but
    // a row the database refuses for any reason must cost only itself.
    for db in databases().await {
        let ledger = poe_gateway::ledger::Ledger::open(&db, None).await.unwrap();
        for model in ["a", "b\u{0}", "c"] {
            ledger.record(poe_gateway::ledger::UsageRow {
                ts_ms: 1,
                request_id: model.into(),
                model: model.into(),
                bot: model.into(),
                status: 200,
                outcome: "completed",
                ..Default::default()
            });
        }
        ledger.flush().await;
        let r = ledger.store().report(&everything()).await.unwrap();
        let want = if db.starts_with("postgres") { 2 } else { 3 };
        assert_eq!(r.totals.requests, want, "{db}");
    }
}

#[tokio::test]
async fn a_client_gone_before_poes_head_still_gets_its_row() {
    // The client hangs up while the gateway waits on Poe's head: no reply ever exists, and
    // the row (and its charge) came only with a reply.
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.push(Reply::hang());
        let policy = "[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        let sock = raw_chat(&gw, &chat_body("gpt-5", false)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while up.chat_calls() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the request never reached Poe"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(sock);
        let r = report_once(&core, 1, "no row for the cancelled request").await;
        // The request's strings are 41 bytes: ceil(41/4) prompt tokens, estimated.
        assert_eq!(r.totals.prompt_tokens, 11, "{db}");
        assert!(
            (r.totals.cost_usd - 0.011).abs() < 1e-9,
            "{db}: {}",
            r.totals.cost_usd
        );
        // The token counter counts what the ledger counts (it left such rows out).
        let metrics = body_bytes(get(&gw, "/metrics").await).await;
        let counted: f64 = String::from_utf8_lossy(&metrics)
            .lines()
            .filter(|l| l.starts_with("poe_gateway_prompt_tokens_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(counted, 11.0, "{db}");
    }
}

/// An answer longer than the tail the tap keeps (8 MiB) is charged by its usage wherever it
/// sits: written first, it was lost, and a 9 MB answer was charged as 15 estimated tokens.
#[tokio::test]
async fn a_long_answer_with_its_usage_first_is_charged_by_it() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let text = "x".repeat(9_000_000);
    // Written by hand: `json!` sorts its keys, and would put the usage last.
    let body = format!(
        r#"{{"usage":{{"prompt_tokens":5000,"completion_tokens":300,"total_tokens":5300}},"id":"c","object":"chat.completion","created":1,"model":"gpt-5","choices":[{{"index":0,"finish_reason":"stop","message":{{"role":"assistant","content":"{text}"}}}}]}}"#
    );
    // In frames of 64 KiB, as a connection hands a long body over.
    let body = bytes::Bytes::from(body);
    let mut reply = Reply::new(200).header("content-type", "application/json");
    for at in (0..body.len()).step_by(65_536) {
        reply = reply.send(body.slice(at..(at + 65_536).min(body.len())));
    }
    up.push(reply);
    let policy = "[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_bytes(resp).await.len(), body.len());
    let r = report_once(&core, 1, "no row").await;
    assert_eq!(
        (r.totals.prompt_tokens, r.totals.completion_tokens),
        (5000, 300)
    );
    assert!(
        (r.totals.cost_usd - 5.6).abs() < 1e-9,
        "{}",
        r.totals.cost_usd
    );
}

/// An upstream's absurd token counts are capped, not wrapped: 2^64 - 1 was stored as -1 (the
/// answer then free), and two such rows made every usage report fail with an overflow.
#[tokio::test]
async fn absurd_token_counts_are_capped() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        let mut body: serde_json::Value =
            serde_json::from_str(&completion_json("gpt-5", "ok")).unwrap();
        body["usage"] = serde_json::json!({
            "prompt_tokens": 7u64,
            "completion_tokens": u64::MAX,
            "total_tokens": u64::MAX,
        });
        up.set_fallback(Reply::json(200, body.to_string()));
        let policy = "[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        for _ in 0..3 {
            let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
            assert_eq!(resp.status(), 200, "{db}");
            body_bytes(resp).await;
        }
        let r = report_once(&core, 3, "no rows").await;
        assert_eq!(r.totals.completion_tokens, 3_000_000_000, "{db}");
        assert!(
            r.totals.cost_usd > 5_000_000.0,
            "{db}: {}",
            r.totals.cost_usd
        );
    }
}

/// Attempts the gateway gives up on before Poe's head (`timeouts.first_byte`) reached Poe,
/// which charges their prompts as it does a client's that leaves then: the row adds them,
/// estimated, on success and on failure. They cost nothing, and a key's budget never saw
/// its slowest requests.
#[tokio::test(start_paused = true)]
async fn attempts_given_up_before_poes_head_are_charged_their_prompts() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.push(Reply::hang());
        up.push(Reply::hang());
        up.push(Reply::completion("gpt-5", "at last"));
        for _ in 0..3 {
            up.push(Reply::hang());
        }
        let policy = "[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\n\
                      [timeouts]\nfirst_byte = \"1s\"\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        assert_eq!(resp.status(), 200, "{db}");
        body_bytes(resp).await;
        // Poe's 7 prompt tokens and two abandoned prompts of ceil(41/4) = 11, estimated.
        let r = report_once(&core, 1, "no row for the request").await;
        assert_eq!(r.totals.prompt_tokens, 7 + 2 * 11, "{db}");
        assert!(
            (r.totals.cost_usd - (0.029 + 0.006)).abs() < 1e-9,
            "{db}: {}",
            r.totals.cost_usd
        );
        // Every attempt given up on: a 504 priced at its three prompts.
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        assert_eq!(resp.status(), 504, "{db}");
        body_bytes(resp).await;
        let r = report_once(&core, 2, "no row for the 504").await;
        assert_eq!(r.totals.prompt_tokens, 29 + 33, "{db}");
        assert!(
            (r.totals.cost_usd - (0.035 + 0.033)).abs() < 1e-9,
            "{db}: {}",
            r.totals.cost_usd
        );
        assert_eq!(up.chat_calls(), 6, "{db}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_while_queued_for_the_limiter_is_not_charged() {
    // The request waits for the upstream rate limiter and its client hangs up first: Poe was
    // never called, so not even the per-request price is owed.
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "ok"));
        let policy = "[aliases]\n[limits]\nupstream_rpm = 1\nqueue_timeout = \"120s\"\n\
                      [pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\nrequest = 0.5\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;

        let sock = raw_chat(&gw, &chat_body("gpt-5", false)).await;
        // Paused time moves on only once the gateway is idle, holding the request in the
        // limiter's queue (the next slot is a minute away).
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(sock);
        let r = report_once(&core, 2, "no row for the request cancelled in the queue").await;
        assert_eq!(up.chat_calls(), 1, "{db}");
        assert_eq!(
            r.totals.errors, 1,
            "{db}: the cancelled request is an error row"
        );
        // 7 prompt and 3 completion tokens for the completed call, plus its request price.
        assert!(
            (r.totals.cost_usd - (0.007 + 0.006 + 0.5)).abs() < 1e-9,
            "{db}: {}",
            r.totals.cost_usd
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_during_a_retrys_backoff_is_not_charged() {
    // Poe answered 429 and asked for 10 s; the client hangs up while the gateway waits to
    // retry. Every call so far failed, and failed calls cost nothing: no prompt estimate, no
    // request price.
    // Both open (no key) and with a key whose budget is charged as requests end.
    // A fresh database for each: a row left by the other run would be counted too.
    let mut runs = Vec::new();
    for keyed in [false, true] {
        runs.extend(databases().await.into_iter().map(|db| (db, keyed)));
    }
    for (db, keyed) in runs {
        let up = MockUpstream::start().await;
        up.set_fallback(
            Reply::json(429, poe_error(429, "rate_limit_error")).header("retry-after", "10"),
        );
        let policy = format!(
            "{}[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\nrequest = 0.5\n",
            if keyed {
                "[auth]\nmode = \"keys\"\n"
            } else {
                ""
            }
        );
        let (gw, core) = TestGateway::with_ledger(&up, &policy, &[], &db).await;
        let sock = if keyed {
            let (_, key) = create_key(&gw, r#"{"name":"b","budget_usd":100}"#).await;
            raw_chat_as(&gw, &chat_body("gpt-5", false), &key).await
        } else {
            raw_chat(&gw, &chat_body("gpt-5", false)).await
        };
        while up.chat_calls() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Well inside the 10 s wait, with Poe's answer read.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(sock);
        let r = report_once(&core, 1, "no row for the request cancelled in its backoff").await;
        assert_eq!(up.chat_calls(), 1, "{db} {keyed}: the retry was made");
        assert_eq!(r.totals.errors, 1, "{db} {keyed}");
        assert_eq!(r.totals.prompt_tokens, 0, "{db} {keyed}");
        assert_eq!(r.totals.cost_usd, 0.0, "{db} {keyed}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_coalesced_follower_gone_before_the_answer_still_gets_its_row() {
    // An identical request waits on the first one's call, and its client hangs up: it has
    // its row (cancelled, at no cost: it called nobody), as every chat request does.
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "shared").head_delay(Duration::from_secs(5)));
        let policy =
            "[aliases]\n[pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\nrequest = 0.5\n";
        let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
        let gw = std::sync::Arc::new(gw);
        let body = serde_json::json!({"model": "gpt-5", "temperature": 0,
            "messages": [{"role": "user", "content": "the same"}]})
        .to_string();
        let leader = {
            let (gw, body) = (gw.clone(), body.clone());
            tokio::spawn(async move {
                let resp = post(&gw, &body, &[]).await;
                assert_eq!(resp.status(), 200);
                body_bytes(resp).await
            })
        };
        while up.chat_calls() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let follower = raw_chat(&gw, &body).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(follower);
        leader.await.unwrap();
        let r = report_once(&core, 2, "no row for the follower that left").await;
        assert_eq!(up.chat_calls(), 1, "{db}");
        assert_eq!(r.totals.errors, 1, "{db}: the follower's row is cancelled");
        assert!(
            (r.totals.cost_usd - (0.007 + 0.006 + 0.5)).abs() < 1e-9,
            "{db}: only the leader's call costs: {}",
            r.totals.cost_usd
        );
    }
}

#[tokio::test]
async fn made_up_model_names_do_not_grow_the_metrics() {
    // Poe answers 404 to names it does not know; each such name as a label would be a new
    // series for good. They are counted as `other`; a real bot keeps its name.
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::json(404, poe_error(404, "not_found_error")));
    let (gw, _core) = TestGateway::with_ledger(&up, ALIASES, &[], &databases().await[0]).await;
    for i in 0..5 {
        let body = chat_body(&format!("made-up-{i}"), false);
        let _ = body_bytes(post(&gw, &body, &[]).await).await;
    }
    let _ = body_bytes(post(&gw, &chat_body("gpt", false), &[]).await).await;
    // Nor do spellings of a real one: Poe reads names case-insensitively.
    for name in ["GPT-5", "gPt-5"] {
        let _ = body_bytes(post(&gw, &chat_body(name, false), &[]).await).await;
    }
    // Nor Anthropic's ids of one Claude bot, which may carry any date and which Poe answers
    // (each was a series of its own).
    up.push(Reply::completion("claude-sonnet-4.5", "ok"));
    up.push(Reply::completion("claude-sonnet-4.5", "ok"));
    for name in ["claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20991231"] {
        let _ = body_bytes(post(&gw, &chat_body(name, false), &[]).await).await;
    }
    let text = String::from_utf8(body_bytes(get(&gw, "/metrics").await).await.to_vec()).unwrap();
    assert!(!text.contains("claude-sonnet-4-5-"), "{text}");
    assert!(!text.contains("made-up-"), "{text}");
    assert!(!text.contains("GPT-5") && !text.contains("gPt-5"), "{text}");
    let requests = |bot: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("poe_gateway_requests_total{")
                    && l.contains(&format!("bot=\"{bot}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    assert_eq!(requests("other"), 5.0, "{text}");
    assert_eq!(requests("gpt-5"), 3.0, "{text}");
    assert_eq!(requests("claude-sonnet-4.5"), 2.0, "{text}");
}

/// In passthrough mode a caller's id is a hash of the token it sent, so a client could make
/// up ids without end: the metrics count those requests under one `key` label. The ledger
/// keeps each caller's id.
#[tokio::test]
async fn passthrough_callers_do_not_grow_the_metrics() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::json(401, poe_error(401, "authentication_error")));
    let (gw, core) = TestGateway::with_ledger(
        &up,
        "[auth]\nmode = \"passthrough\"\n",
        &[],
        &databases().await[0],
    )
    .await;
    for i in 0..3 {
        let auth = format!("Bearer made-up-token-{i}");
        let resp = post(&gw, &chat_body("gpt-5", false), &[("authorization", &auth)]).await;
        assert_eq!(resp.status(), 401);
        let _ = body_bytes(resp).await;
    }
    let text = String::from_utf8(body_bytes(get(&gw, "/metrics").await).await.to_vec()).unwrap();
    assert!(!text.contains("pt_"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("poe_gateway_requests_total{")
                && l.contains("key=\"passthrough\"")
                && l.ends_with(" 3")),
        "{text}"
    );
    core.flush().await;
    let by_key = core
        .ledger()
        .store()
        .report(&poe_gateway::ledger::ReportQuery {
            group_by: Some(poe_gateway::ledger::GroupBy::Key),
            ..everything()
        })
        .await
        .unwrap();
    assert_eq!(by_key.groups.len(), 3, "the ledger keeps each caller");
}

#[tokio::test]
async fn a_key_with_a_budget_reaches_only_priced_bots() {
    // An unpriced row costs nothing against a budget, so an unpriced bot would be spending
    // without a limit.
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("mystery-bot", "ok"));
    let policy = "[auth]\nmode = \"keys\"\n[aliases]\n[pricing.priced-bot]\nprompt = 0.001\n";
    let (gw, _core) = TestGateway::with_ledger(&up, policy, &[], &databases().await[0]).await;
    // The catalogue is read (a listing does), so what it lacks is known to be unpriced.
    assert_eq!(get(&gw, "/v1/models").await.status(), 200);
    let (_, budgeted) = create_key(&gw, r#"{"name":"b","budget_usd":5}"#).await;
    let (_, unlimited) = create_key(&gw, r#"{"name":"u"}"#).await;
    let ask = |key: &str, model: &str| {
        let auth = format!("Bearer {key}");
        let body = chat_body(model, false);
        let gw = &gw;
        async move { post(gw, &body, &[("authorization", &auth)]).await }
    };
    let e = expect_error(ask(&budgeted, "mystery-bot").await, 403, "permission_error").await;
    assert!(
        e["message"].as_str().unwrap().contains("no known price"),
        "{e}"
    );
    // Priced by the catalogue, or by [pricing]: allowed.
    for model in ["claude-sonnet-4.5", "priced-bot"] {
        let resp = ask(&budgeted, model).await;
        assert_eq!(resp.status(), 200, "{model}");
        let _ = body_bytes(resp).await;
    }
    // No budget, nothing to protect.
    let resp = ask(&unlimited, "mystery-bot").await;
    assert_eq!(resp.status(), 200);
    let _ = body_bytes(resp).await;
}

/// `poe-gateway usage` reads the ledger without changing it: against a database no gateway
/// has served with it is an error (a mistyped SQLite path used to become a new, empty
/// ledger and a report of nothing), and against a served ledger it reports what was served.
#[tokio::test]
async fn the_usage_command_reads_a_ledger_and_creates_none() {
    fn usage(db: &str) -> std::process::Output {
        cli(db, &["usage", "--format", "json"])
    }
    for db in databases().await {
        let out = usage(&db);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{db}: {stderr}");
        assert!(
            stderr.contains("no ledger file at") || stderr.contains("no poe-gateway ledger"),
            "{db}: {stderr}"
        );
        if let Some(path) = db.strip_prefix("sqlite://") {
            assert!(!std::path::Path::new(path).exists(), "{path} was created");
        }

        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "counted"));
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        for _ in 0..3 {
            let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
            assert_eq!(resp.status(), 200);
            body_bytes(resp).await;
        }
        core.flush().await;
        let out = usage(&db);
        assert!(
            out.status.success(),
            "{db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
        assert!(
            out.stdout.ends_with(b"}\n"),
            "ended with a newline, as a command's output"
        );
        assert_eq!(r["totals"]["requests"], 3, "{db}: {r}");
        assert_eq!(r["totals"]["prompt_tokens"], 21, "{db}: {r}");

        // Model names come from clients. One that a spreadsheet would run as a formula
        // reaches the CSV export as inert text.
        for model in ["=HYPERLINK(\"http://x\",\"y\")", "@SUM(1)", "-1+2"] {
            let resp = post(&gw, &chat_body(model, false), &[]).await;
            body_bytes(resp).await;
        }
        core.flush().await;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
            .args(["usage", "--format", "csv", "--by", "model"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("POE_GATEWAY_DATABASE_URL", &db)
            .output()
            .expect("the binary runs");
        let csv = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{db}: {csv}");
        // The group is what is left of a line once the header's numeric columns are off it.
        let numbers = csv.lines().next().unwrap().split(',').count() - 1;
        let cells: Vec<&str> = csv
            .lines()
            .skip(1)
            .map(|l| l.rsplitn(numbers + 1, ',').last().unwrap())
            .collect();
        assert!(
            cells.contains(&"\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""),
            "{db}: {csv}"
        );
        assert!(cells.contains(&"\"'@SUM(1)\""), "{db}: {csv}");
        assert!(cells.contains(&"\"'-1+2\""), "{db}: {csv}");
        for cell in &cells {
            assert!(!cell.starts_with(['=', '+', '-', '@']), "{db}: {csv}");
        }
    }
}

/// `poe-gateway keys` against a SQLite path with no ledger: `list` and `revoke` refuse
/// (naming the path) and create nothing; `create` makes the ledger but says so, since a
/// gateway reading another one would not know the key. A bad `--format` is refused.
#[tokio::test]
async fn the_keys_command_says_when_there_is_no_ledger() {
    fn keys(db: &str, args: &[&str]) -> std::process::Output {
        cli(db, &[&["keys"], args].concat())
    }
    let (db, path) = sqlite_database().await;
    for args in [&["list"][..], &["revoke", "alice"][..]] {
        let out = keys(&db, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("no ledger file at"), "{args:?}: {stderr}");
        assert!(stderr.contains(&path), "{args:?}: {stderr}");
        assert!(
            !std::path::Path::new(&path).exists(),
            "{args:?} created {path}"
        );
    }
    let out = keys(&db, &["create", "--name", "alice"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("created a new one"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pgw_"));
    // Now there is one: no word about it, and the key is listed.
    let out = keys(&db, &["list", "--format", "json"]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"alice\""));
    let out = keys(&db, &["list", "--format", "yaml"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");

    // A file that is there but is no ledger (empty, or another program's database) is
    // refused by every subcommand, and left as it was: it used to become a ledger, and
    // `list` and `revoke` answered as from an empty one.
    let (_, other) = sqlite_database().await;
    let (_, empty) = sqlite_database().await;
    for path in [&other, &empty] {
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
    }
    {
        let c = rusqlite::Connection::open(&other).unwrap();
        c.execute("CREATE TABLE theirs (x INTEGER)", []).unwrap();
    }
    std::fs::write(&empty, b"").unwrap();
    for path in [&other, &empty] {
        let before = std::fs::read(path).unwrap();
        for args in [
            &["list"][..],
            &["revoke", "alice"][..],
            &["create", "--name", "bob"][..],
        ] {
            let out = keys(&format!("sqlite://{path}"), args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{path} {args:?}: {stderr}");
            assert!(
                stderr.contains("no poe-gateway ledger"),
                "{args:?}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{args:?}");
        }
        assert_eq!(std::fs::read(path).unwrap(), before, "{path} was changed");
    }
}

/// Processes making keys of one name at once on one ledger (two gateways, a gateway and the
/// CLI): one key is made, the others are refused. The name was checked under a lock of each
/// process's own, so two gateways raced 13 of 31 names into two active keys each.
#[tokio::test]
async fn one_name_is_one_active_key_across_processes() {
    let run = |db: &str, name: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
            .args(["keys", "create", "--name", name])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("POE_GATEWAY_DATABASE_URL", db)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary runs")
    };
    for db in databases().await {
        // The ledger is made first, so the race is the name's, not the schema's.
        assert!(
            run(&db, "first")
                .wait_with_output()
                .unwrap()
                .status
                .success()
        );
        let racers: Vec<_> = (0..6).map(|_| run(&db, "dup")).collect();
        let outs: Vec<_> = racers
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let made = outs.iter().filter(|o| o.status.success()).count();
        for o in outs.iter().filter(|o| !o.status.success()) {
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(stderr.contains("already named"), "{db}: {stderr}");
        }
        assert_eq!(made, 1, "{db}");
        let store = poe_gateway::ledger::Store::open_existing(&db)
            .await
            .unwrap();
        let active = store
            .list_keys()
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.name == "dup" && k.revoked_ms.is_none())
            .count();
        assert_eq!(active, 1, "{db}");
    }
}

/// Revoking while another process writes to the same SQLite ledger (a rotation, another
/// revocation) waits for it and revokes: it failed at once with "database is locked" about
/// one time in five, and the key stayed active.
#[tokio::test]
async fn revocations_across_processes_on_one_sqlite_ledger_all_take() {
    let (db, _) = sqlite_database().await;
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("POE_GATEWAY_DATABASE_URL", &db)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the binary runs")
    };
    let names: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    for name in &names {
        let out = run(&["keys", "create", "--name", name])
            .wait_with_output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Half are revoked while the other half are rotated, all at once.
    let racers: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let verb = if i % 2 == 0 { "revoke" } else { "rotate" };
            (verb, run(&["keys", verb, name]))
        })
        .collect();
    for (verb, child) in racers {
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{verb}: {stderr}");
    }
    let store = poe_gateway::ledger::Store::open_existing(&db)
        .await
        .unwrap();
    let keys = store.list_keys().await.unwrap();
    for (i, name) in names.iter().enumerate() {
        let k = keys.iter().find(|k| &k.name == name).unwrap();
        assert_eq!(k.revoked_ms.is_some(), i % 2 == 0, "{name}");
    }
}

/// A new key's model list is checked against Poe's catalogue and the aliases: a name that is
/// neither (a typo) is named in a warning, with the closest known name, and the key is made
/// all the same (Poe answers bots its catalogue does not list). Known names, in any case,
/// make no warning. A catalogue that cannot be read is said so, and the key is made.
#[tokio::test]
async fn a_new_keys_unknown_model_names_are_warned_about() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;

    let resp = as_admin(
        &gw,
        "POST",
        "/admin/keys",
        r#"{"name":"typo","models":["claude","GPT-5","gpt-5o","made-up-bot"]}"#,
    )
    .await;
    assert_eq!(resp.status(), 201);
    let v = body_json(resp).await;
    assert!(v["key"].as_str().unwrap().starts_with("pgw_"), "{v}");
    let warnings = v["warnings"].as_array().expect("a warnings list");
    assert_eq!(warnings.len(), 1, "{v}");
    let w = warnings[0].as_str().unwrap();
    assert!(w.contains("`models`"), "{w}");
    assert!(w.contains("`gpt-5o` (did you mean `gpt-5`?)"), "{w}");
    assert!(w.contains("`made-up-bot`"), "{w}");
    assert!(!w.contains("`claude`") && !w.contains("`GPT-5`"), "{w}");
    // The key was made as asked, and works for the names it has.
    let auth = format!("Bearer {}", v["key"].as_str().unwrap());
    let resp = post(&gw, &chat_body("gpt-5", false), &[("authorization", &auth)]).await;
    assert_eq!(resp.status(), 200);
    let _ = body_bytes(resp).await;

    let resp = as_admin(
        &gw,
        "POST",
        "/admin/keys",
        // An Anthropic model id is known as the bot it stands for.
        r#"{"name":"known","models":["Claude","gpt-5","grok-4","claude-sonnet-4-5-20250929"]}"#,
    )
    .await;
    assert_eq!(resp.status(), 201);
    let v = body_json(resp).await;
    assert!(v.get("warnings").is_none(), "{v}");
    // No model list, nothing to check.
    let v = body_json(as_admin(&gw, "POST", "/admin/keys", r#"{"name":"all"}"#).await).await;
    assert!(v.get("warnings").is_none(), "{v}");
    // Names padded with spaces are judged as stored, trimmed.
    let v = body_json(
        as_admin(
            &gw,
            "POST",
            "/admin/keys",
            r#"{"name":"padded","models":[" gpt-5 "]}"#,
        )
        .await,
    )
    .await;
    assert!(v.get("warnings").is_none(), "{v}");

    // No catalogue to check against.
    let up = MockUpstream::start().await;
    up.set_models("not a catalogue");
    let db = databases().await.remove(0);
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let resp = as_admin(
        &gw,
        "POST",
        "/admin/keys",
        r#"{"name":"unchecked","models":["gpt-5o"]}"#,
    )
    .await;
    assert_eq!(resp.status(), 201);
    let v = body_json(resp).await;
    let w = v["warnings"][0].as_str().expect("a warning");
    assert!(w.contains("not checked") && w.contains("catalogue"), "{w}");
}

/// `poe-gateway keys create --models`: the same check, against the configured upstream, on
/// stderr; the key is still made and printed. An argument the key cannot have exits 2, as
/// clap's usage errors do.
// Two workers: the command is waited for on one while the test upstream answers on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_command_warns_of_unknown_models_and_exits_2_on_bad_arguments() {
    let (db, _path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    let keys = |base: &str, args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
            .arg("keys")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("POE_GATEWAY_DATABASE_URL", &db)
            .env("POE_BASE_URL", base)
            .env("POE_GATEWAY_POLICIES", "/dev/null")
            .output()
            .expect("the binary runs")
    };
    let out = keys(
        &up.url(),
        &["create", "--name", "typo", "--models", "gpt-5,gpt-5o"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains("`gpt-5o` (did you mean `gpt-5`?)"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().last().unwrap().starts_with("pgw_"),
        "{stdout}"
    );

    let out = keys(
        &up.url(),
        &["create", "--name", "known", "--models", "GPT-5"],
    );
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing answers there: the names are taken unchecked, and it says so.
    let out = keys(
        "http://127.0.0.1:9",
        &["create", "--name", "offline", "--models", "gpt-5o"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("not checked"), "{stderr}");

    for args in [
        &["create", "--name", "r", "--rpm", "0"][..],
        &["create", "--name", "b", "--budget-usd=-1"][..],
        &["create", "--name", "m", "--models", ",,"][..],
        &["create", "--name", "known"][..],
    ] {
        let out = keys(&up.url(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("pgw_"),
            "{args:?}"
        );
    }
}

/// What Poe's Responses API sends: a `response` object, its usage in the API's own names.
/// A Responses object as OpenAI lays it out: the client's `metadata` echoed after the usage.
/// A `usage` in it is the client's, and must never be read for Poe's counts.
fn response_object(model: &str, text: &str, status: &str, usage: &str) -> String {
    format!(
        r#"{{"id":"resp_1","object":"response","created_at":1,"status":"{status}","model":"{model}","output":[{{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{{"type":"output_text","text":"{text}","annotations":[]}}]}}],"usage":{usage},"user":null,"metadata":{{"usage":"n/a"}}}}"#
    )
}

const RESPONSES_USAGE: &str = r#"{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":18}"#;

fn responses_event(kind: &str, data: &str) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// The Responses API (`client.responses.create`) goes to Poe's `/v1/responses` through the
/// aliases, is accounted from the usage in its own names, never comes from the cache, and a
/// stream counts as whole at `response.completed`, which ends it where chat has `[DONE]`.
#[tokio::test]
async fn the_responses_api_is_proxied_and_accounted() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    let body_for = |stream: bool| {
        format!(r#"{{"model":"claude","input":"Say hi","temperature":0,"stream":{stream}}}"#)
    };
    let responses = |body: String| {
        let gw = &gw;
        async move {
            request(
                gw,
                "POST",
                "/v1/responses",
                &[("content-type", "application/json")],
                &body,
            )
            .await
        }
    };

    // Not streamed, twice: both reach Poe (no cache), each accounted.
    let answer = response_object("claude-sonnet-4.5", "Hi!", "completed", RESPONSES_USAGE);
    up.push(Reply::json(200, answer.clone()));
    up.push(Reply::json(200, answer.clone()));
    for _ in 0..2 {
        let resp = responses(body_for(false)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-cache"], "BYPASS");
        assert_eq!(resp.headers()["x-poe-gateway-bot"], "claude-sonnet-4.5");
        assert_eq!(body_bytes(resp).await, Bytes::from(answer.clone()));
    }
    // Poe's `/v1/models` and balance are fetched beside them.
    let sent = up.received_on("/v1/responses");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].json()["model"], "claude-sonnet-4.5");
    assert_eq!(sent[0].json()["input"], "Say hi");
    let r = report(&core, None).await;
    assert_eq!((r.totals.requests, r.totals.errors), (2, 0));
    assert_eq!(r.totals.prompt_tokens, 22);
    assert_eq!(r.totals.completion_tokens, 14);

    // Streamed: the events reach the client as Poe sent them, nothing added.
    let done = response_object("claude-sonnet-4.5", "Hi!", "completed", RESPONSES_USAGE);
    let events = [
        responses_event(
            "response.created",
            &format!(
                r#"{{"type":"response.created","sequence_number":0,"response":{}}}"#,
                response_object("claude-sonnet-4.5", "", "in_progress", "null")
            ),
        ),
        responses_event(
            "response.output_text.delta",
            r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
        ),
        responses_event(
            "response.output_text.delta",
            r#"{"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"!"}"#,
        ),
        responses_event(
            "response.completed",
            &format!(r#"{{"type":"response.completed","sequence_number":3,"response":{done}}}"#),
        ),
    ];
    let mut reply = Reply::sse();
    for e in &events {
        reply = reply.send(e.clone());
    }
    up.push(reply);
    let resp = responses(body_for(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_bytes(resp).await, Bytes::from(events.concat()));
    assert!(
        up.received()
            .last()
            .unwrap()
            .json()
            .get("stream_options")
            .is_none(),
        "no usage is asked for: the last event carries it"
    );
    let r = report(&core, None).await;
    assert_eq!((r.totals.requests, r.totals.errors), (3, 0), "completed");
    assert_eq!(r.totals.prompt_tokens, 33);

    // Cut before `response.completed`: the client is told, and the row is an error with
    // estimated tokens (the deltas' 3 bytes: 1 token).
    up.push(
        Reply::sse()
            .send(events[1].clone())
            .send(events[2].clone())
            .drop_connection(),
    );
    let got = body_bytes(responses(body_for(true)).await).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with(&events[1]), "{text}");
    assert!(text.contains(r#"data: {"error":"#), "{text}");
    // A bare `[DONE]` does not end a Responses stream: only its last event does.
    up.push(
        Reply::sse()
            .send(events[1].clone())
            .send("data: [DONE]\n\n"),
    );
    let got = body_bytes(responses(body_for(true)).await).await;
    assert!(String::from_utf8_lossy(&got).contains("without response.completed"));
    // Poe's own failure event ends the stream with no error added.
    let failed = responses_event(
        "response.failed",
        &format!(
            r#"{{"type":"response.failed","sequence_number":2,"response":{}}}"#,
            response_object("claude-sonnet-4.5", "", "failed", "null")
        ),
    );
    up.push(Reply::sse().send(events[1].clone()).send(failed.clone()));
    let got = body_bytes(responses(body_for(true)).await).await;
    assert_eq!(got, Bytes::from([events[1].clone(), failed].concat()));
    let r = report(&core, None).await;
    assert_eq!((r.totals.requests, r.totals.errors), (6, 3));
    assert_eq!(r.totals.completion_tokens, 21 + 1 + 1 + 1);
    // A 200 whose `response` failed is passed on, and counted as the failure it is.
    let failed = response_object("claude-sonnet-4.5", "", "failed", RESPONSES_USAGE);
    up.push(Reply::json(200, failed.clone()));
    let resp = responses(body_for(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_bytes(resp).await, Bytes::from(failed));
    let r = report(&core, None).await;
    assert_eq!((r.totals.requests, r.totals.errors), (7, 4));

    // A Responses body needs a model, and only that.
    let resp = responses(r#"{"input":"hi"}"#.into()).await;
    let e = expect_error(resp, 400, "invalid_request_error").await;
    assert_eq!(e["param"], "model");
    assert_eq!(up.received_on("/v1/responses").len(), 7);
}

/// What Poe's Messages API sends for a Claude bot: Anthropic's `message` object.
fn message_object(text: &str, usage: &str) -> String {
    format!(
        r#"{{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{{"type":"text","text":"{text}"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{usage}}}"#
    )
}

/// One event of a Messages stream, named as Anthropic names them.
fn messages_event(data: &str) -> String {
    let kind: serde_json::Value = serde_json::from_str(data).unwrap();
    format!(
        "event: {}\ndata: {data}\n\n",
        kind["type"].as_str().unwrap()
    )
}

/// Anthropic's Messages API (the Anthropic SDKs, Claude Code with `ANTHROPIC_BASE_URL`) goes
/// to Poe's `/v1/messages` with the server's key in `x-api-key`, the client's version and
/// beta headers passed on. A gateway key is taken from `x-api-key`. Usage is read from the
/// two events that carry it (cache reads and writes counted in the prompt), `message_stop`
/// ends a stream, and the gateway's own errors come in Anthropic's shape, a cut stream's as an
/// `event: error`.
#[tokio::test]
async fn the_messages_api_is_proxied_and_accounted() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (key_id, key) = create_key(&gw, r#"{"name":"claude-code","budget_usd":50}"#).await;
    let body_for = |stream: bool| {
        format!(
            r#"{{"model":"claude","max_tokens":64,"temperature":0,"messages":[{{"role":"user","content":"Say hi"}}],"stream":{stream}}}"#
        )
    };
    let messages = |body: String, key: Option<&str>| {
        let gw = &gw;
        let key = key.map(String::from);
        async move {
            let mut headers = vec![
                ("content-type", "application/json".to_string()),
                ("anthropic-version", "2023-06-01".to_string()),
                (
                    "anthropic-beta",
                    "fine-grained-tool-streaming-2025-05-14".to_string(),
                ),
            ];
            if let Some(k) = key {
                headers.push(("x-api-key", k));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(gw, "POST", "/v1/messages?beta=true", &headers, &body).await
        }
    };

    // Not streamed, twice: both reach Poe (no cache), each accounted.
    let usage = r#"{"input_tokens":11,"cache_creation_input_tokens":0,"cache_read_input_tokens":100,"output_tokens":7}"#;
    let answer = message_object("Hi!", usage);
    up.push(Reply::json(200, answer.clone()));
    up.push(Reply::json(200, answer.clone()));
    for _ in 0..2 {
        let resp = messages(body_for(false), Some(&key)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-cache"], "BYPASS");
        assert_eq!(resp.headers()["x-poe-gateway-bot"], "claude-sonnet-4.5");
        assert_eq!(body_bytes(resp).await, Bytes::from(answer.clone()));
    }
    let sent = up.received_on("/v1/messages");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].json()["model"], "claude-sonnet-4.5");
    assert_eq!(sent[0].json()["max_tokens"], 64);
    let h = &sent[0].headers;
    // The server's key, not the caller's, in both headers Poe documents for this API.
    assert_eq!(h["x-api-key"], UPSTREAM_KEY);
    assert_eq!(h["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    assert_eq!(h["anthropic-version"], "2023-06-01");
    assert_eq!(
        h["anthropic-beta"],
        "fine-grained-tool-streaming-2025-05-14"
    );
    let r = report(&core, Some(&key_id)).await;
    assert_eq!((r.totals.requests, r.totals.errors), (2, 0));
    assert_eq!(r.totals.prompt_tokens, 222);
    assert_eq!(r.totals.completion_tokens, 14);

    // Streamed: the events reach the client as Poe sent them.
    let events = [
        messages_event(
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":11,"cache_creation_input_tokens":20,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
        ),
        messages_event(
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        messages_event(r#"{"type":"ping"}"#),
        messages_event(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
        ),
        messages_event(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}}"#,
        ),
        messages_event(r#"{"type":"content_block_stop","index":0}"#),
        messages_event(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":9}}"#,
        ),
        messages_event(r#"{"type":"message_stop"}"#),
    ];
    let mut reply = Reply::sse();
    for e in &events {
        reply = reply.send(e.clone());
    }
    up.push(reply);
    let resp = messages(body_for(true), Some(&key)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "BYPASS");
    assert_eq!(body_bytes(resp).await, Bytes::from(events.concat()));
    let last = up.received().pop().unwrap();
    assert!(
        last.json().get("stream_options").is_none(),
        "no usage is asked for: the stream carries it"
    );
    let r = report(&core, Some(&key_id)).await;
    assert_eq!((r.totals.requests, r.totals.errors), (3, 0), "completed");
    assert_eq!(r.totals.prompt_tokens, 222 + 31);
    assert_eq!(r.totals.completion_tokens, 14 + 9);

    // Cut before `message_stop`: the client gets an `error` event the Anthropic SDKs raise,
    // and the row is an error.
    up.push(
        Reply::sse()
            .send(events[0].clone())
            .send(events[3].clone())
            .drop_connection(),
    );
    let got = body_bytes(messages(body_for(true), Some(&key)).await).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with(&events[0]), "{text}");
    let tail = text.rsplit("\n\n").nth(1).unwrap();
    let data = tail
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("{text}"));
    let e: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "api_error");
    // A bare `[DONE]` does not end a Messages stream.
    up.push(
        Reply::sse()
            .send(events[0].clone())
            .send("data: [DONE]\n\n"),
    );
    let got = body_bytes(messages(body_for(true), Some(&key)).await).await;
    assert!(String::from_utf8_lossy(&got).contains("without message_stop"));
    // Poe's own error event ends the stream with nothing added.
    let overloaded = messages_event(
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    up.push(
        Reply::sse()
            .send(events[0].clone())
            .send(overloaded.clone()),
    );
    let got = body_bytes(messages(body_for(true), Some(&key)).await).await;
    assert_eq!(got, Bytes::from([events[0].clone(), overloaded].concat()));
    // So does a 200 whose body is Anthropic's error object: not a completed answer.
    up.push(Reply::json(
        200,
        r#"{"type":"error","error":{"type":"api_error","message":"boom"}}"#,
    ));
    let resp = messages(body_for(false), Some(&key)).await;
    assert_eq!(resp.status(), 200);
    let r = report(&core, Some(&key_id)).await;
    assert_eq!((r.totals.requests, r.totals.errors), (7, 4));

    // The gateway's own errors, in Anthropic's shape (and OpenAI's members inside).
    let anthropic_error = |v: serde_json::Value, kind: &str| {
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], kind, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        v["error"].clone()
    };
    let resp = messages(body_for(false), None).await;
    assert_eq!(resp.status(), 401);
    let e = anthropic_error(body_json(resp).await, "authentication_error");
    assert!(e["message"].as_str().unwrap().contains("x-api-key"), "{e}");
    let resp = messages(r#"{"max_tokens":5,"messages":[]}"#.into(), Some(&key)).await;
    assert_eq!(resp.status(), 400);
    let e = anthropic_error(body_json(resp).await, "invalid_request_error");
    assert_eq!(e["param"], "model");
    // Chat completions keep OpenAI's shape.
    let resp = request(&gw, "POST", "/v1/chat/completions", &[], "{}").await;
    expect_error(resp, 401, "authentication_error").await;
    assert_eq!(up.received_on("/v1/messages").len(), 7);

    // Claude Code names bots by Anthropic's ids, which Poe's Messages API takes too: a key
    // allowed `claude-sonnet-4.5` may use `claude-sonnet-4-5-20250929`, priced as that bot.
    let (id2, key2) = create_key(
        &gw,
        r#"{"name":"sonnet-only","models":["claude-sonnet-4.5"]}"#,
    )
    .await;
    let usage = r#"{"input_tokens":1000,"output_tokens":100}"#;
    up.push(Reply::json(200, message_object("Hi!", usage)));
    let ask = |model: &str| {
        format!(
            r#"{{"model":"{model}","max_tokens":64,"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    // No `anthropic-version` (a hand-written request): Poe requires one, so it gets the default.
    let headers = [("x-api-key", key2.as_str())];
    let resp = request(
        &gw,
        "POST",
        "/v1/messages",
        &headers,
        &ask("claude-sonnet-4-5-20250929"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let sent = up.received().pop().unwrap();
    assert_eq!(sent.json()["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    let r = report(&core, Some(&id2)).await;
    let want = 1000.0 * 0.000003 + 100.0 * 0.000015;
    assert!(
        (r.totals.cost_usd - want).abs() < 1e-12,
        "{}",
        r.totals.cost_usd
    );
    // Another Claude is not the one listed.
    let resp = request(
        &gw,
        "POST",
        "/v1/messages",
        &headers,
        &ask("claude-opus-4-1-20250805"),
    )
    .await;
    assert_eq!(resp.status(), 403);
    let v = body_json(resp).await;
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
}

/// Poe failing a Messages stream with an OpenAI-shaped error event (no `event: error` line):
/// the Anthropic SDKs skip an unnamed event and ended the stream as if whole, with no
/// `stop_reason`. The gateway adds its own `event: error`, which they raise.
#[tokio::test]
async fn a_messages_stream_failed_in_openais_shape_ends_with_an_anthropic_error() {
    let up = MockUpstream::start().await;
    let poes =
        "data: {\"error\":{\"code\":500,\"type\":\"provider_error\",\"message\":\"boom\"}}\n\n";
    up.push(
        Reply::sse()
            .send(messages_event(
                r#"{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"usage":{"input_tokens":5,"output_tokens":1}}}"#,
            ))
            .send(poes),
    );
    let gw = TestGateway::default(&up).await;
    let body = r#"{"model":"claude-sonnet-4.5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = request(
        &gw,
        "POST",
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        body,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let got = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert!(got.contains(poes), "Poe's event is passed on: {got}");
    let last = got.trim_end().rsplit("\n\n").next().unwrap();
    assert!(
        last.starts_with("event: error\ndata: {\"type\":\"error\""),
        "{got}"
    );
}

/// Accounting of the Messages API where Claude Code leans on it: a stream cut (or left by the
/// client) before `message_delta` reported only `message_start`'s output count of 1, so its
/// output is estimated from the text, thinking and tool input streamed; input counts repeated
/// as 0 in `message_delta` do not erase `message_start`'s; a `[pricing]` override of a bot
/// prices its Anthropic ids; key model lists match either name. Errors the gateway makes on
/// this route are Anthropic-shaped even when Poe is unreachable, and the admin key is taken
/// only from `Authorization`.
#[tokio::test]
async fn messages_accounting_holds_for_cut_streams_and_anthropic_ids() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let policy = "[auth]\nmode = \"keys\"\n[retry]\nmax_attempts = 1\n\
                  [pricing.\"claude-opus-4.1\"]\nprompt = 0.001\ncompletion = 0.002\n\
                  cache_read = 0.0001\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    let (key_id, key) = create_key(&gw, r#"{"name":"cc"}"#).await;
    let ask = |model: &str, stream: bool| {
        format!(
            r#"{{"model":"{model}","max_tokens":64,"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    let send = |key: String, body: String| {
        let gw = &gw;
        async move {
            let headers = [
                ("x-api-key", key.as_str()),
                ("anthropic-version", "2023-06-01"),
            ];
            request(gw, "POST", "/v1/messages", &headers, &body).await
        }
    };
    let start = messages_event(
        r#"{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"usage":{"input_tokens":100,"cache_read_input_tokens":50,"output_tokens":1}}}"#,
    );
    let text = "x".repeat(400);
    let delta = |kind: &str, field: &str| {
        messages_event(&format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"{kind}","{field}":"{text}"}}}}"#
        ))
    };

    // Cut after 400 bytes each of thinking, tool input and text: about 300 tokens, not 1.
    up.push(
        Reply::sse()
            .send(start.clone())
            .send(delta("thinking_delta", "thinking"))
            .send(delta("input_json_delta", "partial_json"))
            .send(delta("text_delta", "text"))
            .drop_connection(),
    );
    let got = body_bytes(send(key.clone(), ask("claude-sonnet-4.5", true)).await).await;
    assert!(String::from_utf8_lossy(&got).contains("event: error"));
    let r = report(&core, Some(&key_id)).await;
    assert_eq!((r.totals.requests, r.totals.estimated), (1, 1));
    assert_eq!(r.totals.prompt_tokens, 150, "Poe's input counts stand");
    assert_eq!(r.totals.completion_tokens, 300);

    // A `message_delta` that repeats the input counts as 0; its output count is final.
    up.push(
        Reply::sse()
            .send(start.clone())
            .send(delta("text_delta", "text"))
            .send(messages_event(
                r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":0,"cache_read_input_tokens":0,"output_tokens":7}}"#,
            ))
            .send(messages_event(r#"{"type":"message_stop"}"#)),
    );
    let resp = send(key.clone(), ask("claude-sonnet-4.5", true)).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let before = r.totals.cost_usd;
    let r = report(&core, Some(&key_id)).await;
    assert_eq!((r.totals.requests, r.totals.estimated), (2, 1));
    assert_eq!(r.totals.prompt_tokens, 300);
    assert_eq!(r.totals.completion_tokens, 307);
    // Catalogue prices, with the 50 tokens read from the prompt cache at a tenth of the
    // prompt price (the catalogue has no cache price for this bot).
    let want = 100.0 * 0.000003 + 50.0 * 0.0000003 + 7.0 * 0.000015;
    let cost = r.totals.cost_usd - before;
    assert!((cost - want).abs() < 1e-12, "{cost}");

    // The override of `claude-opus-4.1` prices `claude-opus-4-1-20250805`, which a key
    // listing the Poe name may use, and a key listing the Anthropic id may use the Poe name.
    let (opus_id, opus_key) =
        create_key(&gw, r#"{"name":"opus","models":["claude-opus-4.1"]}"#).await;
    up.push(Reply::json(
        200,
        message_object(
            "ok",
            r#"{"input_tokens":1000,"cache_read_input_tokens":1000,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"output_tokens":100}"#,
        ),
    ));
    let resp = send(opus_key.clone(), ask("claude-opus-4-1-20250805", false)).await;
    assert_eq!(resp.status(), 200);
    let r = report(&core, Some(&opus_id)).await;
    assert_eq!(r.totals.prompt_tokens, 2300);
    // The override's cache price for the 1,000 tokens read from the cache; the writes at
    // Anthropic's shares of the prompt price: a quarter more for five minutes' 100, twice
    // for the hour's 200.
    let want = 1000.0 * 0.001
        + 1000.0 * 0.0001
        + 100.0 * 0.001 * 1.25
        + 200.0 * 0.001 * 2.0
        + 100.0 * 0.002;
    assert!(
        (r.totals.cost_usd - want).abs() < 1e-9,
        "{}",
        r.totals.cost_usd
    );
    let (_, dated_key) = create_key(
        &gw,
        r#"{"name":"dated","models":["claude-sonnet-4-5-20250929"]}"#,
    )
    .await;
    up.push(Reply::json(
        200,
        message_object("ok", r#"{"input_tokens":1,"output_tokens":1}"#),
    ));
    let resp = send(dated_key.clone(), ask("claude-sonnet-4.5", false)).await;
    assert_eq!(resp.status(), 200);
    let resp = send(dated_key, ask("claude-opus-4.1", false)).await;
    assert_eq!(resp.status(), 403);

    // Poe unreachable: the 502 is in Anthropic's shape too.
    up.push(Reply::refuse());
    let resp = send(key.clone(), ask("claude-sonnet-4.5", false)).await;
    assert_eq!(resp.status(), 502);
    let v = body_json(resp).await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");

    // Other methods and paths under the route answer in the same shape.
    for (method, path, status) in [
        ("GET", "/v1/messages", 405),
        ("GET", "/v1/messages/count_tokens", 405),
        ("POST", "/v1/messages/batches", 404),
    ] {
        let resp = request(&gw, method, path, &[("x-api-key", key.as_str())], "{}").await;
        assert_eq!(resp.status(), status);
        let v = body_json(resp).await;
        assert_eq!(v["type"], "error", "{v}");
    }

    // The admin key works only as a bearer token.
    let resp = request(&gw, "GET", "/admin/keys", &[("x-api-key", ADMIN_KEY)], "").await;
    assert_eq!(resp.status(), 401);
}

/// What Claude Code and the Anthropic SDKs ask for besides messages, which Poe does not
/// serve: token counts, estimated here without calling Poe or recording a row (text by its
/// bytes, images by their size as Anthropic prices them, PDFs by their pages, signatures and
/// redacted thinking not at all), and the model list in Anthropic's shape and pages.
#[tokio::test]
async fn anthropic_clients_count_tokens() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let policy = "[auth]\nmode = \"keys\"\n[aliases]\nsonnet = \"claude-sonnet-4.5\"\n\
                  gpt = \"gpt-5\"\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    let (_, key) = create_key(&gw, r#"{"name":"cc","models":["claude-sonnet-4.5"]}"#).await;
    let anthropic = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let count = |content: serde_json::Value| {
        let gw = &gw;
        async move {
            let body =
                json!({"model": "sonnet", "messages": [{"role": "user", "content": content}]});
            let resp = request(
                gw,
                "POST",
                "/v1/messages/count_tokens",
                &anthropic,
                &body.to_string(),
            )
            .await;
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()["x-poe-gateway-tokens"], "estimated");
            body_json(resp).await["input_tokens"].as_u64().unwrap()
        }
    };
    let base = count(json!("")).await;
    assert!(base < 20, "{base}");
    let b64 = |bytes: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let media = |kind: &str, media_type: &str, data: String| json!([{"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}]);
    // A PNG of 800 x 600 and one of 4000 x 3000: 640 tokens, and the most an image costs.
    let png = |w: u32, h: u32| {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        b.extend(w.to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend([8, 6, 0, 0, 0]);
        b64(&b)
    };
    // A media block counts its media alone.
    let media_part = |t: u64| t - base;
    let small = count(media("image", "image/png", png(800, 600))).await;
    assert_eq!(media_part(small), 640, "{small}");
    let large = count(media("image", "image/png", png(4000, 3000))).await;
    assert_eq!(media_part(large), 1_600, "{large}");
    // A PDF of three pages: 2,000 tokens a page, not its bytes as text.
    let pdf = format!(
        "%PDF-1.4\n1 0 obj << /Type /Pages /Count 3 >> endobj\n{}{}",
        "2 0 obj << /Type /Page /Parent 1 0 R >> endobj\n".repeat(2),
        "3 0 obj << /Type/Page >> endobj\n",
    ) + &"x".repeat(100_000);
    let pdf = count(media("document", "application/pdf", b64(pdf.as_bytes()))).await;
    assert_eq!(media_part(pdf), 6_000, "{pdf}");
    // An image by URL: its size is unknown, so a large image's.
    let url =
        count(json!([{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]))
            .await;
    assert_eq!(media_part(url), 1_600, "{url}");
    // Text in a plain-text document, or as a tool's `data` argument, is text.
    let words = "a few words ".repeat(400);
    let as_text = count(json!([{"type": "text", "text": words}])).await;
    let document = count(json!([{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": words}}])).await;
    let tool =
        count(json!([{"type": "tool_use", "id": "t", "name": "save", "input": {"data": words}}]))
            .await;
    for t in [as_text, document, tool] {
        assert!(
            t > base + 1_150 && t < base + 1_250,
            "{as_text} {document} {tool}"
        );
    }
    // A thinking block's signature and redacted thinking are not text.
    let signature = "c2lnbmF0dXJl".repeat(200);
    let thinking = count(json!([
        {"type": "thinking", "thinking": "hmm", "signature": signature},
        {"type": "redacted_thinking", "data": signature},
    ]))
    .await;
    assert!(thinking < base + 20, "{thinking}");

    // Checked like a Messages request, answered in Anthropic's shape; the key's models hold.
    for (body, status, kind) in [
        (
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            400,
            "invalid_request_error",
        ),
        (
            r#"{"model":"sonnet","messages":[]}"#,
            400,
            "invalid_request_error",
        ),
        (
            r#"{"model":"gpt","messages":[{"role":"user","content":"hi"}]}"#,
            403,
            "permission_error",
        ),
    ] {
        let resp = request(&gw, "POST", "/v1/messages/count_tokens", &anthropic, body).await;
        assert_eq!(resp.status(), status);
        let v = body_json(resp).await;
        assert_eq!(
            (v["type"].as_str(), &v["error"]["type"]),
            (Some("error"), &json!(kind)),
            "{v}"
        );
    }
    let resp = request(&gw, "POST", "/v1/messages/count_tokens", &[], "{}").await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        body_json(resp).await["error"]["type"],
        "authentication_error"
    );
    // Poe was never asked, and nothing was recorded.
    assert!(up.chats().is_empty());
    assert_eq!(report(&core, None).await.totals.requests, 0);
}

/// The model list for an Anthropic client (one that sends `anthropic-version`): the models
/// Poe's Messages API serves, in Anthropic's shape and pages, each name once (an alias named
/// like a bot in the bot's place, as requests of that name reach it), Anthropic's model ids
/// found as on the Messages API. An OpenAI client gets the whole catalogue as before.
#[tokio::test]
async fn anthropic_clients_list_models() {
    let up = MockUpstream::start().await;
    up.set_models(
        &json!({"object": "list", "data": [
            {"id": "claude-sonnet-4.5", "object": "model", "created": 1_700_000_000_000u64,
             "owned_by": "Anthropic", "metadata": {"display_name": "Claude-Sonnet-4.5"},
             "context_window": {"context_length": 200000, "max_output_tokens": 64000}},
            {"id": "claude-opus-4.1", "object": "model", "created": 1_700_000_000, "owned_by": "Anthropic"},
            {"id": "gpt-5", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "OpenAI",
             "supported_endpoints": ["/v1/chat/completions"]},
            {"id": "kimi-k2", "object": "model", "created": 1_700_000_000_000u64, "owned_by": "Moonshot",
             "supported_endpoints": ["/v1/chat/completions", "/v1/messages"]},
        ]})
        .to_string(),
    );
    let policy = "[aliases]\nsonnet = \"claude-sonnet-4.5\"\n\"claude-opus-4.1\" = \"claude-sonnet-4.5\"\n\
                  \"claude-sonnet-4-5\" = \"claude-sonnet-4.5\"\n\
                  haiku = \"claude-3-5-haiku-latest\"\nmixed = [\"claude-sonnet-4.5\", \"gpt-5\"]\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let anthropic = [("anthropic-version", "2023-06-01")];
    let models = |path: String| {
        let gw = &gw;
        async move { body_json(request(gw, "GET", &path, &anthropic, "").await).await }
    };
    // Poe's order, then the aliases'.
    let all = [
        "claude-sonnet-4.5",
        "claude-opus-4.1",
        "kimi-k2",
        "claude-sonnet-4-5",
        "haiku",
        "sonnet",
    ];
    let v = models("/v1/models".into()).await;
    assert_eq!(support::ids(&v["data"]), all, "{v}");
    assert_eq!(
        (&v["has_more"], &v["first_id"], &v["last_id"]),
        (&json!(false), &json!(all[0]), &json!(all[5]))
    );
    let sonnet = &v["data"][0];
    assert_eq!(sonnet["type"], "model");
    assert_eq!(sonnet["display_name"], "Claude-Sonnet-4.5");
    assert_eq!(sonnet["created_at"], "2023-11-14T22:13:20Z");
    assert_eq!(
        (&sonnet["max_input_tokens"], &sonnet["max_tokens"]),
        (&json!(200000), &json!(64000))
    );
    // The alias in the bot's place, by its own name; `created` in seconds read as such.
    let opus = &v["data"][1];
    assert_eq!(
        (&opus["display_name"], &opus["created_at"]),
        (&json!("claude-opus-4.1"), &json!("2023-11-14T22:13:20Z"))
    );

    // Paged one at a time, forwards and back, every model once.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after
            .as_ref()
            .map_or(String::new(), |a| format!("&after_id={a}"));
        let v = models(format!("/v1/models?limit=1{query}")).await;
        seen.extend(support::ids(&v["data"]).into_iter().map(String::from));
        if v["has_more"] == false {
            break;
        }
        after = v["last_id"].as_str().map(String::from);
        assert!(seen.len() < 10, "{seen:?}");
    }
    assert_eq!(seen, all);
    let v = models("/v1/models?before_id=sonnet&limit=2".into()).await;
    assert_eq!(
        (support::ids(&v["data"]), &v["has_more"]),
        (vec![all[3], all[4]], &json!(true))
    );
    // An alias named like an Anthropic id of a bot is found by its own name first.
    let v = models("/v1/models?before_id=claude-sonnet-4-5&limit=1".into()).await;
    assert_eq!(support::ids(&v["data"]), [all[2]], "{v}");
    let v = models("/v1/models/claude-sonnet-4-5".into()).await;
    assert_eq!(v["display_name"], "claude-sonnet-4-5", "{v}");
    // An Anthropic model id finds its bot.
    let v = models("/v1/models?after_id=claude-sonnet-4-5-20250929&limit=1".into()).await;
    assert_eq!(support::ids(&v["data"]), [all[1]], "{v}");
    let v = models("/v1/models/claude-sonnet-4-5-20250929".into()).await;
    assert_eq!(v["id"], "claude-sonnet-4.5", "{v}");
    let v = models("/v1/models/SONNET".into()).await;
    assert_eq!(
        (&v["type"], &v["id"]),
        (&json!("model"), &json!("sonnet")),
        "{v}"
    );
    for (path, kind) in [
        ("/v1/models?limit=0", "invalid_request_error"),
        ("/v1/models?after_id=gpt-5", "invalid_request_error"),
        ("/v1/models/gpt-5", "not_found_error"),
        ("/v1/models/mixed", "not_found_error"),
    ] {
        let v = models(path.into()).await;
        assert_eq!(
            (&v["type"], &v["error"]["type"]),
            (&json!("error"), &json!(kind)),
            "{path}: {v}"
        );
    }
    let v = body_json(request(&gw, "GET", "/v1/models", &[], "").await).await;
    assert_eq!(v["object"], "list");
    // Four bots and five aliases, one of them in the place of the bot of its name.
    assert_eq!(v["data"].as_array().unwrap().len(), 4 + 5 - 1, "{v}");
}

/// Every event of an SSE body, parsed: what an SDK reads (an event's `data` lines, joined).
fn sse_events(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Odd but possible stream endings. An error event that carries usage reaches a client that
/// did not ask for usage (it was dropped as the usage-only chunk, and the SDK saw success).
/// An upstream that breaks mid-event leaves the client whole events and then the error event,
/// never a half event (the SDK raised a JSON decoding error, not its API error). A stream
/// whose `data: [DONE]` has no blank line after it is whole.
#[tokio::test]
async fn odd_stream_endings_reach_the_client_as_whole_events() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    let with_usage = r#"{"model":"gpt","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true}}"#;

    // 1. Poe's error event with usage on it, the client not asking for usage.
    let error_event = r#"data: {"error":{"message":"moderation","type":"moderation_error"},"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "Hel"))
            .send(format!("{error_event}\n\n"))
            .send("data: [DONE]\n\n"),
    );
    let got = body_bytes(post(&gw, &chat_body("gpt", true), &[]).await).await;
    let events = sse_events(&got);
    assert_eq!(events.len(), 3, "{events:?}");
    let err: serde_json::Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(err["error"]["message"], "moderation", "{events:?}");
    assert!(
        err.get("usage").is_none(),
        "the usage asked for by the gateway is cut"
    );

    // 2. A break in the middle of an event, in both modes: whole events, then the error.
    for body in [chat_body("gpt", true), with_usage.to_string()] {
        let first = chunk("gpt-5", "Hel");
        let second = chunk("gpt-5", "lo");
        up.push(
            Reply::sse()
                .send(first.clone())
                .send(second[..20].to_string())
                .drop_connection(),
        );
        let got = body_bytes(post(&gw, &body, &[]).await).await;
        let events = sse_events(&got);
        assert_eq!(events.len(), 2, "{body}: {events:?}");
        assert_eq!(events[0], first.trim_end()["data: ".len()..]);
        let err: serde_json::Value = serde_json::from_str(&events[1]).unwrap();
        assert_eq!(err["error"]["type"], "upstream_error", "{body}: {events:?}");
    }

    // 3. `[DONE]` with no blank line after it, in both modes: whole, nothing added.
    for body in [chat_body("gpt", true), with_usage.to_string()] {
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "Hi"))
                .send(usage_chunk(4, 1))
                .send("data: [DONE]"),
        );
        let got = body_bytes(post(&gw, &body, &[]).await).await;
        let events = sse_events(&got);
        assert_eq!(events.last().unwrap(), "[DONE]", "{body}: {events:?}");
        assert!(got.ends_with(b"data: [DONE]\n\n"), "{got:?}");
        assert!(
            !events.iter().any(|e| e.contains("\"error\"")),
            "{events:?}"
        );
    }

    let r = report(&core, None).await;
    assert_eq!(r.totals.requests, 5);
    assert_eq!(r.totals.errors, 3, "the error event and the two breaks");
}

/// An upstream answer's media type is read without regard to case, and a stream asked for
/// and answered with no type is read as one: otherwise the usage chunk the gateway asked for
/// reached the client, and a cut stream was stored and replayed as whole.
#[tokio::test]
async fn a_stream_is_known_whatever_the_case_of_its_content_type() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    for content_type in [Some("Text/Event-Stream; charset=utf-8"), None] {
        let mut reply = Reply::new(200);
        if let Some(ct) = content_type {
            reply = reply.header("content-type", ct);
        }
        up.push(
            reply
                .send(chunk("gpt-5", "Hi"))
                .send(usage_chunk(4, 1))
                .send("data: [DONE]\n\n"),
        );
        let got = body_bytes(post(&gw, &chat_body("gpt", true), &[]).await).await;
        assert_eq!(
            got,
            Bytes::from([chunk("gpt-5", "Hi"), "data: [DONE]\n\n".into()].concat()),
            "{content_type:?}"
        );
    }
    // Cut off, with the cache on (temperature 0): an error event, nothing stored.
    let cacheable = r#"{"model":"gpt","messages":[{"role":"user","content":"x"}],"stream":true,"temperature":0}"#;
    up.push(
        Reply::new(200)
            .header("content-type", "TEXT/EVENT-STREAM")
            .send(chunk("gpt-5", "Hi"))
            .drop_connection(),
    );
    up.push(Reply::stream("gpt-5", &["whole"]));
    let got = body_bytes(post(&gw, cacheable, &[]).await).await;
    assert!(String::from_utf8_lossy(&got).contains("\"error\""));
    let resp = post(&gw, cacheable, &[]).await;
    assert_eq!(
        resp.headers()["x-cache"],
        "MISS",
        "the cut stream was not stored"
    );
    body_bytes(resp).await;
    let r = report(&core, None).await;
    assert_eq!((r.totals.requests, r.totals.errors), (4, 1));
}

/// Non-stream answers: a 200 whose body is an error object is neither stored nor counted as
/// an answer; a body past the 8 MiB the tap keeps still has its usage read (it is at the end);
/// Poe is asked for an uncompressed answer, and a compressed one is not stored.
#[tokio::test]
async fn odd_json_answers_are_accounted_and_not_stored() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
    let cacheable = r#"{"model":"gpt","messages":[{"role":"user","content":"x"}],"temperature":0}"#;

    up.push(Reply::json(
        200,
        r#"{"error":{"message":"bot overloaded","type":"provider_error"}}"#,
    ));
    up.push(Reply::completion("gpt-5", "fine"));
    let resp = post(&gw, cacheable, &[]).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let resp = post(&gw, cacheable, &[]).await;
    assert_eq!(
        resp.headers()["x-cache"],
        "MISS",
        "the error object was stored"
    );
    assert!(String::from_utf8_lossy(&body_bytes(resp).await).contains("fine"));
    let r = report(&core, None).await;
    assert_eq!((r.totals.requests, r.totals.errors), (2, 1));

    // 9 MiB of content, then the usage.
    let text = "a".repeat(1024 * 1024);
    let mut reply = Reply::new(200)
        .header("content-type", "application/json")
        .send(r#"{"id":"chatcmpl-big","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""#);
    for _ in 0..9 {
        reply = reply.send(text.clone());
    }
    up.push(reply.send(
        r#""},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}"#,
    ));
    let got = body_bytes(post(&gw, &chat_body("gpt", false), &[]).await).await;
    assert!(got.len() > 9 * 1024 * 1024);
    let r = report(&core, None).await;
    assert_eq!(r.totals.requests, 3);
    assert_eq!(
        r.totals.completion_tokens,
        3 + 22,
        "read, not estimated from 9 MiB"
    );

    // Compressed against the gateway's wish: a 502 (it could be neither accounted nor
    // checked for the key), never stored, and asked for once each time.
    let other = r#"{"model":"gpt","messages":[{"role":"user","content":"y"}],"temperature":0}"#;
    for _ in 0..2 {
        up.push(
            Reply::json(200, completion_json("gpt-5", "zipped")).header("content-encoding", "br"),
        );
    }
    for _ in 0..2 {
        let resp = post(&gw, other, &[]).await;
        assert_eq!(resp.status(), 502);
        assert!(resp.headers().get("content-encoding").is_none());
        body_bytes(resp).await;
    }
    let asked = up.chats();
    assert!(
        asked.iter().all(|r| r
            .headers
            .get("accept-encoding")
            .is_some_and(|v| v == "identity")),
        "{:?}",
        asked[0].headers
    );

    // An empty 200 is no answer: its client stayed, so it is `incomplete` (it was taken for
    // a client gone, as hyper never read a body of length 0), and it is not stored.
    let empty = r#"{"model":"gpt","messages":[{"role":"user","content":"z"}],"temperature":0}"#;
    up.push(Reply::json(200, ""));
    up.push(Reply::completion("gpt-5", "full"));
    let resp = post(&gw, empty, &[]).await;
    assert_eq!(resp.status(), 200);
    assert!(body_bytes(resp).await.is_empty());
    let resp = post(&gw, empty, &[]).await;
    assert_eq!(
        resp.headers()["x-cache"],
        "MISS",
        "the empty answer was stored"
    );
    body_bytes(resp).await;
    core.flush().await;
    let sql = "SELECT COUNT(*) FROM usage WHERE outcome = 'incomplete' AND status = 200 \
               AND request_id NOT IN (SELECT request_id FROM usage WHERE outcome = 'cancelled')";
    assert_eq!(
        count(&db, sql).await,
        2,
        "{db}: the error object's and the empty one's"
    );
}

/// The one number `sql` selects from the ledger at `db`.
async fn count(db: &str, sql: &str) -> i64 {
    match db.strip_prefix("sqlite://") {
        Some(path) => rusqlite::Connection::open(path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap(),
        None => {
            let (c, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.query_one(sql, &[]).await.unwrap().get(0)
        }
    }
}

/// The ledger's database failing must not stop a team's gateway: keys in use go on being
/// answered from memory, a key the gateway cannot check gets a 503 with `Retry-After` (not a
/// 500), and once the database answers again every key works. (The keys table is renamed
/// away, as a database that is down would fail every look-up.)
#[tokio::test]
async fn keys_in_use_outlive_a_failing_key_store() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (_, used) = create_key(&gw, r#"{"name":"in-use"}"#).await;
    let (_, unseen) = create_key(&gw, r#"{"name":"not-yet"}"#).await;
    let ask = |key: String| {
        let gw = &gw;
        async move {
            let auth = format!("Bearer {key}");
            post(gw, &chat_body("gpt", false), &[("authorization", &auth)]).await
        }
    };
    let resp = ask(used.clone()).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;

    let side = rusqlite::Connection::open(&path).unwrap();
    side.execute_batch("ALTER TABLE gateway_keys RENAME TO keys_away")
        .unwrap();
    // Past the few seconds a record is trusted without asking the store again.
    tokio::time::sleep(Duration::from_millis(5_200)).await;
    for _ in 0..3 {
        let resp = ask(used.clone()).await;
        assert_eq!(resp.status(), 200, "a key in use was refused");
        body_bytes(resp).await;
    }
    let resp = ask(unseen.clone()).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let e = body_json(resp).await;
    assert_eq!(e["error"]["code"], "shared_state_unavailable", "{e}");
    // Refused before it had a caller, so in no request count: counted on its own.
    let refused = metric(&gw, r#"poe_gateway_auth_failures_total{status="503"}"#).await;
    assert_eq!(refused, Some(1.0));

    side.execute_batch("ALTER TABLE keys_away RENAME TO gateway_keys")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = ask(unseen.clone()).await;
        let status = resp.status();
        body_bytes(resp).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "the store never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator's view of keys and reports. A name is one active key, even when many ask for
/// it at once. A report's window, pasted back, means what it said. A filter or parameter
/// that matches nothing is a 400 naming it, not an empty answer. HEAD works as on other
/// routes. Estimated tokens are counted apart, and a refused request is reported under its
/// bot, not its alias. A budget under a cent is shown as it is.
#[tokio::test]
async fn admin_reports_answer_what_was_asked_or_say_why_not() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
    let db = databases().await.remove(0);
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;

    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let addr = gw.addr;
        racing.spawn(async move {
            let gw = TestGateway { addr, handle: None };
            as_admin(&gw, "POST", "/admin/keys", r#"{"name":"race"}"#)
                .await
                .status()
                .as_u16()
        });
    }
    let mut created = 0;
    while let Some(status) = racing.join_next().await {
        match status.unwrap() {
            201 => created += 1,
            s => assert_eq!(s, 400),
        }
    }
    assert_eq!(created, 1, "one active key per name");

    let (_, key) = create_key(&gw, r#"{"name":"erin","budget_usd":0.0001,"period":"day"}"#).await;
    let auth = format!("Bearer {key}");
    let mut refused = 0;
    for _ in 0..3 {
        let resp = post(
            &gw,
            &chat_body("claude", false),
            &[("authorization", &auth)],
        )
        .await;
        let status = resp.status();
        let body = body_bytes(resp).await;
        if status == 429 {
            refused += 1;
            let text = String::from_utf8_lossy(&body);
            assert!(text.contains("budget of $0.0001 "), "{text}");
        }
    }
    assert!(refused > 0, "the $0.0001 budget held nothing back");
    // Refused by its budget: under its bot, with the answered ones. (A budget under a cent
    // would read "$0.00".)
    let v =
        body_json(as_admin(&gw, "GET", "/admin/usage?key_id=erin&group_by=model", "").await).await;
    let groups = v["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{v}");
    assert_eq!(groups[0]["group"], "claude-sonnet-4.5", "{v}");
    assert_eq!(v["totals"]["requests"], 3, "{v}");
    assert_eq!(v["totals"]["estimated"], 0, "{v}");

    // The window a report prints, pasted back, is the same window.
    let all = body_json(as_admin(&gw, "GET", "/admin/usage", "").await).await;
    let again = body_json(
        as_admin(
            &gw,
            "GET",
            &format!(
                "/admin/usage?since={}&until={}",
                all["since_ms"], all["until_ms"]
            ),
            "",
        )
        .await,
    )
    .await;
    assert_eq!(again["totals"], all["totals"]);
    assert_eq!(again["since_ms"], all["since_ms"]);

    // A key's name is found even when it reads like a passthrough id.
    let (_, pt_named) = create_key(&gw, r#"{"name":"pt_team"}"#).await;
    let resp = post(
        &gw,
        &chat_body("claude", false),
        &[("authorization", &format!("Bearer {pt_named}"))],
    )
    .await;
    body_bytes(resp).await;
    let v = body_json(as_admin(&gw, "GET", "/admin/usage?key_id=pt_team", "").await).await;
    assert_eq!(v["totals"]["requests"], 1, "{v}");

    for (query, param) in [
        ("key_id=nobody", "key_id"),
        ("key_id=", "key_id"),
        // Open mode's rows have no key: `open` is a cache scope, not a report filter.
        ("key_id=open", "key_id"),
        ("groupby=key", "null"),
        ("since=2999-01-01", "since"),
    ] {
        let resp = as_admin(&gw, "GET", &format!("/admin/usage?{query}"), "").await;
        let e = expect_error(resp, 400, "invalid_request_error").await;
        assert_eq!(
            e["param"].to_string().trim_matches('"'),
            param,
            "{query}: {e}"
        );
    }
    let resp = as_admin(&gw, "DELETE", "/admin/cache?key_id=nobody", "").await;
    expect_error(resp, 400, "invalid_request_error").await;
    // A wrong field of a new key is named; so is the real range of `rpm`.
    let resp = as_admin(&gw, "POST", "/admin/keys", r#"{"name":"x","rpm":-1}"#).await;
    let e = expect_error(resp, 400, "invalid_request_error").await;
    assert_eq!(e["param"], "rpm", "{e}");
    assert!(e["message"].as_str().unwrap().contains("1000000"), "{e}");
    let resp = as_admin(&gw, "POST", "/admin/keys", r#"{"name":"y"} trailing"#).await;
    expect_error(resp, 400, "invalid_request_error").await;
    let resp = as_admin(&gw, "HEAD", "/admin/usage", "").await;
    assert_eq!(resp.status(), 200);
}

/// Runs `poe-gateway usage ARGS --format json` against the ledger at `db`, and reads its report.
fn usage_command(db: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .arg("usage")
        .args(args)
        .args(["--format", "json"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POE_GATEWAY_DATABASE_URL", db)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{db}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// A report's groups, each with the named counts.
fn group_fields(report: &serde_json::Value, fields: &[&str]) -> Vec<(String, Vec<i64>)> {
    report["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups: {report}"))
        .iter()
        .map(|g| {
            let n = |f: &&str| g[*f].as_i64().unwrap_or_else(|| panic!("{f}: {g}"));
            let group = g["group"].as_str().unwrap().to_string();
            (group, fields.iter().map(n).collect())
        })
        .collect()
}

/// A report's groups as `(group, requests, prompt, completion, errors)`.
fn group_counts(report: &serde_json::Value) -> Vec<(String, i64, i64, i64, i64)> {
    let fields = ["requests", "prompt_tokens", "completion_tokens", "errors"];
    group_fields(report, &fields)
        .into_iter()
        .map(|(g, n)| (g, n[0], n[1], n[2], n[3]))
        .collect()
}

/// A request to `path` with gateway key `key`, sent as each API's clients send it (`x-api-key`
/// and `anthropic-version` on the Messages API, a bearer token elsewhere); its status, the
/// body read to its end.
async fn send_as(gw: &TestGateway, key: &str, path: &str, body: String) -> u16 {
    let bearer = format!("Bearer {key}");
    let mut headers = vec![("content-type", "application/json")];
    if path == "/v1/messages" {
        headers.extend([("x-api-key", key), ("anthropic-version", "2023-06-01")]);
    } else {
        headers.push(("authorization", &bearer));
    }
    let resp = request(gw, "POST", path, &headers, &body).await;
    let status = resp.status().as_u16();
    body_bytes(resp).await;
    status
}

/// The same report grouped by API three ways: the admin's, the key holder's own (`bearer`),
/// and `poe-gateway usage` on the ledger.
async fn reports_by_api(
    gw: &TestGateway,
    core: &poe_gateway::Gateway,
    db: &str,
    bearer: &str,
) -> [serde_json::Value; 3] {
    let admin = body_json(as_admin(gw, "GET", "/admin/usage?group_by=api", "").await).await;
    let own = body_json(
        request(
            gw,
            "GET",
            "/v1/usage?group_by=api&since=1d",
            &[("authorization", bearer)],
            "",
        )
        .await,
    )
    .await;
    core.flush().await;
    [admin, own, usage_command(db, &["--by", "api"])]
}

/// Each row keeps the API its request came in on, and reports group by it: chat completions,
/// the Responses API and the Messages API, each answered, streamed or refused, are told apart
/// in `/admin/usage`, in the caller's `/v1/usage` and in `poe-gateway usage`. A body that
/// cannot be read is the route's API; a request without a valid key writes no row.
#[tokio::test]
async fn reports_group_by_the_api_each_request_came_in_on() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        let (gw, core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
        let (_, key) = create_key(&gw, r#"{"name":"mixed"}"#).await;
        let bearer = format!("Bearer {key}");
        let send = |path: &'static str, body: String| send_as(&gw, &key, path, body);
        let messages_body = |stream: bool| {
            format!(
                r#"{{"model":"claude","max_tokens":64,"messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
            )
        };

        // Chat completions, twice: 7 + 3 tokens each.
        for _ in 0..2 {
            up.push(Reply::completion("claude-sonnet-4.5", "ok"));
            assert_eq!(
                send("/v1/chat/completions", chat_body("claude", false)).await,
                200
            );
        }
        // The Responses API: one answer (11 + 7), one refused by Poe (an error, no tokens).
        up.push(Reply::json(
            200,
            response_object("claude-sonnet-4.5", "Hi!", "completed", RESPONSES_USAGE),
        ));
        up.push(Reply::json(
            400,
            r#"{"error":{"message":"bad input","type":"invalid_request_error"}}"#,
        ));
        let responses_body = r#"{"model":"claude","input":"hi"}"#.to_string();
        assert_eq!(send("/v1/responses", responses_body.clone()).await, 200);
        assert_eq!(send("/v1/responses", responses_body).await, 400);
        // The Messages API: an answer (11 + 100 cache reads, 7), a stream (11 + 20 cache
        // writes, 9), and a body that is not JSON (refused by the gateway: an error).
        let usage = r#"{"input_tokens":11,"cache_creation_input_tokens":0,"cache_read_input_tokens":100,"output_tokens":7}"#;
        up.push(Reply::json(200, message_object("Hi!", usage)));
        assert_eq!(send("/v1/messages", messages_body(false)).await, 200);
        let mut stream = Reply::sse();
        for e in [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":11,"cache_creation_input_tokens":20,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":9}}"#,
            r#"{"type":"message_stop"}"#,
        ] {
            stream = stream.send(messages_event(e));
        }
        up.push(stream);
        assert_eq!(send("/v1/messages", messages_body(true)).await, 200);
        assert_eq!(send("/v1/messages", "{nope".into()).await, 400);
        // No valid key: refused before it is a request, so no row under any API.
        let resp = request(
            &gw,
            "POST",
            "/v1/messages",
            &[
                ("content-type", "application/json"),
                ("x-api-key", "pgw_not-a-key"),
            ],
            &messages_body(false),
        )
        .await;
        assert_eq!(resp.status(), 401);
        body_bytes(resp).await;

        let want = vec![
            ("chat".to_string(), 2, 14, 6, 0),
            ("messages".to_string(), 3, 111 + 31, 7 + 9, 1),
            ("responses".to_string(), 2, 11, 7, 1),
        ];
        let [admin, own, cli] = reports_by_api(&gw, &core, &db, &bearer).await;
        assert_eq!(group_counts(&admin), want, "{db}: {admin}");
        assert_eq!(admin["group_by"], "api", "{db}: {admin}");
        assert_eq!(admin["totals"]["requests"], 7, "{db}: {admin}");
        assert_eq!(group_counts(&own), want, "{db}: {own}");
        assert_eq!(group_counts(&cli), want, "{db}: {cli}");
        let cli = usage_command(&db, &["--group-by", "api"]);
        assert_eq!(group_counts(&cli), want, "{db}: {cli}");
        // Grouped by model, the three APIs' requests to one bot are still one group.
        let by_model =
            body_json(as_admin(&gw, "GET", "/admin/usage?group_by=model", "").await).await;
        assert_eq!(
            by_model["groups"].as_array().unwrap().len(),
            2,
            "the bot, and the unparsed body's `(invalid request)`: {by_model}"
        );
    }
}

/// A report's groups as `(group, cache_read_tokens, cache_write_tokens)`.
fn cache_counts(report: &serde_json::Value) -> Vec<(String, i64, i64)> {
    group_fields(report, &["cache_read_tokens", "cache_write_tokens"])
        .into_iter()
        .map(|(g, n)| (g, n[0], n[1]))
        .collect()
}

/// Prompt-cache tokens are read from every API's usage: chat completions'
/// `prompt_tokens_details.cached_tokens` (streamed or not), the Responses API's
/// `input_tokens_details.cached_tokens`, and the Messages API's cache reads and writes. They
/// are stored in the ledger and reported per group (admin, the caller's own, the CLI). The
/// OpenAI-shaped ones are part of the prompt count, not added to it, and are priced at a
/// cache-read price only where one is known (here the policy's for `claude-sonnet-4.5`);
/// `gpt-5`, with none, is charged its full prompt price for them.
#[tokio::test]
async fn prompt_cache_tokens_are_read_from_every_api_stored_and_reported() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        let policy = format!(
            "{KEYS}[pricing.\"claude-sonnet-4.5\"]\ncache_read = 0.0000003\n\
             [pricing.gpt-5]\nprompt = 0.001\ncompletion = 0.002\n"
        );
        let (gw, core) = TestGateway::with_ledger(&up, &policy, &[], &db).await;
        let (_, key) = create_key(&gw, r#"{"name":"cached"}"#).await;
        let bearer = format!("Bearer {key}");
        let send = |path: &'static str, body: String| send_as(&gw, &key, path, body);

        // Chat, not streamed, to a bot with a known cache-read price: 800 of 1000 cached.
        let mut answer: serde_json::Value =
            serde_json::from_str(&completion_json("claude-sonnet-4.5", "ok")).unwrap();
        answer["usage"] = serde_json::json!({
            "prompt_tokens": 1000, "completion_tokens": 10, "total_tokens": 1010,
            "prompt_tokens_details": {"cached_tokens": 800, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}
        });
        up.push(Reply::json(200, answer.to_string()));
        assert_eq!(
            send("/v1/chat/completions", chat_body("claude", false)).await,
            200
        );
        // Chat, streamed (the usage chunk the gateway asked for), to a bot with no cache
        // price: 600 of 1000 cached.
        let usage = r#"{"prompt_tokens":1000,"completion_tokens":10,"total_tokens":1010,"prompt_tokens_details":{"cached_tokens":600}}"#;
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "ok"))
                .send(finish_chunk("gpt-5"))
                .send(format!(
                    "data: {{\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{usage}}}\n\n"
                ))
                .send("data: [DONE]\n\n"),
        );
        assert_eq!(
            send("/v1/chat/completions", chat_body("gpt", true)).await,
            200
        );
        // The Responses API: 40 of 100 input tokens cached.
        let usage = r#"{"input_tokens":100,"input_tokens_details":{"cached_tokens":40},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":105}"#;
        up.push(Reply::json(
            200,
            response_object("claude-sonnet-4.5", "Hi!", "completed", usage),
        ));
        assert_eq!(
            send("/v1/responses", r#"{"model":"claude","input":"hi"}"#.into()).await,
            200
        );
        // The Messages API: 11 new, 100 read from the cache and 20 written to it.
        let usage = r#"{"input_tokens":11,"cache_creation_input_tokens":20,"cache_read_input_tokens":100,"output_tokens":7}"#;
        up.push(Reply::json(200, message_object("Hi!", usage)));
        let messages =
            r#"{"model":"claude","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(send("/v1/messages", messages.into()).await, 200);

        // Cached tokens are a part of the prompt count on chat and Responses, not added to it.
        let by_api = vec![
            ("chat".to_string(), 2, 2000, 20, 0),
            ("messages".to_string(), 1, 131, 7, 0),
            ("responses".to_string(), 1, 100, 5, 0),
        ];
        let cached = vec![
            ("chat".to_string(), 800 + 600, 0),
            ("messages".to_string(), 100, 20),
            ("responses".to_string(), 40, 0),
        ];
        let [admin, own, cli] = reports_by_api(&gw, &core, &db, &bearer).await;
        assert_eq!(group_counts(&admin), by_api, "{db}: {admin}");
        assert_eq!(cache_counts(&admin), cached, "{db}: {admin}");
        assert_eq!(admin["totals"]["cache_read_tokens"], 1540, "{db}: {admin}");
        assert_eq!(admin["totals"]["cache_write_tokens"], 20, "{db}: {admin}");
        assert_eq!(cache_counts(&own), cached, "{db}: {own}");
        assert_eq!(cache_counts(&cli), cached, "{db}: {cli}");

        // Costs. claude-sonnet-4.5: Poe's $3/M prompt and $15/M completion, the policy's
        // $0.3/M cache reads, and (for the Messages API) Anthropic's 1.25 share for writes.
        let cost = |report: &serde_json::Value, group: &str| {
            report["groups"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["group"] == group)
                .unwrap_or_else(|| panic!("{db}: no {group}: {report}"))["cost_usd"]
                .as_f64()
                .unwrap()
        };
        let near = |got: f64, want: f64, what: &str| {
            assert!((got - want).abs() < 1e-12, "{db} {what}: {got}, not {want}");
        };
        let claude_chat = 200.0 * 3e-6 + 800.0 * 3e-7 + 10.0 * 15e-6;
        // No cache price for gpt-5: all 1000 prompt tokens at its prompt price.
        let gpt_chat = 1000.0 * 0.001 + 10.0 * 0.002;
        near(cost(&admin, "chat"), claude_chat + gpt_chat, "chat");
        near(
            cost(&admin, "responses"),
            60.0 * 3e-6 + 40.0 * 3e-7 + 5.0 * 15e-6,
            "responses",
        );
        near(
            cost(&admin, "messages"),
            11.0 * 3e-6 + 100.0 * 3e-7 + 20.0 * 3e-6 * 1.25 + 7.0 * 15e-6,
            "messages",
        );
        let by_model =
            body_json(as_admin(&gw, "GET", "/admin/usage?group_by=model", "").await).await;
        near(cost(&by_model, "gpt-5"), gpt_chat, "gpt-5");
        assert_eq!(
            cache_counts(&by_model),
            vec![
                ("claude-sonnet-4.5".to_string(), 800 + 40 + 100, 20),
                ("gpt-5".to_string(), 600, 0),
            ],
            "{db}: {by_model}"
        );

        // A hit of the gateway's own cache called no bot, so it read no bot's cache: the
        // miss that stored the answer counts its 800, the hit none.
        let cacheable =
            r#"{"model":"claude","temperature":0,"messages":[{"role":"user","content":"again"}]}"#;
        up.push(Reply::json(200, answer.to_string()));
        for _ in 0..2 {
            assert_eq!(
                send("/v1/chat/completions", cacheable.to_string()).await,
                200
            );
        }
        let after = report(&core, None).await;
        assert_eq!(after.totals.cache_hits, 1, "{db}");
        assert_eq!(after.totals.cache_read_tokens, 1540 + 800, "{db}");
    }
}

/// The ledger as the gateway's schema version 2 left it (before the `api` column): the
/// tables of migrations 1 and 2, both recorded, and two chat rows of an hour ago.
async fn make_version_2_ledger(db: &str) {
    let now = poe_gateway::ledger::now_ms();
    let usage = |id: &str, boolean: &str, real: &str, big: &str| {
        format!(
            "CREATE TABLE poe_gateway_migrations (version {big} PRIMARY KEY, applied_ms {big} NOT NULL);
             CREATE TABLE usage (
                 id {id}, ts_ms {big} NOT NULL, request_id TEXT NOT NULL, key_id TEXT,
                 alias TEXT, model TEXT NOT NULL, bot TEXT NOT NULL, stream {boolean} NOT NULL,
                 status INTEGER NOT NULL, outcome TEXT NOT NULL, prompt_tokens {big},
                 completion_tokens {big}, total_tokens {big}, tokens_estimated {boolean} NOT NULL,
                 cost_usd {real}, cache_hit {boolean} NOT NULL, saved_usd {real},
                 attempts INTEGER NOT NULL, latency_ms {real} NOT NULL, ttfb_ms {real});
             CREATE INDEX usage_ts ON usage (ts_ms);
             CREATE INDEX usage_key_ts ON usage (key_id, ts_ms, cost_usd);
             CREATE TABLE gateway_keys (
                 id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
                 created_ms {big} NOT NULL, revoked_ms {big}, budget_usd {real},
                 period TEXT NOT NULL, rpm INTEGER, models TEXT);
             INSERT INTO poe_gateway_migrations (version, applied_ms) VALUES (1, 0), (2, 0);
             INSERT INTO usage (ts_ms, request_id, model, bot, stream, status, outcome,
                 prompt_tokens, completion_tokens, total_tokens, tokens_estimated, cache_hit,
                 attempts, latency_ms)
             VALUES ({t}, 'old-1', 'gpt-5', 'gpt-5', false, 200, 'completed', 5, 4, 9, false, false, 1, 10.0),
                    ({t}, 'old-2', 'gpt-5', 'gpt-5', true, 200, 'completed', 5, 4, 9, false, false, 1, 10.0);",
            t = now - 3_600_000,
        )
    };
    match db.strip_prefix("sqlite://") {
        Some(path) => {
            std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
            let c = rusqlite::Connection::open(path).unwrap();
            c.execute_batch(&usage("INTEGER PRIMARY KEY", "INTEGER", "REAL", "INTEGER"))
                .unwrap();
            c.execute_batch(
                "DROP INDEX usage_key_ts;
                 CREATE INDEX usage_key_ts ON usage (key_id, ts_ms, cost_usd) WHERE key_id IS NOT NULL;",
            )
            .unwrap();
        }
        None => {
            let (c, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.batch_execute(&usage(
                "BIGSERIAL PRIMARY KEY",
                "BOOLEAN",
                "DOUBLE PRECISION",
                "BIGINT",
            ))
            .await
            .unwrap();
        }
    }
}

/// The schema versions a ledger has recorded, highest first.
async fn schema_versions(db: &str) -> Vec<i64> {
    let sql = "SELECT version FROM poe_gateway_migrations ORDER BY version DESC";
    match db.strip_prefix("sqlite://") {
        Some(path) => {
            let c = rusqlite::Connection::open(path).unwrap();
            let mut stmt = c.prepare(sql).unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }
        None => {
            let (c, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
    }
}

/// A ledger written before rows had an API: `poe-gateway usage --by api` reads it as it is,
/// without migrating it, its rows `unknown` (they may have been any API: Responses and
/// Messages requests came before the column); the gateway then adds the column, the old rows
/// stay `unknown`, and new rows take their own API. The addition is recorded as -3, so
/// `MAX(version)`, what an older gateway checks, stays 2: the old replicas of a rolling
/// upgrade, and a rollback, still start on the ledger.
#[tokio::test]
async fn a_ledger_from_before_the_api_column_reads_as_unknown_and_is_migrated() {
    for db in databases().await {
        make_version_2_ledger(&db).await;
        let old = usage_command(&db, &["--by", "api"]);
        assert_eq!(
            group_counts(&old),
            vec![("unknown".to_string(), 2, 10, 8, 0)],
            "{db}: {old}"
        );
        assert_eq!(cache_counts(&old), vec![("unknown".to_string(), 0, 0)]);
        assert_eq!(
            schema_versions(&db).await,
            [2, 1],
            "{db}: the report migrated"
        );

        let up = MockUpstream::start().await;
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        assert_eq!(schema_versions(&db).await, [2, 1, -3, -4, -5], "{db}");
        up.push(Reply::json(
            200,
            response_object("claude-sonnet-4.5", "Hi!", "completed", RESPONSES_USAGE),
        ));
        let resp = request(
            &gw,
            "POST",
            "/v1/responses",
            &[("content-type", "application/json")],
            r#"{"model":"claude","input":"hi"}"#,
        )
        .await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
        up.push(Reply::completion("gpt-5", "ok"));
        let resp = post(&gw, &chat_body("gpt", false), &[]).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;

        let want = vec![
            ("chat".to_string(), 1, 7, 3, 0),
            ("responses".to_string(), 1, 11, 7, 0),
            ("unknown".to_string(), 2, 10, 8, 0),
        ];
        let r = body_json(as_admin(&gw, "GET", "/admin/usage?group_by=api", "").await).await;
        assert_eq!(group_counts(&r), want, "{db}: {r}");
        core.flush().await;
        assert_eq!(
            group_counts(&usage_command(&db, &["--by", "api"])),
            want,
            "{db}"
        );
    }
}

/// Runs `sql` on the ledger at `db`.
async fn execute(db: &str, sql: &str) {
    match db.strip_prefix("sqlite://") {
        Some(path) => rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(sql)
            .unwrap(),
        None => {
            let (c, conn) = tokio_postgres::connect(db, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.batch_execute(sql).await.unwrap();
        }
    }
}

/// A ledger as the gateway left it before the prompt-cache columns (the `api` column added,
/// recorded as -3): `poe-gateway usage` reads it without migrating, its cache tokens 0; the
/// gateway then adds the two nullable columns, recorded as -4 so that `MAX(version)`, what
/// older gateways check, stays 2 and they still start on it. Old rows count 0 cache tokens,
/// new rows their own.
#[tokio::test]
async fn a_ledger_from_before_the_cache_columns_reads_them_as_0_and_is_migrated() {
    for db in databases().await {
        make_version_2_ledger(&db).await;
        execute(
            &db,
            "ALTER TABLE usage ADD COLUMN api TEXT;
             UPDATE usage SET api = 'chat';
             INSERT INTO poe_gateway_migrations (version, applied_ms) VALUES (-3, 0);",
        )
        .await;
        let old = usage_command(&db, &["--by", "api"]);
        assert_eq!(
            group_counts(&old),
            vec![("chat".to_string(), 2, 10, 8, 0)],
            "{db}: {old}"
        );
        assert_eq!(cache_counts(&old), vec![("chat".to_string(), 0, 0)], "{db}");
        assert_eq!(old["totals"]["cache_read_tokens"], 0, "{db}: {old}");
        assert_eq!(
            schema_versions(&db).await,
            [2, 1, -3],
            "{db}: the report migrated"
        );

        let up = MockUpstream::start().await;
        let (gw, core) = TestGateway::with_ledger(&up, ALIASES, &[], &db).await;
        assert_eq!(schema_versions(&db).await, [2, 1, -3, -4, -5], "{db}");
        let mut answer: serde_json::Value =
            serde_json::from_str(&completion_json("gpt-5", "ok")).unwrap();
        answer["usage"] = serde_json::json!({
            "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4}
        });
        up.push(Reply::json(200, answer.to_string()));
        let resp = post(&gw, &chat_body("gpt", false), &[]).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
        let r = body_json(as_admin(&gw, "GET", "/admin/usage?group_by=api", "").await).await;
        assert_eq!(
            group_counts(&r),
            vec![("chat".to_string(), 3, 17, 11, 0)],
            "{db}: {r}"
        );
        assert_eq!(cache_counts(&r), vec![("chat".to_string(), 4, 0)], "{db}");
        core.flush().await;
        let cli = usage_command(&db, &["--by", "api"]);
        assert_eq!(cache_counts(&cli), vec![("chat".to_string(), 4, 0)], "{db}");
        // The old rows' columns are empty, not 0: nothing was rewritten.
        let nulls = "SELECT COUNT(*) FROM usage WHERE cache_read_tokens IS NULL AND cache_write_tokens IS NULL";
        assert_eq!(count(&db, nulls).await, 2, "{db}");
    }
}

/// A Postgres migration that finds the usage table in use (an analyst's open transaction)
/// waits for it a moment at a time, and lets the replicas' inserts through between tries:
/// a schema change queued for its lock would hold every insert behind it until the
/// transaction ended. The insert here must get through while the table is still held; with
/// the old unbounded wait it did not (it waited for the whole hold). Postgres only.
#[tokio::test]
async fn a_postgres_migration_waiting_for_its_lock_lets_inserts_through() {
    let Some(db) = databases()
        .await
        .into_iter()
        .find(|d| !d.starts_with("sqlite://"))
    else {
        return;
    };
    make_version_2_ledger(&db).await;
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    // The analyst: a transaction that has read the table holds it until it ends.
    let analyst = connect().await;
    analyst
        .batch_execute("BEGIN; SELECT COUNT(*) FROM usage;")
        .await
        .unwrap();
    let migration = tokio::spawn({
        let db = db.clone();
        async move { poe_gateway::ledger::Store::open(&db).await.map(|_| ()) }
    });
    // Until the migration's schema change waits for its lock.
    let watcher = connect().await;
    let waiting = "SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON l.relation = c.oid \
                   WHERE c.relname = 'usage' AND l.mode = 'AccessExclusiveLock' AND NOT l.granted";
    let mut seen = false;
    for _ in 0..400 {
        let n: i64 = watcher.query_one(waiting, &[]).await.unwrap().get(0);
        if n > 0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "the migration never waited for the table");
    // A replica's insert, meanwhile. Bounded well past the migration's 2 s wait, and the
    // analyst's hold lasts until it returns, so it can only get through between tries.
    let replica = connect().await;
    let insert = replica.batch_execute(
        "INSERT INTO usage (ts_ms, request_id, model, bot, stream, status, outcome, \
         tokens_estimated, cache_hit, attempts, latency_ms) \
         VALUES (0, 'during', 'gpt-5', 'gpt-5', false, 200, 'completed', false, false, 1, 1.0)",
    );
    let inserted = tokio::time::timeout(Duration::from_secs(20), insert).await;
    analyst.batch_execute("COMMIT").await.unwrap();
    assert!(
        matches!(inserted, Ok(Ok(()))),
        "the insert waited behind the migration: {inserted:?}"
    );
    migration
        .await
        .unwrap()
        .expect("the migration finished once the table was free");
    let versions = schema_versions(&db).await;
    assert!(versions.contains(&-3), "{versions:?}");
}

/// A key made with an expiry works until then and is refused after, saying when it expired;
/// the CLI and the admin API take the same forms and refuse a time in the past, a duration
/// given as a time, and both at once. A ledger from before the column lists its keys without
/// migrating (none expires), and the gateway then adds the column as -5, so older gateways
/// still start on it.
#[tokio::test]
async fn a_key_expires_and_older_ledgers_keep_their_keys() {
    for db in databases().await {
        make_version_2_ledger(&db).await;
        execute(
            &db,
            "INSERT INTO gateway_keys (id, name, hash, created_ms, period)
             VALUES ('key_0000000000000001', 'old', 'abc', 0, 'month')",
        )
        .await;
        let out = cli(&db, &["keys", "list", "--format", "json"]);
        assert!(
            out.status.success(),
            "{db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(listed[0]["name"], "old", "{db}: {listed}");
        assert!(listed[0]["expires_ms"].is_null(), "{db}: {listed}");
        assert_eq!(schema_versions(&db).await, [2, 1], "{db}: listing migrated");

        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
        let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
        assert_eq!(schema_versions(&db).await, [2, 1, -3, -4, -5], "{db}");

        for (body, param) in [
            (r#"{"name":"a","expires_in":"soon"}"#, "expires_in"),
            (r#"{"name":"a","expires_at":"30d"}"#, "expires_at"),
            (r#"{"name":"a","expires_at":1}"#, "expires_at"),
            (r#"{"name":"a","expires_at":"2001-01-01"}"#, "expires_at"),
            (r#"{"name":"a","expires_at":"99999-01-01"}"#, "expires_at"),
            (
                r#"{"name":"a","expires_at":"2100-01-01","expires_in":"1d"}"#,
                "expires_at",
            ),
        ] {
            let e = expect_error(
                as_admin(&gw, "POST", "/admin/keys", body).await,
                400,
                "invalid_request_error",
            )
            .await;
            assert_eq!(e["param"], param, "{db}: {body}: {e}");
        }

        let (id, key) = create_key(&gw, r#"{"name":"brief","expires_in":"1500ms"}"#).await;
        let listed = body_json(as_admin(&gw, "GET", "/admin/keys", "").await).await;
        let rec = listed
            .as_array()
            .or(listed["data"].as_array())
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .cloned()
            .unwrap();
        let at = rec["expires_ms"].as_i64().expect("an expiry is listed");
        assert!(at > poe_gateway::ledger::now_ms(), "{db}: {rec}");
        assert_eq!(claude_as(&gw, &key).await, 200, "{db}");
        while poe_gateway::ledger::now_ms() < at {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let auth = format!("Bearer {key}");
        let e = expect_error(
            post(
                &gw,
                &chat_body("claude", false),
                &[("authorization", &auth)],
            )
            .await,
            401,
            "authentication_error",
        )
        .await;
        assert!(e["message"].as_str().unwrap().contains("expired at"), "{e}");

        // The CLI: a time in the past is a usage error; a future one is kept and listed.
        let out = cli(
            &db,
            &[
                "keys",
                "create",
                "--name",
                "late",
                "--expires-at",
                "2001-01-01",
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{db}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("in the future"));
        let out = cli(
            &db,
            &[
                "keys",
                "create",
                "--name",
                "later",
                "--expires-at",
                "2100-01-01T00:00:00Z",
            ],
        );
        assert!(
            out.status.success(),
            "{db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("expires 2100-01-01T00:00:00Z"));
        let table = String::from_utf8(cli(&db, &["keys", "list"]).stdout).unwrap();
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name))
                .unwrap_or_else(|| panic!("{name} not in {table}"))
                .to_string()
        };
        assert!(line("brief").contains(" expired "), "{table}");
        assert!(line("later").contains("2100-01-01T00:00:00Z"), "{table}");
        assert!(line("old").contains(" active "), "{table}");
    }
}

/// Every gateway key shares the server's Poe account, which would continue any stored
/// Responses conversation for whoever names its id: a key could read on from another key's
/// (it was passed to Poe as it came). A key continues only the responses it made, streamed
/// or not; another key's id, or one the gateway never saw, is refused as Poe refuses an
/// unknown id, and Poe is not asked.
#[tokio::test]
async fn a_key_continues_only_its_own_stored_responses() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    let (gw, _core) = TestGateway::with_ledger(&up, KEYS, &[], &db).await;
    let (_, alice) = create_key(&gw, r#"{"name":"alice"}"#).await;
    let (_, bob) = create_key(&gw, r#"{"name":"bob"}"#).await;
    let ask = |key: &str, extra: &str, stream: bool| {
        let gw = &gw;
        let auth = format!("Bearer {key}");
        let body = format!(r#"{{"model":"claude","input":"go on","stream":{stream}{extra}}}"#);
        async move {
            let resp = request(
                gw,
                "POST",
                "/v1/responses",
                &[
                    ("content-type", "application/json"),
                    ("authorization", &auth),
                ],
                &body,
            )
            .await;
            let status = resp.status().as_u16();
            (status, body_bytes(resp).await)
        }
    };
    let answer = |id: &str| {
        response_object("claude-sonnet-4.5", "Hi!", "completed", RESPONSES_USAGE)
            .replace("resp_1", id)
    };

    up.push(Reply::json(200, answer("resp_json")));
    assert_eq!(ask(&alice, "", false).await.0, 200);
    let created = format!(
        r#"{{"type":"response.created","sequence_number":0,"response":{}}}"#,
        answer("resp_sse")
    );
    let completed = format!(
        r#"{{"type":"response.completed","sequence_number":1,"response":{}}}"#,
        answer("resp_sse")
    );
    up.push(
        Reply::sse()
            .send(responses_event("response.created", &created))
            .send(responses_event("response.completed", &completed)),
    );
    assert_eq!(ask(&alice, "", true).await.0, 200);
    let calls = up.received_on("/v1/responses").len();

    for (key, id) in [
        (&bob, "resp_json"),
        (&bob, "resp_sse"),
        (&alice, "resp_never_seen"),
    ] {
        let (status, body) = ask(key, &format!(r#","previous_response_id":"{id}""#), false).await;
        assert_eq!(status, 400, "{id}");
        let e: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(e["error"]["param"], "previous_response_id", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not found"),
            "{e}"
        );
    }
    let (status, _) = ask(&alice, r#","previous_response_id":5"#, false).await;
    assert_eq!(status, 400);
    assert_eq!(
        up.received_on("/v1/responses").len(),
        calls,
        "Poe was asked"
    );

    for id in ["resp_json", "resp_sse"] {
        up.push(Reply::json(200, answer("resp_next")));
        let (status, _) = ask(&alice, &format!(r#","previous_response_id":"{id}""#), false).await;
        assert_eq!(status, 200, "{id}");
    }
    let sent = up.received_on("/v1/responses");
    assert_eq!(
        sent.last().unwrap().json()["previous_response_id"],
        "resp_sse"
    );

    // A stream is its key's from `response.completed` on, while its body may linger: a
    // client that goes on at once was refused as if the id were unknown.
    let linger = Arc::new(tokio::sync::Semaphore::new(0));
    let created = created.replace("resp_sse", "resp_linger");
    let completed = completed.replace("resp_sse", "resp_linger");
    up.push(
        Reply::sse()
            .send(responses_event("response.created", &created))
            .send(responses_event("response.completed", &completed))
            .gate(&linger),
    );
    let resp = request(
        &gw,
        "POST",
        "/v1/responses",
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {alice}")),
        ],
        r#"{"model":"claude","input":"go on","stream":true}"#,
    )
    .await;
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("response.completed") {
        let d = next_data(&mut body, 10)
            .await
            .expect("response.completed came");
        seen.extend_from_slice(&d);
    }
    up.push(Reply::json(200, answer("resp_after")));
    let (status, _) = ask(&alice, r#","previous_response_id":"resp_linger""#, false).await;
    assert_eq!(status, 200);
    linger.add_permits(1);
}

/// `poe-gateway usage balance` with a key Poe refuses, quoting it: the error printed has it
/// redacted, as the gateway's own answers do (it printed Poe's body as it came).
#[tokio::test]
async fn usage_balance_never_prints_the_key() {
    const KEY: &str = "poe-balance-secret-key-0123456789";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = sock.read(&mut buf).await;
                let body = format!(r#"{{"error":{{"message":"Invalid API key: Bearer {KEY}"}}}}"#);
                let resp = format!(
                    "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_poe-gateway"))
        .args(["usage", "balance"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POE_API_KEY", KEY)
        .env("POE_BASE_URL", format!("http://{addr}"))
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("[redacted]"),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY), "{stderr}");
}
