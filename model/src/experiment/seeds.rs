//! Several runs of one experiment with different seeds: each system's mean and standard
//! deviation, and the paper's findings judged on paired differences. A finding is
//! "reproduced" only when the mean difference exceeds two standard errors in the paper's
//! direction.

use serde::{Deserialize, Serialize};

use super::Report;

/// Mean and sample standard deviation of a few values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 for one value.
    pub sd: f64,
    /// How many values.
    pub n: usize,
}

impl Stat {
    /// The statistics of `v` (NaN mean when empty).
    pub fn of(v: &[f64]) -> Self {
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Stat { mean, sd, n }
    }

    /// The standard error of the mean.
    pub fn se(&self) -> f64 {
        self.sd / (self.n as f64).sqrt()
    }
}

/// One system over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemStats {
    /// Name.
    pub name: String,
    /// Training FLOPs (the same for every seed).
    pub train_flops: f64,
    /// Mean in-domain perplexity.
    pub mean_in: Stat,
    /// Mean out-of-domain perplexity.
    pub mean_out: Stat,
}

/// Where a finding is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The training domains' test sets.
    InDomain,
    /// The evaluation-only domains.
    OutOfDomain,
}

/// What the runs say about a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The claimed winner is better by more than two standard errors.
    Reproduced,
    /// The claimed loser is better by more than two standard errors.
    Contradicted,
    /// Neither (or fewer than two seeds).
    Inconclusive,
}

/// A claim "`better` has lower perplexity than `worse`" judged on paired relative differences
/// `(better - worse) / worse` over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    /// The paper's claim, in words.
    pub claim: String,
    /// The system claimed to be better.
    pub better: String,
    /// The system claimed to be worse.
    pub worse: String,
    /// In or out of domain.
    pub side: Side,
    /// Relative difference in percent (negative: the claim holds on average).
    pub diff_pct: Stat,
    /// The verdict.
    pub verdict: Verdict,
}

/// Everything the seeds say together.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The settings of the first run (the others differ only in their seed).
    pub config: super::Config,
    /// Training FLOPs of the dense LM (and of every compute-matched system).
    pub dense_flops: f64,
    /// The seeds, in order.
    pub seeds: Vec<u64>,
    /// Every system present in all runs.
    pub systems: Vec<SystemStats>,
    /// The paper's findings.
    pub findings: Vec<Finding>,
}

/// The claims checked, as (claim, better, worse); each is judged in and out of domain.
pub const CLAIMS: &[(&str, &str, &str)] = &[
    (
        "1. ELMforest beats the compute-matched Transformer-LM",
        "btm_ensemble",
        "dense",
    ),
    (
        "1. (previous-token weights, the paper-comparable row)",
        "btm_ensemble_prev_token",
        "dense",
    ),
    ("2. ELMforest beats DEMix", "btm_ensemble", "demix"),
    (
        "3. Domain splits beat random splits",
        "btm_ensemble",
        "random_split_ensemble",
    ),
    (
        "4. Posterior-weighted averaging beats the Transformer-LM",
        "btm_average_posterior",
        "dense",
    ),
    (
        "4. Uniform averaging is worse than the Transformer-LM",
        "dense",
        "btm_average_uniform",
    ),
    (
        "5. The seed phase matters",
        "btm_ensemble",
        "no_seed_ensemble",
    ),
    (
        "The forest is no worse than its seed",
        "btm_ensemble",
        "seed",
    ),
    (
        "The forest with its seed as a member is no worse than the seed",
        "btm_seed_member_ensemble",
        "seed",
    ),
];

impl Summary {
    /// Summarises `runs` (one per seed, same settings otherwise; at least one).
    pub fn of(runs: &[Report]) -> Self {
        let config = runs
            .first()
            .map(|r| r.config.clone())
            .unwrap_or_else(super::Config::standard);
        let dense_flops = runs.first().map_or(f64::NAN, |r| r.plan.dense_flops());
        let seeds = runs.iter().map(|r| r.config.seed).collect();
        let find = |r: &Report, name: &str| r.systems.iter().find(|s| s.name == name).cloned();
        let mut systems = Vec::new();
        if let Some(first) = runs.first() {
            for s in &first.systems {
                let all: Option<Vec<_>> = runs.iter().map(|r| find(r, &s.name)).collect();
                let Some(all) = all else { continue };
                systems.push(SystemStats {
                    name: s.name.clone(),
                    train_flops: s.train_flops,
                    mean_in: Stat::of(&all.iter().map(|x| x.mean_in).collect::<Vec<_>>()),
                    mean_out: Stat::of(&all.iter().map(|x| x.mean_out).collect::<Vec<_>>()),
                });
            }
        }
        let mut findings = Vec::new();
        for &(claim, better, worse) in CLAIMS {
            for side in [Side::InDomain, Side::OutOfDomain] {
                let Some(diff_pct) = paired_diff(runs, better, worse, side) else {
                    continue;
                };
                findings.push(Finding {
                    claim: claim.to_string(),
                    better: better.to_string(),
                    worse: worse.to_string(),
                    side,
                    diff_pct,
                    verdict: verdict(&diff_pct),
                });
            }
        }
        Summary {
            config,
            dense_flops,
            seeds,
            systems,
            findings,
        }
    }

    /// Markdown: the systems' mean ± sd, then the findings with their verdicts.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "{} seeds ({}): mean ± standard deviation of the test perplexity.\n\n",
            self.seeds.len(),
            self.seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        s.push_str(
            "| system | train FLOPs | in-domain ppl | out-of-domain ppl |\n|---|---:|---:|---:|\n",
        );
        for x in &self.systems {
            s.push_str(&format!(
                "| {} | {:.3e} | {:.2} ± {:.2} | {:.2} ± {:.2} |\n",
                x.name, x.train_flops, x.mean_in.mean, x.mean_in.sd, x.mean_out.mean, x.mean_out.sd
            ));
        }
        s.push_str(
            "\nFindings: the relative difference (better − worse) / worse over paired seeds, mean ± sd; \
             reproduced when it is below zero by more than two standard errors.\n\n\
             | claim | better | worse | where | difference | verdict |\n|---|---|---|---|---:|---|\n",
        );
        for f in &self.findings {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:+.1}% ± {:.1} | {} |\n",
                f.claim,
                f.better,
                f.worse,
                match f.side {
                    Side::InDomain => "in",
                    Side::OutOfDomain => "out",
                },
                f.diff_pct.mean,
                f.diff_pct.sd,
                match f.verdict {
                    Verdict::Reproduced => "reproduced",
                    Verdict::Contradicted => "**contradicted**",
                    Verdict::Inconclusive => "inconclusive",
                }
            ));
        }
        s
    }
}

/// The relative difference `(better - worse) / worse` in percent on `side`, seed by seed, as
/// mean ± sd; `None` when a run lacks either system.
pub fn paired_diff(runs: &[Report], better: &str, worse: &str, side: Side) -> Option<Stat> {
    let find = |r: &Report, name: &str| r.systems.iter().find(|s| s.name == name).cloned();
    let diffs: Vec<f64> = runs
        .iter()
        .map(|r| {
            let (b, w) = (find(r, better)?, find(r, worse)?);
            let (b, w) = match side {
                Side::InDomain => (b.mean_in, w.mean_in),
                Side::OutOfDomain => (b.mean_out, w.mean_out),
            };
            Some(100.0 * (b - w) / w)
        })
        .collect::<Option<_>>()?;
    (!diffs.is_empty()).then(|| Stat::of(&diffs))
}

/// The verdict on differences `d` (negative favours the claim).
pub fn verdict(d: &Stat) -> Verdict {
    if d.n < 2 || !d.mean.is_finite() {
        return Verdict::Inconclusive;
    }
    let margin = 2.0 * d.se();
    if d.mean < -margin {
        Verdict::Reproduced
    } else if d.mean > margin {
        Verdict::Contradicted
    } else {
        Verdict::Inconclusive
    }
}

impl Summary {
    /// The finding of `better` against `worse` on `side`, when the summary has it.
    pub fn finding(&self, better: &str, worse: &str, side: Side) -> Option<&Finding> {
        self.findings
            .iter()
            .find(|f| f.better == better && f.worse == worse && f.side == side)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_need_two_standard_errors() {
        // Mean -3, sd 1, n 3: se 0.577, margin 1.15: reproduced.
        assert_eq!(verdict(&Stat::of(&[-2.0, -3.0, -4.0])), Verdict::Reproduced);
        assert_eq!(verdict(&Stat::of(&[2.0, 3.0, 4.0])), Verdict::Contradicted);
        // Mean -1, sd 2: margin 2.3: inconclusive.
        assert_eq!(
            verdict(&Stat::of(&[1.0, -1.0, -3.0])),
            Verdict::Inconclusive
        );
        // One seed never decides.
        assert_eq!(verdict(&Stat::of(&[-50.0])), Verdict::Inconclusive);
        let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!((s.mean - 2.5).abs() < 1e-12);
        assert!((s.sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
