//! `btm-node status`: what a node's data directory says about it (its `status.json`, and the
//! trusted root, registry, claims, ELM records and verdicts in its SQLite store), or what a
//! network file describes, as tables; `--json` prints one document. Reads only: a running node
//! may keep writing the same directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use btm_protocol::{Root, Signed, Verdict, milli_to_ppl};
use btm_registry::Store;
use clap::Args;
use serde::Serialize;

use crate::net::{NetworkFile, Status, StatusFile, short};
use crate::table::{left, line, num, right};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's data directory (status.json, node.db).
    #[arg(long, default_value = "runs/node", conflicts_with = "network")]
    data_dir: PathBuf,
    /// Describe a network file (root and bootstrap peers) instead of a data directory.
    #[arg(long)]
    network: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct ElmRow {
    id: String,
    domain: String,
    trainer: String,
    steps: u64,
    claimed_ppl: f64,
    in_registry: bool,
    accepts: usize,
    rejects: usize,
    /// This node's verdict.
    here: Option<bool>,
}

#[derive(Debug, Serialize)]
struct ClaimRow {
    domain: String,
    node: String,
    lease_left_secs: u64,
    step: Option<u64>,
}

#[derive(Debug, Serialize)]
struct DirStatus {
    data_dir: String,
    status: Option<Status>,
    root_version: Option<u64>,
    registry_version: Option<u64>,
    registry_expires_in_secs: Option<u64>,
    domains: Vec<String>,
    claims: Vec<ClaimRow>,
    elms: Vec<ElmRow>,
    known_peers: usize,
    equivocations: usize,
}

#[derive(Debug, Serialize)]
struct NetStatus {
    network: String,
    name: String,
    root_version: u64,
    root_expires_in_secs: u64,
    threshold: u32,
    maintainers: Vec<String>,
    bootstrap: Vec<String>,
}

pub fn status(a: StatusArgs, json: bool) -> Result<()> {
    if let Some(n) = &a.network {
        let s = network_status(n)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print_network(&s);
        }
        return Ok(());
    }
    let s = dir_status(&a.data_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_dir(&s);
    }
    Ok(())
}

fn network_status(path: &Path) -> Result<NetStatus> {
    let n = NetworkFile::load(path)?;
    let bytes = hex::decode(n.root.trim()).context("the network file's root is not hex")?;
    let root = Signed::<Root>::decode(&bytes).context("the network file's root")?;
    let r = root.record();
    Ok(NetStatus {
        network: path.display().to_string(),
        name: n.name.clone(),
        root_version: r.version,
        root_expires_in_secs: r.expires.saturating_sub(btm_net::limits::now_secs()),
        threshold: r.threshold,
        maintainers: r.keys.iter().map(ToString::to_string).collect(),
        bootstrap: n.bootstrap.clone(),
    })
}

fn dir_status(dir: &Path) -> Result<DirStatus> {
    if !dir.is_dir() {
        bail!(
            "{} is not a node's data directory (pass --data-dir DIR)",
            dir.display()
        );
    }
    let status = StatusFile::read(&dir.join("status.json"));
    let db = dir.join("node.db");
    let mut out = DirStatus {
        data_dir: dir.display().to_string(),
        status,
        root_version: None,
        registry_version: None,
        registry_expires_in_secs: None,
        domains: vec![],
        claims: vec![],
        elms: vec![],
        known_peers: 0,
        equivocations: 0,
    };
    if !db.exists() {
        if out.status.is_none() {
            bail!(
                "{} holds neither status.json nor node.db: no node has run there",
                dir.display()
            );
        }
        return Ok(out);
    }
    let store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let now = btm_net::limits::now_secs();
    let me = out
        .status
        .as_ref()
        .map(|s| s.node.clone())
        .unwrap_or_default();
    if let Some(t) = store.trusted()? {
        out.root_version = Some(t.root.record().version);
        if let Some(reg) = &t.registry {
            let r = reg.record();
            out.registry_version = Some(r.version);
            out.registry_expires_in_secs = Some(r.expires.saturating_sub(now));
            out.domains = r.domains.iter().map(|d| d.name.clone()).collect();
            for d in &r.domains {
                for c in store.claims(&d.name, now)? {
                    let c = c.into_record();
                    out.claims.push(ClaimRow {
                        domain: c.domain.clone(),
                        node: c.node.to_string(),
                        lease_left_secs: c.lease_expires.saturating_sub(now),
                        step: c.progress.map(|p| p.step),
                    });
                }
            }
            for e in store.elms(10_000)? {
                let id = e.id();
                let atts = store.attestations(&id)?;
                let rec = e.record();
                let verdicts: BTreeMap<String, bool> = atts
                    .iter()
                    .map(|a| {
                        let a = a.record();
                        (a.verifier.to_string(), a.verdict == Verdict::Accept)
                    })
                    .collect();
                out.elms.push(ElmRow {
                    id: id.to_string(),
                    domain: rec.domain.clone(),
                    trainer: rec.trainer.to_string(),
                    steps: rec.steps,
                    claimed_ppl: milli_to_ppl(rec.claimed_valid_ppl_milli),
                    in_registry: r.elms.iter().any(|x| x.record == id),
                    accepts: verdicts.values().filter(|v| **v).count(),
                    rejects: verdicts.values().filter(|v| !**v).count(),
                    here: verdicts.get(&me).copied(),
                });
            }
        }
    }
    out.known_peers = store.peers()?.len();
    out.equivocations = store.equivocations()?.len();
    Ok(out)
}

fn ago(t: u64) -> String {
    let s = btm_net::limits::now_secs().saturating_sub(t);
    if s < 120 {
        format!("{s} s ago")
    } else {
        format!("{} min ago", s / 60)
    }
}

fn print_dir(s: &DirStatus) {
    println!("data dir    {}", s.data_dir);
    match &s.status {
        Some(st) => {
            println!(
                "node        {} ({}), updated {}",
                st.node,
                st.role,
                ago(st.updated)
            );
            let mut doing = st.phase.clone();
            if !st.message.is_empty() {
                doing.push_str(": ");
                doing.push_str(&st.message);
            }
            println!("doing       {doing}");
            if let Some(d) = &st.domain {
                let loss = st.loss.map_or("-".into(), |l| num(l, 3));
                println!(
                    "training    {d}: update {}/{}, loss {loss}",
                    st.step, st.steps
                );
            }
            if let (Some(p), Some(sp)) = (st.claimed_ppl, st.seed_ppl) {
                println!(
                    "measured    validation perplexity {} (seed {})",
                    num(p, 2),
                    num(sp, 2)
                );
            }
            if let Some(e) = &st.elm {
                println!("announced   ELM {e}");
            }
            if let Some(u) = &st.ui {
                println!("web UI      {u}");
            }
        }
        None => println!("node        no status.json (the node never ran a role here)"),
    }
    println!(
        "trusted     root v{}, registry {}",
        s.root_version.map_or("-".into(), |v| v.to_string()),
        match (s.registry_version, s.registry_expires_in_secs) {
            (Some(v), Some(e)) => format!(
                "v{v} ({} domains, expires in {} h)",
                s.domains.len(),
                e / 3600
            ),
            _ => "none yet".into(),
        }
    );
    println!(
        "peers       {} known{}",
        s.known_peers,
        if s.equivocations > 0 {
            format!(", {} equivocations recorded", s.equivocations)
        } else {
            String::new()
        }
    );
    if !s.claims.is_empty() {
        println!();
        let cols = [left(20), left(9), right(12), right(8)];
        println!(
            "{}",
            line(&cols, &["domain", "claimant", "lease left", "update"])
        );
        for c in &s.claims {
            println!(
                "{}",
                line(
                    &cols,
                    &[
                        &c.domain,
                        &c.node[..c.node.len().min(8)],
                        &format!("{} s", c.lease_left_secs),
                        &c.step.map_or("-".into(), |x| x.to_string()),
                    ]
                )
            );
        }
    }
    if !s.elms.is_empty() {
        println!();
        let cols = [
            left(9),
            left(20),
            left(9),
            right(7),
            right(9),
            left(4),
            right(8),
            left(8),
        ];
        println!(
            "{}",
            line(
                &cols,
                &[
                    "ELM", "domain", "trainer", "updates", "claimed", "reg", "+/-", "here"
                ]
            )
        );
        for e in &s.elms {
            println!(
                "{}",
                line(
                    &cols,
                    &[
                        &e.id[..e.id.len().min(8)],
                        &e.domain,
                        &e.trainer[..e.trainer.len().min(8)],
                        &e.steps.to_string(),
                        &num(e.claimed_ppl, 2),
                        if e.in_registry { "yes" } else { "no" },
                        &format!("{}/{}", e.accepts, e.rejects),
                        match e.here {
                            Some(true) => "accepts",
                            Some(false) => "REJECTS",
                            None => "-",
                        },
                    ]
                )
            );
        }
    }
}

fn print_network(s: &NetStatus) {
    println!("network     {} ({})", s.network, s.name);
    println!(
        "root        v{}, {} of {} maintainer keys sign, expires in {} days",
        s.root_version,
        s.threshold,
        s.maintainers.len(),
        s.root_expires_in_secs / 86_400
    );
    for k in &s.maintainers {
        println!("maintainer  {}", short(&hex::decode(k).unwrap_or_default()));
    }
    for b in &s.bootstrap {
        println!("bootstrap   {b}");
    }
}
