//! When and how long a client waits before trying a call again: exponential backoff with
//! jitter, or the server's `retry-after` where it gives one.

use std::time::Duration;

use tonic::{Code, Status};

/// Exponential backoff: the n-th retry waits a random time between half and all of
/// `first × 2ⁿ`, capped at `max` (jitter keeps many clients from retrying in step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    /// Retries in a row without progress before the job gives up.
    pub retries: u32,
}

impl Default for Backoff {
    /// About 50 s of retries in all: a server restart (a crash replays its log in under a
    /// second; a clean start loads the model in a few) fits well inside.
    fn default() -> Self {
        Self { first: Duration::from_millis(100), max: Duration::from_secs(10), retries: 10 }
    }
}

impl Backoff {
    /// The wait before retry `attempt` (0 is the first retry); `unit` is uniform in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let full = self.first.saturating_mul(1u32 << attempt.min(20)).min(self.max);
        full.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// The wait before retry `attempt` after `status`: the server's retry-after if it gave one
    /// (never more than `max`), else the backoff with fresh jitter.
    pub fn delay_after(&self, attempt: u32, status: &Status) -> Duration {
        match retry_after(status) {
            Some(wait) => wait.min(self.max),
            None => self.delay(attempt, jitter()),
        }
    }
}

/// A number uniform in [0, 1) that differs between calls and processes (jitter needs no
/// more: the clock's nanoseconds and a counter, mixed by splitmix64).
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ u64::from(std::process::id());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a call that failed with `status` may succeed if sent again: the server was away or
/// shutting down (UNAVAILABLE, or CANCELLED when it reset the stream), it was busy
/// (RESOURCE_EXHAUSTED: its call, stream or model-queue limits), or the connection broke
/// under the call (tonic reports a connection cut mid-stream as UNKNOWN, with the I/O error as
/// its source). Everything else is the request's own fault or a server fault that repeats.
pub fn is_retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::ResourceExhausted | Code::Cancelled) || broke_in_transit(status)
}

/// The status was made on this side from a failure of the connection: a status the server
/// sends arrives in trailers and carries no source, while tonic makes UNKNOWN ones from the
/// transport's errors (hyper's, whose inner h2 error hides the I/O error) with the error as
/// the source.
fn broke_in_transit(status: &Status) -> bool {
    if status.code() == Code::Unknown && std::error::Error::source(status).is_some() {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<std::io::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The wait a server asks for in a `retry-after` header (seconds, as in HTTP).
pub fn retry_after(status: &Status) -> Option<Duration> {
    let value = status.metadata().get("retry-after")?.to_str().ok()?;
    let seconds: f64 = value.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds.min(3600.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_its_jitter_and_stops_at_the_cap() {
        let backoff = Backoff { first: Duration::from_millis(100), max: Duration::from_secs(2), retries: 5 };
        assert_eq!(backoff.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(backoff.delay(0, 0.999_999).as_millis(), 99);
        assert_eq!(backoff.delay(3, 0.0), Duration::from_millis(400));
        assert_eq!(backoff.delay(30, 1.0), Duration::from_secs(2));
        for attempt in 0..40 {
            for unit in [0.0, 0.3, 0.7, 1.0] {
                let d = backoff.delay(attempt, unit);
                assert!(d >= Duration::from_millis(50) && d <= backoff.max, "{attempt} {unit} {d:?}");
            }
        }
    }

    #[test]
    fn jitter_stays_in_its_range_and_varies() {
        let draws: Vec<f64> = (0..1000).map(|_| jitter()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }

    #[test]
    fn retry_after_is_read_and_bounded() {
        let mut status = Status::resource_exhausted("busy");
        assert_eq!(retry_after(&status), None);
        status.metadata_mut().insert("retry-after", "1.5".parse().unwrap());
        assert_eq!(retry_after(&status), Some(Duration::from_millis(1500)));
        let backoff = Backoff { max: Duration::from_secs(1), ..Backoff::default() };
        assert_eq!(backoff.delay_after(0, &status), Duration::from_secs(1));
        status.metadata_mut().insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&status), None);
        status.metadata_mut().insert("retry-after", "-3".parse().unwrap());
        assert_eq!(retry_after(&status), None);
    }

    #[test]
    fn only_transient_codes_are_retried() {
        assert!(is_retryable(&Status::unavailable("restarting")));
        assert!(is_retryable(&Status::resource_exhausted("busy")));
        let cut = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed because of a broken pipe");
        let in_transit = Status::from_error(Box::new(cut));
        assert_eq!(in_transit.code(), Code::Unknown);
        assert!(is_retryable(&in_transit), "a connection that broke under the call");
        assert!(!is_retryable(&Status::unknown("the server said so")));
        for status in [
            Status::invalid_argument("x"),
            Status::not_found("x"),
            Status::unauthenticated("x"),
            Status::permission_denied("x"),
            Status::internal("x"),
            Status::data_loss("x"),
        ] {
            assert!(!is_retryable(&status), "{status:?}");
        }
    }
}
