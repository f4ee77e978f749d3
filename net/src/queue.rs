//! The verification queue, fair per trainer: jobs wait in one line per trainer and the
//! workers take from the lines in turn, so one trainer's flood of records (say, eight sybil
//! announcements a second) waits behind itself, not in front of everyone else's ELM. Each
//! trainer may have at most `per_key` jobs waiting and all together at most `total`; beyond
//! that a job is refused (its gossip message is ignored, not forwarded, and the record comes
//! again with the next sync).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// This key already has `per_key` jobs waiting.
    Key,
    /// `total` jobs are waiting.
    Total,
}

/// A queue served round-robin by key.
#[derive(Debug)]
pub struct FairQueue<K, T> {
    state: Mutex<State<K, T>>,
    ready: Notify,
    per_key: usize,
    total: usize,
}

#[derive(Debug)]
struct State<K, T> {
    lines: HashMap<K, VecDeque<T>>,
    /// Keys with jobs waiting, in the order they are served next.
    turn: VecDeque<K>,
    len: usize,
}

impl<K: Hash + Eq + Clone, T> FairQueue<K, T> {
    /// A queue holding at most `per_key` jobs per key and `total` in all (each at least 1).
    pub fn new(per_key: usize, total: usize) -> Self {
        FairQueue {
            state: Mutex::new(State {
                lines: HashMap::new(),
                turn: VecDeque::new(),
                len: 0,
            }),
            ready: Notify::new(),
            per_key: per_key.max(1),
            total: total.max(1),
        }
    }

    /// Queues `job` under `key`; gives it back when the key's line or the queue is full.
    pub fn push(&self, key: K, job: T) -> Result<(), (Full, T)> {
        {
            let Ok(mut s) = self.state.lock() else {
                return Err((Full::Total, job));
            };
            if s.len >= self.total {
                return Err((Full::Total, job));
            }
            let line = s.lines.entry(key.clone()).or_default();
            if line.len() >= self.per_key {
                return Err((Full::Key, job));
            }
            line.push_back(job);
            if line.len() == 1 {
                s.turn.push_back(key);
            }
            s.len += 1;
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, taking the lines in turn, if any is waiting.
    pub fn try_pop(&self) -> Option<T> {
        let mut s = self.state.lock().ok()?;
        let key = s.turn.pop_front()?;
        let line = s.lines.get_mut(&key)?;
        let job = line.pop_front();
        if line.is_empty() {
            s.lines.remove(&key);
        } else {
            s.turn.push_back(key);
        }
        if job.is_some() {
            s.len -= 1;
        }
        job
    }

    /// Waits for the next job.
    pub async fn pop(&self) -> T {
        loop {
            // Registered before looking, so a push between the look and the wait is not missed.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(job) = self.try_pop() {
                return job;
            }
            notified.await;
        }
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.len)
    }

    /// Whether no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_flooding_key_waits_behind_itself_and_is_capped() {
        let q = FairQueue::new(4, 10);
        for i in 0..4 {
            q.push("sybil", i).expect("room");
        }
        assert_eq!(q.push("sybil", 4), Err((Full::Key, 4)));
        q.push("honest", 100).expect("room");
        // The honest job is served second, not fifth.
        assert_eq!(q.try_pop(), Some(0));
        assert_eq!(q.try_pop(), Some(100));
        assert_eq!(q.try_pop(), Some(1));
        assert_eq!(q.len(), 2);
        for k in ["a", "b", "c", "d", "e", "f", "g", "h"] {
            let _ = q.push(k, 7);
        }
        assert_eq!(q.len(), 10);
        assert_eq!(q.push("late", 8), Err((Full::Total, 8)));
        let mut n = 0;
        while q.try_pop().is_some() {
            n += 1;
        }
        assert_eq!(n, 10);
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn pop_waits_for_a_push() {
        let q = std::sync::Arc::new(FairQueue::new(1, 1));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        q.push(1u8, "job").expect("room");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("join");
        assert_eq!(got, "job");
    }
}
