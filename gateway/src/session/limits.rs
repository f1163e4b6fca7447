//! A connection's frame budgets (SPEC §9): the frame rate with its burst
//! and strikes, and the per-minute budget of protocol errors.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use crate::{config::Limits, disconnect::Disconnect};

/// Rate-limited frames in a row after which the connection is closed with `4006`.
const RATE_STRIKES: u32 = 10;

pub(super) struct Budget {
    bucket: TokenBucket,
    strikes: u32,
    /// Times of recent protocol errors, for the per-minute budget.
    errors: VecDeque<Instant>,
    errors_per_minute: usize,
}

impl Budget {
    pub(super) fn new(limits: &Limits) -> Self {
        Budget {
            bucket: TokenBucket::new(limits.rate_per_second, limits.rate_burst),
            strikes: 0,
            errors: VecDeque::new(),
            errors_per_minute: limits.protocol_errors_per_minute,
        }
    }

    /// Whether a frame arriving at `now` may be handled; when it may not,
    /// whether the connection is to be closed for it.
    pub(super) fn admit(&mut self, now: Instant) -> Result<(), Option<Disconnect>> {
        if self.bucket.take(now) {
            self.strikes = 0;
            return Ok(());
        }
        self.strikes += 1;
        Err((self.strikes > RATE_STRIKES).then_some(Disconnect::TOO_MANY_REQUESTS))
    }

    /// Counts a protocol error; the close it calls for once the budget is spent.
    pub(super) fn protocol_error(&mut self, now: Instant) -> Option<Disconnect> {
        self.errors.push_back(now);
        while self.errors.front().is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60)) {
            self.errors.pop_front();
        }
        (self.errors.len() >= self.errors_per_minute).then_some(Disconnect::PROTOCOL_ERRORS)
    }
}

/// Frames per second with a burst allowance.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket { tokens: burst as f64, rate: rate as f64, burst: burst as f64, last: Instant::now() }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = TokenBucket { tokens: 3.0, rate: 10.0, burst: 3.0, last: start };
        assert!(b.take(start) && b.take(start) && b.take(start));
        assert!(!b.take(start));
        assert!(b.take(start + Duration::from_millis(100)));
        assert!(!b.take(start + Duration::from_millis(100)));
    }
}
