//! The streaming gateway core over real sockets: passthrough, streaming without buffering,
//! byte fidelity, aliasing, catalogue, errors, request ids, disconnects and shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

#[tokio::test]
async fn non_stream_is_passed_through_with_alias_rewritten() {
    let up = MockUpstream::start().await;
    let answer = completion_json("claude-sonnet-4.5", "Hello!");
    up.push(Reply::json(200, answer.clone()));
    let gw = TestGateway::default(&up).await;

    let body = r#"{"model":"Claude","messages":[{"role":"user","content":"hi"}],"thinking_budget":1024,"aspect":"3:2","nested":{"keep":[1,"two",null]}}"#;
    let resp = post(
        &gw,
        body,
        &[("authorization", "Bearer client-key-ignored-in-open-mode")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-poe-gateway-bot"], "claude-sonnet-4.5");
    assert_eq!(h["x-poe-gateway-attempts"], "1");
    assert_eq!(h["x-cache"], "BYPASS");
    assert!(!h["x-request-id"].is_empty());
    assert_eq!(
        body_bytes(resp).await,
        Bytes::from(answer),
        "client gets upstream bytes unchanged"
    );

    let got = up.received();
    let chat = got
        .iter()
        .find(|r| r.path == "/v1/chat/completions")
        .unwrap();
    // Only the model value changed; every other byte is the client's.
    assert_eq!(
        chat.body,
        Bytes::from(body.replace("\"Claude\"", "\"claude-sonnet-4.5\""))
    );
    assert_eq!(
        chat.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}").as_str(),
        "open mode uses the server key, not the client's"
    );
}

#[tokio::test]
async fn stream_bytes_reach_the_client_unchanged() {
    let up = MockUpstream::start().await;
    // CRLF endings, comments, a multi-byte character split across frames, unknown fields.
    let frames: Vec<&[u8]> = vec![
        b": keep-alive comment\r\n\r\n",
        b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"caf\xc3",
        b"\xa9 \xe2\x98",
        b"\x95\"},\"finish_reason\":null}],\"poe_extra\":{\"x\":1}}\r\n\r\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        b"data: [DONE]\n\n",
    ];
    let mut reply = Reply::sse();
    for f in &frames {
        reply = reply.send(Bytes::copy_from_slice(f));
    }
    up.push(reply);
    let gw = TestGateway::default(&up).await;

    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let got = body_bytes(resp).await;
    assert_eq!(got, Bytes::from(frames.concat()));
}

#[tokio::test]
async fn frames_are_not_buffered() {
    // The upstream sends one event, then waits for the test. If the gateway held the first
    // event back until more arrived, the client would never see it and the read would time out.
    let up = MockUpstream::start().await;
    let gate = Arc::new(Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "first"))
            .send(": ping\n")
            .send(": ping\n")
            .gate(&gate)
            .send(chunk("gpt-5", "second"))
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    let mut body = resp.into_body();
    // The first event, then keep-alive comments with no blank line after them: all reach
    // the client before Poe sends more (the comments were held until the next event, and a
    // client with a read timeout gave up meanwhile). Frames may come together.
    let want = format!("{}: ping\n: ping\n", chunk("gpt-5", "first"));
    let mut got = Vec::new();
    while got.len() < want.len() {
        let d = next_data(&mut body, 10)
            .await
            .expect("sent before Poe went on");
        got.extend_from_slice(&d);
    }
    assert_eq!(String::from_utf8_lossy(&got), want);
    gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(d) = next_data(&mut body, 10).await {
        rest.extend_from_slice(&d);
    }
    assert_eq!(
        rest,
        [chunk("gpt-5", "second"), "data: [DONE]\n\n".to_string()]
            .concat()
            .as_bytes()
    );
}

#[tokio::test]
async fn unknown_models_pass_through_as_written() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("Some-Bot", "ok"));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("Some-Bot", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-bot"], "Some-Bot");
    assert_eq!(up.received()[0].json()["model"], "Some-Bot");
}

#[tokio::test]
async fn aliases_are_case_insensitive_and_env_configurable() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("x", "ok"));
    let gw = TestGateway::start(
        &up,
        "[aliases]\nfast = \"GPT-5-mini\"\n",
        &[("POE_GATEWAY_ALIASES__BIG", "claude-opus-4.1")],
    )
    .await;
    for (asked, sent) in [
        ("FAST", "GPT-5-mini"),
        ("fast", "GPT-5-mini"),
        ("Big", "claude-opus-4.1"),
    ] {
        let resp = post(&gw, &chat_body(asked, false), &[]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(up.received().last().unwrap().json()["model"], sent);
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_catalogue_keeps_poes_status_and_a_slow_one_times_out() {
    let up = MockUpstream::start().await;
    up.push_models(Reply::json(429, poe_error(429, "rate_limit_error")).header("retry-after", "7"));
    up.push_models(Reply::json(503, poe_error(503, "overloaded")));
    up.push_models(Reply::hang());
    up.push_models(Reply::json(500, poe_error(500, "provider_error")));
    let gw = TestGateway::default(&up).await;

    let resp = get(&gw, "/v1/models").await;
    assert_eq!(resp.headers()["retry-after"], "7");
    let body = expect_error(resp, 429, "rate_limit_error").await;
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("upstream answered 429"), "{message}");
    expect_error(get(&gw, "/v1/models/gpt-5").await, 503, "overloaded_error").await;
    // A catalogue is not a slow bot: it gets 30 seconds, not the 10-minute first-byte wait.
    let started = tokio::time::Instant::now();
    expect_error(get(&gw, "/v1/models").await, 504, "timeout_error").await;
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    expect_error(get(&gw, "/v1/models").await, 502, "upstream_error").await;
    // Then Poe answers, and the list is served.
    assert_eq!(get(&gw, "/v1/models").await.status(), 200);
}

#[tokio::test]
async fn models_lists_catalogue_and_aliases() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;
    let resp = get(&gw, "/v1/models").await;
    assert_eq!(resp.status(), 200);
    let v = body_json(resp).await;
    let ids = support::ids(&v["data"]);
    for id in [
        "claude-sonnet-4.5",
        "gpt-5",
        "claude",
        "gpt",
        "gemini",
        "grok",
        "image",
        "video",
        "resilient",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let claude = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "claude")
        .unwrap();
    assert_eq!(claude["root"], "claude-sonnet-4.5");
    assert_eq!(
        claude["pricing"]["prompt"], "0.000003",
        "alias carries its bot's details"
    );

    // Cached: a second listing does not go upstream again.
    let _ = body_bytes(get(&gw, "/v1/models").await).await;
    let one = get(&gw, "/v1/models/CLAUDE-SONNET-4.5").await;
    assert_eq!(body_json(one).await["id"], "claude-sonnet-4.5");
    assert_eq!(up.received_on("/v1/models").len(), 1);
    expect_error(
        get(&gw, "/v1/models/nope").await,
        404,
        "invalid_request_error",
    )
    .await;
}

/// An alias named like a bot (`gpt-5 = ["gpt-5", ...]`, the README's own fallback pattern)
/// is listed once, in the bot's place, and `/v1/models/{id}` shows the alias: requests of
/// that name reach it. It was listed twice, and the entry showed the bot.
#[tokio::test]
async fn an_alias_named_like_a_bot_is_listed_once_in_its_place() {
    let up = MockUpstream::start().await;
    let policy = "[aliases]\n\"gpt-5\" = [\"gpt-5\", \"claude-sonnet-4.5\"]\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let v = body_json(get(&gw, "/v1/models").await).await;
    let ids = support::ids(&v["data"]);
    assert_eq!(ids.iter().filter(|i| **i == "gpt-5").count(), 1, "{ids:?}");
    let one = body_json(get(&gw, "/v1/models/gpt-5").await).await;
    assert_eq!(
        one["alias_of"],
        serde_json::json!(["gpt-5", "claude-sonnet-4.5"]),
        "{one}"
    );

    // Anthropic's view of a Claude bot with an alias of its name, and an alias to it: both
    // listed (the list came back empty, the bot's entry being the alias's).
    let policy = "[aliases]\n\"claude-sonnet-4.5\" = [\"claude-sonnet-4.5\"]\nclaude = \"claude-sonnet-4.5\"\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let resp = request(
        &gw,
        "GET",
        "/v1/models?limit=100",
        &[("anthropic-version", "2023-06-01")],
        "",
    )
    .await;
    let v = body_json(resp).await;
    let ids = support::ids(&v["data"]);
    for id in ["claude-sonnet-4.5", "claude"] {
        assert!(ids.contains(&id), "{id} missing from {v}");
    }
}

#[tokio::test]
async fn unknown_model_404_gets_a_suggestion() {
    let up = MockUpstream::start().await;
    let poe_404 = r#"{"error":{"code":404,"type":"not_found_error","message":"Model claude-sonet-4.5 not found","metadata":{"m":1}}}"#;
    up.push(Reply::json(404, poe_404));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("claude-sonet-4.5", false), &[]).await;
    assert_eq!(resp.status(), 404);
    let v = body_json(resp).await;
    assert_eq!(
        v["error"]["message"],
        "Model claude-sonet-4.5 not found (did you mean `claude-sonnet-4.5`?)"
    );
    assert_eq!(
        v["error"]["metadata"]["m"], 1,
        "the rest of Poe's error is kept"
    );
    assert_eq!(v["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn poe_errors_pass_through_unchanged() {
    let up = MockUpstream::start().await;
    let poe = r#"{"error":{"code":402,"type":"insufficient_credits","message":"Out of points","metadata":{}}}"#;
    up.push(Reply::json(402, poe).header("x-ratelimit-remaining-requests", "499"));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 402);
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "499");
    assert_eq!(body_bytes(resp).await, Bytes::from(poe));
    assert_eq!(up.chat_calls(), 1, "402 is not retried");
}

/// Headers that speak for Poe's origin would apply to the gateway's: a CDN cookie, an HTTP/3
/// endpoint, an HSTS pin, a CORS grant that lets web pages read answers.
#[tokio::test]
async fn headers_for_poes_origin_are_not_passed_on() {
    let up = MockUpstream::start().await;
    let origin_bound = [
        ("set-cookie", "__cf_bm=abc; path=/; domain=.poe.com"),
        ("alt-svc", "h3=\":443\"; ma=86400"),
        ("strict-transport-security", "max-age=31536000"),
        ("access-control-allow-origin", "*"),
        ("access-control-allow-credentials", "true"),
    ];
    for stream in [false, true] {
        let mut reply = if stream {
            Reply::stream("gpt-5", &["hi"])
        } else {
            Reply::completion("gpt-5", "hi")
        };
        for (k, v) in origin_bound {
            reply = reply.header(k, v);
        }
        up.push(reply.header("x-ratelimit-remaining-requests", "498"));
    }
    let gw = TestGateway::default(&up).await;
    for stream in [false, true] {
        let resp = post(&gw, &chat_body("gpt", stream), &[]).await;
        assert_eq!(resp.status(), 200);
        for (k, _) in origin_bound {
            assert!(
                !resp.headers().contains_key(k),
                "{k} passed (stream: {stream})"
            );
        }
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "498");
        body_bytes(resp).await;
    }
}

#[tokio::test]
async fn gateway_errors_are_openai_shaped() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nmax_body_bytes = 2048\n", &[]).await;

    for (body, param) in [
        ("{not json", None),
        (
            r#"{"messages":[{"role":"user","content":"x"}]}"#,
            Some("model"),
        ),
        (r#"{"model":"gpt"}"#, Some("messages")),
        (r#"{"model":7,"messages":[]}"#, Some("model")),
    ] {
        let resp = post(&gw, body, &[]).await;
        // Chat completion answers always say what the cache did, refusals included.
        assert_eq!(resp.headers()["x-cache"], "BYPASS", "{body}");
        let e = expect_error(resp, 400, "invalid_request_error").await;
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body}");
        }
    }
    // Too large, declared up front.
    let big = format!(
        r#"{{"model":"gpt","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    expect_error(post(&gw, &big, &[]).await, 413, "invalid_request_error").await;
    // Too large, chunked with no Content-Length.
    let resp = post_chunked(&gw, vec![Bytes::from(vec![b' '; 1024]); 8], &[]).await;
    expect_error(resp, 413, "invalid_request_error").await;

    expect_error(get(&gw, "/v1/nothing").await, 404, "invalid_request_error").await;
    let resp = get(&gw, "/v1/chat/completions").await;
    assert_eq!(resp.headers()["allow"], "POST");
    expect_error(resp, 405, "invalid_request_error").await;
    assert_eq!(up.chat_calls(), 0, "bad requests never reach Poe");
}

#[tokio::test]
async fn passthrough_mode_forwards_the_clients_key_and_requires_one() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::start(&up, "[auth]\nmode = \"passthrough\"\n", &[]).await;
    let e = expect_error(
        post(&gw, &chat_body("gpt", false), &[]).await,
        401,
        "authentication_error",
    )
    .await;
    assert!(!e["message"].as_str().unwrap().contains(UPSTREAM_KEY));
    let resp = post(
        &gw,
        &chat_body("gpt", false),
        &[("authorization", "Bearer users-own-poe-key")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.received()[0].headers["authorization"],
        "Bearer users-own-poe-key"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port with nothing listening: bind, note it, close it.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(
        &up,
        "[retry]\nmax_attempts = 1\n",
        &[("POE_BASE_URL", &format!("http://{dead}"))],
    )
    .await;
    let e = expect_error(
        post(&gw, &chat_body("gpt", false), &[]).await,
        502,
        "upstream_error",
    )
    .await;
    assert_eq!(e["code"], "upstream_unreachable");
}

#[tokio::test]
async fn request_id_is_echoed_or_made() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let resp = post(
        &gw,
        &chat_body("gpt", false),
        &[("x-request-id", "trace-abc-123")],
    )
    .await;
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    assert_eq!(up.received()[0].headers["x-request-id"], "trace-abc-123");
    // A value with spaces is not echoed; a fresh one is made.
    let resp = post(&gw, &chat_body("gpt", false), &[("x-request-id", "a b")]).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(id, "a b");
    assert_eq!(id.len(), 36);
    // Errors and other routes carry one too.
    assert!(
        get(&gw, "/healthz")
            .await
            .headers()
            .contains_key("x-request-id")
    );
    assert!(
        post(&gw, "{", &[])
            .await
            .headers()
            .contains_key("x-request-id")
    );
}

#[tokio::test]
async fn client_disconnect_closes_the_upstream_stream() {
    let up = MockUpstream::start().await;
    let never = Arc::new(Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "hello"))
            .gate(&never)
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::default(&up).await;

    // A raw socket, so "going away" is an actual close.
    let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = chat_body("gpt", true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{}",
        body.len(),
        body
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("hello") {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    drop(sock);
    tokio::time::timeout(Duration::from_secs(10), up.wait_disconnect())
        .await
        .expect("the upstream stream was not closed after the client left");
}

#[tokio::test]
async fn health_and_readiness() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;
    assert_eq!(get(&gw, "/healthz").await.status(), 200);
    assert_eq!(get(&gw, "/readyz").await.status(), 200);
}

/// `requests_in_flight` counts a request from its start: one waiting on Poe's first byte is
/// in flight (it was counted only once Poe's head came, so it read 0 through a drain or a
/// slow bot's wait), and it is 0 again once the answer is read.
#[tokio::test]
async fn a_request_waiting_on_poe_is_in_flight() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "slow").head_delay(Duration::from_secs(2)));
    let gw = Arc::new(TestGateway::default(&up).await);
    let waiting = {
        let gw = gw.clone();
        tokio::spawn(
            async move { body_bytes(post(&gw, &chat_body("gpt", false), &[]).await).await },
        )
    };
    while up.chat_calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        metric(&gw, "poe_gateway_requests_in_flight").await,
        Some(1.0)
    );
    waiting.await.unwrap();
    assert_eq!(
        metric(&gw, "poe_gateway_requests_in_flight").await,
        Some(0.0)
    );
}

/// Identical requests that waited on a call that failed on the gateway's side (no slot in
/// time) make calls of their own; each is counted in flight once. A waiter was counted
/// again by its own call while still counted as a waiter: 7 for 4 open requests.
#[tokio::test]
async fn waiters_that_make_their_own_call_are_in_flight_once() {
    let up = MockUpstream::start().await;
    let gate = Arc::new(Semaphore::new(0));
    // The one slot is held by a stream until the end of the test.
    up.push(Reply::sse().send(chunk("gpt-5", "held")).gate(&gate));
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let gw = Arc::new(
        TestGateway::start(
            &up,
            "[limits]\nmax_concurrent_upstream = 1\nqueue_timeout = \"4s\"\n",
            &[],
        )
        .await,
    );
    let held = post(&gw, &chat_body("gpt", true), &[]).await;
    let mut held = held.into_body();
    next_data(&mut held, 10).await.unwrap();
    let body = serde_json::json!({"model": "gpt", "temperature": 0,
        "messages": [{"role": "user", "content": "the same"}]})
    .to_string();
    let asks: Vec<_> = (0..4)
        .map(|_| {
            let (gw, body) = (gw.clone(), body.clone());
            tokio::spawn(async move { post(&gw, &body, &[]).await.status() })
        })
        .collect();
    // The leader gives up at 4 s; the three others then wait for the slot themselves,
    // until 8 s. Halfway through that: the stream and the three.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        metric(&gw, "poe_gateway_requests_in_flight").await,
        Some(4.0)
    );
    for a in asks {
        assert_eq!(a.await.unwrap(), 503, "no slot in time");
    }
    gate.add_permits(1);
    drop(held);
    // The held stream's end reaches the gateway a moment after the client drops it.
    let mut left = None;
    for _ in 0..100 {
        left = metric(&gw, "poe_gateway_requests_in_flight").await;
        if left == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, Some(0.0));
}

#[tokio::test]
async fn graceful_shutdown_lets_streams_finish() {
    let up = MockUpstream::start().await;
    let gate = Arc::new(Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "one"))
            .gate(&gate)
            .send(chunk("gpt-5", "two"))
            .send("data: [DONE]\n\n"),
    );
    let mut gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    let mut body = resp.into_body();
    next_data(&mut body, 10).await.unwrap();

    let handle = gw.handle.take().unwrap();
    handle.begin_shutdown();
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(gw.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still accepting after shutdown began");

    // The in-flight stream runs to its end.
    gate.add_permits(1);
    let mut rest = Vec::new();
    while let Some(d) = next_data(&mut body, 10).await {
        rest.extend_from_slice(&d);
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(10), handle.wait())
        .await
        .expect("server stopped");
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "over h2"));
    let gw = TestGateway::default(&up).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .body(Full::new(Bytes::from(chat_body("gpt", false))))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&b).contains("over h2"));

    // HEAD is the GET's head with no body over HTTP/2 too (its body went out as DATA
    // frames, a protocol error: `curl -I` failed), its length included.
    for path in ["/healthz", "/v1/models", "/openapi.json"] {
        let get = client.get(gw.url(path).parse().unwrap()).await.unwrap();
        let status = get.status();
        let body = get.into_body().collect().await.unwrap().to_bytes();
        let head = http::Request::head(gw.url(path))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(head).await.expect(path);
        assert_eq!(resp.status(), status, "{path}");
        assert_eq!(
            resp.headers()["content-length"],
            body.len().to_string().as_str(),
            "{path}"
        );
        let b = resp.into_body().collect().await.expect(path).to_bytes();
        assert!(b.is_empty(), "{path}: {b:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_request_body_times_out_with_408() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nbody_read_timeout = \"5s\"\n", &[]).await;
    // The chat route and MCP's HTTP transport read bodies the same way.
    for path in ["/v1/chat/completions", "/mcp"] {
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        // Declares 1000 bytes, sends 10, then stalls.
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             accept: application/json, text/event-stream\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(60), sock.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(
            text.contains("\"code\":\"request_timeout\""),
            "{path}: {text}"
        );
    }
    assert_eq!(up.chat_calls(), 0);
}

#[tokio::test]
async fn connections_past_the_cap_wait_to_be_accepted() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "[server]\nmax_connections = 2\n", &[]).await;
    // Two idle connections take both slots.
    let a = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // A third connects (the kernel's backlog) but is not served while the others are open.
    let mut c = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf))
            .await
            .is_err(),
        "served past the connection cap"
    );
    // One leaves; the waiting one is accepted and answered.
    drop(a);
    let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// `poe-gateway serve` with two serving threads spreads a burst of keep-alive connections
/// over both, whichever thread accepts them. Before, the thread that woke first could take the
/// whole burst and leave the other core idle (`src/http/balance.rs`).
#[tokio::test]
async fn a_burst_of_connections_is_spread_over_the_serving_threads() {
    let up = MockUpstream::start().await;
    let (db, _) = sqlite_database().await;
    let mut cmd = binary_command(&up.url(), &db);
    cmd.env("POE_GATEWAY_SERVER__THREADS", "2");
    let (mut child, gw) = spawn_binary(&mut cmd);

    // Ten connections opened at once, each kept open after one request.
    const N: usize = 10;
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..N {
        let addr = gw.addr;
        opening.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
            s
        });
    }
    let held = opening.join_all().await;

    let metrics = String::from_utf8(body_bytes(get(&gw, "/metrics").await).await.to_vec()).unwrap();
    let open: Vec<i64> = (0..2)
        .map(|t| {
            let name = format!("poe_gateway_open_connections{{thread=\"{t}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /metrics"))
        })
        .collect();
    // The ten held, and the one asking for the metrics.
    assert_eq!(open.iter().sum::<i64>(), N as i64 + 1, "{open:?}");
    assert!(
        open.iter().all(|n| *n >= N as i64 / 2),
        "unbalanced: {open:?}"
    );

    drop(held);
    child.kill().unwrap();
    let _ = child.wait();
}

/// Two servers on one gateway (an embedder's public and internal listeners): one stopping,
/// its grace over, leaves the other's streams alone. The upstream connections a stopping
/// server may close are only a serving thread's own (`poe-gateway serve`).
#[tokio::test]
async fn a_server_stopping_leaves_another_on_its_gateway_streaming() {
    let up = MockUpstream::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    for _ in 0..2 {
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "first"))
                .gate(&gate)
                .send("data: [DONE]\n\n"),
        );
    }
    let policy = test_policy(&up, "[server]\nshutdown_grace = \"1s\"\n", &[]);
    let core = poe_gateway::Gateway::new(
        policy,
        Some(poe_gateway::upstream::Secret::new(UPSTREAM_KEY)),
    )
    .unwrap();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        servers.push(poe_gateway::http::spawn(listener, core.clone()).unwrap());
    }
    let mut streams = Vec::new();
    for s in &servers {
        let gw = TestGateway {
            addr: s.local_addr,
            handle: None,
        };
        let mut body = post(&gw, &chat_body("gpt-5", true), &[]).await.into_body();
        assert!(next_data(&mut body, 10).await.is_some());
        streams.push(body);
    }
    let staying = streams.pop().unwrap();
    let first = servers.remove(0);
    tokio::time::timeout(Duration::from_secs(30), first.shutdown())
        .await
        .expect("the first server stopped");
    gate.add_permits(2);
    let rest = tokio::time::timeout(Duration::from_secs(10), body_bytes_of(staying))
        .await
        .expect("the other stream went on");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
}

async fn body_bytes_of(body: hyper::body::Incoming) -> bytes::Bytes {
    use http_body_util::BodyExt;
    body.collect().await.unwrap().to_bytes()
}
