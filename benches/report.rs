//! Usage reports at a million rows: fills a ledger with 1,000,000 rows spread over 30 days,
//! 50 keys and 20 bots, then times each report the gateway serves (median of 5 runs).
//!
//!   cargo bench --bench report                      # SQLite in a temp dir
//!   POE_GATEWAY_BENCH_POSTGRES_URL=postgres://... cargo bench --bench report   # and Postgres
//!
//! Rows are written through the same `Store::insert_usage` the ledger writer uses, in batches
//! of 1,000, so the fill rate is the writer's throughput too.

use std::time::{Duration, Instant};

use poe_gateway::ledger::{Api, GroupBy, ReportQuery, Store, UsageRow, now_ms};

const ROWS: usize = 1_000_000;
const BATCH: usize = 1_000;
const DAYS: i64 = 30;

fn row(i: usize, now: i64) -> UsageRow {
    let key = i % 50;
    let bot = i % 20;
    UsageRow {
        ts_ms: now - (i as i64 * DAYS * 86_400_000 / ROWS as i64),
        request_id: format!("req-{i}"),
        key_id: Some(format!("key_{key:04}")),
        alias: None,
        model: format!("bot-{bot}"),
        bot: format!("bot-{bot}"),
        stream: i.is_multiple_of(2),
        status: if i.is_multiple_of(97) { 500 } else { 200 },
        outcome: "completed",
        prompt_tokens: Some(100 + (i % 1000) as i64),
        completion_tokens: Some(50 + (i % 500) as i64),
        total_tokens: Some(150 + (i % 1500) as i64),
        tokens_estimated: false,
        cost_usd: if bot == 19 {
            None
        } else {
            Some(0.0001 * (1 + i % 7) as f64)
        },
        cache_hit: i.is_multiple_of(10),
        saved_usd: None,
        attempts: 1,
        latency_ms: 250.0,
        ttfb_ms: Some(40.0),
        api: [Api::Chat, Api::Chat, Api::Responses, Api::Messages][i % 4],
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cache_write_1h_tokens: 0,
        charged: false,
    }
}

async fn fill(store: &Store) -> Duration {
    let now = now_ms();
    let started = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    for i in 0..ROWS {
        batch.push(row(i, now));
        if batch.len() == BATCH {
            let full = std::sync::Arc::new(std::mem::take(&mut batch));
            store.insert_usage(&full).await.expect("insert");
        }
    }
    started.elapsed()
}

async fn time<F, Fut>(label: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        f().await;
        runs.push(t.elapsed());
    }
    runs.sort();
    println!(
        "  {label:<44} median {:>8.1} ms   max {:>8.1} ms",
        runs[2].as_secs_f64() * 1000.0,
        runs[4].as_secs_f64() * 1000.0
    );
}

async fn bench(name: &str, store: Store) {
    println!("{name}: filling {ROWS} rows...");
    let took = fill(&store).await;
    println!(
        "  fill: {:.1} s ({:.0} rows/s through insert_usage, batches of {BATCH})",
        took.as_secs_f64(),
        ROWS as f64 / took.as_secs_f64()
    );
    let now = now_ms();
    let q = |since_days: i64, key: Option<&str>, group: Option<GroupBy>| ReportQuery {
        since_ms: now - since_days * 86_400_000,
        until_ms: now + 1,
        key_id: key.map(String::from),
        group_by: group,
    };
    for (label, query) in [
        ("all keys, 30 days, totals", q(31, None, None)),
        (
            "all keys, 30 days, by model",
            q(31, None, Some(GroupBy::Model)),
        ),
        ("all keys, 30 days, by day", q(31, None, Some(GroupBy::Day))),
        ("all keys, 30 days, by key", q(31, None, Some(GroupBy::Key))),
        ("all keys, 30 days, by api", q(31, None, Some(GroupBy::Api))),
        (
            "all keys, 1 day, by model",
            q(1, None, Some(GroupBy::Model)),
        ),
        (
            "one key, 30 days, by model (/v1/usage)",
            q(31, Some("key_0007"), Some(GroupBy::Model)),
        ),
        ("one key, 1 day, totals", q(1, Some("key_0007"), None)),
    ] {
        let store = store.clone();
        time(label, || {
            let store = store.clone();
            let query = query.clone();
            async move {
                let r = store.report(&query).await.expect("report");
                assert!(r.totals.requests > 0);
            }
        })
        .await;
    }
    let store2 = store.clone();
    time("budget check: one key's spend this month", || {
        let store = store2.clone();
        async move {
            store
                .spent_since("key_0007", now - 30 * 86_400_000)
                .await
                .expect("spent");
        }
    })
    .await;
}

#[tokio::main]
async fn main() {
    // `cargo test --benches` runs bench targets with no arguments besides --bench; stay quick
    // there and do the real run only under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("poe-gateway-report-bench-{}", std::process::id()));
    let sqlite = Store::open(&format!("sqlite://{}/ledger.db", dir.display()))
        .await
        .expect("sqlite");
    bench("sqlite", sqlite).await;
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(url) = std::env::var("POE_GATEWAY_BENCH_POSTGRES_URL") {
        let pg = Store::open(&url).await.expect("postgres");
        bench("postgres", pg).await;
    } else {
        println!("postgres: skipped (set POE_GATEWAY_BENCH_POSTGRES_URL to a scratch database)");
    }
}
