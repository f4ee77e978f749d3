//! A stop request that async code awaits and blocking code (training) polls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A stop request shared by a role's tasks. The command-line program requests it on Ctrl-C or
/// SIGTERM; tests request it directly.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Asks every holder to stop (idempotent).
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once a stop was requested.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }

    /// The flag itself, for blocking code that polls it between units of work.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// Sleeps `d` unless a stop comes first; returns whether to stop.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.is_set(),
            _ = self.wait() => true,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_wakes_sleepers_and_sets_the_flag() {
        let stop = Stop::new();
        let s = stop.clone();
        let sleeper = tokio::spawn(async move { s.sleep(Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!stop.is_set());
        stop.request();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), sleeper)
                .await
                .expect("woken")
                .expect("join")
        );
        assert!(stop.flag().load(Ordering::SeqCst));
        // Waiting after the request returns at once.
        tokio::time::timeout(Duration::from_secs(1), stop.wait())
            .await
            .expect("already stopped");
    }
}
