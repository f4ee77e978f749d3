//! `btm-node keys ...` and `btm-node registry ...`: the maintainers' commands. Argument parsing
//! and printing only; the logic is `btm_registry::maintainer`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use btm_protocol::{
    Architecture, ClientVersion, ContentId, Domain, EvalSettings, PublicKey, Root, SeedManifest,
    TrainingSummary, ppl_to_milli,
};
use btm_registry::maintainer::{self, Edited, RegistryInit};

const DAY: u64 = 24 * 60 * 60;

/// Maintainer signing keys.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCmd {
    /// Create a new ed25519 key (the file holds the secret seed as hex, mode 0600).
    Generate {
        /// Where to write the key.
        #[arg(long, default_value = "maintainer.key")]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a key file.
    Show {
        #[arg(long, default_value = "maintainer.key")]
        key: PathBuf,
    },
}

/// The signed registry: drafts, signatures, checks.
#[derive(Debug, clap::Subcommand)]
pub enum RegistryCmd {
    /// Write an unsigned root listing the maintainer keys.
    RootInit {
        /// A maintainer public key (hex); repeat for each maintainer.
        #[arg(long = "maintainer", required = true)]
        maintainers: Vec<PublicKey>,
        /// How many distinct maintainers must sign.
        #[arg(long)]
        threshold: u32,
        /// Root version: 1 for the first root, trusted version + 1 for a rotation.
        #[arg(long, default_value_t = 1)]
        version: u64,
        /// Days until the root expires.
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
        #[arg(long, default_value = "root.cbor")]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Start an unsigned registry draft, empty or continuing from a published registry.
    Init {
        /// The published registry to continue from (its version + 1, same content).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Version (default: previous + 1, or 1).
        #[arg(long)]
        version: Option<u64>,
        /// Days until the registry expires.
        #[arg(long, default_value_t = 30)]
        expires_days: u64,
        /// Minimum client version, MAJOR.MINOR.PATCH (default: previous, or 0.1.0).
        #[arg(long)]
        min_client: Option<ClientVersion>,
        #[arg(long, default_value = "registry.cbor")]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Add a domain to a draft (drops existing signatures).
    AddDomain {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Content id (hex) of the training data, or a file to hash.
        #[arg(long)]
        train: String,
        /// Content id (hex) of the validation data, or a file to hash.
        #[arg(long)]
        valid: String,
        /// Content id (hex) of the test data, or a file to hash.
        #[arg(long)]
        test: String,
        /// Tokens per evaluation block.
        #[arg(long, default_value_t = 1024)]
        block_size: u32,
        /// Most validation tokens a verifier scores.
        #[arg(long, default_value_t = 1 << 20)]
        max_eval_tokens: u64,
        /// Relative perplexity tolerance, parts per million.
        #[arg(long, default_value_t = 20_000)]
        tolerance_ppm: u32,
    },
    /// Set the seed of a draft (drops existing signatures).
    SetSeed {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
        #[arg(long)]
        vocab: u32,
        #[arg(long)]
        context: u32,
        #[arg(long)]
        d_model: u32,
        #[arg(long)]
        heads: u32,
        #[arg(long)]
        layers: u32,
        /// Content id (hex) of the tokenizer, or a file to hash.
        #[arg(long)]
        tokenizer: String,
        /// Content id (hex) of the seed weights, or a file to hash.
        #[arg(long)]
        weights: String,
        #[arg(long, default_value_t = 0)]
        steps: u64,
        #[arg(long, default_value_t = 0)]
        tokens: u64,
        #[arg(long, default_value_t = 0)]
        flops: u64,
        /// Validation perplexity of the seed.
        #[arg(long)]
        valid_ppl: f64,
    },
    /// Accept a signed ELM record file into a draft (drops existing signatures).
    AcceptElm {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
        /// The ELM record envelope, signed by its trainer.
        #[arg(long)]
        elm: PathBuf,
    },
    /// Add your signature to a root or registry file.
    Sign {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
        #[arg(long, default_value = "maintainer.key")]
        key: PathBuf,
    },
    /// Copy the valid signatures of another copy of the same draft into this one.
    Combine {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
        /// The other copy.
        #[arg(long)]
        from: PathBuf,
    },
    /// Print a root, registry or other record file.
    Show {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
    },
    /// Run a node's acceptance rules on a file; exits non-zero if a node would refuse it.
    Verify {
        #[arg(long, default_value = "registry.cbor")]
        file: PathBuf,
        /// The trusted root (required for a registry; for a root, checks it as a rotation).
        #[arg(long)]
        root: Option<PathBuf>,
        /// The registry nodes trust now (checks rollback and equivocation).
        #[arg(long)]
        previous: Option<PathBuf>,
        /// Unix time to check expiry at (default: now).
        #[arg(long)]
        now: Option<u64>,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A 64-hex-digit content id, or else the path of a file whose BLAKE3 hash is the id.
fn content_id(arg: &str) -> Result<ContentId> {
    if let Ok(id) = arg.parse::<ContentId>() {
        return Ok(id);
    }
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(maintainer::hash_file(path)?);
    }
    bail!("{arg:?} is neither a 64-digit hex content id nor a file")
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn report_edit(what: &str, file: &Path, edited: &Edited, json: bool) -> Result<()> {
    let r = edited.registry.record();
    if json {
        return print_json(&serde_json::json!({
            "file": file, "id": edited.registry.id(), "version": r.version,
            "dropped_signatures": edited.dropped_signatures,
        }));
    }
    println!(
        "{what}: {} (registry v{}, id {})",
        file.display(),
        r.version,
        edited.registry.id()
    );
    if edited.dropped_signatures > 0 {
        println!(
            "dropped {} signature(s) over the old body: maintainers must sign again",
            edited.dropped_signatures
        );
    }
    Ok(())
}

/// Runs `btm-node keys ...`.
pub fn run_keys(cmd: KeysCmd, json: bool) -> Result<()> {
    let (path, key) = match cmd {
        KeysCmd::Generate { out, force } => {
            let key = maintainer::generate_key(&out, force)?;
            (out, key)
        }
        KeysCmd::Show { key } => {
            let public = maintainer::public_key(&key)?;
            (key, public)
        }
    };
    if json {
        print_json(&serde_json::json!({ "file": path, "public_key": key }))
    } else {
        println!("{key}  {}", path.display());
        Ok(())
    }
}

/// Runs `btm-node registry ...`.
pub fn run_registry(cmd: RegistryCmd, json: bool) -> Result<()> {
    match cmd {
        RegistryCmd::RootInit {
            maintainers,
            threshold,
            version,
            expires_days,
            out,
            force,
        } => {
            let root = Root {
                version,
                expires: now() + expires_days * DAY,
                threshold,
                keys: maintainers,
            };
            let env = maintainer::init_root(&out, root, force)?;
            if json {
                return print_json(
                    &serde_json::json!({ "file": out, "id": env.id(), "root": env.record() }),
                );
            }
            let r = env.record();
            println!(
                "wrote unsigned root v{} ({} of {} keys) to {}",
                r.version,
                r.threshold,
                r.keys.len(),
                out.display()
            );
        }
        RegistryCmd::Init {
            from,
            version,
            expires_days,
            min_client,
            out,
            force,
        } => {
            let init = RegistryInit {
                version,
                expires: now() + expires_days * DAY,
                min_client_version: min_client,
                from,
            };
            let env = maintainer::init_registry(&out, init, force)?;
            let edited = Edited {
                registry: env,
                dropped_signatures: 0,
            };
            report_edit("wrote draft", &out, &edited, json)?;
        }
        RegistryCmd::AddDomain {
            file,
            name,
            description,
            train,
            valid,
            test,
            block_size,
            max_eval_tokens,
            tolerance_ppm,
        } => {
            let domain = Domain {
                name,
                description,
                train: content_id(&train).context("--train")?,
                valid: content_id(&valid).context("--valid")?,
                test: content_id(&test).context("--test")?,
                eval: EvalSettings::public(block_size, max_eval_tokens, tolerance_ppm),
            };
            let edited = maintainer::add_domain(&file, domain)?;
            report_edit("added domain", &file, &edited, json)?;
        }
        RegistryCmd::SetSeed {
            file,
            vocab,
            context,
            d_model,
            heads,
            layers,
            tokenizer,
            weights,
            steps,
            tokens,
            flops,
            valid_ppl,
        } => {
            let Some(valid_ppl_milli) = ppl_to_milli(valid_ppl) else {
                bail!("--valid-ppl must be a finite, non-negative number")
            };
            let seed = SeedManifest {
                architecture: Architecture {
                    vocab_size: vocab,
                    context,
                    d_model,
                    heads,
                    layers,
                },
                tokenizer: content_id(&tokenizer).context("--tokenizer")?,
                weights: content_id(&weights).context("--weights")?,
                training: TrainingSummary {
                    steps,
                    tokens,
                    flops,
                    valid_ppl_milli,
                },
                schedule: btm_protocol::Schedule {
                    step: steps,
                    total: steps,
                },
                optimizer: None,
            };
            let edited = maintainer::set_seed(&file, seed)?;
            report_edit("set seed", &file, &edited, json)?;
        }
        RegistryCmd::AcceptElm { file, elm } => {
            let edited = maintainer::accept_elm(&file, &elm)?;
            report_edit("accepted ELM", &file, &edited, json)?;
        }
        RegistryCmd::Sign { file, key } => {
            let s = maintainer::sign(&file, &key)?;
            if json {
                return print_json(&s);
            }
            println!(
                "signed {} {} as {}: {} signature(s)",
                s.kind, s.id, s.key, s.signatures
            );
        }
        RegistryCmd::Combine { file, from } => {
            let added = maintainer::combine(&file, &from)?;
            if json {
                return print_json(&serde_json::json!({ "file": file, "added": added }));
            }
            println!(
                "added {added} signature(s) from {} to {}",
                from.display(),
                file.display()
            );
        }
        RegistryCmd::Show { file } => {
            let s = maintainer::show(&file)?;
            if json {
                return print_json(&s);
            }
            println!("{} {} ({} bytes)", s.kind, s.id, s.body_bytes);
            println!("{}", serde_json::to_string_pretty(&s.record)?);
            for (sig, ok) in s.signatures.iter().zip(&s.signature_valid) {
                println!(
                    "signature by {} {}",
                    sig.key,
                    if *ok { "valid" } else { "INVALID" }
                );
            }
        }
        RegistryCmd::Verify {
            file,
            root,
            previous,
            now: at,
        } => {
            let v = maintainer::verify(
                &file,
                root.as_deref(),
                previous.as_deref(),
                at.unwrap_or_else(now),
            )?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "{} v{} {}: {} of {} required signatures valid ({} invalid, {} unknown, {} duplicate)",
                    v.kind,
                    v.version,
                    v.id,
                    v.tally.valid,
                    v.threshold,
                    v.tally.invalid,
                    v.tally.unknown,
                    v.tally.duplicate
                );
            }
            if let Some(r) = v.rejection {
                bail!("a node would refuse {}: {r}", file.display());
            }
            if !json {
                println!("a node would accept {}", file.display());
            }
        }
    }
    Ok(())
}
