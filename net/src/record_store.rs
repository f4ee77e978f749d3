//! The Kademlia record store: libp2p's `MemoryStore` with a quota per publishing peer, and
//! eviction of foreign records before our own are refused. Records this node holds or
//! publishes (publisher `None` or ourselves) always fit while any foreign record is held.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;
use libp2p::kad::store::{Error, MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};

/// Counters of what the store did, for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Records held now, and of them our own.
    pub records: usize,
    pub own: usize,
    /// Foreign records offered to the store (new keys and replacements).
    pub offered: u64,
    /// Foreign records stored.
    pub stored: u64,
    /// Foreign records evicted to make room (expired ones included).
    pub evicted: u64,
    /// Foreign records refused by the per-publisher quota.
    pub over_quota: u64,
}

/// A `MemoryStore` bounded per publisher.
pub struct BoundedStore {
    inner: MemoryStore,
    local: PeerId,
    max_records: usize,
    max_per_publisher: usize,
    per_publisher: HashMap<PeerId, usize>,
    stats: StoreStats,
}

impl BoundedStore {
    /// `config.max_records` bounds all records; `max_per_publisher` the foreign records from
    /// one peer.
    pub fn new(local: PeerId, config: MemoryStoreConfig, max_per_publisher: usize) -> Self {
        let max_records = config.max_records.max(1);
        BoundedStore {
            // One slot of headroom: replacing is decided here, not by the inner store.
            inner: MemoryStore::with_config(
                local,
                MemoryStoreConfig {
                    max_records: max_records.saturating_add(1),
                    ..config
                },
            ),
            local,
            max_records,
            max_per_publisher: max_per_publisher.max(1),
            per_publisher: HashMap::new(),
            stats: StoreStats::default(),
        }
    }

    fn foreign_publisher(&self, r: &Record) -> Option<PeerId> {
        r.publisher.filter(|p| *p != self.local)
    }

    pub fn stats(&self) -> StoreStats {
        let own = self
            .inner
            .records()
            .filter(|r| self.foreign_publisher(r).is_none())
            .count();
        StoreStats {
            records: self.inner.records().count(),
            own,
            ..self.stats
        }
    }

    /// Removes one foreign record: an expired one if any, else the one expiring soonest of the
    /// publisher holding the most. False when no foreign record is held.
    fn evict_one(&mut self, now: Instant) -> bool {
        let victim = self
            .inner
            .records()
            .filter_map(|r| self.foreign_publisher(&r).map(|p| (p, r)))
            .max_by_key(|(p, r)| {
                let expired = r.is_expired(now);
                let held = self.per_publisher.get(p).copied().unwrap_or(0);
                // Expired first, then the largest publisher, then the soonest expiry.
                let left = r
                    .expires
                    .map_or(u128::MAX, |e| e.saturating_duration_since(now).as_nanos());
                (expired, held, std::cmp::Reverse(left))
            })
            .map(|(_, r)| r.key.clone());
        match victim {
            Some(k) => {
                self.remove(&k);
                self.stats.evicted += 1;
                true
            }
            None => false,
        }
    }
}

impl RecordStore for BoundedStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    fn put(&mut self, r: Record) -> Result<()> {
        let now = Instant::now();
        let publisher = self.foreign_publisher(&r);
        let held = self.inner.get(&r.key).map(|h| self.foreign_publisher(&h));
        if publisher.is_some() {
            self.stats.offered += 1;
            // An own record is never replaced by a foreign copy.
            if held == Some(None) {
                return Err(Error::MaxRecords);
            }
        }
        if let Some(p) = publisher
            && held != Some(Some(p))
            && self.per_publisher.get(&p).copied().unwrap_or(0) >= self.max_per_publisher
        {
            self.stats.over_quota += 1;
            return Err(Error::MaxRecords);
        }
        if held.is_none() && self.inner.records().count() >= self.max_records {
            // Room for an own record is always made; a foreign one only displaces an expired
            // record or one of a publisher holding more than this one would.
            let room = match publisher {
                None => self.evict_one(now),
                Some(p) => {
                    let mine = self.per_publisher.get(&p).copied().unwrap_or(0);
                    let top = self.per_publisher.values().copied().max().unwrap_or(0);
                    let expired = self
                        .inner
                        .records()
                        .any(|h| self.foreign_publisher(&h).is_some() && h.is_expired(now));
                    (expired || top > mine + 1) && self.evict_one(now)
                }
            };
            if !room {
                return Err(Error::MaxRecords);
            }
        }
        if let Some(Some(old)) = held {
            self.unaccount(old);
        }
        self.inner.put(r)?;
        if let Some(p) = publisher {
            *self.per_publisher.entry(p).or_insert(0) += 1;
            self.stats.stored += 1;
        }
        Ok(())
    }

    fn remove(&mut self, k: &RecordKey) {
        if let Some(Some(p)) = self.inner.get(k).map(|h| self.foreign_publisher(&h)) {
            self.unaccount(p);
        }
        self.inner.remove(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        self.inner.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p)
    }
}

impl std::fmt::Debug for BoundedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedStore")
            .field("max_records", &self.max_records)
            .field("max_per_publisher", &self.max_per_publisher)
            .field("publishers", &self.per_publisher.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl BoundedStore {
    fn unaccount(&mut self, p: PeerId) {
        if let Some(n) = self.per_publisher.get_mut(&p) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_publisher.remove(&p);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(i: usize, publisher: Option<PeerId>) -> Record {
        let mut r = Record::new(RecordKey::new(&format!("k{i}")), vec![1]);
        r.publisher = publisher;
        r
    }

    #[test]
    fn own_records_always_fit_and_publishers_have_quotas() {
        let local = PeerId::random();
        let cfg = MemoryStoreConfig {
            max_records: 10,
            ..Default::default()
        };
        let mut s = BoundedStore::new(local, cfg, 4);
        let sybils: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let mut i = 0;
        for p in &sybils {
            for _ in 0..6 {
                i += 1;
                let _ = s.put(rec(i, Some(*p)));
            }
        }
        let st = s.stats();
        assert!(st.records <= 10, "{st:?}");
        assert!(st.over_quota > 0, "{st:?}");
        assert!(s.per_publisher.values().all(|n| *n <= 4));
        // Our own records always fit: foreign ones are evicted.
        for j in 0..8 {
            s.put(rec(1000 + j, Some(local))).unwrap();
        }
        s.put(rec(2000, None)).unwrap();
        let st = s.stats();
        assert_eq!(st.own, 9, "{st:?}");
        assert!(st.records <= 10 && st.evicted > 0, "{st:?}");
        // A foreign copy never replaces an own record.
        assert!(s.put(rec(1000, Some(sybils[0]))).is_err());
        // Expired foreign records make room for new foreign ones.
        let mut s = BoundedStore::new(local, cfg_of(2), 4);
        let mut r = rec(1, Some(sybils[0]));
        r.expires = Some(Instant::now() - Duration::from_secs(1));
        s.put(r).unwrap();
        s.put(rec(2, Some(sybils[1]))).unwrap();
        s.put(rec(3, Some(sybils[2]))).unwrap();
        assert!(s.get(&RecordKey::new(&"k1")).is_none());
    }

    fn cfg_of(n: usize) -> MemoryStoreConfig {
        MemoryStoreConfig {
            max_records: n,
            ..Default::default()
        }
    }
}
