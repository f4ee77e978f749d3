//! `btm-node demo`: the whole network on one machine, as separate processes on loopback, on
//! the bundled corpus.
//!
//! 1. keys and the network's root (two maintainers, threshold 2: no one process can accept);
//! 2. the seed LM on the balanced mix of the eight training domains (`seed train`);
//! 3. two maintainer nodes (`seed publish --accept-verified`, one key each): the registry, the
//!    seed and every domain's data as blobs, the first registry and every acceptance signed by
//!    both; each verifies announced ELMs on its own withheld pool and co-signs the good ones;
//! 4. volunteers (`join`): each claims a different domain, branches from the seed, trains,
//!    announces, and verifies the others' ELMs;
//! 5. a client (`fetch`, then `forest report`): fetches and verifies the forest and prints
//!    per-domain perplexity of the seed, each ELM, the ensemble and the averages, with a plot.
//!
//! Every process writes its log to `<dir>/logs/` and its state to `<data dir>/status.json`;
//! the demo watches those and shows one progress line per node.

use btm_model::files::WEIGHTS_FILE;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use btm_model::Preset;
use btm_protocol::{PublicKey, Root, Signed};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::net::{NetworkFile, Status, StatusFile};
use crate::table::{left, line, num, right};
use btm_model::forest::report::ForestReport;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory: keys, network.toml, each node's data directory, logs, forest, report.
    #[arg(long, default_value = "runs/demo")]
    dir: PathBuf,
    /// Volunteers (each trains one ELM on its own domain).
    #[arg(long, default_value_t = 3)]
    volunteers: usize,
    /// Architecture preset of the seed and so of every ELM.
    #[arg(long, default_value = "tiny")]
    preset: Preset,
    /// Updates of the seed LM.
    #[arg(long, default_value_t = 600)]
    seed_steps: u64,
    /// Updates of each ELM.
    #[arg(long, default_value_t = 300)]
    elm_steps: u64,
    /// Blocks per update.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Validation tokens a verifier scores per domain.
    #[arg(long, default_value_t = 8192)]
    eval_tokens: u64,
    /// Test tokens per domain in the client's report.
    #[arg(long, default_value_t = 8192)]
    report_tokens: usize,
    /// Lease of a domain claim, in seconds.
    #[arg(long, default_value_t = 60)]
    lease_secs: u64,
    /// Retrain the seed even if an earlier demo run left one with the same settings.
    #[arg(long)]
    retrain_seed: bool,
    /// Keep the network running after the report (Ctrl-C stops it), to try `join`, `fetch`,
    /// `forest list` against it from another terminal.
    #[arg(long)]
    keep_running: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Serve no web UI (by default the maintainer and every volunteer serve one on loopback,
    /// on a free port, and the demo prints their addresses).
    #[arg(long)]
    no_ui: bool,
}

/// What `demo` writes to `<dir>/result.json`.
#[derive(Debug, Serialize)]
pub struct DemoResult {
    pub volunteers: Vec<VolunteerResult>,
    /// ELM record ids in the maintainer's last registry.
    pub accepted: Vec<String>,
    pub report: ForestReport,
    /// Seconds per stage, in order.
    pub timings: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct VolunteerResult {
    pub name: String,
    pub node: String,
    pub domain: Option<String>,
    pub elm: Option<String>,
    pub claimed_ppl: Option<f64>,
    pub seed_ppl: Option<f64>,
    /// Other volunteers that accepted this ELM.
    pub verified_by: Vec<String>,
}

/// The children, killed if the demo ends early.
struct Procs {
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Procs {
    fn spawn(&mut self, name: &str, args: &[String]) -> Result<()> {
        let exe = std::env::current_exe().context("finding this program")?;
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        let child = Command::new(exe)
            .args(args)
            .env(
                "BTM_LOG",
                std::env::var("BTM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// Fails if a child exited (they run until stopped).
    fn check(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}); its log ends with:\n{}",
                    tail(&self.logs.join(format!("{name}.log")), 15)
                );
            }
        }
        Ok(())
    }

    /// Asks every child to stop (SIGTERM), then kills what is left after `grace`.
    fn stop(&mut self, grace: Duration) {
        for (_, child) in &self.children {
            terminate(child.id());
        }
        let deadline = Instant::now() + grace;
        for (_, child) in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(pid: u32) {
    #[cfg(unix)]
    {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// Runs a child to completion; its output goes to the log, or to the terminal when `show`.
fn run_step(name: &str, args: &[String], logs: &Path, show: bool) -> Result<()> {
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null());
    let log_path = logs.join(format!("{name}.log"));
    if !show {
        let log = std::fs::File::create(&log_path)?;
        cmd.stdout(log.try_clone()?).stderr(log);
    }
    let status = cmd.status().with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!(
            "{name} failed ({status}){}",
            if show {
                String::new()
            } else {
                format!("; its log ends with:\n{}", tail(&log_path, 15))
            }
        );
    }
    Ok(())
}

pub fn demo(a: DemoArgs, json: bool) -> Result<()> {
    let started = Instant::now();
    let mut timings: Vec<(String, f64)> = Vec::new();
    let dir = &a.dir;
    let say = |m: &str| {
        if !json {
            eprintln!("[demo] {m}");
        }
    };
    if a.volunteers == 0 {
        bail!("--volunteers must be at least 1");
    }
    // A fresh network each run; a seed trained with the same settings is kept.
    let seed_dir = dir.join("seed");
    let seed_tag = format!("{} {} {}", a.preset, a.seed_steps, a.batch_size);
    let tag_path = seed_dir.join("demo-seed.txt");
    let seed_ok = !a.retrain_seed
        && seed_dir.join(WEIGHTS_FILE).exists()
        && std::fs::read_to_string(&tag_path).is_ok_and(|t| t == seed_tag);
    if dir.exists() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_name() == "seed" && seed_ok {
                continue;
            }
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .with_context(|| format!("cleaning {}", p.display()))?;
        }
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;

    // 1. Keys and root: two maintainers, both needed to sign.
    let key_paths = [dir.join("maintainer.key"), dir.join("maintainer-2.key")];
    let mut keys = Vec::new();
    for p in &key_paths {
        btm_registry::maintainer::generate_key(p, true)?;
        keys.push(btm_registry::maintainer::load_key(p)?);
    }
    let mut pks: Vec<PublicKey> = keys.iter().map(PublicKey::of).collect();
    pks.sort();
    let mut root = Signed::new(Root {
        version: 1,
        expires: btm_net::limits::now_secs() + 365 * 86_400,
        threshold: 2,
        keys: pks,
    });
    for k in &keys {
        root.sign(k);
    }
    let root_path = dir.join("root.cbor");
    btm_model::fsutil::write_atomic(&root_path, &root.encode())?;
    say(&format!(
        "maintainer keys {} and {} (threshold 2) and the network root written to {}",
        &PublicKey::of(&keys[0]).to_string()[..8],
        &PublicKey::of(&keys[1]).to_string()[..8],
        dir.display()
    ));

    // 2. The seed.
    let t = Instant::now();
    if seed_ok {
        say(&format!(
            "reusing the seed in {} ({seed_tag})",
            seed_dir.display()
        ));
    } else {
        say(&format!(
            "training the seed LM ({}, {} updates) on the balanced mix of the 8 training domains",
            a.preset, a.seed_steps
        ));
        run_step(
            "seed",
            &[
                s("seed"),
                s("train"),
                s("--preset"),
                s(a.preset),
                s("--steps"),
                s(a.seed_steps),
                s("--batch-size"),
                s(a.batch_size),
                s("--eval-tokens"),
                s(4096),
                s("--out"),
                s(seed_dir.display()),
            ],
            &logs,
            !json,
        )?;
        std::fs::write(&tag_path, &seed_tag)?;
    }
    timings.push(("seed".to_string(), t.elapsed().as_secs_f64()));

    // 3. The maintainer.
    let t = Instant::now();
    let mut procs = Procs {
        children: Vec::new(),
        logs: logs.clone(),
    };
    let network = dir.join("network.toml");
    let forest = dir.join("forest");
    // The web UI: loopback, a free port; the address is read back from status.json.
    let ui_args = |forest: Option<&Path>| -> Vec<String> {
        if a.no_ui {
            return vec![];
        }
        let mut v = vec![s("--ui"), s("127.0.0.1:0")];
        if let Some(f) = forest {
            v.extend([s("--ui-forest"), s(f.display())]);
        }
        v
    };
    // Both maintainers: one key each, the same seed, data and settings; the first makes the
    // root's network file, the second starts from it.
    let maintainer = |key: &Path, data_dir: &str, network_arg: [String; 2]| -> Vec<String> {
        let mut v = vec![s("seed"), s("publish")];
        v.extend(network_arg);
        v.extend([
            s("--key"),
            s(key.display()),
            s("--seed"),
            s(seed_dir.display()),
        ]);
        v.extend([s("--data-dir"), s(dir.join(data_dir).display())]);
        v.extend([
            s("--listen"),
            s("/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1"),
        ]);
        v.extend([s("--eval-tokens"), s(a.eval_tokens), s("--accept-verified")]);
        v
    };
    let mut maintainer_args = maintainer(
        &key_paths[0],
        "maintainer",
        [s("--root"), s(root_path.display())],
    );
    maintainer_args.extend([s("--network-out"), s(network.display())]);
    maintainer_args.extend(ui_args(Some(&forest)));
    procs.spawn("maintainer", &maintainer_args)?;
    say("starting the maintainers: registry, seed and domain data as blobs");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !network.exists() {
        procs.check()?;
        if Instant::now() > deadline {
            bail!(
                "the maintainer did not start within 120 s; see {}",
                logs.join("maintainer.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The second maintainer builds the same first registry from the same seed, data and
    // settings and co-signs it; later it co-signs only ELMs it verified itself.
    procs.spawn(
        "maintainer-2",
        &maintainer(
            &key_paths[1],
            "maintainer-2",
            [s("--network"), s(network.display())],
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while StatusFile::read(&dir.join("maintainer").join("status.json"))
        .and_then(|st| st.registry_version)
        .is_none()
    {
        procs.check()?;
        if Instant::now() > deadline {
            bail!(
                "the maintainers did not publish a registry signed by both within 180 s; see {} and {}",
                logs.join("maintainer.log").display(),
                logs.join("maintainer-2.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let net = NetworkFile::load(&network)?;
    if let Some(ui) =
        StatusFile::read(&dir.join("maintainer").join("status.json")).and_then(|st| st.ui)
    {
        say(&format!(
            "web UI of the maintainer's node: {ui} (the network, domains, verdicts; the forest once reported)"
        ));
    }
    say(&format!(
        "registry published; the network is described in {} (bootstrap {})",
        network.display(),
        net.bootstrap.first().map_or("-", String::as_str)
    ));
    timings.push(("publish".to_string(), t.elapsed().as_secs_f64()));

    // 4. Volunteers.
    let t = Instant::now();
    let names: Vec<String> = (1..=a.volunteers)
        .map(|i| format!("volunteer-{i}"))
        .collect();
    for name in &names {
        procs.spawn(
            name,
            &[
                s("join"),
                s("--network"),
                s(network.display()),
                s("--data-dir"),
                s(dir.join(name).display()),
                s("--steps"),
                s(a.elm_steps),
                s("--batch-size"),
                s(a.batch_size),
                s("--lease-secs"),
                s(a.lease_secs),
                s("--checkpoint-every"),
                s(25),
            ]
            .into_iter()
            .chain(ui_args(None))
            .collect::<Vec<_>>(),
        )?;
        std::thread::sleep(Duration::from_millis(700));
    }
    say(&format!(
        "{} volunteers joined; each claims a domain, trains an ELM, announces it and verifies the others",
        names.len()
    ));
    let multi = if json {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let style = ProgressStyle::with_template("{prefix:<40} [{bar:25}] {pos:>4}/{len:4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = names
        .iter()
        .map(|n| {
            let b = multi.add(ProgressBar::new(a.elm_steps));
            b.set_style(style.clone());
            b.set_prefix(n.clone());
            b
        })
        .collect();
    let mbar = multi.add(ProgressBar::new_spinner());
    mbar.set_style(
        ProgressStyle::with_template("{prefix:<40} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    mbar.set_prefix("maintainer");
    let deadline = started + Duration::from_secs(a.timeout);
    let mut ui_told = vec![false; names.len()];
    let statuses = loop {
        procs.check()?;
        let st: Vec<Status> = names
            .iter()
            .map(|n| StatusFile::read(&dir.join(n).join("status.json")).unwrap_or_default())
            .collect();
        for (i, s) in st.iter().enumerate() {
            if let Some(ui) = &s.ui
                && !ui_told[i]
                && !json
            {
                ui_told[i] = true;
                let _ = multi.println(format!(
                    "[demo] web UI of {}: {ui} (its training curve and verdicts)",
                    names[i]
                ));
            }
        }
        let m = StatusFile::read(&dir.join("maintainer").join("status.json")).unwrap_or_default();
        for (b, s) in bars.iter().zip(&st) {
            b.set_prefix(format!(
                "{} {}",
                names[bars.iter().position(|x| std::ptr::eq(x, b)).unwrap_or(0)],
                s.domain.as_deref().unwrap_or("")
            ));
            b.set_position(s.step);
            let verified = s.verified.values().filter(|v| **v).count();
            b.set_message(match (s.phase.as_str(), s.loss) {
                ("training", Some(l)) => format!("training, loss {l:.3}"),
                ("serving", _) => format!(
                    "announced {} (ppl {:.1} vs seed {:.1}), verified {verified} others",
                    s.elm.as_deref().map_or("", |e| &e[..8]),
                    s.claimed_ppl.unwrap_or(f64::NAN),
                    s.seed_ppl.unwrap_or(f64::NAN)
                ),
                (p, _) => p.to_string(),
            });
        }
        mbar.set_message(format!(
            "registry v{}, {} ELMs accepted, {} verified",
            m.registry_version.unwrap_or(0),
            m.accepted.len(),
            m.verified.len()
        ));
        let elms: Vec<Option<&String>> = st.iter().map(|s| s.elm.as_ref()).collect();
        let all_announced = elms.iter().all(Option::is_some);
        let cross_verified = st.iter().enumerate().all(|(i, s)| {
            let Some(e) = &s.elm else { return false };
            st.iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .all(|(_, o)| o.verified.get(e) == Some(&true))
        });
        let all_accepted = st
            .iter()
            .all(|s| s.elm.as_ref().is_some_and(|e| m.accepted.contains(e)));
        if all_announced && cross_verified && all_accepted {
            break st;
        }
        if Instant::now() > deadline {
            bail!(
                "the volunteers did not finish within {} s; see the logs in {}",
                a.timeout,
                logs.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for b in &bars {
        b.finish();
    }
    mbar.finish();
    timings.push(("volunteers".to_string(), t.elapsed().as_secs_f64()));
    say(
        "every ELM is announced, verified by every other volunteer and accepted by both maintainers",
    );

    // 5. The client.
    let t = Instant::now();
    say("client: fetching the verified forest (it verifies every ELM itself)");
    run_step(
        "client-fetch",
        &[
            s("fetch"),
            s("--network"),
            s(network.display()),
            s("--data-dir"),
            s(dir.join("client").display()),
            s("--out"),
            s(forest.display()),
            s("--min-elms"),
            s(a.volunteers),
        ],
        &logs,
        !json,
    )?;
    timings.push(("fetch".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    say(
        "client: scoring the seed, each ELM, the ensemble and the averages on each domain's test data",
    );
    run_step(
        "client-report",
        &[
            s("--json"),
            s("forest"),
            s("report"),
            s("--forest"),
            s(forest.display()),
            s("--max-tokens"),
            s(a.report_tokens),
        ],
        &logs,
        false,
    )?;
    timings.push(("report".to_string(), t.elapsed().as_secs_f64()));
    let report: ForestReport = serde_json::from_slice(&std::fs::read(forest.join("report.json"))?)
        .context("reading the report")?;
    let maint = StatusFile::read(&dir.join("maintainer").join("status.json")).unwrap_or_default();

    if a.keep_running {
        say(&format!(
            "the network keeps running (Ctrl-C to stop); try: btm-node forest list --network {}",
            network.display()
        ));
        if let Some(ui) = &maint.ui {
            say(&format!(
                "web UI: {ui}forest (the report and an ensemble box)"
            ));
        }
        for (_, child) in &mut procs.children {
            let _ = child.wait();
        }
    }
    procs.stop(Duration::from_secs(10));
    // The network is gone: a stale description would send `join` looking for it.
    let _ = std::fs::remove_file(&network);
    timings.push(("total".to_string(), started.elapsed().as_secs_f64()));

    let volunteers: Vec<VolunteerResult> = statuses
        .iter()
        .zip(&names)
        .map(|(s, n)| VolunteerResult {
            name: n.clone(),
            node: s.node.clone(),
            domain: s.domain.clone(),
            elm: s.elm.clone(),
            claimed_ppl: s.claimed_ppl,
            seed_ppl: s.seed_ppl,
            verified_by: statuses
                .iter()
                .zip(&names)
                .filter(|(o, _)| o.node != s.node)
                .filter(|(o, _)| {
                    s.elm
                        .as_ref()
                        .is_some_and(|e| o.verified.get(e) == Some(&true))
                })
                .map(|(_, on)| on.clone())
                .collect(),
        })
        .collect();
    let result = DemoResult {
        volunteers,
        accepted: maint.accepted.clone(),
        report,
        timings,
    };
    btm_model::fsutil::write_atomic(
        &dir.join("result.json"),
        &serde_json::to_vec_pretty(&result)?,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!();
    let cols = [left(14), left(22), left(9), right(9), right(9)];
    let head = ["volunteer", "domain", "ELM", "ppl", "seed ppl"];
    println!("{}  verified by", line(&cols, &head));
    for v in &result.volunteers {
        let cells = [
            v.name.as_str(),
            v.domain.as_deref().unwrap_or("-"),
            v.elm.as_deref().map_or("-", |e| &e[..8]),
            &num(v.claimed_ppl.unwrap_or(f64::NAN), 2),
            &num(v.seed_ppl.unwrap_or(f64::NAN), 2),
        ];
        println!("{}  {}", line(&cols, &cells), v.verified_by.join(", "));
    }
    println!();
    println!("{}", result.report.markdown());
    let stages: Vec<String> = result
        .timings
        .iter()
        .map(|(k, v)| format!("{k} {v:.0}s"))
        .collect();
    println!("time: {}", stages.join(", "));
    println!(
        "wrote {}, {} and {}; logs in {}",
        forest.join("report.md").display(),
        forest.join("report.png").display(),
        dir.join("result.json").display(),
        logs.display()
    );
    Ok(())
}
