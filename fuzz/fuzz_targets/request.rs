//! The request normaliser (src/gateway/request.rs) and the cache key (src/gateway/cache.rs)
//! on arbitrary bytes.
//!
//! `ChatRequest::parse` either refuses with a 400 or gives a request whose upstream body,
//! for any bot name:
//! - is one JSON object the gateway itself accepts again (`ChatRequest::parse`);
//! - has `model` set to the bot, every other member unchanged (same raw text, same order),
//!   except `stream_options`, which gains `include_usage: true` (its other members kept) when
//!   the gateway injects usage for a stream;
//! - is the client's bytes themselves when nothing changes.
//!
//! The cache key is deterministic, ignores the order of members, and is the same for the
//! client's body and the upstream body (which differ only in `model` and `stream_options`).

#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use poe_gateway::config::{CacheMode, CachePolicy};
use poe_gateway::gateway::cache::{CacheKey, ResponseCache};
use poe_gateway::gateway::json::TopLevel;
use poe_gateway::gateway::models::Models;
use poe_gateway::gateway::{Caller, ChatRequest};
use poe_gateway::metrics::Metrics;
use serde_json::{Map, Value};

struct Env {
    cache: ResponseCache,
    caller: Caller,
}

static ENV: LazyLock<Env> = LazyLock::new(|| {
    let policy = CachePolicy {
        mode: CacheMode::All,
        ..CachePolicy::default()
    };
    Env {
        cache: ResponseCache::new(
            &policy,
            Arc::new(Models::new(Duration::from_secs(60))),
            Arc::new(Metrics::new()),
        ),
        caller: Caller::server(Arc::from("fuzz")),
    }
});

fn key(req: &ChatRequest, bot: &str) -> Option<CacheKey> {
    let plan = ENV.cache.plan(&ENV.caller, req, &[bot.to_string()])?;
    Some(plan.key)
}

/// Top-level members as (key, raw value text), in order.
fn members(body: &[u8]) -> Vec<(String, String)> {
    let text = std::str::from_utf8(body).expect("the upstream body is UTF-8");
    let top = TopLevel::parse(text).unwrap_or_else(|e| {
        panic!("the upstream body is not one JSON object ({e}): {text:?}");
    });
    top.0
        .iter()
        .map(|(k, v)| (k.to_string(), v.get().to_string()))
        .collect()
}

fn get<'a>(m: &'a [(String, String)], name: &str) -> Option<&'a str> {
    m.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn check_upstream(req: &ChatRequest, bot: &str) {
    let up = req.upstream_body(bot);
    if bot == req.model() && !req.injects_usage() {
        assert_eq!(&up, req.body(), "nothing to change, yet the body changed");
    }
    let before = members(req.body());
    let after = members(&up);

    let model: String = serde_json::from_str(get(&after, "model").expect("model is kept"))
        .expect("model is a string");
    assert_eq!(model, bot);

    let others = |m: &[(String, String)]| -> Vec<(String, String)> {
        m.iter()
            .filter(|(k, _)| k != "model" && k != "stream_options")
            .cloned()
            .collect()
    };
    assert_eq!(
        others(&after),
        others(&before),
        "members other than model and stream_options changed"
    );

    let opts_before = get(&before, "stream_options");
    let opts_after = get(&after, "stream_options");
    if req.injects_usage() {
        let after: Map<String, Value> = serde_json::from_str(opts_after.expect("injected"))
            .expect("stream_options is an object");
        assert_eq!(after.get("include_usage"), Some(&Value::Bool(true)));
        let before: Map<String, Value> = opts_before
            .and_then(|o| serde_json::from_str(o).ok())
            .unwrap_or_default();
        for (k, v) in &before {
            if k != "include_usage" {
                // The gateway prints the parsed value again; serde_json's float parsing is
                // not exact to the last bit, so compare with what that printing reads back as.
                let printed: Value = serde_json::from_str(&v.to_string()).expect("reparses");
                assert_eq!(after.get(k), Some(&printed), "stream_options.{k} changed");
            }
        }
        assert_eq!(
            after.len(),
            before.len() + usize::from(!before.contains_key("include_usage")),
            "stream_options gained members"
        );
    } else {
        assert_eq!(opts_after, opts_before, "stream_options changed");
    }

    // The gateway accepts its own upstream body, and reads the same request from it.
    let again = ChatRequest::parse(up.clone()).unwrap_or_else(|e| {
        panic!(
            "the upstream body is refused ({e}): {:?}",
            String::from_utf8_lossy(&up)
        )
    });
    assert_eq!(again.model(), bot);
    assert_eq!(again.stream(), req.stream());
    assert_eq!(again.include_usage(), req.include_usage() || req.stream());
    assert!(!again.injects_usage());
    assert_eq!(
        again.temperature().map(f64::to_bits),
        req.temperature().map(f64::to_bits)
    );
    assert_eq!(again.max_tokens(), req.max_tokens());
    assert_eq!(again.has_seed(), req.has_seed());

    // The cache key: deterministic, and blind to model and stream_options.
    // Keyed only when the body is JSON; and when it is, unless a number in it is a whole
    // float too large to key exactly (2^53 and past: two different ones would share a key),
    // which needs 16 digits or an exponent in its text. (Duplicate members hide such a
    // number from a `Value`, so the text is what is checked.)
    let k = key(req, bot);
    let json = serde_json::from_slice::<Value>(req.body()).is_ok();
    assert!(k.is_none() || json, "a key for a body that is no JSON");
    assert!(
        k.is_some() || !json || may_hold_a_large_number(req.body()),
        "no key for a JSON body"
    );
    assert_eq!(k, key(req, bot), "the cache key is not deterministic");
    assert_eq!(
        key(&again, bot),
        k,
        "the upstream body has another cache key"
    );
}

/// Whether `body` has a run of 16 digits or a digit before an exponent: the only ways to
/// write a whole number of 2^53 or more.
fn may_hold_a_large_number(body: &[u8]) -> bool {
    let mut run = 0;
    for (i, b) in body.iter().enumerate() {
        if b.is_ascii_digit() {
            run += 1;
            if run >= 16 {
                return true;
            }
        } else {
            if run > 0 && (*b == b'e' || *b == b'E') && i + 1 < body.len() {
                return true;
            }
            run = 0;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    let req = match ChatRequest::parse(Bytes::copy_from_slice(data)) {
        Ok(req) => req,
        Err(e) => {
            assert_eq!(e.status(), 400, "{e}");
            assert!(!e.to_string().is_empty());
            let _ = e.to_json();
            return;
        }
    };
    let model = req.model().to_string();
    for bot in [
        model.as_str(),
        "Claude-Sonnet-4.5",
        // Every kind of character JSON escapes or may escape, but no control character:
        // the gateway refuses a model name with one (a NUL broke the ledger's batch).
        "we\"ird\\bot \u{e9}\u{2028}\u{1f600}/",
    ] {
        check_upstream(&req, bot);
    }

    // Members in reverse order: the same request, the same cache key.
    let m = members(req.body());
    let reversed: Vec<String> = m
        .iter()
        .rev()
        .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
        .collect();
    let reversed = format!("{{{}}}", reversed.join(","));
    let r = ChatRequest::parse(Bytes::from(reversed)).expect("the same members parse again");
    assert_eq!(r.model(), req.model());
    assert_eq!(
        key(&r, "b"),
        key(&req, "b"),
        "member order changed the cache key"
    );
});
