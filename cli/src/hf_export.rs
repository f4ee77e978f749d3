//! `btm-node forest export-hf`: a forest in the formats people already use. Each ELM becomes a
//! folder that `transformers.GPT2LMHeadModel.from_pretrained` loads (weights, `config.json`,
//! `tokenizer.json`) with a model card (`README.md`: domain, parents, updates, tokens, verified
//! perplexity and who verified it, the licence of the domain's data) and the same facts as
//! `btm.json`; averages of the ELMs export the same way; `ensemble.json` is the forest's
//! ensemble recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use btm_model::device::DeviceKind;
use btm_model::forest::{Forest, average};
use btm_model::tokenizer::Tokenizer;
use btm_model::{fsutil, weights};
use clap::Args;
use serde_json::{Value, json};

use crate::open::open_with_elms;

#[derive(Debug, Args)]
pub struct ExportHfArgs {
    /// The forest (directory or forest.json), e.g. from `btm-node fetch`.
    #[arg(long, default_value = "runs/forest")]
    forest: PathBuf,
    /// Output directory: one folder per ELM, the averages, ensemble.json.
    #[arg(long)]
    out: PathBuf,
    /// Also export the posterior-weighted average for this text (the ELMs weighted by their
    /// domain posterior on it).
    #[arg(long)]
    average_text: Option<String>,
    /// Skip the uniform average.
    #[arg(long)]
    no_average: bool,
}

/// The licence of each domain's text, from the corpus README's tables (`| \`domain\` | sources
/// | licence | ...`).
fn licences() -> BTreeMap<String, String> {
    let Ok(dir) = btm_model::bundle::dir() else {
        return BTreeMap::new();
    };
    let text = std::fs::read_to_string(dir.join("README.md")).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        if cells.len() > 3
            && let Some(name) = cells[0]
                .trim_start_matches('|')
                .trim()
                .strip_prefix('`')
                .and_then(|s| s.strip_suffix('`'))
        {
            out.insert(name.to_string(), cells[2].trim().to_string());
        }
    }
    out
}

fn card(title: &str, facts: &Value, licence: &str, body: &str) -> String {
    let yaml_licence = licence.replace(['\n', '"'], " ");
    format!(
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\nlicense: other\n\
         license_name: \"{yaml_licence}\"\ntags:\n- btm\n- branch-train-merge\n- gpt2\n---\n\n\
         # {title}\n\n{body}\n\n```json\n{}\n```\n\nLoad it with `transformers.GPT2LMHeadModel.from_pretrained(\".\")` \
         and `tokenizers.Tokenizer.from_file(\"tokenizer.json\")` (byte-level BPE; token 0 is \
         `<|endoftext|>`, which separates documents).\n",
        serde_json::to_string_pretty(facts).unwrap_or_default()
    )
}

fn export_model(
    model: &btm_model::Gpt,
    tok: &Tokenizer,
    dir: &Path,
    readme: &str,
    facts: &Value,
) -> Result<()> {
    weights::export_hf(model, Some(tok.json()), dir)?;
    fsutil::write_atomic(&dir.join("README.md"), readme.as_bytes())?;
    fsutil::write_atomic(&dir.join("btm.json"), &serde_json::to_vec_pretty(facts)?)?;
    Ok(())
}

/// A folder name for an ELM name (forest names are domain names, but a forest file is input).
fn folder(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("elm_{s}")
    } else {
        s
    }
}

pub fn export_hf(a: ExportHfArgs, json: bool) -> Result<()> {
    let (forest, tok) = open_with_elms(&a.forest)?;
    let device = DeviceKind::Cpu.device()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let licences = licences();
    let verification: BTreeMap<String, Value> = fsutil::read_limited(
        &forest.dir().join(crate::client_cmds::VERIFICATION_FILE),
        16 << 20,
    )
    .ok()
    .and_then(|b| serde_json::from_slice(&b).ok())
    .unwrap_or_default();
    let mut written = Vec::new();
    for (i, e) in forest.elms.iter().enumerate() {
        let dir = a.out.join(folder(&e.name));
        let licence = e
            .domains
            .iter()
            .map(|d| licences.get(d).cloned().unwrap_or_else(|| "unknown".into()))
            .collect::<Vec<_>>()
            .join("; ");
        let verified = verification.get(&e.name).cloned().unwrap_or(Value::Null);
        let facts = json!({
            "name": e.name,
            "domains": e.domains,
            "init": e.init,
            "parents": e.parents,
            "steps": e.train.as_ref().map(|t| t.steps),
            "tokens": e.train.as_ref().map(|t| t.tokens),
            "weights_blake3": e.weights.id,
            "verification": verified,
            "data_licence": licence,
            "architecture": forest.architecture.to_hf_config(),
        });
        let body = format!(
            "An expert LM (ELM) of a Branch-Train-Merge forest (Li et al. 2022), trained on the \
             domain {} by a volunteer of the btm network and verified by its peers. Its data's \
             licence: {licence}.",
            e.domains.join(", ")
        );
        let model = forest.load_elm(i, &device)?;
        export_model(
            &model,
            &tok,
            &dir,
            &card(&format!("btm ELM: {}", e.name), &facts, &licence, &body),
            &facts,
        )?;
        written.push(dir);
    }
    let mut averages = Vec::new();
    let tmp = tempfile::tempdir()?;
    let mut do_average = |name: &str, members: Vec<(usize, f64)>, how: &str| -> Result<()> {
        let path = tmp.path().join(format!("{name}.safetensors"));
        let summary = average::average_members(&forest, &members, &path)?;
        let model = weights::load(&path, Some(&forest.architecture), &device)?;
        let weights: Vec<Value> = members
            .iter()
            .zip(&summary.weights)
            .map(|(&(i, _), w)| json!({ "elm": forest.elms[i].name, "weight": w }))
            .collect();
        let facts = json!({ "name": name, "average": how, "members": weights, "weights_blake3": summary.id });
        let licence = forest
            .elms
            .iter()
            .flat_map(|e| e.domains.iter())
            .map(|d| licences.get(d).cloned().unwrap_or_else(|| "unknown".into()))
            .collect::<Vec<_>>()
            .join("; ");
        let dir = a.out.join(name);
        let body = format!(
            "The {how} parameter average of the forest's ELMs (one model, the size of one ELM). \
             Licences of the data behind it: {licence}."
        );
        export_model(
            &model,
            &tok,
            &dir,
            &card(&format!("btm forest: {name}"), &facts, &licence, &body),
            &facts,
        )?;
        averages.push(dir);
        Ok(())
    };
    if !a.no_average {
        let all = (0..forest.elms.len()).map(|i| (i, 1.0)).collect();
        do_average("average-uniform", all, "uniform")?;
    }
    if let Some(text) = &a.average_text {
        let mut ids = vec![btm_model::tokenizer::EOT_ID];
        ids.extend(tok.encode(text)?);
        let prior = crate::client_cmds::prior_on(&forest, &ids, &device)?;
        do_average(
            "average-posterior",
            prior.iter().copied().enumerate().collect(),
            "posterior-weighted (the ELMs' domain posterior on a target text)",
        )?;
    }
    let recipe = ensemble_recipe(&forest);
    fsutil::write_atomic(
        &a.out.join("ensemble.json"),
        &serde_json::to_vec_pretty(&recipe)?,
    )?;
    if json {
        println!(
            "{}",
            json!({ "out": a.out, "elms": written, "averages": averages, "ensemble": a.out.join("ensemble.json") })
        );
    } else {
        println!(
            "wrote {} ELM folders, {} averages and ensemble.json to {} (each loads with transformers.GPT2LMHeadModel.from_pretrained)",
            written.len(),
            averages.len(),
            a.out.display()
        );
    }
    Ok(())
}

/// How to run the forest as the paper's ensemble from the exported folders.
fn ensemble_recipe(forest: &Forest) -> Value {
    json!({
        "method": "Branch-Train-Merge ELMforest ensemble (Li et al. 2022, section 4.1)",
        "members": forest.elms.iter().map(|e| json!({
            "name": e.name,
            "folder": folder(&e.name),
            "domains": e.domains,
        })).collect::<Vec<_>>(),
        "weighting": "posterior",
        "recipe": [
            "tokenize the text with any member's tokenizer.json (all are the same)",
            "prior: uniform over the members (or a cached prior estimated on dev data of the target domain)",
            "at each position t, weight each member by its domain posterior: prior times the likelihood it gave tokens 0..t-1, normalised",
            "the next-token distribution is the weighted sum of the members' softmax outputs",
            "top_k (optional): keep only the k members with the largest weights and renormalise",
        ],
        "specification": "specs/forest.md in the btm repository",
    })
}
