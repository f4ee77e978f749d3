//! What the roles share: waiting for the registry, this node's verdicts, short ids.

use std::time::{Duration, Instant};

use btm_net::Node;
use btm_net::blobs::Fetched;
use btm_protocol::{ContentId, ElmRecord, NodeId, Registry, Signed, Verdict};

use crate::error::{Error, Result};
use crate::{Event, Events, Stop};

/// Waits until the node trusts a registry that names a seed, asking the DHT now and then.
/// `None` when stopped first.
pub async fn wait_registry(
    node: &Node,
    within: Duration,
    stop: &Stop,
) -> Result<Option<Signed<Registry>>> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = node.registry().await?
            && r.record().seed.is_some()
        {
            return Ok(Some(r));
        }
        if Instant::now() >= deadline {
            return Err(Error::NoRegistry {
                secs: within.as_secs(),
            });
        }
        let _ = node.sync().await;
        if stop.sleep(Duration::from_millis(500)).await {
            return Ok(None);
        }
    }
}

/// This node's verdict on each ELM record it holds: `Some(accepted)`, or `None` when it has not
/// verified it (yet).
pub fn own_verdicts(node: &Node) -> Result<Vec<(Signed<ElmRecord>, Option<bool>)>> {
    let me = node.node_id();
    node.with_store(|s| -> Result<_> {
        let mut out = Vec::new();
        for e in s.elms(10_000)? {
            let v = s
                .attestations(&e.id())?
                .into_iter()
                .map(Signed::into_record)
                .find(|a| a.verifier == me)
                .map(|a| a.verdict == Verdict::Accept);
            out.push((e, v));
        }
        Ok(out)
    })?
}

/// The first 8 hex digits of an id, for file names and messages.
pub fn short(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

/// Reports the trusted registry (after the node adopted `version`) as an [`Event::Registry`].
pub(crate) async fn report_registry(node: &Node, version: u64, events: &crate::Events) {
    if let Ok(Some(r)) = node.registry().await {
        let r = r.record();
        events.emit(crate::Event::Registry {
            version,
            domains: r.domains.len(),
            seed: r.seed.as_ref().map(|s| s.weights),
            accepted: r.elms.iter().map(|e| e.record).collect(),
        });
    }
}

/// How often a download in progress is reported.
const DOWNLOAD_REPORT: Duration = Duration::from_millis(500);

/// [`Node::fetch_blob`], reported to `events`: [`Event::Download`] about twice a second while
/// bytes arrive (what has arrived, the rate, the size when the caller knows it), then
/// [`Event::Fetched`] when the blob is held.
pub(crate) async fn fetch_reported(
    node: &Node,
    what: &str,
    id: ContentId,
    hints: &[NodeId],
    total: Option<u64>,
    events: &Events,
) -> std::result::Result<Fetched, btm_net::NodeError> {
    let start = Instant::now();
    let fetch = node.fetch_blob(id, hints);
    tokio::pin!(fetch);
    let mut tick = tokio::time::interval(DOWNLOAD_REPORT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            r = &mut fetch => break r,
            _ = tick.tick() => {
                if let Some(bytes) = node.blobs().download_progress(&id) {
                    let secs = start.elapsed().as_secs_f64().max(1e-3);
                    events.emit(Event::Download {
                        what: what.into(),
                        id,
                        bytes,
                        total,
                        bytes_per_s: bytes as f64 / secs,
                    });
                }
            }
        }
    };
    if let Ok(f) = &result {
        events.emit(Event::Fetched {
            what: what.into(),
            id,
            bytes: f.bytes,
            secs: f.elapsed.as_secs_f64(),
            held_already: f.from.is_none(),
        });
    }
    result
}
