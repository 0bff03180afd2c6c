//! Microbenchmarks for the pieces on the request path (criterion):
//! request parse + alias rewrite, the SSE tap per frame (plain and usage-stripping), the cache
//! key, and the ledger enqueue.
//!
//!   cargo bench --bench hot_path

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use poe_gateway::config::{self, CachePolicy};
use poe_gateway::gateway::cache::ResponseCache;
use poe_gateway::gateway::completion::Accounting;
use poe_gateway::gateway::models::Models;
use poe_gateway::gateway::sse::SseScanner;
use poe_gateway::gateway::tap::Tap;
use poe_gateway::gateway::{Caller, ChatRequest};
use poe_gateway::ledger::{Ledger, Store, UsageRow};
use poe_gateway::metrics::Metrics;

fn request_body() -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "claude",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Explain the difference between TCP and UDP in three sentences, please."}
            ],
            "temperature": 0,
            "stream": true,
            "thinking_budget": 1024
        })
        .to_string(),
    )
}

/// A typical streamed answer: 40 content chunks, a finish chunk, the usage chunk, [DONE].
fn stream_frames() -> Vec<Bytes> {
    let mut frames = Vec::new();
    for i in 0..40 {
        frames.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"claude-sonnet-4.5\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"word{i} \"}},\"finish_reason\":null}}]}}\n\n"
        )));
    }
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"));
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":80,\"total_tokens\":110}}\n\n"));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn parse_and_rewrite(c: &mut Criterion) {
    let body = request_body();
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse + alias rewrite + include_usage", |b| {
        b.iter(|| {
            let req = ChatRequest::parse(black_box(body.clone())).unwrap();
            black_box(req.upstream_body("claude-sonnet-4.5"))
        })
    });
    g.finish();

    // A message with a file attached as a data URL (how MCP attachments reach Poe): the
    // body is mostly one long string, which every pass over the request must cross.
    let attachment = Bytes::from(
        serde_json::json!({
            "model": "claude",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in this file?"},
                {"type": "file", "file": {"filename": "a.pdf",
                    "file_data": format!("data:application/pdf;base64,{}", "QUJD".repeat(1 << 20))}}
            ]}],
        })
        .to_string(),
    );
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Bytes(attachment.len() as u64));
    g.sample_size(20);
    g.bench_function("parse + alias rewrite, a 4 MiB attachment", |b| {
        b.iter(|| {
            let req = ChatRequest::parse(black_box(attachment.clone())).unwrap();
            black_box(req.upstream_body("claude-sonnet-4.5"))
        })
    });
    g.finish();
}

fn sse_scan(c: &mut Criterion) {
    let frames = stream_frames();
    let mut g = c.benchmark_group("sse");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("scanner, per stream of 43 frames", |b| {
        b.iter(|| {
            let mut s = SseScanner::default();
            let mut n = 0;
            for f in &frames {
                s.feed(f, &mut |_: &[u8]| n += 1).unwrap();
            }
            black_box(n)
        })
    });
    g.finish();
}

fn tap(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let frames: Arc<[Bytes]> = stream_frames().into();
    let acct = Arc::new(Accounting {
        metrics: Arc::new(Metrics::new()),
        ledger: Ledger::start(Store::memory().unwrap(), None),
        charger: None,
    });
    let mut g = c.benchmark_group("tap");
    g.throughput(Throughput::Elements(frames.len() as u64));
    for strip in [false, true] {
        let name = if strip {
            "per stream, stripping injected usage"
        } else {
            "per stream, passthrough"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let tap = Tap::over_frames(frames.clone(), strip, acct.clone());
                rt.block_on(async { black_box(tap.collect().await.unwrap().to_bytes()) })
            })
        });
    }
    g.finish();
}

fn cache_key(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let policy = CachePolicy {
        mode: config::CacheMode::All,
        ..CachePolicy::default()
    };
    let cache = ResponseCache::new(
        &policy,
        Arc::new(Models::new(std::time::Duration::from_secs(60))),
        Arc::new(Metrics::new()),
    );
    let req = ChatRequest::parse(request_body()).unwrap();
    let caller = Caller::server(Arc::from("bench"));
    let bots = vec!["claude-sonnet-4.5".to_string()];
    c.bench_function("cache key (canonical JSON + SHA-256)", |b| {
        b.iter(|| black_box(cache.plan(&caller, &req, &bots)))
    });
}

fn ledger_enqueue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ledger = rt.block_on(async { Ledger::start(Store::memory().unwrap(), None) });
    let row = UsageRow {
        request_id: "bench".into(),
        model: "claude".into(),
        bot: "claude-sonnet-4.5".into(),
        outcome: "completed",
        ..UsageRow::default()
    };
    c.bench_function("ledger enqueue (request path side)", |b| {
        b.iter(|| ledger.record(black_box(row.clone())))
    });
}

criterion_group!(
    benches,
    parse_and_rewrite,
    sse_scan,
    tap,
    cache_key,
    ledger_enqueue
);
criterion_main!(benches);
