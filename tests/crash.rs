//! The real binary's end. Crash safety of the ledger: killed with SIGKILL while serving, every
//! request that finished more than a second before is in the ledger afterwards. Stop signals:
//! `/readyz` fails before the listener closes, a second signal ends the drain at once, and
//! SIGHUP stops it as gracefully as SIGTERM.

mod support;

use std::time::Duration;

use poe_gateway::ledger::Store;
use support::*;

#[tokio::test]
async fn kill_9_loses_nothing_older_than_a_second() {
    for db in databases().await {
        let up = MockUpstream::start().await;
        up.set_fallback(Reply::completion("gpt-5", "ok"));
        let (mut child, gw) = spawn_binary(&mut binary_command(&up.url(), &db));

        const N: usize = 25;
        for _ in 0..N {
            let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
            assert_eq!(resp.status(), 200);
            let _ = body_bytes(resp).await;
        }
        // Finished more than a second ago...
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // ...then the process dies without any chance to flush.
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success());

        let store = Store::open(&db).await.unwrap();
        let r = store.report(&everything()).await.unwrap();
        assert_eq!(r.totals.requests, N as i64, "{db}");
        assert_eq!(r.totals.prompt_tokens, 7 * N as i64, "{db}");
    }
}

/// The SQLite ledger's write-ahead log deleted under the running binary (the database file
/// left in place), then `kill -9`: the rows committed to the deleted log before, and those
/// written after, are all in the ledger at restart. The gateway notices the log is gone,
/// copies what it held into the database file, and opens the ledger again.
#[tokio::test]
async fn kill_9_after_the_wal_was_deleted_loses_nothing_older_than_a_second() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (mut child, gw) = spawn_binary(&mut binary_command(&up.url(), &db));
    let chat = |n: usize| {
        let gw = &gw;
        async move {
            for _ in 0..n {
                let resp = post(gw, &chat_body("gpt-5", false), &[]).await;
                assert_eq!(resp.status(), 200);
                let _ = body_bytes(resp).await;
            }
        }
    };
    chat(3).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    std::fs::remove_file(format!("{path}-wal")).unwrap();
    chat(4).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    assert_eq!(ledger_rows(&db).await, 7, "{db}");
}

fn signal(child: &std::process::Child, name: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// The requests in the ledger, once the binary has exited.
async fn ledger_rows(db: &str) -> i64 {
    let store = Store::open(db).await.unwrap();
    store.report(&everything()).await.unwrap().totals.requests
}

/// Starts the binary with `env` and a stream through it that would run for ever (its first
/// event read).
async fn with_a_held_stream(
    env: &[(&str, &str)],
) -> (
    MockUpstream,
    String,
    std::process::Child,
    TestGateway,
    hyper::body::Incoming,
) {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    up.push(
        Reply::sse()
            .send(chunk("gpt-5", "first"))
            .gate(&gate)
            .send("data: [DONE]\n\n"),
    );
    let mut cmd = binary_command(&up.url(), &db);
    cmd.envs(env.iter().copied());
    let (child, gw) = spawn_binary(&mut cmd);
    let mut stream = post(&gw, &chat_body("gpt-5", true), &[]).await.into_body();
    assert!(next_data(&mut stream, 10).await.is_some());
    (up, db, child, gw, stream)
}

/// Polls `/readyz` until it fails (new connections are still accepted meanwhile).
async fn until_not_ready(gw: &TestGateway) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = get(gw, "/readyz").await.status();
        if status == 503 {
            return;
        }
        assert_eq!(status, 200);
        assert!(std::time::Instant::now() < deadline, "/readyz never failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the process to exit, for up to `secs` (a bound on a hang, not a speed check).
async fn exited(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not exit within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_signal_fails_readyz_first_and_a_second_one_ends_the_drain() {
    let (_up, db, mut child, gw, stream) = with_a_held_stream(&[
        ("POE_GATEWAY_SERVER__SHUTDOWN_DELAY", "3s"),
        ("POE_GATEWAY_SERVER__SHUTDOWN_GRACE", "300s"),
    ])
    .await;
    // Reads the held stream to its end, as its client would.
    let rest = tokio::spawn(async move {
        use http_body_util::BodyExt;
        stream.collect().await.map(|b| b.to_bytes())
    });
    signal(&child, "TERM");
    // Still serving, new connections included, while /readyz says to go elsewhere.
    until_not_ready(&gw).await;
    let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
    assert_eq!(resp.status(), 200, "a request in the delay was refused");
    body_bytes(resp).await;

    // The stream holds the drain (its grace is 300 s) until a second signal ends it.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(child.try_wait().unwrap().is_none(), "the drain ended early");
    signal(&child, "TERM");
    let status = exited(&mut child, 60).await;
    assert!(status.success(), "{status}");
    // The cut stream ended as a whole response, with an error event its SDK raises.
    let rest = rest
        .await
        .unwrap()
        .expect("the stream ended cleanly, not cut mid-body");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("data: {\"error\""), "{text}");
    // Blamed on the shutdown, not on Poe, which was still sending.
    assert!(text.contains("\"code\":\"shutting_down\""), "{text}");
    assert!(!text.contains("upstream_unreachable"), "{text}");
    // Every request has its row, the stream cut by the second signal included.
    assert_eq!(ledger_rows(&db).await, 2, "{db}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_in_the_shutdown_delay_stops_at_once() {
    let (_up, db, mut child, gw, _stream) =
        with_a_held_stream(&[("POE_GATEWAY_SERVER__SHUTDOWN_DELAY", "300s")]).await;
    signal(&child, "INT");
    until_not_ready(&gw).await;
    signal(&child, "INT");
    let status = exited(&mut child, 60).await;
    assert!(status.success(), "{status}");
    assert_eq!(ledger_rows(&db).await, 1, "the cut stream's row: {db}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_stops_the_gateway_gracefully() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let (mut child, gw) = spawn_binary(&mut binary_command(&up.url(), &db));
    for _ in 0..5 {
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        assert_eq!(resp.status(), 200);
        body_bytes(resp).await;
    }
    signal(&child, "HUP");
    let status = exited(&mut child, 60).await;
    assert!(status.success(), "{status}: SIGHUP killed the gateway");
    // The rows written within the batch window are not lost: the stop wrote them.
    assert_eq!(ledger_rows(&db).await, 5, "{db}");
}

/// The SQLite ledger's path made unusable under the running binary in keys mode (the file
/// deleted and a directory put in its place): the gateway goes on with the file it has open,
/// logs the trouble a bounded number of times (not once per call), and once the path is free
/// again writes the ledger back there, keys and rows included.
#[tokio::test]
async fn a_ledger_path_that_cannot_be_reopened_keeps_serving_and_logs_once() {
    let (db, path) = sqlite_database().await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let log_path = std::env::temp_dir()
        .join(format!("poe-gw-reopen-{}.stderr", uuid::Uuid::new_v4()))
        .display()
        .to_string();
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = binary_command(&up.url(), &db);
    cmd.env("POE_GATEWAY_AUTH__MODE", "keys")
        .env("POE_GATEWAY_ADMIN_KEY", ADMIN_KEY)
        .stderr(log);
    let (mut child, gw) = spawn_binary(&mut cmd);
    let admin = format!("Bearer {ADMIN_KEY}");
    let resp = request(
        &gw,
        "POST",
        "/admin/keys",
        &[("authorization", &admin)],
        r#"{"name":"client"}"#,
    )
    .await;
    assert_eq!(resp.status(), 201);
    let key = body_json(resp).await["key"].as_str().unwrap().to_string();
    let auth = format!("Bearer {key}");
    let chat = |n: usize| {
        let (gw, auth) = (&gw, &auth);
        async move {
            for _ in 0..n {
                let resp = post(gw, &chat_body("gpt-5", false), &[("authorization", auth)]).await;
                assert_eq!(resp.status(), 200);
                let _ = body_bytes(resp).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    chat(2).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    // Some 3 s of calls: every one finds the path changed; a few retries are due.
    chat(30).await;
    let logged = std::fs::read_to_string(&log_path).unwrap();
    let lines = logged.lines().filter(|l| l.contains(&path)).count();
    assert!(lines <= 2, "{lines} lines logged:\n{logged}");
    assert!(logged.contains("directory"), "{logged}");

    std::fs::remove_dir(&path).unwrap();
    chat(15).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    assert_eq!(ledger_rows(&db).await, 47, "{db}");
    let logged = std::fs::read_to_string(&log_path).unwrap();
    let lines = logged.lines().filter(|l| l.contains(&path)).count();
    assert!(lines <= 3, "{lines} lines logged:\n{logged}");
    let _ = std::fs::remove_file(&log_path);
}

/// Starts the binary with a 1 s shutdown grace (and `env`) against `reply`, sends one
/// non-stream request, and stops the binary with SIGTERM once Poe has the request. What the
/// client got, and Poe's calls, once the binary has exited.
async fn stopped_while_poe_has_a_request(
    reply: Reply,
    env: &[(&str, &str)],
) -> (u16, serde_json::Value, usize, String) {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    up.set_fallback(reply);
    let mut cmd = binary_command(&up.url(), &db);
    cmd.env("POE_GATEWAY_SERVER__SHUTDOWN_GRACE", "1s")
        .envs(env.iter().copied());
    let (mut child, gw) = spawn_binary(&mut cmd);
    let waiting = tokio::spawn(async move {
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        let status = resp.status().as_u16();
        (status, body_json(resp).await)
    });
    while up.chat_calls() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "TERM");
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("an answer before Poe's")
        .unwrap();
    assert!(exited(&mut child, 60).await.success());
    (status, body, up.chat_calls(), db)
}

/// A non-stream request still waiting on Poe when the drain's grace runs out gets a whole
/// 503 (`shutting_down`), and Poe is not asked again. The gateway closed its upstream
/// connections, took the request's broken one for a failed attempt, sent it to Poe once
/// more, then cut the client off with no response at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_poe_at_the_end_of_the_grace_gets_a_503_and_no_retry() {
    let late = Reply::completion("gpt-5", "late").head_delay(Duration::from_secs(30));
    let (status, body, calls, db) = stopped_while_poe_has_a_request(late, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    assert_eq!(calls, 1, "the request was sent to Poe again");
    // Poe had it, and charges it: its row is a cancelled one with the prompt estimated, as
    // for a client gone before Poe's head (it was a 503 "completed" with no tokens).
    let totals = Store::open(&db)
        .await
        .unwrap()
        .report(&everything())
        .await
        .unwrap()
        .totals;
    assert_eq!(totals.requests, 1, "{db}");
    assert_eq!(totals.estimated, 1, "{totals:?}");
    assert!(totals.prompt_tokens > 0, "{totals:?}");
}

/// A request waiting out a retry's backoff when the grace runs out gets the same 503 and no
/// further attempt (it slept on, and was cut off with no response when the server stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_a_retry_backoff_at_the_end_of_the_grace_gets_a_503() {
    let busy = Reply::json(
        503,
        "{\"error\":{\"code\":503,\"type\":\"overloaded\",\"message\":\"busy\"}}",
    )
    .header("retry-after", "8");
    let env = [("POE_GATEWAY_RETRY__MAX_RETRY_AFTER", "30s")];
    let (status, body, calls, _) = stopped_while_poe_has_a_request(busy, &env).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    assert_eq!(calls, 1, "no attempt after the grace");
}

/// A request queued for the upstream rate limit when the grace runs out gets the same 503,
/// and Poe never sees it (it was cut off with its connection when the server stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_for_the_upstream_limit_at_the_end_of_the_grace_gets_a_503() {
    let db = databases().await.remove(0);
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let mut cmd = binary_command(&up.url(), &db);
    // One request a minute: the first goes at once, the next waits about 60 s for its slot.
    cmd.env("POE_GATEWAY_SERVER__SHUTDOWN_GRACE", "1s")
        .env("POE_GATEWAY_LIMITS__UPSTREAM_RPM", "1")
        .env("POE_GATEWAY_LIMITS__QUEUE_TIMEOUT", "120s");
    let (mut child, gw) = spawn_binary(&mut cmd);
    assert_eq!(
        post(&gw, &chat_body("gpt-5", false), &[]).await.status(),
        200
    );
    let queued = tokio::spawn(async move {
        let resp = post(&gw, &chat_body("gpt-5", false), &[]).await;
        let status = resp.status().as_u16();
        (status, body_json(resp).await)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!queued.is_finished(), "the second request was not held");
    signal(&child, "TERM");
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .expect("an answer before the limiter's slot")
        .unwrap();
    assert!(exited(&mut child, 60).await.success());
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shutting_down", "{body}");
    assert_eq!(up.chat_calls(), 1, "the queued request reached Poe");
    assert_eq!(ledger_rows(&db).await, 2, "{db}");
}

/// One raw `/mcp` POST on a connection of its own: the response, its body unread.
async fn mcp_post(
    gw: &TestGateway,
    session: Option<&str>,
    body: serde_json::Value,
) -> http::Response<hyper::body::Incoming> {
    let stateless = body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"].is_string();
    let mut req = http::Request::post(gw.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if stateless {
        let name = body["params"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        req = req
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", body["method"].as_str().unwrap())
            .header("mcp-name", name);
    } else {
        req = req.header("mcp-protocol-version", "2025-06-18");
    }
    if let Some(id) = session {
        req = req.header("mcp-session-id", id);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    client().request(req).await.unwrap()
}

/// A tool call running when `poe-gateway serve` (a runtime per serving thread) begins its
/// graceful shutdown gets its answer. An MCP session's worker, and its calls, run on the
/// thread that opened the session: when that thread's own connections had drained (at
/// once, an idle one), its runtime was dropped with them, and a call answering on another
/// thread's connection was cut at the drain's start. Several rounds on four threads, so
/// the session and the call meet on different threads. The last round is the stateless
/// protocol's (2026-07-28: no session, the client's details in each request), whose calls
/// were not waited for: a 500 at once, the call to Poe dropped and charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_in_progress_finishes_through_a_graceful_stop() {
    for round in 0..5 {
        let stateless = round == 4;
        let db = databases().await.remove(0);
        let up = MockUpstream::start().await;
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        up.push(
            Reply::sse()
                .send(chunk("gpt-5", "the answer"))
                .gate(&gate)
                .send(finish_chunk("gpt-5"))
                .send("data: [DONE]\n\n"),
        );
        let mut cmd = binary_command(&up.url(), &db);
        cmd.env("POE_GATEWAY_SERVER__THREADS", "4")
            .env("POE_GATEWAY_SERVER__SHUTDOWN_GRACE", "30s");
        let (mut child, gw) = spawn_binary(&mut cmd);
        let answer = if stateless {
            let call = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "ask_poe", "arguments": {"bot": "gpt-5", "prompt": "go"},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
                    "io.modelcontextprotocol/clientCapabilities": {}}}});
            // Its answer's head comes with the answer: the request runs on while the test
            // stops the gateway.
            let gw = TestGateway {
                addr: gw.addr,
                handle: None,
            };
            tokio::spawn(async move { mcp_post(&gw, None, call).await })
        } else {
            let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"}}});
            let resp = mcp_post(&gw, None, init).await;
            let sid = resp.headers()["mcp-session-id"]
                .to_str()
                .unwrap()
                .to_string();
            body_bytes(resp).await;
            let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
            body_bytes(mcp_post(&gw, Some(&sid), note).await).await;
            let call = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "ask_poe", "arguments": {"bot": "gpt-5", "prompt": "go"}}});
            let answer = mcp_post(&gw, Some(&sid), call).await;
            assert_eq!(answer.status(), 200, "round {round}");
            tokio::spawn(async move { answer })
        };
        while up.chat_calls() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal(&child, "TERM");
        // The drain has begun once new connections are refused.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the drain never began"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gate.add_permits(1);
        let text = tokio::time::timeout(Duration::from_secs(30), async {
            let answer = answer.await.unwrap();
            assert_eq!(answer.status(), 200, "round {round}");
            String::from_utf8_lossy(&body_bytes(answer).await).into_owned()
        })
        .await
        .expect("the answer ended");
        assert!(
            text.contains("the answer") && text.contains("\"id\":2"),
            "round {round}: {text}"
        );
        assert!(exited(&mut child, 60).await.success());
    }
}
