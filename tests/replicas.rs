//! Two gateway processes (the real binary) behind no load balancer, sharing one PostgreSQL
//! ledger and one Redis: budgets, per-key RPM and the upstream limiter hold across both, the
//! reports see both, a replica killed with SIGKILL leaves the other serving, and a Redis that
//! stops mid-run is handled by the policy and recovered from.
//!
//! Redis servers are started by the tests themselves (so one can be stopped mid-run) from
//! `POE_GATEWAY_TEST_REDIS_SERVER` or `redis-server` on PATH; scripts/test.sh installs it.

mod support;

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

/// A throwaway Redis on a fixed loopback port, so it can be stopped and started again there.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn binary() -> Option<String> {
        if let Ok(p) = std::env::var("POE_GATEWAY_TEST_REDIS_SERVER") {
            return Some(p);
        }
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return Some("redis-server".into());
        }
        if std::env::var("CI").is_ok() {
            panic!("CI must run the replica tests: install redis-server (scripts/redis.sh)");
        }
        eprintln!("redis-server not found: replica tests skipped");
        None
    }

    fn start() -> Option<Redis> {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("pgw-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            child: None,
            port,
            dir,
        };
        r.resume()?;
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers.
    fn resume(&mut self) -> Option<()> {
        let bin = Redis::binary()?;
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Some(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One gateway process.
struct Replica {
    child: Child,
    gw: TestGateway,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared-mode policy the replicas run: gateway keys, a price for the test bot.
const POLICY: &str = r#"
[auth]
mode = "keys"
allow_open_on_network = false
[pricing]
"gpt-5" = { prompt = 0.00001, completion = 0.00001 }
"#;

fn spawn_replica(
    upstream: &MockUpstream,
    database_url: &str,
    redis_url: &str,
    policy_file: &std::path::Path,
    env: &[(&str, &str)],
) -> Replica {
    let mut cmd = binary_command(&upstream.url(), database_url);
    cmd.env("POE_GATEWAY_POLICIES", policy_file)
        .env("POE_GATEWAY_REDIS_URL", redis_url)
        .env("POE_GATEWAY_ADMIN_KEY", ADMIN_KEY);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (child, gw) = spawn_binary(&mut cmd);
    Replica { child, gw }
}

/// Everything two replicas need: an upstream, a fresh Postgres database, a Redis, a policy.
struct Cluster {
    up: MockUpstream,
    redis: Redis,
    a: Replica,
    b: Replica,
    db: String,
    _policy: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn cluster(extra_policy: &str, env: &[(&str, &str)]) -> Option<Cluster> {
    let db = databases()
        .await
        .into_iter()
        .find(|d| d.starts_with("postgres"));
    let Some(db) = db else {
        eprintln!("no Postgres: replica tests skipped");
        return None;
    };
    let redis = Redis::start()?;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let path =
        std::env::temp_dir().join(format!("pgw-policy-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, format!("{POLICY}\n{extra_policy}")).unwrap();
    let a = spawn_replica(&up, &db, &redis.url(), &path, env);
    let b = spawn_replica(&up, &db, &redis.url(), &path, env);
    Some(Cluster {
        up,
        redis,
        a,
        b,
        db,
        _policy: tempfile_path::TempPath(path),
    })
}

fn admin() -> (&'static str, String) {
    ("authorization", format!("Bearer {ADMIN_KEY}"))
}

async fn create_key(gw: &TestGateway, body: &str) -> (String, String) {
    let (h, v) = admin();
    let resp = request(gw, "POST", "/admin/keys", &[(h, &v)], body).await;
    assert_eq!(resp.status(), 201);
    let v = body_json(resp).await;
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

async fn chat(gw: &TestGateway, key: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {key}");
    let resp = post(gw, &chat_body("gpt-5", false), &[("authorization", &auth)]).await;
    let status = resp.status().as_u16();
    (status, body_json(resp).await)
}

/// Requests the ledger holds for a key, as one replica's admin API reports them.
async fn ledger_requests(gw: &TestGateway, key_id: &str) -> i64 {
    let (h, v) = admin();
    let resp = request(
        gw,
        "GET",
        &format!("/admin/usage?since=1d&key_id={key_id}"),
        &[(h, &v)],
        "",
    )
    .await;
    assert_eq!(resp.status(), 200);
    body_json(resp).await["totals"]["requests"]
        .as_i64()
        .unwrap_or(0)
}

/// Waits until `n` of a key's requests are in the ledger (the charge to the shared spend
/// counter happens as the ledger writer prices them, just before the write).
async fn settle(gw: &TestGateway, key_id: &str, n: i64) {
    for _ in 0..200 {
        if ledger_requests(gw, key_id).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the ledger never reached {n} requests for {key_id}");
}

#[tokio::test]
async fn budget_rpm_and_reports_hold_across_two_replicas() {
    let Some(c) = cluster("", &[]).await else {
        return;
    };

    // Each call costs 7 * 1e-5 + 3 * 1e-5 = 1e-4 USD. A budget of 4.5e-4: the fifth call
    // starts at 4e-4 spent and is allowed, the sixth finds 5e-4 and is refused: the budget
    // holds to within one request's cost, whichever replica the calls land on. With spend
    // kept per replica, each would have let through its own five.
    let (budget_id, budget_key) = create_key(
        &c.a.gw,
        r#"{"name":"team","budget_usd":0.00045,"period":"day"}"#,
    )
    .await;
    let mut admitted = 0;
    let mut refused = None;
    for i in 0..12 {
        let gw = if i % 2 == 0 { &c.a.gw } else { &c.b.gw };
        let (status, body) = chat(gw, &budget_key).await;
        if status == 200 {
            admitted += 1;
            settle(&c.b.gw, &budget_id, admitted).await;
        } else {
            refused = Some((status, body));
            break;
        }
    }
    assert_eq!(admitted, 5, "calls admitted against a 4.5e-4 budget");
    let (status, body) = refused.expect("the budget was never enforced");
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    // The other replica refuses as well.
    let (status, _) = chat(&c.a.gw, &budget_key).await;
    assert_eq!(status, 429);

    // Per-key RPM of 3, across both: three calls pass, the fourth is refused on either.
    let (_, rpm_key) = create_key(&c.a.gw, r#"{"name":"ci","rpm":3}"#).await;
    for gw in [&c.a.gw, &c.b.gw, &c.a.gw] {
        assert_eq!(chat(gw, &rpm_key).await.0, 200);
    }
    let (status, body) = chat(&c.b.gw, &rpm_key).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(chat(&c.a.gw, &rpm_key).await.0, 429);

    // Reports on either replica see both replicas' rows (5 priced calls, 2 budget refusals).
    let (h, v) = admin();
    for gw in [&c.a.gw, &c.b.gw] {
        let resp = request(
            gw,
            "GET",
            "/admin/usage?since=1d&group_by=key",
            &[(h, &v)],
            "",
        )
        .await;
        let report = body_json(resp).await;
        let groups = report["groups"].as_array().unwrap();
        let team = groups
            .iter()
            .find(|g| g["group"] == budget_id.as_str())
            .unwrap_or_else(|| panic!("{report}"));
        assert!(team["requests"].as_i64().unwrap() >= 5, "{report}");
        let cost = team["cost_usd"].as_f64().unwrap();
        assert!((cost - 5e-4).abs() < 1e-9, "{report}");
    }
    assert_eq!(c.up.chat_calls(), 8);
    let _ = &c.db;
}

#[tokio::test]
async fn the_upstream_limiter_is_shared() {
    // 10 RPM to Poe with a burst of one; a request that would wait more than 50 ms is refused.
    let Some(c) = cluster(
        "[limits]\nupstream_rpm = 10\nqueue_timeout = \"50ms\"\n",
        &[],
    )
    .await
    else {
        return;
    };
    let (_, key) = create_key(&c.a.gw, r#"{"name":"x"}"#).await;
    assert_eq!(chat(&c.a.gw, &key).await.0, 200);
    // The second call to Poe within the interval is held back, on the other replica too.
    let (status, body) = chat(&c.b.gw, &key).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("holding requests to Poe"),
        "{body}"
    );
    assert_eq!(c.up.chat_calls(), 1);
}

#[tokio::test]
async fn a_killed_replica_leaves_the_other_serving_and_the_ledger_intact() {
    let Some(mut c) = cluster("", &[]).await else {
        return;
    };
    let (key_id, key) = create_key(&c.a.gw, r#"{"name":"load"}"#).await;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &c.a.gw } else { &c.b.gw };
        assert_eq!(chat(gw, &key).await.0, 200);
    }
    // Both replicas' rows are flushed (the writer batches for at most 200 ms)...
    settle(&c.a.gw, &key_id, 20).await;
    // ...then B dies with no chance to flush anything, while A is still serving.
    let load = {
        let gw = TestGateway {
            addr: c.a.gw.addr,
            handle: None,
        };
        let key = key.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..20 {
                if chat(&gw, &key).await.0 == 200 {
                    ok += 1;
                }
            }
            ok
        })
    };
    c.b.child.kill().unwrap();
    c.b.child.wait().unwrap();
    assert_eq!(load.await.unwrap(), 20, "A kept serving while B died");
    settle(&c.a.gw, &key_id, 40).await;
    assert_eq!(ledger_requests(&c.a.gw, &key_id).await, 40);
}

#[tokio::test]
async fn redis_down_follows_the_policy_and_recovers() {
    // Defaults: limits fail open (to this replica's own limiter), budgets fail closed.
    let Some(mut c) = cluster("[redis]\ntimeout = \"200ms\"\n", &[]).await else {
        return;
    };
    let (_, budget_key) =
        create_key(&c.a.gw, r#"{"name":"b","budget_usd":10,"period":"month"}"#).await;
    let (_, rpm_key) = create_key(&c.a.gw, r#"{"name":"r","rpm":1000}"#).await;
    assert_eq!(chat(&c.a.gw, &budget_key).await.0, 200);
    assert_eq!(chat(&c.b.gw, &rpm_key).await.0, 200);
    assert_eq!(metric(&c.a.gw, "poe_gateway_redis_up").await, Some(1.0));

    c.redis.stop();
    for gw in [&c.a.gw, &c.b.gw] {
        let (status, body) = chat(gw, &budget_key).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "shared_state_unavailable", "{body}");
        assert!(!body.to_string().contains("redis://"), "{body}");
        // Limits fail open: the RPM key is still served, by each replica's own limiter.
        assert_eq!(chat(gw, &rpm_key).await.0, 200);
        assert_eq!(metric(gw, "poe_gateway_redis_up").await, Some(0.0));
    }
    // After a failure, calls skip Redis for a while instead of each waiting out
    // `redis.timeout`: 20 requests (two limiter steps each) make a few failed calls, not 40.
    let errors = r#"poe_gateway_redis_errors_total{op="rate"}"#;
    let before = metric(&c.a.gw, errors).await.unwrap_or(0.0);
    for _ in 0..20 {
        assert_eq!(chat(&c.a.gw, &rpm_key).await.0, 200);
    }
    let failed = metric(&c.a.gw, errors).await.unwrap_or(0.0) - before;
    assert!(
        failed <= 6.0,
        "{failed} failed calls to Redis for 20 requests"
    );

    c.redis.resume().unwrap();
    // The connection comes back without a restart, once a call tries Redis again (at most
    // a couple of seconds after the last failure): the call that finds the old connection
    // broken reconnects and is made again.
    for gw in [&c.b.gw, &c.a.gw] {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while chat(gw, &budget_key).await.0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "Redis never came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert_eq!(metric(&c.b.gw, "poe_gateway_redis_up").await, Some(1.0));
}

#[tokio::test]
async fn budgets_can_fail_open_and_limits_closed() {
    let Some(mut c) = cluster(
        "[redis]\ntimeout = \"200ms\"\nlimits_on_error = \"fail_closed\"\nbudgets_on_error = \"fail_open\"\n",
        &[],
    )
    .await
    else {
        return;
    };
    let (_, budget_key) =
        create_key(&c.a.gw, r#"{"name":"b","budget_usd":10,"period":"month"}"#).await;
    assert_eq!(chat(&c.a.gw, &budget_key).await.0, 200);
    c.redis.stop();
    // The upstream limiter is shared and fails closed: every call gets a 503 naming why.
    let (status, body) = chat(&c.b.gw, &budget_key).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "shared_state_unavailable", "{body}");
    c.redis.resume().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while chat(&c.b.gw, &budget_key).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until Redis holds `n` shared cache entries (they are written by a background task
/// once an answer completes).
async fn shared_entries(redis_url: &str, n: usize) {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..200 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("pgw:cache:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if keys.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("Redis never held {n} cache entries");
}

#[tokio::test]
async fn a_cache_hit_on_one_replica_serves_the_other() {
    let Some(c) = cluster("[cache]\nshared = true\n", &[]).await else {
        return;
    };
    let (_, key) = create_key(&c.a.gw, r#"{"name":"c"}"#).await;
    let auth = format!("Bearer {key}");
    let body = r#"{"model":"gpt-5","temperature":0,"messages":[{"role":"user","content":"same"}]}"#;
    let first = post(&c.a.gw, body, &[("authorization", &auth)]).await;
    assert_eq!(first.headers()["x-cache"], "MISS");
    let first = body_bytes(first).await;
    shared_entries(&c.redis.url(), 1).await;
    // B has never seen this request: its hit comes from Redis, byte for byte A's answer.
    let r = post(&c.b.gw, body, &[("authorization", &auth)]).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(body_bytes(r).await, first);
    assert_eq!(c.up.chat_calls(), 1);
    assert_eq!(
        metric(&c.b.gw, "poe_gateway_cache_shared_hits_total").await,
        Some(1.0)
    );

    // A stream recorded on B is replayed on A, frame for frame.
    let sbody = r#"{"model":"gpt-5","temperature":0,"stream":true,"messages":[{"role":"user","content":"s"}]}"#;
    c.up.push(Reply::stream("gpt-5", &["a", "b", "c"]));
    let miss = post(&c.b.gw, sbody, &[("authorization", &auth)]).await;
    assert_eq!(miss.headers()["x-cache"], "MISS");
    let miss = body_bytes(miss).await;
    shared_entries(&c.redis.url(), 2).await;
    let hit = post(&c.a.gw, sbody, &[("authorization", &auth)]).await;
    assert_eq!(hit.headers()["x-cache"], "HIT");
    assert_eq!(body_bytes(hit).await, miss);
    assert_eq!(c.up.chat_calls(), 2);

    // A purge through one replica clears the shared tier as well as its own.
    let (h, v) = admin();
    assert_eq!(
        request(&c.a.gw, "DELETE", "/admin/cache", &[(h, &v)], "")
            .await
            .status(),
        200
    );
    let client = redis::Client::open(c.redis.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("pgw:cache:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    let r = post(&c.a.gw, body, &[("authorization", &auth)]).await;
    assert_eq!(r.headers()["x-cache"], "MISS");
}

/// A TCP relay in front of Redis that can be cut: while cut it swallows what either side
/// sends (a network partition, with Redis keeping its data), and healing resets the
/// connections it held, as a partition that ends usually does.
struct Partition {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Partition {
    async fn start(redis_port: u16) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (c, list) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut = c.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = relay(cr, sw, cut.clone()) => {}
                        _ = relay(sr, cw, cut) => {}
                    }
                });
                list.lock().unwrap().push(task);
            }
        });
        Partition { port, cut, conns }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies one direction of a relayed connection; while cut, what arrives is dropped.
async fn relay(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !cut.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_lost_in_a_partition_are_recounted_from_the_ledger() {
    // Redis keeps its data through a partition, so the spend counter outlives the charges
    // that never reached it; left alone it would stay that far short for the whole period.
    let Some(db) = databases()
        .await
        .into_iter()
        .find(|d| d.starts_with("postgres"))
    else {
        eprintln!("no Postgres: replica tests skipped");
        return;
    };
    let Some(redis) = Redis::start() else {
        return;
    };
    let net = Partition::start(redis.port).await;
    let up = MockUpstream::start().await;
    up.set_fallback(Reply::completion("gpt-5", "ok"));
    let path =
        std::env::temp_dir().join(format!("pgw-policy-{}.toml", uuid::Uuid::new_v4().simple()));
    // Budgets fail open, so the calls in the partition are served (and owed).
    let policy =
        format!("{POLICY}\n[redis]\ntimeout = \"200ms\"\nbudgets_on_error = \"fail_open\"\n");
    std::fs::write(&path, policy).unwrap();
    let _policy = tempfile_path::TempPath(path.clone());
    let a = spawn_replica(&up, &db, &net.url(), &path, &[]);
    let b = spawn_replica(&up, &db, &redis.url(), &path, &[]);

    // Each call costs 1e-4; the budget lets five through.
    let (id, key) = create_key(
        &a.gw,
        r#"{"name":"team","budget_usd":0.00045,"period":"day"}"#,
    )
    .await;
    assert_eq!(chat(&a.gw, &key).await.0, 200);
    settle(&b.gw, &id, 1).await;

    net.cut();
    for n in 2..=3 {
        assert_eq!(chat(&a.gw, &key).await.0, 200);
        settle(&b.gw, &id, n).await;
    }
    net.heal();
    // A replica leaves Redis alone for 2 s after its last failed call (then tries again).
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // Two more are within the budget (the ledger holds three); the charges that missed the
    // counter would otherwise have let four through.
    let mut admitted = 3;
    for _ in 0..6 {
        let (status, body) = chat(&a.gw, &key).await;
        if status != 200 {
            assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
            break;
        }
        admitted += 1;
        settle(&b.gw, &id, admitted).await;
    }
    assert_eq!(admitted, 5, "calls admitted against a 4.5e-4 budget");
    // The other replica reads the same counter.
    assert_eq!(chat(&b.gw, &key).await.0, 429);
}

/// A key's shared spend counter for the current period, as Redis holds it.
async fn spend_counter(redis_url: &str, key_id: &str) -> Option<f64> {
    let client = redis::Client::open(redis_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("pgw:spend:{key_id}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.len() <= 1, "{keys:?}");
    let key = keys.first()?;
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A chat whose estimate is small enough for several to be held on a tiny budget at once.
async fn short_chat(gw: &TestGateway, key: &str) -> u16 {
    chat_of(gw, key, 3).await
}

/// A chat estimated at a token for its prompt and `max_tokens` for its answer.
async fn chat_of(gw: &TestGateway, key: &str, max_tokens: u32) -> u16 {
    let body = format!(
        r#"{{"model":"gpt-5","messages":[{{"role":"user","content":"hi"}}],"max_tokens":{max_tokens}}}"#
    );
    let body = body.as_str();
    let auth = format!("Bearer {key}");
    let resp = post(gw, body, &[("authorization", &auth)]).await;
    let status = resp.status().as_u16();
    // Read whole: a client that hangs up on the body is charged for a cancelled call.
    body_json(resp).await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_sigterm_charges_its_last_batch() {
    let Some(mut c) = cluster("", &[]).await else {
        return;
    };
    // Each call costs 1e-4.
    let (id, key) = create_key(
        &c.a.gw,
        r#"{"name":"team","budget_usd":0.00045,"period":"day"}"#,
    )
    .await;
    assert_eq!(short_chat(&c.a.gw, &key).await, 200);
    settle(&c.b.gw, &id, 1).await;
    let counter = spend_counter(&c.redis.url(), &id).await;
    assert!(
        counter.is_some_and(|usd| (usd - 1e-4).abs() < 1e-9),
        "{counter:?}"
    );

    // Three calls Poe holds while the replica is told to stop: they finish within the grace
    // and their rows are the writer's last batch, charged after the serving threads are gone.
    for _ in 0..3 {
        c.up.push(Reply::completion("gpt-5", "ok").head_delay(Duration::from_millis(700)));
    }
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let gw = TestGateway {
                addr: c.a.gw.addr,
                handle: None,
            };
            let key = key.clone();
            tokio::spawn(async move { short_chat(&gw, &key).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.up.chat_calls() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "Poe never had the calls"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = Command::new("kill")
        .args(["-TERM", &c.a.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert!(c.a.child.wait().unwrap().success());

    // The counter has all four (it was left at one: the connection died with the runtime of
    // the serving thread that made it).
    let counter = spend_counter(&c.redis.url(), &id).await;
    assert!(
        counter.is_some_and(|usd| (usd - 4e-4).abs() < 1e-9),
        "{counter:?}"
    );
    // So the other replica lets one more through, not four.
    assert_eq!(short_chat(&c.b.gw, &key).await, 200);
    settle(&c.b.gw, &id, 5).await;
    assert_eq!(short_chat(&c.b.gw, &key).await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_redis_is_down_for_budgets() {
    // After a failover the old primary may answer as a replica: reads work, every write is
    // refused with READONLY. Budgets read from its counter would never see a charge.
    let Some(c) = cluster(
        "[redis]\ntimeout = \"200ms\"\nbudgets_on_error = \"fail_open\"\n",
        &[],
    )
    .await
    else {
        return;
    };
    let (id, key) = create_key(
        &c.a.gw,
        r#"{"name":"team","budget_usd":0.00045,"period":"day"}"#,
    )
    .await;
    assert_eq!(short_chat(&c.a.gw, &key).await, 200);
    settle(&c.a.gw, &id, 1).await;

    // A replica of a primary that is not there.
    let nobody = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = redis::Client::open(c.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(nobody)
        .query_async(&mut conn)
        .await
        .unwrap();

    // Budgets fail open to the replica's own count, which holds: five calls in all.
    let mut admitted = 1;
    for _ in 0..8 {
        let status = short_chat(&c.a.gw, &key).await;
        if status != 200 {
            assert_eq!(status, 429);
            break;
        }
        admitted += 1;
        settle(&c.a.gw, &id, admitted).await;
    }
    assert_eq!(admitted, 5, "calls admitted against a 4.5e-4 budget");
    assert_eq!(metric(&c.a.gw, "poe_gateway_redis_up").await, Some(0.0));
    let _ = &c.db;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_on_every_replica_hold_one_budget() {
    let Some(c) = cluster("", &[]).await else {
        return;
    };
    // Each call is estimated at about 1.05e-3 while it runs (a few tokens of prompt and 99
    // of answer at 1e-5): a budget of 4.5e-3 has room for five at once, whichever replica
    // takes them. With holds kept per replica, each let five through.
    let (id, key) = create_key(
        &c.a.gw,
        r#"{"name":"team","budget_usd":0.0045,"period":"day"}"#,
    )
    .await;
    c.up.set_fallback(Reply::completion("gpt-5", "ok").head_delay(Duration::from_millis(1500)));
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let gw = TestGateway {
                addr: if i % 2 == 0 { c.a.gw.addr } else { c.b.gw.addr },
                handle: None,
            };
            let key = key.clone();
            tokio::spawn(async move { chat_of(&gw, &key, 99).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 5, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );
    assert_eq!(c.up.chat_calls(), 5);
    // Their holds went with them (they cost 5e-4 in all): the next five pass again.
    settle(&c.b.gw, &id, 12).await;
    c.up.set_fallback(Reply::completion("gpt-5", "ok"));
    for gw in [&c.a.gw, &c.b.gw] {
        assert_eq!(chat_of(gw, &key, 99).await, 200);
    }
}
