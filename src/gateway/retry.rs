//! When and how long to retry: status classes, backoff with full jitter, `Retry-After`,
//! and a retry budget so a sick upstream is not hit with a storm.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use tokio::time::Instant;

use crate::config::RetryPolicy;

/// Upstream statuses worth another try: rate limits, overload and transient server faults.
/// 400, 401, 402, 403, 404 and 413 are answers about the request, never retried.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 429 | 500 | 502 | 503 | 504 | 529)
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^retry)]`.
pub fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let cap = policy
        .base_backoff
        .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX))
        .min(policy.max_backoff);
    cap.mul_f64(fastrand::f64())
}

/// How long the upstream asked us to wait before trying again after a `status` answer:
/// `Retry-After` (seconds or an HTTP date), else, for a 429 only, Poe's
/// `x-ratelimit-reset-requests` (seconds, or a duration such as `1s` or `6m0s`). That header
/// says when the key's request window resets: it may come with any answer, and it is no
/// reason to hold back the retry of a 500 or a 503.
pub fn requested_wait(status: http::StatusCode, headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = text("retry-after") {
        if let Some(wait) = seconds(v) {
            return Some(wait);
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return Some(
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            );
        }
    }
    if status != http::StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let v = text("x-ratelimit-reset-requests")?;
    seconds(v).or_else(|| humantime::parse_duration(v).ok())
}

/// A wait written as a number of seconds. One too long for a `Duration` (`1e20`) is read as
/// the longest: still longer than any `max_retry_after`, so the answer goes back to the
/// client, where `Duration::from_secs_f64` would have panicked.
fn seconds(v: &str) -> Option<Duration> {
    let secs = v.parse::<f64>().ok()?;
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// Retries may be at most `ratio` of the requests seen in the last `WINDOW` seconds,
/// plus `min_per_second` so that a quiet gateway can still retry a one-off failure.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window: Mutex<VecDeque<Bucket>>,
}

const WINDOW: u64 = 10;

#[derive(Clone, Copy)]
struct Bucket {
    second: u64,
    requests: u32,
    retries: u32,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        RetryBudget {
            ratio,
            min_per_second,
            window: Mutex::new(VecDeque::with_capacity(WINDOW as usize + 1)),
        }
    }

    /// Counts a new request (not a retry).
    pub fn deposit(&self, now: Instant, epoch: Instant) {
        self.with_bucket(now, epoch, |b| b.requests += 1);
    }

    /// Takes permission for one retry; false when the budget is spent.
    pub fn try_withdraw(&self, now: Instant, epoch: Instant) -> bool {
        let second = now.duration_since(epoch).as_secs();
        let mut w = self.window.lock().expect("retry budget lock");
        Self::expire(&mut w, second);
        let (requests, retries) = w.iter().fold((0u64, 0u64), |(q, r), b| {
            (q + b.requests as u64, r + b.retries as u64)
        });
        let allowed = (requests as f64 * self.ratio) + (self.min_per_second as u64 * WINDOW) as f64;
        if (retries as f64) < allowed {
            Self::bucket(&mut w, second).retries += 1;
            true
        } else {
            false
        }
    }

    fn with_bucket(&self, now: Instant, epoch: Instant, f: impl FnOnce(&mut Bucket)) {
        let second = now.duration_since(epoch).as_secs();
        let mut w = self.window.lock().expect("retry budget lock");
        Self::expire(&mut w, second);
        f(Self::bucket(&mut w, second));
    }

    fn expire(w: &mut VecDeque<Bucket>, second: u64) {
        while w.front().is_some_and(|b| b.second + WINDOW <= second) {
            w.pop_front();
        }
    }

    fn bucket(w: &mut VecDeque<Bucket>, second: u64) -> &mut Bucket {
        if w.back().is_none_or(|b| b.second != second) {
            w.push_back(Bucket {
                second,
                requests: 0,
                retries: 0,
            });
        }
        w.back_mut().expect("just pushed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let requested_wait = |h: &HeaderMap| requested_wait(http::StatusCode::TOO_MANY_REQUESTS, h);
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(requested_wait(&h), Some(Duration::from_secs(2)));
        h.clear();
        h.insert("x-ratelimit-reset-requests", "1m30s".parse().unwrap());
        assert_eq!(requested_wait(&h), Some(Duration::from_secs(90)));
        h.clear();
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert("retry-after", later.parse().unwrap());
        let w = requested_wait(&h).unwrap();
        assert!(w > Duration::from_secs(100) && w <= Duration::from_secs(120));
        for (name, huge) in [
            ("retry-after", "1e20"),
            ("x-ratelimit-reset-requests", "99999999999999999999"),
        ] {
            h.clear();
            h.insert(name, huge.parse().unwrap());
            assert_eq!(requested_wait(&h), Some(Duration::MAX), "{name}: {huge}");
        }
        h.clear();
        h.insert("retry-after", "-1".parse().unwrap());
        assert_eq!(requested_wait(&h), None);
    }

    /// Poe's request-window reset may ride on any answer; only a 429 is held to it.
    #[test]
    fn the_window_reset_only_holds_back_a_429() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", "45s".parse().unwrap());
        for status in [500, 503, 529] {
            let status = http::StatusCode::from_u16(status).unwrap();
            assert_eq!(super::requested_wait(status, &h), None, "{status}");
        }
        h.insert("retry-after", "3".parse().unwrap());
        let unavailable = http::StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            super::requested_wait(unavailable, &h),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn backoff_is_capped() {
        let p = RetryPolicy::default();
        for n in 0..40 {
            assert!(backoff(&p, n) <= p.max_backoff);
        }
    }

    #[test]
    fn budget_limits_retries_to_a_share() {
        let epoch = Instant::now();
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.deposit(epoch, epoch);
        }
        let granted = (0..100).filter(|_| b.try_withdraw(epoch, epoch)).count();
        assert_eq!(granted, 20);
    }
}
