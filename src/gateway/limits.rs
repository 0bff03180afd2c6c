//! Upstream protection: a GCRA limiter per upstream key keeps the gateway under Poe's
//! requests-per-minute limit, and a semaphore caps concurrent upstream requests.
//!
//! A request that finds the limiter full waits, up to `limits.queue_timeout`, instead of firing
//! into Poe's own 429s; past that it gets a 429 with `Retry-After`.

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{FailurePolicy, LimitsPolicy};
use crate::error::GatewayError;
use crate::shared_state::{SharedState, limiter_id};
use crate::upstream::Secret;

/// governor's clock on tokio time, so paused-time tests drive the limiters too.
#[derive(Clone, Debug)]
pub struct TokioClock {
    start: Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        TokioClock {
            start: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Limiter = RateLimiter<u64, HashMapStateStore<u64>, TokioClock, NoOpMiddleware<Duration>>;

pub struct UpstreamLimits {
    limiter: Limiter,
    clock: TokioClock,
    hasher: RandomState,
    queue_timeout: Duration,
    concurrency: Arc<Semaphore>,
    admitted: AtomicU64,
    /// With Redis, one schedule per upstream key for all replicas.
    shared: Option<Arc<SharedState>>,
    on_error: FailurePolicy,
    /// The quota as GCRA parameters, for the shared limiter.
    interval: Duration,
    burst: u32,
}

impl UpstreamLimits {
    pub fn new(policy: &LimitsPolicy) -> Self {
        UpstreamLimits::with_shared(policy, None, FailurePolicy::FailOpen)
    }

    pub fn with_shared(
        policy: &LimitsPolicy,
        shared: Option<Arc<SharedState>>,
        on_error: FailurePolicy,
    ) -> Self {
        let clock = TokioClock {
            start: Instant::now(),
        };
        let (interval, burst) = schedule(policy.upstream_rpm);
        UpstreamLimits {
            shared,
            on_error,
            interval,
            burst,
            limiter: RateLimiter::hashmap_with_clock(quota(policy.upstream_rpm), clock.clone()),
            clock,
            hasher: RandomState::new(),
            queue_timeout: policy.queue_timeout,
            concurrency: Arc::new(Semaphore::new(policy.max_concurrent_upstream as usize)),
            admitted: AtomicU64::new(0),
        }
    }

    /// A slot to call upstream with `key` if one is free now, without waiting: the common
    /// case, kept out of [`admit`](Self::admit)'s future. `None` when the request would
    /// wait for either slot, or when the rate limiter is the one replicas share (a round trip
    /// to Redis); `admit` then decides.
    pub fn admit_now(&self, key: &Secret) -> Option<OwnedSemaphorePermit> {
        if self.shared.is_some() {
            return None;
        }
        // Concurrency first, as in `admit`; a refused rate check spends no slot.
        let permit = self.concurrency.clone().try_acquire_owned().ok()?;
        self.limiter.check_key(&self.local_id(key)).ok()?;
        self.admitted_locally();
        Some(permit)
    }

    /// Waits for a slot to call upstream with `key`, up to `limits.queue_timeout`, or until
    /// `closed` resolves (the end of a shutdown's grace: a 503 then, rather than a request
    /// cut off with its connection). The permit is held for as long as the upstream
    /// response lives (a stream holds it to its end).
    pub async fn admit(
        &self,
        key: &Secret,
        closed: impl Future<Output = ()>,
    ) -> Result<OwnedSemaphorePermit, GatewayError> {
        tokio::select! {
            admitted = self.wait_for_slots(key) => admitted,
            () = closed => Err(GatewayError::ShuttingDown(
                "the gateway is shutting down: its shutdown grace ran out while the request \
                 waited for the upstream rate limit (limits.upstream_rpm)"
                    .into(),
            )),
        }
    }

    /// The concurrency slot comes first, the rate slot last: a rate slot is spent when taken,
    /// and one taken by a request that then timed out waiting for concurrency (or whose client
    /// left meanwhile) would hold back requests that Poe never saw.
    async fn wait_for_slots(&self, key: &Secret) -> Result<OwnedSemaphorePermit, GatewayError> {
        let deadline = Instant::now() + self.queue_timeout;
        let permit = match tokio::time::timeout_at(
            deadline,
            self.concurrency.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(GatewayError::Overloaded(
                        "too many concurrent upstream requests (limits.max_concurrent_upstream); retry shortly"
                            .into(),
                    ));
            }
        };
        if !self.admit_shared(key, deadline).await? {
            self.admit_local(key, deadline).await?;
        }
        Ok(permit)
    }

    /// Takes a slot from the limiter all replicas share. `Ok(false)`: there is none (no Redis,
    /// or Redis is down and the policy is `fail_open`), so the local limiter decides.
    async fn admit_shared(&self, key: &Secret, deadline: Instant) -> Result<bool, GatewayError> {
        let Some(shared) = &self.shared else {
            return Ok(false);
        };
        let id = limiter_id(key.expose());
        loop {
            match shared.rate(&id, self.interval, self.burst).await {
                Ok(None) => return Ok(true),
                Ok(Some(wait)) => {
                    if Instant::now() + wait > deadline {
                        return Err(held(wait));
                    }
                    // A little jitter, so replicas that waited together do not retry together.
                    let jitter = Duration::from_micros(fastrand::u64(0..=1000));
                    tokio::time::sleep(wait + jitter).await;
                }
                Err(e) if self.on_error == FailurePolicy::FailClosed => {
                    tracing::debug!(error = %e, "the shared upstream rate limiter is unavailable");
                    return Err(GatewayError::StateUnavailable(
                        "the shared upstream rate limiter is unavailable (shared state is down); \
                         retry shortly"
                            .into(),
                    ));
                }
                Err(_) => return Ok(false),
            }
        }
    }

    async fn admit_local(&self, key: &Secret, deadline: Instant) -> Result<(), GatewayError> {
        let id = self.local_id(key);
        loop {
            match self.limiter.check_key(&id) {
                Ok(()) => break,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    if Instant::now() + wait > deadline {
                        return Err(held(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
        self.admitted_locally();
        Ok(())
    }

    /// The key's name in the local limiter. The key itself is never stored: only a hash with
    /// a per-process random seed.
    fn local_id(&self, key: &Secret) -> u64 {
        self.hasher.hash_one(key.expose())
    }

    fn admitted_locally(&self) {
        // Forget idle keys now and then, so passthrough keys do not accumulate.
        if self.admitted.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.limiter.retain_recent();
        }
    }
}

fn held(wait: Duration) -> GatewayError {
    GatewayError::RateLimited {
        message: format!(
            "the gateway is holding requests to Poe under its per-key rate limit; retry in {:.1}s",
            wait.as_secs_f64()
        ),
        retry_after: Some(wait),
    }
}

/// The upstream quota as a GCRA schedule: the emission interval and the burst.
fn schedule(rpm: u32) -> (Duration, u32) {
    let burst = (rpm / 10).max(1);
    let sustained = rpm.saturating_sub(burst).max(1);
    (Duration::from_secs(60) / sustained, burst)
}

/// A quota that never exceeds `rpm` in any 60-second window: a burst of a tenth of the limit,
/// refilled at the rest. A plain per-minute quota would allow `2 * rpm` across a window edge.
fn quota(rpm: u32) -> Quota {
    let (period, burst) = schedule(rpm);
    Quota::with_period(period)
        .expect("non-zero period")
        .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn never_more_than_rpm_in_a_minute() {
        let l = UpstreamLimits::new(&LimitsPolicy {
            upstream_rpm: 60,
            queue_timeout: Duration::from_secs(3600),
            max_concurrent_upstream: 10_000,
        });
        let key = Secret::new("k");
        let start = Instant::now();
        let mut n = 0;
        loop {
            // As the gateway asks: without waiting first, then waiting.
            let _p = match l.admit_now(&key) {
                Some(p) => p,
                None => l.admit(&key, std::future::pending()).await.unwrap(),
            };
            if Instant::now() - start >= Duration::from_secs(60) {
                break;
            }
            n += 1;
        }
        assert!(n <= 60, "{n} admitted in a minute");
        assert!(n >= 50, "{n} admitted in a minute");
    }
}
