//! Faults upstream become recoveries or clear errors: retries, Retry-After, fallback chains,
//! timeouts, mid-stream breaks, the upstream limiter and the retry budget.
//!
//! Time is paused wherever a wait matters, so a 30-second Retry-After costs nothing.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;
use tokio::time::Instant;

#[tokio::test(start_paused = true)]
async fn rate_limited_then_success_honours_retry_after() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(429, poe_error(429, "rate_limit_error")).header("retry-after", "7"));
    up.push(Reply::completion("gpt-5", "after the wait"));
    let gw = TestGateway::default(&up).await;
    let started = Instant::now();
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "Retry-After was not waited out"
    );
    assert!(String::from_utf8_lossy(&body_bytes(resp).await).contains("after the wait"));
    assert_eq!(up.chat_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn ratelimit_reset_header_is_honoured_too() {
    let up = MockUpstream::start().await;
    up.push(
        Reply::json(429, poe_error(429, "rate_limit_error"))
            .header("x-ratelimit-reset-requests", "4s"),
    );
    up.push(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let started = Instant::now();
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_cap_goes_back_to_the_client() {
    let up = MockUpstream::start().await;
    let body = poe_error(429, "rate_limit_error");
    up.push(Reply::json(429, body.clone()).header("retry-after", "120"));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "120");
    // Two minutes: longer than the OpenAI SDKs wait, so they are told not to retry.
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(body_bytes(resp).await, Bytes::from(body));
    assert_eq!(up.chat_calls(), 1);
}

/// Poe's request-window reset may ride on any answer. On a 503 it says nothing about the
/// server error: the 503 is retried after the usual backoff, not handed back because the
/// window resets in 45 s.
#[tokio::test(start_paused = true)]
async fn a_window_reset_on_a_server_error_does_not_stop_its_retry() {
    let up = MockUpstream::start().await;
    up.push(
        Reply::json(503, poe_error(503, "upstream_error"))
            .header("x-ratelimit-reset-requests", "45s"),
    );
    up.push(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let started = Instant::now();
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "waited for the window"
    );
}

/// A 429 whose wait is longer than the gateway holds a client goes back at once, with a
/// `Retry-After` (made from Poe's window reset when that is all Poe gave). Under a minute,
/// which the OpenAI SDKs wait for, the client may schedule it: no `x-should-retry: false`,
/// even after earlier attempts. A minute or more, which the SDKs would not wait for (they
/// retry within a second or two), is marked not to retry.
#[tokio::test(start_paused = true)]
async fn a_long_429_goes_back_schedulable_when_the_sdk_would_wait() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;
    for (reset, retry_after, should_retry) in [("45s", "45", None), ("1m30s", "90", Some("false"))]
    {
        up.push(Reply::json(500, poe_error(500, "provider_error")));
        up.push(
            Reply::json(429, poe_error(429, "rate_limit_error"))
                .header("x-ratelimit-reset-requests", reset),
        );
        let resp = post(&gw, &chat_body("gpt", false), &[]).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
        assert_eq!(resp.headers()["retry-after"], retry_after);
        assert_eq!(
            resp.headers()
                .get("x-should-retry")
                .map(|v| v.to_str().unwrap()),
            should_retry,
            "{reset}"
        );
    }
    assert_eq!(up.chat_calls(), 4);
}

/// A 5xx whose `Retry-After` is longer than the gateway waits moves a chain on; after the
/// whole chain the SDK is told not to retry it (only a 429 is left for the client to
/// schedule).
#[tokio::test(start_paused = true)]
async fn a_5xx_after_a_whole_chain_is_not_left_to_the_sdk() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::json(503, poe_error(503, "upstream_error")).header("retry-after", "45"));
    let gw = TestGateway::start(&up, CHAIN, &[]).await;
    let resp = post(&gw, &chat_body("resilient", false), &[]).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    assert_eq!(resp.headers()["x-should-retry"], "false");
}

/// A 429 the gateway waited out and retried, to the last attempt, carries its short
/// `Retry-After` and still `x-should-retry: false`: the SDK's own retries would each be the
/// gateway's three.
#[tokio::test(start_paused = true)]
async fn a_429_retried_by_the_gateway_is_not_retried_by_the_sdk() {
    let up = MockUpstream::start().await;
    up.set_fallback(
        Reply::json(429, poe_error(429, "rate_limit_error")).header("retry-after", "1"),
    );
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "3");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["x-should-retry"], "false");
}

#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_goes_back_to_the_client_instead_of_panicking() {
    // Too long for a Duration: reading it as seconds used to panic the connection's task.
    let up = MockUpstream::start().await;
    let body = poe_error(429, "rate_limit_error");
    up.push(Reply::json(429, body.clone()).header("retry-after", "1e20"));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1e20");
    assert_eq!(body_bytes(resp).await, Bytes::from(body));
    assert_eq!(up.chat_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn bad_gateway_then_success_non_stream_and_stream() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(502, poe_error(502, "upstream_error")));
    up.push(Reply::completion("gpt-5", "recovered"));
    up.push(Reply::json(529, poe_error(529, "overloaded_error")));
    up.push(Reply::stream("gpt-5", &["re", "covered"]));
    let gw = TestGateway::default(&up).await;

    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    let _ = body_bytes(resp).await;

    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(up.chat_calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn persistent_500_makes_exactly_max_attempts_calls() {
    let up = MockUpstream::start().await;
    let body = poe_error(500, "provider_error");
    up.set_fallback(Reply::json(500, body.clone()));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "3");
    // The gateway has retried: the SDKs must not retry on top.
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert_eq!(
        body_bytes(resp).await,
        Bytes::from(body),
        "Poe's error is passed on"
    );
    assert_eq!(up.chat_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn client_errors_are_never_retried() {
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (402, "insufficient_credits"),
        (403, "moderation_error"),
        (413, "request_too_large"),
    ] {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::json(status, poe_error(status, kind)));
        let gw = TestGateway::default(&up).await;
        let resp = post(&gw, &chat_body("gpt", false), &[]).await;
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(up.chat_calls(), 1, "{status} was retried");
    }
}

const CHAIN: &str =
    "[aliases]\nresilient = [\"first-bot\", \"second-bot\"]\n[retry]\nmax_attempts = 2\n";

#[tokio::test(start_paused = true)]
async fn fallback_chain_moves_on_at_once_after_404() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(404, poe_error(404, "not_found_error")));
    up.push(Reply::completion("second-bot", "from the second"));
    let gw = TestGateway::start(&up, CHAIN, &[]).await;
    let resp = post(&gw, &chat_body("resilient", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-bot"], "second-bot");
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    assert_eq!(body_json(resp).await["model"], "second-bot");
    let sent: Vec<String> = up
        .received()
        .iter()
        .map(|r| r.json()["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sent, ["first-bot", "second-bot"]);
}

#[tokio::test(start_paused = true)]
async fn fallback_chain_moves_on_for_unsupported_features() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(
        400,
        r#"{"error":{"code":"unsupported_feature_for_model","type":"invalid_request_error","message":"tools not supported","param":"tools"}}"#,
    ));
    up.push(Reply::completion("second-bot", "ok"));
    let gw = TestGateway::start(&up, CHAIN, &[]).await;
    let resp = post(&gw, &chat_body("resilient", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-bot"], "second-bot");
    assert_eq!(up.chat_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn fallback_chain_moves_on_after_its_own_retries() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(503, poe_error(503, "upstream_error")));
    up.push(Reply::json(503, poe_error(503, "upstream_error")));
    up.push(Reply::stream("second-bot", &["fine"]));
    let gw = TestGateway::start(&up, CHAIN, &[]).await;
    let resp = post(&gw, &chat_body("resilient", true), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-bot"], "second-bot");
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "3");
    assert!(resp.headers().get("x-should-retry").is_none(), "a success");
    let _ = body_bytes(resp).await;
}

/// The retry budget stops retry storms; it must not stop a chain from moving on. With no
/// budget at all, a failing first bot is not retried, and the next bot still gets its call
/// (its first attempt is not a retry).
#[tokio::test(start_paused = true)]
async fn a_spent_retry_budget_still_lets_a_chain_reach_its_next_bot() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(503, poe_error(503, "upstream_error")));
    up.push(Reply::completion("second-bot", "from the second"));
    let policy = format!("{CHAIN}budget_ratio = 0.0\nbudget_min_per_second = 0\n");
    let gw = TestGateway::start(&up, &policy, &[]).await;
    let resp = post(&gw, &chat_body("resilient", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-bot"], "second-bot");
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    let sent: Vec<String> = up
        .received()
        .iter()
        .map(|r| r.json()["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sent, ["first-bot", "second-bot"], "first-bot was retried");
}

#[tokio::test(start_paused = true)]
async fn a_whole_chain_failing_returns_the_last_error() {
    let up = MockUpstream::start().await;
    up.push(Reply::json(404, poe_error(404, "not_found_error")));
    up.push(Reply::json(404, poe_error(404, "not_found_error")));
    let gw = TestGateway::start(&up, CHAIN, &[]).await;
    let resp = post(&gw, &chat_body("resilient", false), &[]).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-poe-gateway-bot"], "second-bot");
    assert_eq!(up.chat_calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn drop_mid_stream_ends_with_an_error_event_not_done() {
    let up = MockUpstream::start().await;
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "partial"))
            .drop_connection(),
    );
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert!(text.starts_with(&chunk("gpt-5", "partial")), "{text}");
    assert!(
        !text.contains("[DONE]"),
        "a broken stream must not look finished: {text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["type"], "upstream_error");
    assert_eq!(
        up.chat_calls(),
        1,
        "never retried once bytes reached the client"
    );
}

/// A stream that reached `[DONE]` is whole, however its connection ends after that: a break
/// or a silence adds no error event after `[DONE]`, the silence is not waited out for
/// `timeouts.idle`, and the answer counts as completed and is stored.
#[tokio::test(start_paused = true)]
async fn a_connection_lost_after_done_ends_the_stream_cleanly() {
    let done = format!("{}data: [DONE]\n\n", chunk("gpt-5", "whole"));
    let up = MockUpstream::start().await;
    up.push(Reply::sse().send(done.clone()).drop_connection());
    up.push(
        Reply::sse()
            .send(done.clone())
            .sleep(Duration::from_secs(3600)),
    );
    let gw = TestGateway::start(&up, "[cache]\nmode = \"all\"\n", &[]).await;
    for (i, how) in ["a dropped connection", "a held one"]
        .into_iter()
        .enumerate()
    {
        // Different questions, so the second is not the first's cache hit.
        let body = chat_body("gpt", true).replace("\"hi\"", &format!("\"question {i}\""));
        let started = Instant::now();
        let resp = post(&gw, &body, &[]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-cache"], "MISS", "{how}");
        let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
        assert_eq!(text, done, "{how}: nothing follows [DONE]");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{how}: the stream ended in {:?}, not at timeouts.idle",
            started.elapsed()
        );
        let again = post(&gw, &body, &[]).await;
        assert_eq!(
            again.headers()["x-cache"],
            "HIT",
            "{how}: a whole answer is stored"
        );
        assert_eq!(body_bytes(again).await, Bytes::from(done.clone()), "{how}");
    }
    assert_eq!(up.chat_calls(), 2);
}

/// A stream cut off inside its last event is not whole, whatever the event's `type` says at
/// its start: the client gets the gateway's error event (its SDK raises an API error, not a
/// JSON error on the cut event), on a broken connection and on a clean end alike.
#[tokio::test(start_paused = true)]
async fn a_stream_cut_inside_its_last_event_ends_with_an_error() {
    let cut = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"output\":[{\"text\":\"hello wor";
    let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hello\"}\n\n";
    let up = MockUpstream::start().await;
    up.push(Reply::sse().send(delta).send(cut).drop_connection());
    up.push(Reply::sse().send(delta).send(cut));
    let gw = TestGateway::default(&up).await;
    for how in ["a broken connection", "a clean end"] {
        let body = r#"{"model":"gpt-5","input":"hi","stream":true}"#;
        let resp = request(
            &gw,
            "POST",
            "/v1/responses",
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(resp.status(), 200);
        let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        assert!(last.contains("\"error\""), "{how}: {text}");
        assert!(
            !text.contains("hello wor"),
            "{how}: the cut event is dropped: {text}"
        );
    }
}

/// A stream Poe ends with its own error event (then a clean end, or a dropped connection)
/// already tells the client why: the gateway adds no second, generic error event after it.
#[tokio::test(start_paused = true)]
async fn poes_own_error_event_is_the_only_one() {
    let poes = "data: {\"error\":{\"code\":500,\"type\":\"provider_error\",\"message\":\"bot crashed\"}}\n\n";
    let up = MockUpstream::start().await;
    up.push(Reply::sse().send(chunk("gpt-5", "partial")).send(poes));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "partial"))
            .send(poes)
            .drop_connection(),
    );
    let gw = TestGateway::default(&up).await;
    for how in ["a clean end", "a dropped connection"] {
        let resp = post(&gw, &chat_body("gpt", true), &[]).await;
        assert_eq!(resp.status(), 200);
        let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
        assert_eq!(text.matches("\"error\"").count(), 1, "{how}: {text}");
        assert!(text.ends_with(poes), "{how}: {text}");
    }
}

#[tokio::test(start_paused = true)]
async fn idle_gap_past_the_limit_ends_with_an_error_event() {
    let up = MockUpstream::start().await;
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "then silence"))
            .sleep(Duration::from_secs(3600))
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::start(&up, "[timeouts]\nidle = \"30s\"\n", &[]).await;
    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert!(!text.contains("[DONE]"));
    assert!(text.contains("timeouts.idle"), "{text}");
}

/// The idle limit counts from the latest frame: gaps under it add up to more than it without
/// an error, and a long gap is cut `idle` after the frame before it (the tap re-arms its
/// timer lazily, so this checks the re-arming).
#[tokio::test(start_paused = true)]
async fn idle_limit_counts_from_the_latest_frame() {
    let up = MockUpstream::start().await;
    up.push(Reply::dripping("gpt-5", 4, Duration::from_secs(20)));
    up.push(
        Reply::sse()
            .sleep(Duration::from_secs(20))
            .send(chunk("gpt-5", "one"))
            .sleep(Duration::from_secs(35))
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::start(&up, "[timeouts]\nidle = \"30s\"\n", &[]).await;

    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert!(text.contains("part 3"), "{text}");
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "80 s of 20 s gaps: {text}"
    );

    let started = tokio::time::Instant::now();
    let resp = post(&gw, &chat_body("gpt", true), &[]).await;
    let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
    assert!(text.contains("timeouts.idle"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    // The frame came at 20 s; the error 30 s later, before the upstream's next send at 55 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(50) && took < Duration::from_secs(55),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn hang_before_headers_is_a_504_after_retries() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::hang());
    let gw = TestGateway::start(&up, "", &[("POE_GATEWAY_TIMEOUTS__FIRST_BYTE", "2s")]).await;
    let e = expect_error(
        post(&gw, &chat_body("gpt", false), &[]).await,
        504,
        "timeout_error",
    )
    .await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("timeouts.first_byte")
    );
    assert_eq!(up.chat_calls(), 3, "a first-byte timeout is retryable");
}

#[tokio::test(start_paused = true)]
async fn slow_head_within_the_timeout_is_fine() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "slow but fine").head_delay(Duration::from_secs(100)));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.chat_calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_connection_before_a_response_is_retried() {
    let up = MockUpstream::start().await;
    up.push(Reply::refuse());
    up.push(Reply::completion("gpt-5", "second try"));
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
}

#[tokio::test(start_paused = true)]
async fn limiter_queues_then_refuses() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    // 10 rpm: a burst of 1, then one slot every 60/9 s.
    let policy = "[limits]\nupstream_rpm = 10\nqueue_timeout = \"10s\"\n";
    let gw = TestGateway::start(&up, policy, &[]).await;

    let t0 = Instant::now();
    assert_eq!(post(&gw, &chat_body("gpt", false), &[]).await.status(), 200);
    // The second waits in the queue for the next slot, then goes through.
    assert_eq!(post(&gw, &chat_body("gpt", false), &[]).await.status(), 200);
    assert!(
        t0.elapsed() >= Duration::from_secs(6),
        "the second request was not held back"
    );
    // Two more at once: one fits the queue time, the other would wait past it and is refused.
    let body = chat_body("gpt", false);
    let (a, b) = tokio::join!(post(&gw, &body, &[]), post(&gw, &body, &[]));
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 429]);
    let refused = if a.status() == 429 { a } else { b };
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    expect_error(refused, 429, "rate_limit_error").await;
    assert_eq!(up.chat_calls(), 3, "the refused request never reached Poe");
}

#[tokio::test(start_paused = true)]
async fn retry_budget_stops_a_storm() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::json(500, poe_error(500, "provider_error")));
    let policy = "[retry]\nmax_attempts = 3\nbudget_ratio = 0.2\nbudget_min_per_second = 0\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    for _ in 0..20 {
        assert_eq!(post(&gw, &chat_body("gpt", false), &[]).await.status(), 500);
    }
    let calls = up.chat_calls();
    // Without a budget: 60 calls. With 20% of 20 requests: at most 4 retries.
    assert!(calls <= 24, "{calls} upstream calls for 20 requests");
    assert!(calls > 20, "some retries should still be allowed");
    // A request stops retrying at the first retry the budget refuses; each such stop is
    // counted (and not logged per request). At most 4 requests had a retry, so at most 2 got
    // all their 3 attempts.
    let skipped = metric(&gw, "poe_gateway_retries_skipped_total")
        .await
        .unwrap();
    assert!(
        (18.0..=20.0).contains(&skipped),
        "{skipped} skipped, {calls} calls"
    );
}

/// One upstream connection carries request after request: JSON, streams, error answers and
/// empty bodies all hand it back once read. A connection the upstream closes after its answer
/// (`Connection: close`) is not reused, and the next request opens another without an error.
#[tokio::test]
async fn upstream_connections_are_reused_and_closed_ones_replaced() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;
    up.push(Reply::completion("gpt-5", "warm-up"));
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    body_bytes(resp).await;
    let before = up.connections();

    up.push(Reply::completion("gpt-5", "one"));
    up.push(Reply::stream("gpt-5", &["two", " parts"]));
    up.push(Reply::json(400, poe_error(400, "invalid_request_error")));
    up.push(Reply::stream("gpt-5", &["three"]));
    up.push(Reply::new(204));
    up.push(Reply::completion("gpt-5", "four"));
    for (stream, status) in [
        (false, 200),
        (true, 200),
        (false, 400),
        (true, 200),
        (false, 204),
        (false, 200),
    ] {
        let resp = post(&gw, &chat_body("gpt", stream), &[]).await;
        assert_eq!(resp.status(), status);
        body_bytes(resp).await;
    }
    assert_eq!(up.chat_calls(), 7);
    assert_eq!(
        up.connections(),
        before,
        "every request after the warm-up should reuse the first upstream connection"
    );

    up.push(Reply::completion("gpt-5", "last on this one").header("connection", "close"));
    up.push(Reply::completion("gpt-5", "on a new one"));
    for text in ["last on this one", "on a new one"] {
        let resp = post(&gw, &chat_body("gpt", false), &[]).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-poe-gateway-attempts"], "1");
        assert!(String::from_utf8_lossy(&body_bytes(resp).await).contains(text));
    }
    assert_eq!(up.connections(), before + 1);
}

/// Poe's path: TLS, HTTP/2 by ALPN, and a server that caps its concurrent streams per
/// connection (here 4). Streams past the cap must go on new connections, not wait unseen
/// inside a full one until a long stream ends: ten held streams start at once, on new
/// connections past the first one's four, and each then finishes. With one connection per
/// pool, six never started.
#[tokio::test]
async fn streams_past_an_http2_connections_cap_open_another_connection() {
    let up = MockUpstream::start_tls(4).await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    up.set_fallback(
        Reply::sse()
            .send(chunk("gpt-5", "first"))
            .gate(&gate)
            .send(finish_chunk("gpt-5"))
            .send("data: [DONE]\n\n"),
    );
    let gw = TestGateway::start(
        &up,
        "[upstream]\nhttp2_max_streams = 4\n",
        &[("POE_GATEWAY_UPSTREAM__CA_FILE", TEST_CA_FILE)],
    )
    .await;
    // One request first, so the pool holds one HTTP/2 connection (ten at once on a cold pool
    // would each open their own).
    up.push(Reply::completion("gpt-5", "warm"));
    let warm = post(&gw, &chat_body("gpt-5", false), &[]).await;
    assert_eq!(warm.status(), 200);
    body_bytes(warm).await;
    // Counted from here: the ledger's catalogue fetch may open a connection of its own.
    let before = up.connections();
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let addr = gw.addr;
        streams.spawn(async move {
            let gw = TestGateway { addr, handle: None };
            let resp = tokio::time::timeout(
                Duration::from_secs(20),
                post(&gw, &chat_body("gpt-5", true), &[]),
            )
            .await
            .expect("the stream's head never came: queued behind a full HTTP/2 connection?");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_11);
            let mut body = resp.into_body();
            let first = next_data(&mut body, 20).await.expect("first event");
            assert!(String::from_utf8_lossy(&first).contains("first"));
            body
        });
    }
    let mut held = Vec::new();
    while let Some(body) = streams.join_next().await {
        held.push(body.unwrap());
    }
    assert_eq!(held.len(), 10, "every stream started while all were held");
    let opened = up.connections() - before;
    assert!(
        (2..=6).contains(&opened),
        "6 streams past the first connection's 4 need 2 more connections (and at most one \
         each), saw {opened}"
    );
    // Poe's path: ALPN picked HTTP/2 for every request.
    assert!(
        up.chats()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2),
        "the gateway did not speak HTTP/2 to the TLS upstream"
    );
    gate.add_permits(10);
    for mut body in held {
        let mut all = Vec::new();
        while let Some(d) = next_data(&mut body, 20).await {
            all.extend_from_slice(&d);
        }
        assert!(String::from_utf8_lossy(&all).contains("[DONE]"));
    }
}

/// `upstream.ca_file` must name a readable PEM certificate file: the error names the key,
/// the file and what is wrong.
#[test]
fn a_bad_upstream_ca_file_is_a_clear_config_error() {
    let missing = poe_gateway::config::parse(
        "policy.toml",
        "[upstream]\nca_file = \"/nonexistent/ca.pem\"\n",
        Vec::<(String, String)>::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(missing.contains("policy.toml"), "{missing}");
    assert!(missing.contains("upstream.ca_file"), "{missing}");
    assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
    let not_pem = poe_gateway::config::parse(
        "policy.toml",
        &format!("[upstream]\nca_file = \"{}\"\n", file!()),
        Vec::<(String, String)>::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(not_pem.contains("no PEM certificate"), "{not_pem}");
}

#[tokio::test(start_paused = true)]
async fn an_error_body_cut_off_keeps_poes_status_and_is_not_retried() {
    // A 400 whose body breaks off: still Poe's 400 (not a retried transport failure that
    // ends as a 502), with an OpenAI-shaped body saying what was lost.
    let up = MockUpstream::start().await;
    up.push(
        Reply::new(400)
            .header("content-type", "application/json")
            .send(r#"{"error":{"message":"bad"#)
            .drop_connection(),
    );
    let gw = TestGateway::default(&up).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    let e = expect_error(resp, 400, "upstream_error").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("could not be read"), "{message}");
    assert_eq!(up.chat_calls(), 1);

    // A 503 cut off the same way is still retried, as any 503 is.
    up.push(Reply::new(503).send("over").drop_connection());
    up.push(Reply::completion("gpt-5", "ok"));
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.chat_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_retry_the_limiter_refuses_returns_poes_answer() {
    // One request a minute upstream, and a 1 s queue: the retry after Poe's 500 cannot be
    // admitted. The client gets Poe's 500, and the ledger one attempt, not a 429 rejection.
    let up = MockUpstream::start().await;
    let body = poe_error(500, "provider_error");
    up.push(Reply::json(500, body.clone()));
    let policy = "[limits]\nupstream_rpm = 1\nqueue_timeout = \"1s\"\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "1");
    assert_eq!(body_bytes(resp).await, Bytes::from(body));
    assert_eq!(up.chat_calls(), 1);
}

/// A TCP relay in front of an upstream whose open connections can be made to go dark: from
/// [`Relay::darken`] on, their bytes are swallowed both ways and their sockets stay open, as
/// when a NAT mapping expires or a load balancer goes away without closing anything.
/// Connections made after that relay as usual.
struct Relay {
    port: u16,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let conns = open.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let dark = Arc::new(AtomicBool::new(false));
                conns.lock().unwrap().push(dark.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    // Time is paused in these tests: a write Nagle held back for a delayed
                    // ACK would let the clock run on to the keep-alive's deadline.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, dark.clone()), pipe(sr, cw, dark));
                });
            }
        });
        Relay { port, open }
    }

    /// The upstream's URL through the relay (the test certificate is for `localhost`).
    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn darken(&self) {
        for dark in self.open.lock().unwrap().iter() {
            dark.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dark: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if dark.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if !dark.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = to.shutdown().await;
    }
}

/// A gateway on the default policy that reaches the TLS `up` through `relay`.
async fn gateway_through(up: &MockUpstream, relay: &Relay) -> TestGateway {
    TestGateway::start(
        up,
        "",
        &[
            ("POE_BASE_URL", &relay.url()),
            ("POE_GATEWAY_UPSTREAM__CA_FILE", TEST_CA_FILE),
        ],
    )
    .await
}

/// The pooled HTTP/2 connection to Poe goes dark while idle. The next request goes out on it;
/// with no answer to the PING sent after `upstream.keepalive_interval` (30 s) the connection is
/// closed after `upstream.keepalive_timeout` (20 s), and the request is retried on a new
/// connection. Without the PING it waited out `timeouts.first_byte` (600 s), and so did every
/// request after it on that connection.
#[tokio::test(start_paused = true)]
async fn a_request_on_a_connection_gone_dark_is_retried_on_a_new_one() {
    let up = MockUpstream::start_tls(100).await;
    let relay = Relay::start(up.addr).await;
    let gw = gateway_through(&up, &relay).await;
    let resp = answer(&up, &gw, "before", 5, "the first request hung").await;
    body_bytes(resp).await;

    relay.darken();
    let resp = answer(
        &up,
        &gw,
        "after the dark",
        120,
        "the request waited on the dead connection (no keep-alive PING?)",
    )
    .await;
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "2");
    assert!(String::from_utf8_lossy(&body_bytes(resp).await).contains("after the dark"));
    assert_eq!(
        up.chat_calls(),
        2,
        "the dark attempt never reached the upstream"
    );
    assert!(
        up.chats()
            .iter()
            .all(|r| r.version == http::Version::HTTP_2)
    );

    // The dead connection is gone from the pool: the next request goes straight through.
    let resp = answer(&up, &gw, "and again", 5, "the next request hung").await;
    assert_eq!(resp.headers()["x-poe-gateway-attempts"], "1");
}

/// A non-stream request answered with `text`, within `secs` of paused time (a hang guard).
async fn answer(
    up: &MockUpstream,
    gw: &TestGateway,
    text: &str,
    secs: u64,
    hung: &str,
) -> http::Response<hyper::body::Incoming> {
    up.push(Reply::completion("gpt-5", text));
    let resp = tokio::time::timeout(
        Duration::from_secs(secs),
        post(gw, &chat_body("gpt-5", false), &[]),
    )
    .await
    .expect(hung);
    assert_eq!(resp.status(), 200);
    resp
}

/// A stream whose connection goes dark mid-response ends with the error event once the PING
/// goes unanswered (about 50 s here), not after `timeouts.idle` (300 s).
#[tokio::test(start_paused = true)]
async fn a_stream_whose_connection_goes_dark_ends_at_the_keepalive_not_the_idle_timeout() {
    let up = MockUpstream::start_tls(100).await;
    let relay = Relay::start(up.addr).await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "first"))
            .gate(&gate)
            .send(finish_chunk("gpt-5"))
            .send("data: [DONE]\n\n"),
    );
    let gw = gateway_through(&up, &relay).await;
    let resp = post(&gw, &chat_body("gpt-5", true), &[]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = next_data(&mut body, 20).await.expect("first event");
    assert!(String::from_utf8_lossy(&first).contains("first"));

    relay.darken();
    let started = Instant::now();
    let mut rest = Vec::new();
    while let Some(d) = next_data(&mut body, 400).await {
        rest.extend_from_slice(&d);
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("[DONE]"), "{text}");
    assert!(text.contains("upstream connection broke"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(300),
        "the stream ended at timeouts.idle, not at the keep-alive: {:?}",
        started.elapsed()
    );
    gate.add_permits(1);
}

/// A TLS upstream that takes the TCP connection and then says nothing (an overloaded load
/// balancer): the attempt ends at `timeouts.connect`, which covers TLS and the HTTP/2
/// handshake too, not at `timeouts.first_byte` (here ten minutes).
#[tokio::test]
async fn a_silent_tls_server_fails_the_attempt_at_the_connect_timeout() {
    let up = MockUpstream::start().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let base = format!("https://{addr}");
    let policy = "[retry]\nmax_attempts = 1\n[timeouts]\nconnect = \"1s\"\nfirst_byte = \"600s\"\n";
    let gw = TestGateway::start(&up, policy, &[("POE_BASE_URL", &base)]).await;
    let resp = tokio::time::timeout(
        Duration::from_secs(120),
        post(&gw, &chat_body("gpt", false), &[]),
    )
    .await
    .expect("the attempt waited for timeouts.first_byte");
    let e = expect_error(resp, 502, "upstream_error").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("timeouts.connect"), "{message}");
}

/// A request that times out waiting for a concurrency slot never called Poe, so it must not
/// have spent a slot of the upstream rate limiter either: the next request still fits.
#[tokio::test(start_paused = true)]
async fn a_request_refused_for_concurrency_spends_no_rate_slot() {
    let up = MockUpstream::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "held"))
            .gate(&gate)
            .send("data: [DONE]\n\n"),
    );
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    // A burst of 2 (a tenth of 20), one call at a time, a second of queueing.
    let policy =
        "[limits]\nupstream_rpm = 20\nmax_concurrent_upstream = 1\nqueue_timeout = \"1s\"\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let held = post(&gw, &chat_body("gpt", true), &[]).await;
    assert_eq!(held.status(), 200);
    let mut held = held.into_body();
    next_data(&mut held, 10)
        .await
        .expect("the held stream's first event");
    expect_error(
        post(&gw, &chat_body("gpt", false), &[]).await,
        503,
        "overloaded_error",
    )
    .await;
    gate.add_permits(1);
    while next_data(&mut held, 10).await.is_some() {}
    let resp = post(&gw, &chat_body("gpt", false), &[]).await;
    assert_eq!(
        resp.status(),
        200,
        "the refused request spent the burst's second slot"
    );
    assert_eq!(up.chat_calls(), 2);
}

/// Clients that stop reading big answers must not stall the other requests sharing their
/// HTTP/2 connection to Poe. What such a client has not read piles up in its stream's
/// window; with hyper's defaults (2 MiB per stream, 5 MiB per connection) three of them used
/// up the connection's window, and every other answer on it stopped mid-body.
#[tokio::test]
async fn clients_that_stop_reading_do_not_stall_their_http2_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start_tls(100).await;
    let gw = TestGateway::start(&up, "", &[("POE_GATEWAY_UPSTREAM__CA_FILE", TEST_CA_FILE)]).await;
    up.push(Reply::completion("gpt-5", "warm"));
    let warm = post(&gw, &chat_body("gpt-5", false), &[]).await;
    body_bytes(warm).await;
    let before = up.connections();

    // Three answers of 24 MiB each, to clients that read their heads and nothing more.
    let big = Bytes::from(completion_json("gpt-5", &"x".repeat(24 * 1024 * 1024)));
    let body = chat_body("gpt-5", false);
    let mut stalled = Vec::new();
    for _ in 0..3 {
        up.push(Reply::json(200, big.clone()));
        let mut sock = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), sock.read(&mut head))
            .await
            .expect("a head")
            .unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
        stalled.push(sock);
    }
    // Time for what they do not read to fill every buffer on the way.
    tokio::time::sleep(Duration::from_millis(500)).await;

    up.push(Reply::completion("gpt-5", "still served"));
    let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
    let got = tokio::time::timeout(Duration::from_secs(20), body_bytes(resp))
        .await
        .expect("an answer on the shared connection stalled behind the unread ones");
    assert!(String::from_utf8_lossy(&got).contains("still served"));
    assert_eq!(up.connections(), before, "all on the one HTTP/2 connection");
    drop(stalled);
}

/// Answers the gateway cannot pass on as they came become its own OpenAI-shaped errors:
/// - an error body in a coding (a proxy that compresses though the gateway asks for
///   `identity`): it was passed on, and the key it quoted reached the client, since the
///   redaction searched the compressed bytes;
/// - a redirect: it was passed on with its `Location`, and the SDKs followed it, sending the
///   prompt past the gateway to another host;
/// - a compressed stream: the tap cannot read it, and it reached the client as a broken body.
///
/// A redirect or a compressed stream is asked for once: each attempt got the same, and each
/// was an answer Poe bills (three calls for one 502).
#[tokio::test(start_paused = true)]
async fn redirects_and_compressed_errors_and_streams_are_not_passed_on() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&up, "", &[]).await;

    up.push(
        Reply::new(401)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .send(format!(
                "{{\"error\":{{\"message\":\"Invalid key {UPSTREAM_KEY}\"}}}}"
            )),
    );
    let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
    assert!(resp.headers().get("content-encoding").is_none());
    let e = expect_error(resp, 401, "upstream_error").await;
    assert!(!e.to_string().contains(UPSTREAM_KEY), "{e}");
    assert!(e["message"].as_str().unwrap().contains("compressed"), "{e}");

    for status in [301, 307, 308] {
        up.push(
            Reply::new(status)
                .header("location", "http://elsewhere.example/v1/chat/completions")
                .send("moved"),
        );
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        assert!(resp.headers().get("location").is_none(), "{status}");
        // The SDKs would get the same: told not to ask again.
        assert_eq!(resp.headers()["x-should-retry"], "false", "{status}");
        let e = expect_error(resp, 502, "upstream_error").await;
        assert!(e["message"].as_str().unwrap().contains("redirect"), "{e}");
    }
    // On the Messages API, in Anthropic's shape, as the gateway's other errors there.
    up.push(Reply::new(302).header("location", "http://elsewhere.example/"));
    let resp = request(
        &gw,
        "POST",
        "/v1/messages",
        &[("content-type", "application/json")],
        r#"{"model":"claude-sonnet-4.5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(resp.status(), 502);
    let v = body_json(resp).await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");

    up.push(
        Reply::sse()
            .header("content-encoding", "gzip")
            .send(&b"\x1f\x8b\x08\x00 not readable"[..]),
    );
    let resp = post(&gw, &chat_body("gpt-5", true), &[]).await;
    assert!(resp.headers().get("content-encoding").is_none());
    let e = expect_error(resp, 502, "upstream_error").await;
    assert!(e["message"].as_str().unwrap().contains("compressed"), "{e}");

    // A compressed JSON answer too: its usage could not be read (nor an error object in it
    // checked for the key), so it could not be accounted; it was passed on.
    up.push(Reply::json(200, completion_json("gpt-5", "ok")).header("content-encoding", "gzip"));
    let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
    assert!(resp.headers().get("content-encoding").is_none());
    let e = expect_error(resp, 502, "upstream_error").await;
    assert!(e["message"].as_str().unwrap().contains("compressed"), "{e}");
    assert_eq!(up.chat_calls(), 6, "one call each");
    assert_eq!(up.received_on("/v1/messages").len(), 1, "one call");
}
