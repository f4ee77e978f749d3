//! Serving: a node that has done its work keeps serving blobs and verifying other peers' ELMs
//! until stopped, reporting verdicts and registry versions.

use std::collections::BTreeSet;
use std::time::Duration;

use btm_net::{Node, Observed};
use btm_protocol::ContentId;

use crate::common::own_verdicts;
use crate::error::Result;
use crate::{Event, Events, Phase, Stop};

/// Serves until `stop`: reports this node's verdicts (also those reached earlier, from the
/// store) and new registry versions; catches up on what gossip missed every 20 s.
pub async fn serve(node: &Node, stop: &Stop, events: &Events) -> Result<()> {
    events.phase(Phase::Serving);
    let mut observed = node.observe();
    let mut told: BTreeSet<ContentId> = BTreeSet::new();
    // Verdicts reached while training were observed by nobody: take them from the store.
    let refresh = |told: &mut BTreeSet<ContentId>| {
        if let Ok(v) = own_verdicts(node) {
            for (e, verdict) in v {
                if let Some(accepted) = verdict
                    && told.insert(e.id())
                {
                    events.emit(Event::Verdict(btm_net::VerdictReport {
                        elm: e.id(),
                        accepted,
                        measured_ppl: None,
                        reason: "verified earlier".into(),
                    }));
                }
            }
        }
    };
    refresh(&mut told);
    let mut tick = tokio::time::interval(Duration::from_secs(20));
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            ev = observed.recv() => match ev {
                Ok(Observed::Verdict(v)) => {
                    told.insert(v.elm);
                    events.emit(Event::Verdict(v));
                }
                Ok(Observed::Verifying(elm)) => events.emit(Event::Verifying { elm }),
                Ok(Observed::Registry { version }) => {
                    crate::common::report_registry(node, version, events).await;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                // Catch up on anything gossip missed, keep the address record fresh.
                let _ = node.sync().await;
                let _ = node.publish_addr().await;
                refresh(&mut told);
            }
        }
    }
    events.phase(Phase::Stopped);
    Ok(())
}
