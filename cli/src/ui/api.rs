//! The UI's routes: the pages and the JSON API under `/api/` that they draw themselves from.
//! Every document is built from the running node (its trusted root and registry, its SQLite
//! store of claims, ELM records and attestations, its connections), the role's recorded
//! activity, and the forest directory the UI was given. Endpoints are listed in docs/ui.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use btm_model::forest::Forest;
use btm_model::forest::ensemble::Ensemble;
use btm_model::forest::posterior::Weighting;
use btm_model::generate::SampleConfig;
use btm_net::libp2p::PeerId;
use btm_protocol::{Attestation, Claim, ContentId, EvalPool, NodeId, Verdict, milli_to_ppl};
use serde_json::{Value, json};

use super::State;
use super::http::{Request, Response};
use btm_model::forest::report::ForestReport;

/// Peers listed on the network page (with their scores).
const MAX_PEERS_SHOWN: usize = 64;
/// ELM records listed on the domains page.
const MAX_ELMS_SHOWN: usize = 1000;
/// Longest text the ensemble box scores, in bytes.
pub const MAX_ENSEMBLE_TEXT: usize = 2000;
/// Most tokens the ensemble box generates.
pub const MAX_ENSEMBLE_TOKENS: usize = 64;
/// Largest report.json read.
const MAX_REPORT_BYTES: u64 = 4 << 20;

/// The four pages: (path, page name, title). Each is `static/page.html` with its name and title
/// filled in; the page's script draws the rest from `/api/<name>`.
const PAGES: &[(&str, &str, &str)] = &[
    ("/", "network", "the network"),
    ("/domains", "domains", "domains"),
    ("/node", "node", "this node"),
    ("/forest", "forest", "the forest"),
];

const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/ui.js",
        "text/javascript; charset=utf-8",
        include_str!("static/ui.js"),
    ),
    (
        "/ui.css",
        "text/css; charset=utf-8",
        include_str!("static/ui.css"),
    ),
];

/// A page's HTML: the shared template with the page's name, title and (for the forest) the
/// ensemble box. Only these constants are put in; nothing from the network.
fn page_html(name: &str, title: &str) -> String {
    let extra = if name == "forest" {
        include_str!("static/ensemble-box.html")
    } else {
        ""
    };
    include_str!("static/page.html")
        .replace("{{title}}", title)
        .replace("{{page}}", name)
        .replace("{{extra}}", extra)
}

/// Answers one request.
pub(super) async fn route(state: Arc<State>, req: Request) -> Response {
    if let Some(&(_, name, title)) = PAGES.iter().find(|(p, _, _)| *p == req.path) {
        return Response::new(200, "text/html; charset=utf-8", page_html(name, title));
    }
    if let Some(&(_, ty, body)) = ASSETS.iter().find(|(p, _, _)| *p == req.path) {
        return Response::new(200, ty, body.as_bytes());
    }
    let doc = match req.path.as_str() {
        "/api/network" => network(&state).await,
        "/api/domains" => domains(&state).await,
        "/api/node" => node(&state).await,
        "/api/forest" => forest(&state).await,
        "/api/forest/ensemble" => return ensemble(&state, &req).await,
        p if p.starts_with("/api/") => return Response::error(404, "no such API endpoint"),
        _ => return Response::new(404, "text/plain; charset=utf-8", "not found\n"),
    };
    match doc {
        Ok(v) => Response::json(200, &v),
        Err(e) => Response::error(503, &crate::error_text(&e)),
    }
}

fn now() -> u64 {
    btm_net::limits::now_secs()
}

/// `GET /api/network`: root, registry, maintainers, domains with their data, peers.
async fn network(state: &State) -> anyhow::Result<Value> {
    let node = &state.node;
    let trusted = node.client().trusted().await?;
    let root = trusted.root.record();
    let registry = trusted.registry.as_ref().map(|r| r.record());
    let mut domains = Vec::new();
    for d in registry.map(|r| r.domains.as_slice()).unwrap_or_default() {
        let mut data = serde_json::Map::new();
        for (split, id) in [("train", d.train), ("valid", d.valid), ("test", d.test)] {
            data.insert(
                split.into(),
                json!({ "id": id.to_string(), "bytes": blob_size(node, &id).await }),
            );
        }
        domains.push(json!({
            "name": d.name,
            "description": d.description,
            "data": data,
            "eval_tokens": d.eval.max_eval_tokens,
            "withheld_pool": d.eval.withheld.is_some(),
        }));
    }
    let connected = node.client().connected_peers().await.unwrap_or_default();
    let mut peers = Vec::new();
    for p in connected.iter().take(MAX_PEERS_SHOWN) {
        let score = node.client().peer_score(*p).await.ok().flatten();
        let agent = node.client().peer_agent(*p).await.ok().flatten();
        peers.push(json!({
            "peer": p.to_string(),
            "node": node_of(p),
            "agent": agent,
            "score": score.filter(|s| s.is_finite()),
        }));
    }
    let listen = node.listen_addrs().await.unwrap_or_default();
    Ok(json!({
        "now": now(),
        "node": node.node_id().to_string(),
        "role": state.config.role,
        "listen": listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "root": {
            "version": root.version,
            "expires": root.expires,
            "threshold": root.threshold,
        },
        "maintainers": root.keys.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "registry": registry.map(|r| json!({
            "version": r.version,
            "expires": r.expires,
            "domains": r.domains.len(),
            "accepted": r.elms.len(),
            "seed": r.seed.as_ref().map(|s| json!({
                "weights": s.weights.to_string(),
                "tokenizer": s.tokenizer.to_string(),
                "architecture": {
                    "vocab_size": s.architecture.vocab_size,
                    "context": s.architecture.context,
                    "d_model": s.architecture.d_model,
                    "heads": s.architecture.heads,
                    "layers": s.architecture.layers,
                },
                "steps": s.training.steps,
                "tokens": s.training.tokens,
            })),
        })),
        "domains": domains,
        "peers_connected": connected.len(),
        "peers": peers,
    }))
}

/// The node id (hex) behind a peer id, when it is one of ours (ed25519).
fn node_of(p: &PeerId) -> Option<String> {
    btm_net::identity::node_id_of(p).map(|n| n.to_string())
}

/// The size of a blob this node holds completely.
async fn blob_size(node: &btm_net::Node, id: &ContentId) -> Option<u64> {
    match node.blobs().status(id).await {
        Ok(iroh_blobs::api::blobs::BlobStatus::Complete { size }) => Some(size),
        _ => None,
    }
}

/// `GET /api/domains`: per domain, the live claims and the ELM records held, each with its
/// parents and every verdict this node holds.
async fn domains(state: &State) -> anyhow::Result<Value> {
    let node = &state.node;
    let Some(reg) = node.registry().await? else {
        return Ok(json!({ "registry_version": null, "domains": [] }));
    };
    let reg = reg.record();
    let t = now();
    let me = node.node_id();
    let seed_weights = reg.seed.as_ref().map(|s| s.weights);
    let (claims, elms) = node.with_store(|s| -> anyhow::Result<_> {
        let mut claims = BTreeMap::new();
        for d in &reg.domains {
            claims.insert(d.name.clone(), s.claims(&d.name, t)?);
        }
        let mut elms = Vec::new();
        for e in s.elms(MAX_ELMS_SHOWN)? {
            let atts = s.attestations(&e.id())?;
            elms.push((e, atts));
        }
        Ok((claims, elms))
    })??;
    // Weights id -> ELM record id, to name parents.
    let by_weights: BTreeMap<ContentId, ContentId> = elms
        .iter()
        .map(|(e, _)| (e.record().weights, e.id()))
        .collect();
    let mut out = Vec::new();
    for d in &reg.domains {
        let claims: Vec<Value> = claims
            .get(&d.name)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|c| claim_json(c.record(), me, t))
            .collect();
        let mut listed = Vec::new();
        for (env, atts) in elms.iter().filter(|(e, _)| e.record().domain == d.name) {
            let e = env.record();
            let id = env.id();
            let parents: Vec<Value> = e
                .parents
                .iter()
                .map(|p| {
                    let of = if Some(p.weights) == seed_weights {
                        json!("seed")
                    } else {
                        by_weights
                            .get(&p.weights)
                            .map_or(Value::Null, |r| json!(r.to_string()))
                    };
                    json!({
                        "weights": p.weights.to_string(),
                        "weight": f64::from(p.weight_ppm) / 1e6,
                        "of": of,
                    })
                })
                .collect();
            let verdicts: Vec<Value> = atts
                .iter()
                .map(|a| attestation_json(a.record(), me))
                .collect();
            listed.push(json!({
                "id": id.to_string(),
                "weights": e.weights.to_string(),
                "trainer": e.trainer.to_string(),
                "steps": e.steps,
                "tokens": e.tokens,
                "claimed_ppl": milli_to_ppl(e.claimed_valid_ppl_milli),
                "accepted": reg.elms.iter().any(|x| x.record == id),
                "parents": parents,
                "verdicts": verdicts,
            }));
        }
        out.push(json!({
            "name": d.name,
            "description": d.description,
            "claims": claims,
            "elms": listed,
        }));
    }
    Ok(json!({
        "now": t,
        "registry_version": reg.version,
        "seed": seed_weights.map(|s| s.to_string()),
        "domains": out,
    }))
}

/// A claim on the network page; `me` is this node, `t` now.
fn claim_json(c: &Claim, me: NodeId, t: u64) -> Value {
    json!({
        "node": c.node.to_string(),
        "me": c.node == me,
        "lease_left_secs": c.lease_expires.saturating_sub(t),
        "held_secs": t.saturating_sub(c.first_claimed),
        "progress": c.progress.map(|p| json!({"step": p.step, "loss": p.loss_milli as f64 / 1000.0})),
    })
}

/// A verifier's attestation on the network page.
fn attestation_json(a: &Attestation, me: NodeId) -> Value {
    let pool = match a.pool {
        EvalPool::Public => "public",
        EvalPool::Withheld => "withheld",
    };
    json!({
        "verifier": a.verifier.to_string(),
        "me": a.verifier == me,
        "accepted": a.verdict == Verdict::Accept,
        "measured_ppl": (a.measured_ppl_milli > 0).then(|| milli_to_ppl(a.measured_ppl_milli)),
        "pool": pool,
    })
}

/// `GET /api/node`: what this node is doing.
async fn node(state: &State) -> anyhow::Result<Value> {
    let node = &state.node;
    let a = state.activity.snapshot();
    Ok(json!({
        "now": now(),
        "node": node.node_id().to_string(),
        "role": state.config.role,
        "data_dir": state.config.data_dir.display().to_string(),
        "activity": a,
        "bytes_received": node.blobs().bytes_received(),
        "bytes_served": node.blobs().bytes_served(),
        "peers_connected": node.client().connected_peers().await.map(|p| p.len()).ok(),
    }))
}

/// Reads the forest named by the UI's config.
fn open_forest(p: &Path) -> anyhow::Result<Forest> {
    crate::open::open(p)
}

/// `GET /api/forest`: the forest's members and its report (`forest report`), if any.
async fn forest(state: &State) -> anyhow::Result<Value> {
    let Some(path) = state.config.forest.clone() else {
        return Ok(json!({
            "forest": null,
            "hint": "start the UI with --ui-forest DIR (btm-node ui: --forest DIR) to show a forest",
        }));
    };
    let doc = tokio::task::spawn_blocking(move || -> Value {
        let forest = match open_forest(&path) {
            Ok(f) => f,
            Err(e) => {
                return json!({
                    "forest": path.display().to_string(),
                    "error": crate::error_text(&e),
                });
            }
        };
        let report_path = forest.dir().join("report.json");
        let report: Option<ForestReport> =
            btm_model::fsutil::read_limited(&report_path, MAX_REPORT_BYTES)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
        let elms: Vec<Value> = forest
            .elms
            .iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "domains": e.domains,
                    "parents": e.parents,
                    "train": e.train,
                })
            })
            .collect();
        let hint = report
            .is_none()
            .then_some("no report.json yet: run `btm-node forest report --forest DIR`");
        json!({
            "forest": path.display().to_string(),
            "elms": elms,
            "report": report,
            "hint": hint,
        })
    })
    .await?;
    Ok(doc)
}

/// `GET /api/forest/ensemble?text=T&tokens=N`: the domain posterior of the text over the ELMs
/// (the ensemble's weights) and the ensemble's continuation of it.
async fn ensemble(state: &State, req: &Request) -> Response {
    let Some(path) = state.config.forest.clone() else {
        return Response::error(404, "this UI shows no forest (--ui-forest DIR)");
    };
    let text = req.param("text").unwrap_or_default().to_string();
    if text.is_empty() {
        return Response::error(400, "pass text=...");
    }
    if text.len() > MAX_ENSEMBLE_TEXT {
        return Response::error(400, "the text is longer than 2000 bytes");
    }
    let tokens = match req.param("tokens").map(str::parse::<usize>) {
        None => 32,
        Some(Ok(n)) if n <= MAX_ENSEMBLE_TOKENS => n,
        Some(_) => return Response::error(400, "tokens must be a number from 0 to 64"),
    };
    let Ok(_permit) = state.ensemble.try_acquire() else {
        return Response::error(503, "busy with another text; try again");
    };
    let run = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let (forest, tok) = crate::open::open_with_elms(&path)?;
        let device = btm_model::device::DeviceKind::Cpu.device()?;
        let mut ids = vec![btm_model::tokenizer::EOT_ID];
        ids.extend(tok.encode(&text)?);
        let prior = crate::client_cmds::prior_on(&forest, &ids, &device)?;
        let (ens, _) =
            Ensemble::from_forest(&forest, Some(&prior), None, Weighting::Posterior, &device)?;
        let continuation = ens.generate(
            &tok,
            &text,
            &SampleConfig {
                max_new_tokens: tokens,
                temperature: 0.0,
                top_k: None,
                seed: 0,
            },
        )?;
        let weights: Vec<Value> = forest
            .elms
            .iter()
            .zip(&prior)
            .map(|(e, w)| json!({ "elm": e.name, "domains": e.domains, "weight": w }))
            .collect();
        Ok(json!({
            "text": text,
            "tokens": ids.len() - 1,
            "weights": weights,
            "continuation": continuation,
        }))
    })
    .await;
    match run {
        Ok(Ok(v)) => Response::json(200, &v),
        Ok(Err(e)) => Response::error(400, &crate::error_text(&e)),
        Err(e) => Response::error(503, &format!("the ensemble task failed: {e}")),
    }
}
