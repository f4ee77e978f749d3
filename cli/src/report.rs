//! The command-line subscriber of a role's events: one line per event on stderr (prefixed with
//! the role), a progress bar while training, `status.json` kept current for people and for
//! `btm-node demo`; with `--json`, one JSON event a line instead of the lines and bars: on stdout
//! for the long-running roles (`join`, `seed publish`), on stderr for commands whose result is
//! the JSON document on stdout (`fetch`, `forest list`).

use std::sync::{Arc, Mutex};

use btm_roles::{Event, Events, InitKind, Phase};

use crate::net::{Say, StatusFile, short};

/// How a phase reads in lines and in `status.json` (the demo and the end-to-end tests read it).
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::WaitingForRegistry => "waiting for the registry",
        Phase::AddingBlobs => "adding blobs",
        Phase::Downloading => "downloading",
        Phase::Training => "training",
        Phase::Measuring => "measuring",
        Phase::Serving => "serving",
        Phase::Stopped => "stopped",
    }
}

/// A bar style from an indicatif template (the default bar if the template is wrong).
pub(crate) fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// ELM names with their weights: `elm0 0.25, elm1 0.75`.
fn weighted_names(w: &[(String, f64)]) -> String {
    w.iter()
        .map(|(n, p)| format!("{n} {p:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Draws a role's events for a person (or a script, with `--json`).
pub struct Reporter {
    say: Say,
    json: bool,
    /// Whether `--json` events go to stdout (else stderr).
    events_on_stdout: bool,
    status: Option<StatusFile>,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Reporter {
    /// A reporter for a long-running role: `--json` events on stdout.
    pub fn new(role: &str, json: bool, status: Option<StatusFile>) -> Arc<Reporter> {
        Self::with_output(role, json, status, true)
    }

    /// A reporter for a command whose result goes to stdout: `--json` events on stderr.
    pub fn for_command(role: &str, json: bool) -> Arc<Reporter> {
        Self::with_output(role, json, None, false)
    }

    fn with_output(
        role: &str,
        json: bool,
        status: Option<StatusFile>,
        events_on_stdout: bool,
    ) -> Arc<Reporter> {
        Arc::new(Reporter {
            say: Say::new(role, json),
            json,
            events_on_stdout,
            status,
            bar: Mutex::new(None),
        })
    }

    /// The role's event sink.
    pub fn events(self: &Arc<Self>) -> Events {
        let me = self.clone();
        Events::new(move |e| me.on(e))
    }

    pub fn line(&self, m: impl AsRef<str>) {
        if let Ok(b) = self.bar.lock()
            && let Some(b) = b.as_ref()
        {
            b.suspend(|| self.say.line(m.as_ref()));
            return;
        }
        self.say.line(m);
    }

    fn status(&self, f: impl FnOnce(&mut crate::net::Status)) {
        if let Some(s) = &self.status {
            s.update(f);
        }
    }

    /// Puts `make()`'s bar in the slot unless one is there (not with `--json`), then lets `f`
    /// update it.
    fn with_bar(
        &self,
        make: impl FnOnce() -> indicatif::ProgressBar,
        f: impl FnOnce(&indicatif::ProgressBar),
    ) {
        if self.json {
            return;
        }
        if let Ok(mut b) = self.bar.lock() {
            f(b.get_or_insert_with(make));
        }
    }

    fn finish_bar(&self) {
        if let Ok(mut b) = self.bar.lock()
            && let Some(b) = b.take()
        {
            b.finish_and_clear();
        }
    }

    fn on(&self, e: &Event) {
        if self.json
            && let Ok(s) = serde_json::to_string(e)
        {
            if self.events_on_stdout {
                println!("{s}");
            } else {
                eprintln!("{s}");
            }
        }
        match e {
            Event::Phase { phase } => {
                if !matches!(phase, Phase::Training) {
                    self.finish_bar();
                }
                match phase {
                    Phase::Serving => {
                        self.line("serving blobs and verifying other ELMs (Ctrl-C to stop)")
                    }
                    Phase::Stopped => self.line("stopping"),
                    _ => {}
                }
                self.status(|s| s.phase = phase_name(*phase).into());
            }
            Event::Registry {
                version,
                domains,
                seed,
                accepted,
            } => {
                self.line(format!(
                    "registry v{version} verified: {domains} domains, seed {}, {} accepted ELMs",
                    seed.map_or("-".into(), |s| short(&s.0)),
                    accepted.len()
                ));
                self.status(|s| {
                    s.registry_version = Some(*version);
                    s.accepted = accepted.iter().map(ToString::to_string).collect();
                });
            }
            Event::Claimed { domain, lease_secs } => {
                self.line(format!(
                    "claimed {domain} (lease {lease_secs} s, renewed while training)"
                ));
                self.status(|s| s.domain = Some(domain.clone()));
            }
            Event::ClaimLost { domain, keeper } => self.line(format!(
                "{domain} was claimed by {} at the same time; it keeps it, choosing again",
                short(keeper.as_bytes())
            )),
            Event::Fetching { what, id } => {
                self.line(format!("fetching the {what} ({})", short(&id.0)))
            }
            Event::Download {
                what,
                bytes,
                total,
                ..
            } => self.with_bar(
                || {
                    let (bar, template) = match total {
                        Some(t) => (
                            indicatif::ProgressBar::new(*t),
                            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
                        ),
                        None => (
                            indicatif::ProgressBar::no_length(),
                            "{spinner} {msg} {bytes} {bytes_per_sec} ({elapsed})",
                        ),
                    };
                    bar.set_style(bar_style(template));
                    bar.set_message(format!("downloading the {what}"));
                    bar
                },
                |b| b.set_position(*bytes),
            ),
            Event::Fetched {
                what,
                bytes,
                secs,
                held_already,
                ..
            } => {
                self.finish_bar();
                if *held_already {
                    self.line(format!("the {what} is held here already"));
                } else {
                    self.line(format!(
                        "fetched the {what}: {} in {secs:.1} s ({}/s)",
                        indicatif::HumanBytes(*bytes),
                        indicatif::HumanBytes((*bytes as f64 / secs.max(1e-3)) as u64)
                    ));
                }
            }
            Event::Verifying { elm } => {
                self.finish_bar();
                let label = format!("verifying ELM {}", short(&elm.0));
                self.with_bar(
                    || {
                        let bar = indicatif::ProgressBar::new_spinner();
                        bar.set_style(bar_style("{spinner} {msg} ({elapsed})"));
                        bar.enable_steady_tick(std::time::Duration::from_millis(200));
                        bar
                    },
                    |b| b.set_message(label),
                );
            }
            Event::Validation { step, ppl, tokens } => self.line(format!(
                "update {step}: validation perplexity {ppl:.2} ({tokens} tokens of the public split)"
            )),
            Event::Branched { init, parents } => {
                let how = match init {
                    InitKind::Seed => "from the seed",
                    InitKind::PosteriorAverage => "from the posterior-weighted average",
                    InitKind::Random => "from a random initialisation",
                };
                let desc = format!("{how} ({})", weighted_names(parents));
                self.line(format!("branching {desc}"));
                self.status(|s| s.branch = Some(desc));
            }
            Event::Posterior { domain, weights } => self.line(format!(
                "posterior of {domain}'s validation data over the accepted ELMs: {}",
                weighted_names(weights)
            )),
            Event::TrainingStarted(t) => {
                self.line(t.describe());
                self.status(|s| {
                    s.steps = t.steps;
                    s.resumed_from = t.resumed_from;
                });
                if !self.json {
                    self.finish_bar();
                    let bar = indicatif::ProgressBar::new(t.steps);
                    bar.set_style(bar_style(
                        "{spinner} train [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})",
                    ));
                    bar.set_position(t.resumed_from.unwrap_or(0));
                    if let Ok(mut b) = self.bar.lock() {
                        *b = Some(bar);
                    }
                }
            }
            Event::Step {
                step,
                loss,
                tokens_per_s,
                ..
            } => {
                if let Ok(b) = self.bar.lock()
                    && let Some(b) = b.as_ref()
                {
                    b.set_position(*step);
                    b.set_message(format!("loss {loss:.3} {tokens_per_s:.0} tok/s"));
                }
                self.status(|s| {
                    s.step = *step;
                    s.loss = Some(*loss);
                });
            }
            Event::TrainingStopped { step } => {
                self.finish_bar();
                self.line(format!(
                    "stopped at update {step}; run the same command again to resume from the checkpoint"
                ));
            }
            Event::Trained { ppl, seed_ppl } => {
                self.finish_bar();
                self.line(format!(
                    "trained: validation perplexity {ppl:.2} (seed {seed_ppl:.2})"
                ));
                self.status(|s| {
                    s.claimed_ppl = Some(*ppl);
                    s.seed_ppl = Some(*seed_ppl);
                });
            }
            Event::Announced {
                elm,
                weights,
                domain,
                again,
            } => {
                self.line(if *again {
                    format!(
                        "resuming: ELM {} on {domain} was announced before; announced again",
                        short(&elm.0)
                    )
                } else {
                    format!(
                        "announced ELM {} on {domain}: weights {} served from this node",
                        short(&elm.0),
                        short(&weights.0)
                    )
                });
                self.status(|s| {
                    s.domain = Some(domain.clone());
                    s.elm = Some(elm.to_string());
                });
            }
            Event::Verdict(v) => {
                self.finish_bar();
                self.line(format!("verified ELM {}: {}", short(&v.elm.0), v.outcome()));
                self.status(|s| {
                    s.verified.insert(v.elm.to_string(), v.accepted);
                });
            }
            Event::ClaimSeen {
                domain,
                node,
                lease_left_secs,
            } => self.line(format!(
                "claim: {} on {domain} for {lease_left_secs} s",
                short(node.as_bytes())
            )),
            Event::Attestation {
                elm,
                verifier,
                accepted,
            } => self.line(format!(
                "attestation: {} {} ELM {}",
                short(verifier.as_bytes()),
                if *accepted { "accepts" } else { "rejects" },
                short(&elm.0)
            )),
            Event::Published {
                version,
                domains,
                seed,
                added,
            } => {
                if added.is_empty() {
                    self.line(format!(
                        "published registry v{version}: {domains} domains, seed {}",
                        short(&seed.0)
                    ));
                } else {
                    self.line(format!(
                        "registry v{version} accepts {}",
                        added
                            .iter()
                            .map(|(id, d)| format!("{} ({d})", short(&id.0)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                self.status(|s| s.registry_version = Some(*version));
            }
            Event::Note { message } => self.line(message),
            _ => {}
        }
    }
}
