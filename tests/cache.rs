//! The response cache over real sockets: byte-identical hits for JSON and streams, request
//! directives, TTL on paused time, tenant scope, coalescing, what is never stored, and the
//! accounting of hits.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::*;

fn det_body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "the same question"}],
        "temperature": 0,
        "stream": stream
    })
    .to_string()
}

fn usage_chunk() -> String {
    "data: {\"id\":\"chatcmpl-test\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n".into()
}

/// What Poe streams when asked for usage.
fn poe_stream(model: &str) -> Reply {
    Reply::sse()
        .send(chunk(model, "cached "))
        .send(chunk(model, "words"))
        .send(finish_chunk(model))
        .send(usage_chunk())
        .send("data: [DONE]\n\n")
}

async fn call(gw: &TestGateway, body: &str, headers: &[(&str, &str)]) -> (String, Bytes) {
    let resp = post(gw, body, headers).await;
    assert_eq!(resp.status(), 200);
    let x = resp.headers()["x-cache"].to_str().unwrap().to_string();
    (x, body_bytes(resp).await)
}

#[tokio::test]
async fn json_hit_is_byte_identical_and_skips_upstream() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("claude-sonnet-4.5", "remembered"));
    let gw = TestGateway::default(&up).await;
    let (x1, b1) = call(&gw, &det_body("claude", false), &[]).await;
    let (x2, b2) = call(&gw, &det_body("CLAUDE-SONNET-4.5", false), &[]).await;
    assert_eq!((x1.as_str(), x2.as_str()), ("MISS", "HIT"));
    assert_eq!(b1, b2);
    assert_eq!(up.chat_calls(), 1);
    // Not deterministic: bypassed.
    up.push(Reply::completion("claude-sonnet-4.5", "creative"));
    let body = det_body("claude", false).replace("\"temperature\":0", "\"temperature\":0.8");
    assert_eq!(call(&gw, &body, &[]).await.0, "BYPASS");
}

#[tokio::test]
async fn stream_hit_is_byte_identical_and_honours_include_usage() {
    let up = MockUpstream::start().await;
    up.push(poe_stream("gpt-5"));
    let gw = TestGateway::default(&up).await;
    let (x1, b1) = call(&gw, &det_body("gpt", true), &[]).await;
    let (x2, b2) = call(&gw, &det_body("gpt", true), &[]).await;
    assert_eq!((x1.as_str(), x2.as_str()), ("MISS", "HIT"));
    assert_eq!(
        b1, b2,
        "a replay is the stream the client got the first time"
    );
    assert!(!String::from_utf8_lossy(&b2).contains("\"usage\""));
    assert!(String::from_utf8_lossy(&b2).ends_with("data: [DONE]\n\n"));

    // The same request asking for usage gets the recording with the usage chunk in it.
    let mut with_usage: serde_json::Value = serde_json::from_str(&det_body("gpt", true)).unwrap();
    with_usage["stream_options"] = serde_json::json!({"include_usage": true});
    let (x3, b3) = call(&gw, &with_usage.to_string(), &[]).await;
    assert_eq!(x3, "HIT");
    let want = [
        chunk("gpt-5", "cached "),
        chunk("gpt-5", "words"),
        finish_chunk("gpt-5"),
        usage_chunk(),
        "data: [DONE]\n\n".into(),
    ]
    .concat();
    assert_eq!(b3, Bytes::from(want));
    assert_eq!(up.chat_calls(), 1);
}

#[tokio::test]
async fn no_cache_refreshes_and_no_store_bypasses() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "first"));
    up.push(Reply::completion("gpt-5", "second"));
    up.push(Reply::completion("gpt-5", "third"));
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    assert_eq!(call(&gw, &body, &[]).await.0, "MISS");
    // no-cache: skips the read, stores the fresh answer.
    let (x, b) = call(&gw, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(x, "MISS");
    assert!(String::from_utf8_lossy(&b).contains("second"));
    let (x, b) = call(&gw, &body, &[]).await;
    assert_eq!(x, "HIT");
    assert!(String::from_utf8_lossy(&b).contains("second"));
    // no-store: neither reads nor stores.
    let (x, b) = call(&gw, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(x, "BYPASS");
    assert!(String::from_utf8_lossy(&b).contains("third"));
    assert!(String::from_utf8_lossy(&call(&gw, &body, &[]).await.1).contains("second"));
    assert_eq!(up.chat_calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn ttl_expires_on_paused_time() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let short = [("x-poe-gateway-cache-ttl", "600")];
    assert_eq!(call(&gw, &body, &short).await.0, "MISS");
    tokio::time::advance(Duration::from_secs(599)).await;
    assert_eq!(call(&gw, &body, &[]).await.0, "HIT");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        call(&gw, &body, &[]).await.0,
        "MISS",
        "the short TTL passed"
    );
    // The policy TTL (1 h) applies without the header.
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert_eq!(call(&gw, &body, &[]).await.0, "HIT");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(call(&gw, &body, &[]).await.0, "MISS");

    // A duration with its unit works too; a value that is no lifetime is a 400 naming the
    // header (ignored, it stored the answer for the whole hour), and nothing reaches Poe.
    tokio::time::advance(Duration::from_secs(3601)).await;
    let calls = up.chat_calls();
    assert_eq!(
        call(&gw, &body, &[("x-poe-gateway-cache-ttl", "1m")])
            .await
            .0,
        "MISS"
    );
    tokio::time::advance(Duration::from_secs(61)).await;
    assert_eq!(call(&gw, &body, &[]).await.0, "MISS", "stored for a minute");
    for bad in ["soon", "-5", "1.5"] {
        let resp = post(&gw, &body, &[("x-poe-gateway-cache-ttl", bad)]).await;
        let e = expect_error(resp, 400, "invalid_request_error").await;
        assert_eq!(e["param"], "x-poe-gateway-cache-ttl", "{bad}: {e}");
    }
    assert_eq!(up.chat_calls(), calls + 2);
}

#[tokio::test]
async fn tenants_are_isolated_unless_shared() {
    for (shared, expect_calls) in [(false, 2), (true, 1)] {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "ok"));
        let policy = format!("[auth]\nmode = \"passthrough\"\n[cache]\nshared = {shared}\n");
        let gw = TestGateway::start(&up, &policy, &[]).await;
        let body = det_body("gpt-5", false);
        assert_eq!(
            call(&gw, &body, &[("authorization", "Bearer poe-key-a")])
                .await
                .0,
            "MISS"
        );
        let (x, _) = call(&gw, &body, &[("authorization", "Bearer poe-key-b")]).await;
        assert_eq!(x, if shared { "HIT" } else { "MISS" }, "shared = {shared}");
        assert_eq!(
            call(&gw, &body, &[("authorization", "Bearer poe-key-a")])
                .await
                .0,
            "HIT"
        );
        assert_eq!(up.chat_calls(), expect_calls, "shared = {shared}");
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_requests_make_one_call() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "once").head_delay(Duration::from_secs(5)));
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let calls = (0..10).map(|_| call(&gw, &body, &[]));
    let results = futures_join_all(calls).await;
    let first = &results[0].1;
    assert!(results.iter().all(|(_, b)| b == first));
    assert_eq!(results.iter().filter(|(x, _)| x == "MISS").count(), 1);
    assert_eq!(up.chat_calls(), 1);
    // The metrics agree with the headers: one miss, nine answered without a call.
    assert_eq!(
        metric(&gw, "poe_gateway_cache_misses_total").await,
        Some(1.0)
    );
    assert_eq!(metric(&gw, "poe_gateway_cache_hits_total").await, Some(9.0));
}

/// Identical requests that waited on one call share its error too, and with it the leader's
/// word that the gateway already retried (`x-should-retry: false`): without it each waiting
/// client's SDK retried by itself, and Poe got the retries of every one of them.
#[tokio::test(start_paused = true)]
async fn a_shared_error_tells_every_client_it_was_retried() {
    let up = MockUpstream::start().await;
    up.set_fallback(
        Reply::json(500, poe_error(500, "provider_error")).head_delay(Duration::from_secs(5)),
    );
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let answers = futures_join_all((0..3).map(|_| post(&gw, &body, &[]))).await;
    for resp in &answers {
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        assert_eq!(resp.headers()["x-poe-gateway-attempts"], "3");
    }
    assert_eq!(
        up.chat_calls(),
        3,
        "one request's attempts, shared by all three"
    );
}

/// When the request making a coalesced call is cancelled (its client hangs up), the requests
/// waiting on it do not all go to Poe at once: one of them takes the call over for the rest.
#[tokio::test(start_paused = true)]
async fn a_cancelled_leader_hands_the_call_to_one_follower() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "once more").head_delay(Duration::from_secs(5)));
    let gw = std::sync::Arc::new(TestGateway::default(&up).await);
    let body = det_body("gpt", false);
    let leader = {
        let (gw, body) = (gw.clone(), body.clone());
        tokio::spawn(async move { post(&gw, &body, &[]).await })
    };
    while up.chat_calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let followers: Vec<_> = (0..4)
        .map(|_| {
            let (gw, body) = (gw.clone(), body.clone());
            tokio::spawn(async move { call(&gw, &body, &[]).await })
        })
        .collect();
    // They reach the gateway and wait on the leader's call.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(up.chat_calls(), 1, "the followers wait, they do not call");
    leader.abort();
    let mut answers = Vec::new();
    for f in followers {
        answers.push(f.await.expect("a follower's answer"));
    }
    assert!(answers.iter().all(|(_, b)| b == &answers[0].1));
    assert_eq!(
        up.chat_calls(),
        2,
        "one call for the cancelled leader and one taken over for all four followers"
    );
}

/// A cacheable non-stream miss that nobody else waits for is passed on as it arrives, not read
/// whole first: the client has the head and the first bytes while upstream is still sending,
/// and the answer is stored once it is complete.
#[tokio::test]
async fn a_lone_json_miss_streams_through_and_is_stored() {
    let up = MockUpstream::start().await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let whole = completion_json("gpt-5", "arrives in two parts");
    let (a, b) = whole.split_at(whole.len() / 2);
    up.push(
        Reply::new(200)
            .header("content-type", "application/json")
            .send(a.to_string())
            .gate(&gate)
            .send(b.to_string()),
    );
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let resp = tokio::time::timeout(Duration::from_secs(10), post(&gw, &body, &[]))
        .await
        .expect("the head comes before the whole answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "MISS");
    let mut incoming = resp.into_body();
    let first = next_data(&mut incoming, 10).await.expect("the first part");
    assert_eq!(first, Bytes::from(a.to_string()));
    gate.add_permits(1);
    let mut got = first.to_vec();
    while let Some(d) = next_data(&mut incoming, 10).await {
        got.extend_from_slice(&d);
    }
    assert_eq!(got, whole.as_bytes());
    let (x, again) = call(&gw, &body, &[]).await;
    assert_eq!(x, "HIT");
    assert_eq!(again, whole.as_bytes());
    assert_eq!(up.chat_calls(), 1);
}

/// A full cache still stores a new answer: the next identical request is a hit, even though
/// the cache is full of answers nobody asked for again. (A frequency-based admission policy
/// would turn the newcomer away until it had missed a few times.)
#[tokio::test]
async fn a_full_cache_still_keeps_the_newest_answer() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion(
        "gpt-5",
        "an answer of a few hundred bytes",
    ));
    // About 60 answers fit. The upstream limiter would pace 300 requests over half a minute.
    let policy = "[cache]\nmax_bytes = \"64KiB\"\nmax_entry_bytes = \"16KiB\"\n\
                  [limits]\nupstream_rpm = 1000000\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let unique =
        |i: usize| det_body("gpt", false).replace("the same question", &format!("question {i}"));
    for i in 0..300 {
        assert_eq!(call(&gw, &unique(i), &[]).await.0, "MISS");
    }
    let asked = unique(1_000_000);
    assert_eq!(call(&gw, &asked, &[]).await.0, "MISS");
    // Other traffic in between, well under the cache's size.
    for i in 300..320 {
        call(&gw, &unique(i), &[]).await;
    }
    assert_eq!(call(&gw, &asked, &[]).await.0, "HIT");
    // What made room was counted as evicted, and what is still held was not.
    let evicted = evictions(&gw).await;
    assert!(
        (200..=320).contains(&evicted),
        "{evicted} evictions after 321 answers in room for about 60"
    );
}

/// The cache's eviction count from `/metrics`.
async fn evictions(gw: &TestGateway) -> u64 {
    metric(gw, "poe_gateway_cache_evictions_total")
        .await
        .expect("an eviction count in /metrics") as u64
}

/// Joins futures without pulling in the futures crate.
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futs.map(|f| Some(Box::pin(f))).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("every future finished"))
        .collect()
}

#[tokio::test]
async fn broken_streams_errors_and_media_are_never_stored() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::default(&up).await;

    up.push(Reply::sse().send(chunk("gpt-5", "half")).drop_connection());
    up.push(poe_stream("gpt-5"));
    let _ = call(&gw, &det_body("gpt", true), &[]).await;
    assert_eq!(
        call(&gw, &det_body("gpt", true), &[]).await.0,
        "MISS",
        "a broken stream was stored"
    );

    let resp = {
        up.push(Reply::json(
            500,
            r#"{"error":{"code":500,"type":"provider_error","message":"x"}}"#,
        ));
        up.push(Reply::json(
            500,
            r#"{"error":{"code":500,"type":"provider_error","message":"x"}}"#,
        ));
        up.push(Reply::json(
            500,
            r#"{"error":{"code":500,"type":"provider_error","message":"x"}}"#,
        ));
        post(&gw, &det_body("claude", false), &[]).await
    };
    assert_eq!(resp.status(), 500);
    let _ = body_bytes(resp).await;
    up.push(Reply::completion("claude-sonnet-4.5", "ok"));
    assert_eq!(
        call(&gw, &det_body("claude", false), &[]).await.0,
        "MISS",
        "an error was stored"
    );

    let media = "![image.png](https://pfst.cf2.poecdn.net/base/image/abc?w=1024&h=1024)\nhttps://pfst.cf2.poecdn.net/base/image/abc?w=1024&h=1024";
    up.push(Reply::completion("gpt-image-1", media));
    up.push(Reply::completion("gpt-image-1", media));
    assert_eq!(call(&gw, &det_body("image", false), &[]).await.0, "MISS");
    assert_eq!(
        call(&gw, &det_body("image", false), &[]).await.0,
        "MISS",
        "a media answer was stored"
    );
}

/// Hits of an answer that came without usage save what its miss was charged (an estimate),
/// as JSON and as a stream: they recorded no tokens, and saved $0.
#[tokio::test]
async fn hits_of_an_answer_without_usage_save_its_estimate() {
    let up = MockUpstream::start().await;
    let words = "an answer of some words";
    let json = serde_json::json!({
        "id": "c", "object": "chat.completion", "created": 1, "model": "claude-sonnet-4.5",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": words}}]
    });
    up.push(Reply::json(200, json.to_string()));
    up.push(
        Reply::sse()
            .send(chunk("claude-sonnet-4.5", words))
            .send(finish_chunk("claude-sonnet-4.5"))
            .send("data: [DONE]\n\n"),
    );
    let db = databases().await.remove(0);
    let policy = "[aliases]\nclaude = \"claude-sonnet-4.5\"\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    let _ = body_bytes(get(&gw, "/v1/models").await).await;
    for stream in [false, true] {
        assert_eq!(call(&gw, &det_body("claude", stream), &[]).await.0, "MISS");
        assert_eq!(call(&gw, &det_body("claude", stream), &[]).await.0, "HIT");
    }
    core.flush().await;
    let r = core.ledger().store().report(&everything()).await.unwrap();
    assert_eq!((r.totals.requests, r.totals.cache_hits), (4, 2));
    assert!(r.totals.cost_usd > 0.0);
    assert!(
        (r.totals.saved_usd - r.totals.cost_usd).abs() < 1e-12,
        "hits saved {} of misses that cost {}",
        r.totals.saved_usd,
        r.totals.cost_usd
    );
}

#[tokio::test]
async fn hits_are_accounted_as_savings_and_purge_works() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("claude-sonnet-4.5", "ok"));
    let db = databases().await.remove(0);
    let policy = "[aliases]\nclaude = \"claude-sonnet-4.5\"\n";
    let (gw, core) = TestGateway::with_ledger(&up, policy, &[], &db).await;
    // The catalogue (with prices) is loaded by the first listing.
    let _ = body_bytes(get(&gw, "/v1/models").await).await;
    assert_eq!(call(&gw, &det_body("claude", false), &[]).await.0, "MISS");
    assert_eq!(call(&gw, &det_body("claude", false), &[]).await.0, "HIT");
    core.flush().await;
    let r = core.ledger().store().report(&everything()).await.unwrap();
    let price = 7.0 * 0.000003 + 3.0 * 0.000015;
    assert_eq!(r.totals.requests, 2);
    assert_eq!(r.totals.cache_hits, 1);
    assert!(
        (r.totals.cost_usd - price).abs() < 1e-12,
        "a hit costs nothing: {}",
        r.totals.cost_usd
    );
    assert!(
        (r.totals.saved_usd - price).abs() < 1e-12,
        "and saves its price: {}",
        r.totals.saved_usd
    );

    let metrics = String::from_utf8(body_bytes(get(&gw, "/metrics").await).await.to_vec()).unwrap();
    assert!(
        metrics.contains("poe_gateway_cache_hits_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("poe_gateway_cache_misses_total 1"),
        "{metrics}"
    );

    let auth = format!("Bearer {ADMIN_KEY}");
    let resp = request(
        &gw,
        "DELETE",
        "/admin/cache",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        call(&gw, &det_body("claude", false), &[]).await.0,
        "MISS",
        "purged"
    );
    // A purged entry was taken out, not evicted for room.
    assert_eq!(evictions(&gw).await, 0);
}

/// `DELETE /admin/cache?key_id=` drops that key's entries and leaves the others'. Without
/// gateway keys every caller's entries are the `open` scope's.
#[tokio::test]
async fn a_scoped_purge_drops_only_that_scope() {
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let db = databases().await.remove(0);
    let (gw, _core) = TestGateway::with_ledger(&up, "", &[], &db).await;
    let body = det_body("gpt", false);
    assert_eq!(call(&gw, &body, &[]).await.0, "MISS");
    let auth = format!("Bearer {ADMIN_KEY}");
    let purge = |scope: &'static str| {
        let auth = auth.clone();
        let gw = &gw;
        async move {
            let path = format!("/admin/cache?key_id={scope}");
            let resp = request(gw, "DELETE", &path, &[("authorization", &auth)], "").await;
            assert_eq!(resp.status(), 200);
        }
    };
    purge("pt_0123456789abcdef").await;
    assert_eq!(
        call(&gw, &body, &[]).await.0,
        "HIT",
        "another scope's purge"
    );
    purge("open").await;
    assert_eq!(
        call(&gw, &body, &[]).await.0,
        "MISS",
        "its own scope's purge"
    );
    assert_eq!(up.chat_calls(), 2);
    assert_eq!(evictions(&gw).await, 0);

    // Shared answers belong to no key: a key's purge is refused (it said it purged, and
    // the key's next request still hit).
    let gw = TestGateway::with_ledger(&up, "[cache]\nshared = true\n", &[], &db)
        .await
        .0;
    let resp = request(
        &gw,
        "DELETE",
        "/admin/cache?key_id=open",
        &[("authorization", &auth)],
        "",
    )
    .await;
    let e = expect_error(resp, 400, "invalid_request_error").await;
    assert_eq!(e["param"], "key_id", "{e}");
}

/// Poe fails a stream that started well with an error event. Even with `[DONE]` after it,
/// that is not an answer: it is not stored (the next identical request goes upstream again)
/// and it is accounted as incomplete, not completed.
#[tokio::test]
async fn a_stream_with_an_error_event_is_not_stored_even_when_done_follows() {
    let up = MockUpstream::start().await;
    let failed = || {
        Reply::sse()
            .send(chunk("gpt-5", "half an answer"))
            .send("data: {\"error\":{\"code\":500,\"type\":\"provider_error\",\"message\":\"provider died\"}}\n\n")
            .send("data: [DONE]\n\n")
    };
    // The error member not first, as OpenRouter fails a stream (the SDKs raise it too).
    let failed_later = || {
        Reply::sse()
            .send(chunk("gpt-5", "half an answer"))
            .send("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"error\"}],\"error\":{\"message\":\"provider died\"}}\n\n")
            .send("data: [DONE]\n\n")
    };
    up.push(failed());
    up.push(failed_later());
    up.push(failed_later());
    let (gw, core) = TestGateway::with_ledger(
        &up,
        poe_gateway::config::DEFAULT_POLICY,
        &[],
        "sqlite::memory:",
    )
    .await;
    for _ in 0..3 {
        let (x, body) = call(&gw, &det_body("gpt", true), &[]).await;
        assert_eq!(x, "MISS", "the failed stream was stored");
        let body = String::from_utf8_lossy(&body).into_owned();
        // The client gets the stream as Poe sent it, with nothing added after `[DONE]`.
        assert!(body.contains("provider died"), "{body}");
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    }
    assert_eq!(up.chat_calls(), 3);
    core.flush().await;
    let all = core.ledger().store().report(&everything()).await.unwrap();
    assert_eq!(all.totals.requests, 3);
    assert_eq!(
        all.totals.errors, 3,
        "a stream that failed counts as an error"
    );

    // The same as a JSON answer: an `error` member after the others (it was stored and
    // replayed for the TTL, and counted completed).
    let failed_json = || {
        Reply::json(
            200,
            r#"{"id":"c","object":"chat.completion","choices":[],"error":{"message":"provider died","code":502}}"#,
        )
    };
    up.push(failed_json());
    up.push(failed_json());
    for _ in 0..2 {
        let (x, body) = call(&gw, &det_body("gpt", false), &[]).await;
        assert_eq!(x, "MISS", "the failed answer was stored");
        assert!(String::from_utf8_lossy(&body).contains("provider died"));
    }
    assert_eq!(up.chat_calls(), 5);
    core.flush().await;
    let all = core.ledger().store().report(&everything()).await.unwrap();
    assert_eq!(
        all.totals.errors, 5,
        "a failed JSON answer counts as an error"
    );
}

/// A 200 that is no whole JSON answer (a proxy's HTML page; an answer cut short that came
/// with a length of its own) reaches its client once, and is not stored: it was replayed as
/// a HIT for the whole TTL, the SDKs returning the page as text or failing to parse.
#[tokio::test]
async fn a_200_that_is_no_whole_json_answer_is_not_stored() {
    let up = MockUpstream::start().await;
    // Each with its length in its head, as a proxy or a broken upstream sends it (one
    // without is cut short by its close, which fails its client's body already).
    let with_length = |ct: &str, body: &'static str| {
        Reply::new(200)
            .header("content-type", ct)
            .header("content-length", &body.len().to_string())
            .send(body)
    };
    let gw = TestGateway::default(&up).await;
    for (what, ct, body) in [
        (
            "page",
            "text/html",
            "<html><body>Sign in to the proxy</body></html>",
        ),
        (
            "cut",
            "application/json",
            r#"{"id":"c","object":"chat.completion","choices":[{"#,
        ),
    ] {
        up.push(with_length(ct, body));
        up.push(with_length(ct, body));
        let before = up.chat_calls();
        for _ in 0..2 {
            let (x, _) = call(&gw, &det_body("gpt", false), &[]).await;
            assert_eq!(x, "MISS", "{what} was stored");
        }
        assert_eq!(up.chat_calls(), before + 2, "{what}");
    }
    // A whole answer still is.
    up.push(Reply::completion("gpt-5", "whole"));
    assert_eq!(call(&gw, &det_body("gpt", false), &[]).await.0, "MISS");
    assert_eq!(call(&gw, &det_body("gpt", false), &[]).await.0, "HIT");
}

/// One request written two ways (Python's SDK writes `0.0` where JavaScript's writes `0`, and
/// a stream flag may be left out or `false`) is one cache entry.
#[tokio::test]
async fn spellings_of_one_request_share_an_entry() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "once"));
    let gw = TestGateway::default(&up).await;
    let (x1, b1) = call(&gw, &det_body("gpt", false), &[]).await;
    let respelled = r#"{"messages":[{"role":"user","content":"the same question"}],"temperature":0.0,"model":"gpt"}"#;
    let (x2, b2) = call(&gw, respelled, &[]).await;
    assert_eq!((x1.as_str(), x2.as_str()), ("MISS", "HIT"));
    assert_eq!(b1, b2);
    assert_eq!(up.chat_calls(), 1);
}

/// An upstream on a raw socket that answers every chat request with a JSON head of no length
/// (the body ends with the connection) and `body`, then closes (the catalogue is whole).
/// Returns its URL and a count of the chat requests it got.
async fn close_delimited_upstream(
    body: &'static str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let chats = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = chats.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let counted = counted.clone();
            tokio::spawn(async move {
                // The head, then the body its length names.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let (head_end, len, chat) = loop {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        let chat = head.contains("/chat/completions");
                        if chat {
                            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        break (i + 4, len, chat);
                    }
                };
                while got.len() < head_end + len {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let answer = if chat {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{body}"
                    )
                } else {
                    let models = default_models();
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{models}",
                        models.len()
                    )
                };
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, chats)
}

/// A JSON answer whose length its head does not give ends with the connection: one cut
/// short by a dropped connection is no answer. It is not stored (it was, and replayed as a
/// 200 HIT that no SDK could parse for the whole TTL), its client's body fails rather than
/// ending as if whole, and its row is `incomplete`. A whole one is stored as before.
#[tokio::test]
async fn a_json_answer_cut_at_the_connections_close_is_not_stored() {
    let whole = Box::leak(completion_json("gpt-5", "all of it").into_boxed_str());
    let cut = &whole[..whole.len() / 2];
    for (body, complete) in [(cut, false), (&*whole, true)] {
        let up = MockUpstream::start().await;
        let (url, chats) = close_delimited_upstream(body).await;
        let gw = TestGateway::start(&up, config_default(), &[("POE_BASE_URL", &url)]).await;
        for _ in 0..2 {
            let resp = post(&gw, &det_body("gpt-5", false), &[]).await;
            assert_eq!(resp.status(), 200);
            let read = http_body_util::BodyExt::collect(resp.into_body()).await;
            assert_eq!(read.is_ok(), complete, "{body}");
        }
        let calls = chats.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(calls, if complete { 1 } else { 2 }, "{body}");
    }
}

fn config_default() -> &'static str {
    poe_gateway::config::DEFAULT_POLICY
}

/// When the coalesced call breaks off mid-answer, the requests waiting on it coalesce once
/// more behind one of them: one more call to Poe, not one each (all 20 called at once).
#[tokio::test(start_paused = true)]
async fn a_leader_whose_answer_broke_hands_the_call_to_one_follower() {
    let up = MockUpstream::start().await;
    let half = completion_json("gpt-5", "broken");
    up.push(
        Reply::new(200)
            .header("content-type", "application/json")
            .head_delay(Duration::from_secs(5))
            .send(half[..half.len() / 2].to_string())
            .drop_connection(),
    );
    up.set_fallback(Reply::completion("gpt-5", "whole").head_delay(Duration::from_secs(5)));
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let answers = futures_join_all((0..6).map(|_| post(&gw, &body, &[]))).await;
    let mut whole = 0;
    for resp in answers {
        if resp.status() == 502 {
            // The broken leader's client: a reply of a call (it said BYPASS, and had no
            // attempts header, so the SDKs could not tell the gateway had called Poe).
            assert_eq!(resp.headers()["x-cache"], "MISS");
            assert_eq!(resp.headers()["x-poe-gateway-attempts"], "1");
            expect_error(resp, 502, "upstream_error").await;
            continue;
        }
        if resp.status() == 200 {
            let x = resp.headers()["x-cache"].to_str().unwrap().to_string();
            if let Ok(b) = http_body_util::BodyExt::collect(resp.into_body()).await
                && serde_json::from_slice::<serde_json::Value>(&b.to_bytes()).is_ok()
            {
                whole += 1;
                assert!(x == "HIT" || x == "MISS", "{x}");
            }
        }
    }
    assert_eq!(whole, 5, "every follower got the second leader's answer");
    assert_eq!(up.chat_calls(), 2, "the broken call and one more, shared");
}

/// A request that asks for a fresh answer (`Cache-Control: no-cache`) makes its own call
/// even while an identical one is in flight: it joined that one and was told HIT.
#[tokio::test(start_paused = true)]
async fn no_cache_does_not_join_a_call_in_flight() {
    let up = MockUpstream::start().await;
    up.push(Reply::completion("gpt-5", "first").head_delay(Duration::from_secs(5)));
    up.push(Reply::completion("gpt-5", "fresh").head_delay(Duration::from_secs(5)));
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let (plain, fresh) = tokio::join!(call(&gw, &body, &[]), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        call(&gw, &body, &[("cache-control", "no-cache")]).await
    });
    assert_eq!(plain.0, "MISS");
    assert_eq!(fresh.0, "MISS");
    assert!(String::from_utf8_lossy(&fresh.1).contains("fresh"));
    assert_eq!(up.chat_calls(), 2);
}

/// A 200 that is Poe's error object is shared with those waiting as it came, but it is no
/// hit: they are told MISS, counted as misses, and their rows say `incomplete`.
#[tokio::test(start_paused = true)]
async fn a_shared_error_object_is_no_hit() {
    let up = MockUpstream::start().await;
    up.set_fallback(
        Reply::json(200, poe_error(500, "provider_error")).head_delay(Duration::from_secs(5)),
    );
    let gw = TestGateway::default(&up).await;
    let body = det_body("gpt", false);
    let results = futures_join_all((0..3).map(|_| call(&gw, &body, &[]))).await;
    assert!(results.iter().all(|(x, _)| x == "MISS"), "{results:?}");
    assert_eq!(up.chat_calls(), 1);
    assert_eq!(metric(&gw, "poe_gateway_cache_hits_total").await, Some(0.0));
}

/// An image bot's answer is not stored even when it is the gateway's first request, before
/// anything had read Poe's catalogue (which says which bots make media): it was stored, and
/// served for the whole TTL after its links expired, unless they were Poe's CDN's. While the
/// catalogue cannot be read, nothing is stored; once it can, text answers are again.
#[tokio::test(start_paused = true)]
async fn media_answers_are_not_stored_before_the_catalogue_is_read() {
    let up = MockUpstream::start().await;
    let mut models: serde_json::Value = serde_json::from_str(&default_models()).unwrap();
    models["data"][4]["architecture"] = serde_json::json!({"output_modalities": ["image"]});
    up.set_models(&models.to_string());
    let picture = "![cat](https://images.example/cat.png)";
    up.set_fallback(Reply::completion("gpt-image-1", picture));
    let gw = TestGateway::default(&up).await;
    for _ in 0..2 {
        assert_eq!(
            call(&gw, &det_body("gpt-image-1", false), &[]).await.0,
            "MISS"
        );
    }
    assert_eq!(up.chat_calls(), 2, "the image answer was stored");

    // A second gateway whose catalogue read fails: nothing is stored, until a read works.
    let up = MockUpstream::start().await;
    up.push_models(Reply::json(503, poe_error(503, "overloaded")));
    up.set_models(&models.to_string());
    up.set_fallback(Reply::completion("gpt-5", "words"));
    let gw = TestGateway::default(&up).await;
    assert_eq!(call(&gw, &det_body("gpt-5", false), &[]).await.0, "MISS");
    assert_eq!(call(&gw, &det_body("gpt-5", false), &[]).await.0, "MISS");
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(call(&gw, &det_body("gpt-5", false), &[]).await.0, "MISS");
    assert_eq!(call(&gw, &det_body("gpt-5", false), &[]).await.0, "HIT");
}

/// A replay paced at or over `timeouts.idle` plays to its end: its gaps are the gateway's
/// own pacing. It stopped after one frame with "upstream sent nothing" (Poe was never
/// called).
#[tokio::test(start_paused = true)]
async fn a_slow_paced_replay_is_not_taken_for_a_silent_upstream() {
    let up = MockUpstream::start().await;
    up.push(poe_stream("gpt-5"));
    let policy = "[cache]\nreplay_frame_delay = \"2s\"\n[timeouts]\nidle = \"1s\"\n";
    let gw = TestGateway::start(&up, policy, &[]).await;
    let (x1, b1) = call(&gw, &det_body("gpt-5", true), &[]).await;
    let (x2, b2) = call(&gw, &det_body("gpt-5", true), &[]).await;
    assert_eq!((x1.as_str(), x2.as_str()), ("MISS", "HIT"));
    assert_eq!(b1, b2, "{}", String::from_utf8_lossy(&b2));
    assert_eq!(up.chat_calls(), 1);
}
