//! Token buckets that limit a device's bytes and operations per second.

use std::time::Instant;

use crate::config::{RateLimitConfig, TokenBucketConfig};

/// One bucket: `size` tokens refilled linearly over `refill_ms`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    refill_ms: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(cfg: TokenBucketConfig) -> Self {
        TokenBucket { size: cfg.size.max(1), refill_ms: cfg.refill_ms.max(1), tokens: cfg.size.max(1) as f64, last: Instant::now() }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1000.0;
        self.last = now;
        self.tokens = (self.tokens + ms * self.size as f64 / self.refill_ms as f64).min(self.size as f64);
    }

    /// Takes `n` tokens if there are enough. A request larger than the
    /// bucket is allowed once the bucket is full, so it cannot stall forever.
    pub fn consume(&mut self, n: u64) -> bool {
        self.refill();
        let need = (n as f64).min(self.size as f64);
        if self.tokens >= need {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// Milliseconds until `n` tokens are there.
    pub fn wait_ms(&self, n: u64) -> u64 {
        let need = (n as f64).min(self.size as f64) - self.tokens;
        if need <= 0.0 {
            0
        } else {
            (need * self.refill_ms as f64 / self.size as f64).ceil() as u64 + 1
        }
    }
}

/// A bandwidth bucket and an operations bucket; either may be absent.
#[derive(Clone, Debug, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Times a request had to wait.
    pub throttled: u64,
    blocked_until_ms: Option<u64>,
}

impl RateLimiter {
    /// Builds the limiter from its config (None: unlimited).
    pub fn new(cfg: Option<RateLimitConfig>) -> Self {
        let cfg = cfg.unwrap_or_default();
        RateLimiter {
            bytes: cfg.bandwidth.map(TokenBucket::new),
            ops: cfg.ops.map(TokenBucket::new),
            throttled: 0,
            blocked_until_ms: None,
        }
    }

    /// Takes one operation of `bytes`; false means wait `blocked_ms()`.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if let Some(o) = &mut self.ops {
            if !o.consume(1) {
                self.throttled += 1;
                self.blocked_until_ms = Some(o.wait_ms(1));
                return false;
            }
        }
        if let Some(b) = &mut self.bytes {
            if !b.consume(bytes) {
                if let Some(o) = &mut self.ops {
                    o.tokens += 1.0;
                }
                self.throttled += 1;
                self.blocked_until_ms = Some(b.wait_ms(bytes));
                return false;
            }
        }
        self.blocked_until_ms = None;
        true
    }

    /// When the last refused request may be retried.
    pub fn blocked_ms(&self) -> Option<u64> {
        self.blocked_until_ms
    }

    /// Forgets a pending refusal (the queue was reset).
    pub fn clear(&mut self) {
        self.blocked_until_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_limits_then_refills() {
        let mut l = RateLimiter::new(Some(RateLimitConfig {
            bandwidth: Some(TokenBucketConfig { size: 1000, refill_ms: 100 }),
            ops: None,
        }));
        assert!(l.consume(600));
        assert!(!l.consume(600));
        assert!(l.blocked_ms().unwrap() > 0);
        std::thread::sleep(std::time::Duration::from_millis(l.blocked_ms().unwrap()));
        assert!(l.consume(600));
        let mut u = RateLimiter::new(None);
        assert!((0..1000).all(|_| u.consume(1 << 20)));
    }
}
