//! What this node's role is doing, for the node page: recorded from the role's events (phase,
//! training updates, verdicts) and the node's observations (ELM records queued for
//! verification). Every list is bounded.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use btm_net::{Node, Observed};
use btm_protocol::ContentId;
use btm_roles::{Event, InitKind};
use serde::Serialize;

use crate::report::phase_name;

/// Points kept of the training curve; beyond this every other point is dropped.
pub const MAX_CURVE_POINTS: usize = 1000;
/// Verdicts and notes kept (the newest).
pub const MAX_RECENT: usize = 100;
/// ELM records tracked as waiting for verification.
pub const MAX_QUEUE: usize = 256;
/// A queued record with no verdict after this long is no longer shown (it could not be checked).
pub const QUEUE_FORGET_SECS: u64 = 15 * 60;

/// One training update on the curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
}

/// One point of the validation curve: perplexity on the public validation split's first tokens.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ValidPoint {
    pub step: u64,
    pub ppl: f64,
}

/// A download in progress.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadNow {
    pub what: String,
    pub bytes: u64,
    pub total: Option<u64>,
    pub bytes_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerdictSeen {
    #[serde(flatten)]
    pub verdict: btm_net::VerdictReport,
    pub at: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub at: u64,
    pub message: String,
}

/// The recorded state (serialised as part of `/api/node`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// volunteer, maintainer or client.
    pub role: String,
    /// The role's phase, and since when (unix seconds).
    pub phase: String,
    pub phase_since: u64,
    /// What is being downloaded (during the downloading phase).
    pub fetching: Option<String>,
    /// The domain this node trains (or trained).
    pub domain: Option<String>,
    /// Training: the current update of `steps`, from `resumed_from` when the run resumed.
    pub step: u64,
    pub steps: u64,
    pub resumed_from: Option<u64>,
    /// Tokens per update.
    pub tokens_per_step: u64,
    /// The last update's loss and the throughput.
    pub loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Every `curve_stride`-th update.
    pub curve: Vec<Point>,
    pub curve_stride: u64,
    /// Validation perplexity during training (the newest [`MAX_CURVE_POINTS`]).
    pub valid_curve: VecDeque<ValidPoint>,
    /// The download in progress, if any.
    pub download: Option<DownloadNow>,
    /// The ELM record being verified now and since when.
    pub verifying: Option<(String, u64)>,
    /// How the ELM branched, in words.
    pub branch: Option<String>,
    /// (parent name, weight) of the branch.
    pub parents: Vec<(String, f64)>,
    /// Validation perplexity of the trained ELM and of the seed, measured as verifiers do.
    pub valid_ppl: Option<f64>,
    pub seed_ppl: Option<f64>,
    /// The ELM record this node announced.
    pub announced: Option<String>,
    /// The newest registry version this node trusts.
    pub registry_version: Option<u64>,
    /// This node's newest verdicts and notes.
    pub verdicts: VecDeque<VerdictSeen>,
    pub notes: VecDeque<Note>,
    /// ELM record id -> when it was queued for verification (no verdict yet).
    pub queue: BTreeMap<String, u64>,
}

/// The recorder; shared between the role's event sink and the pages.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<Snapshot>,
}

fn now() -> u64 {
    btm_net::limits::now_secs()
}

fn push_bounded<T>(v: &mut VecDeque<T>, x: T) {
    if v.len() >= MAX_RECENT {
        v.pop_front();
    }
    v.push_back(x);
}

impl Activity {
    pub fn new(role: &str) -> Activity {
        Activity {
            state: Mutex::new(Snapshot {
                role: role.into(),
                phase: "starting".into(),
                phase_since: now(),
                curve_stride: 1,
                ..Snapshot::default()
            }),
        }
    }

    /// A copy of what is recorded (queued records older than [`QUEUE_FORGET_SECS`] dropped).
    pub fn snapshot(&self) -> Snapshot {
        let Ok(mut s) = self.state.lock() else {
            return Snapshot::default();
        };
        let t = now();
        s.queue
            .retain(|_, at| t.saturating_sub(*at) < QUEUE_FORGET_SECS);
        s.clone()
    }

    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    /// Records one of the role's events.
    pub fn on(&self, e: &Event) {
        self.update(|s| match e {
            Event::Phase { phase } => {
                s.phase = phase_name(*phase).into();
                s.phase_since = now();
            }
            Event::Registry { version, .. } => s.registry_version = Some(*version),
            Event::Published { version, .. } => s.registry_version = Some(*version),
            Event::Claimed { domain, .. } => s.domain = Some(domain.clone()),
            Event::Fetching { what, id } => s.fetching = Some(format!("{what} ({id})")),
            Event::Branched { init, parents } => {
                s.branch = Some(
                    match init {
                        InitKind::Seed => "from the seed",
                        InitKind::PosteriorAverage => "from the posterior-weighted average",
                        InitKind::Random => "from a random initialisation",
                    }
                    .into(),
                );
                s.parents = parents.clone();
            }
            Event::TrainingStarted(t) => {
                s.domain = Some(t.domain.clone());
                s.steps = t.steps;
                s.tokens_per_step = t.tokens_per_step;
                s.resumed_from = t.resumed_from;
                s.step = t.resumed_from.unwrap_or(0);
            }
            Event::Step {
                step,
                loss,
                tokens_per_s,
                ..
            } => {
                s.step = *step;
                s.loss = Some(*loss);
                s.tokens_per_s = Some(*tokens_per_s);
                if step % s.curve_stride.max(1) == 0 {
                    s.curve.push(Point {
                        step: *step,
                        loss: *loss,
                        tokens_per_s: *tokens_per_s,
                    });
                }
                if s.curve.len() >= MAX_CURVE_POINTS {
                    s.curve_stride = s.curve_stride.max(1) * 2;
                    let stride = s.curve_stride;
                    s.curve.retain(|p| p.step % stride == 0);
                }
            }
            Event::Validation { step, ppl, .. } => {
                if s.valid_curve.len() >= MAX_CURVE_POINTS {
                    s.valid_curve.pop_front();
                }
                s.valid_curve.push_back(ValidPoint {
                    step: *step,
                    ppl: *ppl,
                });
            }
            Event::Download {
                what,
                bytes,
                total,
                bytes_per_s,
                ..
            } => {
                s.download = Some(DownloadNow {
                    what: what.clone(),
                    bytes: *bytes,
                    total: *total,
                    bytes_per_s: *bytes_per_s,
                });
            }
            Event::Fetched { .. } => s.download = None,
            Event::Verifying { elm } => s.verifying = Some((elm.to_string(), now())),
            Event::Trained { ppl, seed_ppl } => {
                s.valid_ppl = Some(*ppl);
                s.seed_ppl = Some(*seed_ppl);
            }
            Event::Announced { elm, domain, .. } => {
                s.announced = Some(elm.to_string());
                s.domain = Some(domain.clone());
            }
            Event::Verdict(v) => {
                let elm = v.elm.to_string();
                s.queue.remove(&elm);
                if s.verifying.as_ref().is_some_and(|(e, _)| *e == elm) {
                    s.verifying = None;
                }
                let seen = VerdictSeen {
                    verdict: v.clone(),
                    at: now(),
                };
                push_bounded(&mut s.verdicts, seen);
            }
            Event::Note { message } => push_bounded(
                &mut s.notes,
                Note {
                    at: now(),
                    message: message.clone(),
                },
            ),
            _ => {}
        });
    }

    fn queued(&self, elm: ContentId) {
        self.update(|s| {
            if s.queue.len() < MAX_QUEUE {
                s.queue.entry(elm.to_string()).or_insert_with(now);
            }
        });
    }

    fn judged(&self, elm: ContentId) {
        self.update(|s| {
            s.queue.remove(&elm.to_string());
        });
    }

    /// Follows the node's observations (verification queue) until the node stops.
    pub async fn observe(self: Arc<Self>, node: Node) {
        use tokio::sync::broadcast::error::RecvError;
        let mut rx = node.observe();
        drop(node);
        loop {
            match rx.recv().await {
                Ok(Observed::ElmQueued(id)) => self.queued(id),
                Ok(Observed::Verdict(v)) => self.judged(v.elm),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_stays_bounded_and_spread_over_the_run() {
        let a = Activity::new("volunteer");
        for step in 1..=10_000u64 {
            a.on(&Event::Step {
                step,
                steps: 10_000,
                loss: 1.0 / step as f64,
                tokens_per_s: 100.0,
            });
        }
        let s = a.snapshot();
        assert!(s.curve.len() < MAX_CURVE_POINTS, "{}", s.curve.len());
        assert!(s.curve.len() > MAX_CURVE_POINTS / 4, "{}", s.curve.len());
        let last = s.curve.last().map_or(0, |p| p.step);
        assert!(last > 9_000, "{last}");
        assert_eq!(s.step, 10_000);
    }

    #[test]
    fn validation_downloads_and_verifications_are_recorded() {
        let a = Activity::new("volunteer");
        for step in [0u64, 10, 20] {
            a.on(&Event::Validation {
                step,
                ppl: 100.0 - step as f64,
                tokens: 2047,
            });
        }
        let id = ContentId::of(b"weights");
        a.on(&Event::Download {
            what: "seed".into(),
            id,
            bytes: 4096,
            total: None,
            bytes_per_s: 1000.0,
        });
        a.on(&Event::Verifying { elm: id });
        let s = a.snapshot();
        let steps: Vec<u64> = s.valid_curve.iter().map(|p| p.step).collect();
        assert_eq!(steps, [0, 10, 20]);
        assert_eq!(s.download.as_ref().map(|d| d.bytes), Some(4096));
        assert_eq!(
            s.verifying.as_ref().map(|v| v.0.clone()),
            Some(id.to_string())
        );
        a.on(&Event::Fetched {
            what: "seed".into(),
            id,
            bytes: 8192,
            secs: 1.0,
            held_already: false,
        });
        a.on(&Event::Verdict(btm_net::VerdictReport {
            elm: id,
            accepted: true,
            measured_ppl: Some(50.0),
            reason: "accepted".into(),
        }));
        let s = a.snapshot();
        assert!(s.download.is_none());
        assert!(s.verifying.is_none());
    }

    #[test]
    fn verdicts_and_notes_keep_the_newest() {
        let a = Activity::new("maintainer");
        for i in 0..(MAX_RECENT + 10) {
            a.on(&Event::Note {
                message: format!("note {i}"),
            });
        }
        let s = a.snapshot();
        assert_eq!(s.notes.len(), MAX_RECENT);
        assert_eq!(
            s.notes.back().map(|n| n.message.as_str()),
            Some(format!("note {}", MAX_RECENT + 9).as_str())
        );
    }
}
