//! Bounds on what peers can make us do: per-peer token buckets and the network's size limits.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The longest identify agent string kept per connected peer, in bytes (cut at a character
/// boundary, control characters dropped).
pub const MAX_AGENT_LEN: usize = 96;

/// A token-bucket rate: `burst` at once, refilled at `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: f64,
    pub per_sec: f64,
}

/// Every size, count and rate limit of the network layer. Defaults are documented in
/// `specs/network.md`, "Limits".
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most DHT value records held.
    pub max_dht_records: usize,
    /// Most providers held per provider key.
    pub max_providers_per_key: usize,
    /// Most keys this node provides.
    pub max_provided_keys: usize,
    /// Most foreign DHT records held from one publishing peer (`record_store`).
    pub max_dht_records_per_peer: usize,
    /// Inbound DHT PUT and ADD_PROVIDER requests per peer.
    pub dht_puts_per_peer: Rate,
    /// Invalid DHT PUTs a peer may have outstanding before its PUTs are ignored unread; each
    /// also lowers its gossipsub score by 10.
    pub bad_puts_per_peer: u32,
    /// One invalid PUT is forgiven every this long.
    pub bad_put_forgive: Duration,
    /// DHT lookups that one peer's attestations of unknown ELMs may cause.
    pub lookups_per_peer: Rate,
    /// DHT lookups of unknown ELMs running at once (beyond: skipped; the next sync finds
    /// what was real).
    pub max_unknown_lookups: usize,
    /// Gossip messages validated per propagating peer (beyond: ignored, not forwarded).
    pub gossip_per_peer: Rate,
    /// Most established connections in total, and per peer.
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Most pending incoming connections.
    pub max_pending_incoming: u32,
    /// Capacity of the command channel into the event loop.
    pub command_queue: usize,
    /// Capacity of the event channel from the event loop to the node's worker.
    pub event_queue: usize,
    /// Most Kademlia routing-table peers from one subnet (IPv4 /24, IPv6 /48): an eclipse
    /// defence (`diversity`).
    pub max_peers_per_subnet: usize,
    /// Apply that limit to loopback, private and link-local addresses too (off: a LAN or a
    /// test network shares a subnet honestly).
    pub limit_local_subnets: bool,
    /// Gossip messages waiting for their SQLite write on the store thread (beyond: ignored).
    pub store_queue: usize,
    /// Most concurrent DHT queries started by commands.
    pub max_pending_queries: usize,
    /// How many peers' rate buckets are remembered.
    pub max_tracked_peers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_dht_records: 8192,
            max_dht_records_per_peer: 256,
            max_providers_per_key: 20,
            max_provided_keys: 4096,
            dht_puts_per_peer: Rate {
                burst: 128.0,
                per_sec: 8.0,
            },
            bad_puts_per_peer: 8,
            bad_put_forgive: Duration::from_secs(60),
            lookups_per_peer: Rate {
                burst: 4.0,
                per_sec: 0.2,
            },
            max_unknown_lookups: 4,
            gossip_per_peer: Rate {
                burst: 256.0,
                per_sec: 32.0,
            },
            max_connections: 256,
            max_connections_per_peer: 1,
            max_pending_incoming: 64,
            command_queue: 256,
            event_queue: 256,
            store_queue: 1024,
            max_peers_per_subnet: 8,
            limit_local_subnets: false,
            max_pending_queries: 256,
            max_tracked_peers: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-key token buckets, at most `max_keys` remembered (full buckets are forgotten first).
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        RateLimiter {
            rate,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key` at `now`; false when the bucket is empty.
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            let rate = self.rate;
            self.buckets
                .retain(|_, b| refill(rate, *b, now) < rate.burst);
            if self.buckets.len() >= self.max_keys {
                return false;
            }
        }
        let rate = self.rate;
        let b = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        let tokens = refill(rate, *b, now);
        if tokens >= 1.0 {
            *b = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            true
        } else {
            *b = Bucket { tokens, at: now };
            false
        }
    }
}

/// Failures charged to peers and forgiven over time: each failure costs one unit and one unit
/// is forgiven every `forgive_every`; a peer with `budget` or more units outstanding is not
/// asked. A peer that failed for a passing reason (a restart, a flaky link) is tried again
/// later; one that keeps failing stays out.
#[derive(Debug)]
pub struct ErrorBudget<K> {
    budget: u32,
    forgive_every: Duration,
    max_keys: usize,
    charged: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq + Clone> ErrorBudget<K> {
    pub fn new(budget: u32, forgive_every: Duration, max_keys: usize) -> Self {
        ErrorBudget {
            budget,
            forgive_every,
            max_keys: max_keys.max(1),
            charged: HashMap::new(),
        }
    }

    fn outstanding_at(&self, units: f64, at: Instant, now: Instant) -> f64 {
        let forgiven = if self.forgive_every.is_zero() {
            f64::INFINITY
        } else {
            now.saturating_duration_since(at).as_secs_f64() / self.forgive_every.as_secs_f64()
        };
        (units - forgiven).max(0.0)
    }

    /// Units outstanding for `key` at `now`, rounded up.
    pub fn outstanding(&self, key: &K, now: Instant) -> u32 {
        self.charged
            .get(key)
            .map_or(0, |&(u, at)| self.outstanding_at(u, at, now).ceil() as u32)
    }

    /// Whether `key` has spent its budget.
    pub fn spent(&self, key: &K, now: Instant) -> bool {
        self.outstanding(key, now) >= self.budget
    }

    /// Charges one failure to `key`.
    pub fn charge(&mut self, key: &K, now: Instant) {
        if !self.charged.contains_key(key) && self.charged.len() >= self.max_keys {
            let charged = std::mem::take(&mut self.charged);
            self.charged = charged
                .into_iter()
                .filter(|&(_, (u, at))| self.outstanding_at(u, at, now) > 0.0)
                .collect();
            if self.charged.len() >= self.max_keys {
                // Full of peers still in debt: forget the one charged longest ago.
                if let Some(oldest) = self
                    .charged
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
                {
                    self.charged.remove(&oldest);
                }
            }
        }
        let units = self
            .charged
            .get(key)
            .map_or(0.0, |&(u, at)| self.outstanding_at(u, at, now));
        self.charged.insert(key.clone(), (units + 1.0, now));
    }
}

fn refill(rate: Rate, b: Bucket, now: Instant) -> f64 {
    let dt = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + dt * rate.per_sec).min(rate.burst)
}

/// A node's clock: the system's, shifted by `skew_secs`. Real nodes run at 0; tests play a
/// node whose clock is minutes off (issue 13: leases and expiry must hold under +-5 minutes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clock {
    pub skew_secs: i64,
}

impl Clock {
    /// Seconds since the Unix epoch, as this node's clock reads them.
    pub fn now(&self) -> u64 {
        now_secs().saturating_add_signed(self.skew_secs)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_a_burst_and_refills() {
        let mut r = RateLimiter::new(
            Rate {
                burst: 3.0,
                per_sec: 1.0,
            },
            2,
        );
        let t0 = Instant::now();
        assert!((0..3).all(|_| r.allow(&"a", t0)));
        assert!(!r.allow(&"a", t0));
        assert!(r.allow(&"a", t0 + Duration::from_secs(1)));
        assert!(r.allow(&"b", t0));
        // A third key when two are tracked and neither is full: refused.
        assert!(!r.allow(&"c", t0));
        // Once "b" has refilled it is forgotten and "c" gets a bucket.
        assert!(r.allow(&"c", t0 + Duration::from_secs(10)));
    }

    #[test]
    fn error_budget_is_spent_then_forgiven() {
        let t0 = Instant::now();
        let min = Duration::from_secs(60);
        let mut b = ErrorBudget::new(3, min, 2);
        assert!(!b.spent(&"p", t0));
        for _ in 0..3 {
            b.charge(&"p", t0);
        }
        assert!(b.spent(&"p", t0));
        assert_eq!(b.outstanding(&"p", t0), 3);
        // One unit forgiven per minute: asked again after one, spent again at the next failure.
        assert!(b.spent(&"p", t0 + min / 2));
        assert!(!b.spent(&"p", t0 + min));
        b.charge(&"p", t0 + min);
        assert!(b.spent(&"p", t0 + min));
        assert_eq!(b.outstanding(&"p", t0 + 10 * min), 0);
        // Bounded memory: a third peer pushes out the one charged longest ago.
        b.charge(&"q", t0 + min);
        b.charge(&"r", t0 + 2 * min);
        assert_eq!(b.outstanding(&"r", t0 + 2 * min), 1);
        assert_eq!(b.charged.len(), 2);
    }
}
