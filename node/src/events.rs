//! What a role reports while it works: typed events, sent to whoever drives the role (the
//! command-line program draws progress bars, writes `status.json` and prints `--json` lines
//! from them; tests assert on them).

use std::sync::Arc;

use btm_protocol::{ContentId, NodeId};

use crate::InitKind;
use serde::Serialize;

/// What a role is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for a registry with a seed to reach the node.
    WaitingForRegistry,
    /// Adding the seed and the domains' data as blobs (maintainers).
    AddingBlobs,
    /// Downloading the seed, the tokenizer, data or parents.
    Downloading,
    Training,
    /// Scoring the trained ELM the way verifiers will.
    Measuring,
    /// Serving blobs and verifying other peers' ELMs.
    Serving,
    /// Stopped on request (resumable).
    Stopped,
}

/// One thing a role did or saw.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    Phase {
        phase: Phase,
    },
    /// The trusted registry (at start, and whenever a newer version arrives).
    Registry {
        version: u64,
        domains: usize,
        seed: Option<ContentId>,
        /// Accepted ELM records.
        accepted: Vec<ContentId>,
    },
    /// This volunteer holds a claim on `domain`.
    Claimed {
        domain: String,
        lease_secs: u64,
    },
    /// Another node claimed the same domain at the same time and keeps it.
    ClaimLost {
        domain: String,
        keeper: NodeId,
    },
    /// A download starts.
    Fetching {
        what: String,
        id: ContentId,
    },
    /// A download in progress: bytes received so far by the current attempt, and the blob's
    /// size when it is known beforehand (an ELM record states its weights' size).
    Download {
        what: String,
        id: ContentId,
        bytes: u64,
        total: Option<u64>,
        bytes_per_s: f64,
    },
    /// A download ended: the blob is held (`held_already`: it was, nothing was fetched).
    Fetched {
        what: String,
        id: ContentId,
        bytes: u64,
        secs: f64,
        held_already: bool,
    },
    /// This node started verifying an ELM record (its verdict follows as [`Event::Verdict`]).
    Verifying {
        elm: ContentId,
    },
    /// How the ELM was initialised (seed or posterior average), with (name, weight) parents.
    Branched {
        init: InitKind,
        parents: Vec<(String, f64)>,
    },
    /// The domain posterior of the new domain's validation data over the parent ELMs.
    Posterior {
        domain: String,
        weights: Vec<(String, f64)>,
    },
    /// Training starts (or resumes).
    TrainingStarted(TrainingStart),
    /// One optimiser update.
    Step {
        step: u64,
        steps: u64,
        loss: f64,
        tokens_per_s: f64,
    },
    /// The model's perplexity on the first tokens of the domain's public validation split
    /// (at most [`crate::volunteer::VALID_CURVE_TOKENS`]), measured during training: before
    /// the first update and about every tenth of the run. The curve for people; verifiers
    /// measure the trained ELM on their own data.
    Validation {
        step: u64,
        ppl: f64,
        tokens: u64,
    },
    /// Training stopped on request at `step`, with a checkpoint to resume from.
    TrainingStopped {
        step: u64,
    },
    /// The trained ELM measured as verifiers measure it.
    Trained {
        ppl: f64,
        seed_ppl: f64,
    },
    /// This node announced its ELM.
    Announced {
        elm: ContentId,
        weights: ContentId,
        domain: String,
        /// Whether it was announced before and only refreshed now.
        again: bool,
    },
    /// This node's verdict on an ELM.
    Verdict(btm_net::VerdictReport),
    /// A claim seen on the network.
    ClaimSeen {
        domain: String,
        node: NodeId,
        lease_left_secs: u64,
    },
    /// Another node's attestation.
    Attestation {
        elm: ContentId,
        verifier: NodeId,
        accepted: bool,
    },
    /// The maintainers' node published a registry version.
    Published {
        version: u64,
        domains: usize,
        seed: ContentId,
        /// ELM records this version added (record id, domain).
        added: Vec<(ContentId, String)>,
    },
    /// Something worth telling a person that is not a state change (a retried failure).
    Note {
        message: String,
    },
}

/// Where a role sends its events. Cloning shares the receiver.
/// A training run that starts, or resumes from its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingStart {
    /// The domain trained.
    pub domain: String,
    /// Optimiser updates of the whole run.
    pub steps: u64,
    /// Tokens per update.
    pub tokens_per_step: u64,
    /// The update the run resumes from, when it resumes.
    pub resumed_from: Option<u64>,
}

impl TrainingStart {
    /// What starts, in words.
    pub fn describe(&self) -> String {
        let TrainingStart {
            domain,
            steps,
            tokens_per_step,
            resumed_from,
        } = self;
        match resumed_from {
            Some(k) => {
                format!("resuming the run on {domain} at update {k}/{steps} from its checkpoint")
            }
            None => format!("training {steps} updates of {tokens_per_step} tokens on {domain}"),
        }
    }
}

#[derive(Clone)]
pub struct Events {
    sink: Arc<dyn Fn(&Event) + Send + Sync>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}

impl Events {
    pub fn new(sink: impl Fn(&Event) + Send + Sync + 'static) -> Events {
        Events {
            sink: Arc::new(sink),
        }
    }

    /// Events nobody listens to.
    pub fn ignore() -> Events {
        Events::new(|_| {})
    }

    pub fn emit(&self, e: Event) {
        (self.sink)(&e);
    }

    pub fn phase(&self, phase: Phase) {
        self.emit(Event::Phase { phase });
    }

    pub fn note(&self, message: impl Into<String>) {
        self.emit(Event::Note {
            message: message.into(),
        });
    }
}
