//! What the roles share: waiting for the registry, this node's verdicts, short ids.

use std::time::{Duration, Instant};

use btm_net::Node;
use btm_protocol::{ElmRecord, Registry, Signed, Verdict};

use crate::Stop;
use crate::error::{Error, Result};

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
