//! Tests of the `btm-node` program as a user runs it: a copy of the built binary, away from
//! the source tree; and its web UI in a real browser (`ui`). One binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod hf;
mod ui;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The built program.
fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_btm-node"))
}

/// The checkout the program was built from (the parent of this crate).
fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate has a parent directory")
        .to_path_buf()
}

fn text(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The environment a user's shell would give: HOME and the XDG data directory inside `home`,
/// no `BTM_CORPUS`, nothing from cargo.
fn user_env(cmd: &mut Command, home: &Path) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .current_dir(home);
}

/// `program` run as a user would, in [`user_env`].
fn isolated(program: &Path, home: &Path) -> Command {
    let mut c = Command::new(program);
    user_env(&mut c, home);
    c
}

/// `unshare` making a private mount namespace (with a user namespace when not root).
fn unshare_mount() -> Command {
    btm_testkit::unshare("--mount")
}

/// The installed program works with its source tree gone: the built binary is copied to an
/// empty directory and run in a private mount namespace with a tmpfs over the checkout, so
/// nothing it was built from can be read. Commands that need the corpus must find the one
/// carried in the binary.
#[test]
fn binary_runs_without_the_checkout() {
    let checkout = checkout();
    let probe = unshare_mount()
        .args([
            "sh",
            "-c",
            "mount -t tmpfs tmpfs \"$0\" && test ! -e \"$0/Cargo.toml\"",
        ])
        .arg(&checkout)
        .output();
    if !btm_testkit::namespace_available(
        "binary_runs_without_the_checkout",
        "mount namespace",
        probe,
    ) {
        return;
    }

    let dir = tempfile::tempdir().expect("temp dir");
    assert!(
        !dir.path().starts_with(&checkout),
        "the temp dir {} is inside the checkout",
        dir.path().display()
    );
    let bin_dir = dir.path().join("bin");
    let home = dir.path().join("home");
    for d in [&bin_dir, &home] {
        std::fs::create_dir_all(d).expect("create dir");
    }
    let copy = bin_dir.join("btm-node");
    std::fs::copy(exe(), &copy).expect("copy the program");

    // In the namespace: hide the checkout, check it is hidden, then run the copy.
    let run = |args: &[&str]| -> Output {
        let script = "set -e
checkout=$1; shift
mount -t tmpfs tmpfs \"$checkout\"
test ! -e \"$checkout/Cargo.toml\"
exec \"$@\"";
        let mut c = unshare_mount();
        user_env(&mut c, &home);
        c.args(["sh", "-c", script, "sh"])
            .arg(&checkout)
            .arg(&copy)
            .args(args)
            .output()
            .expect("run the program in a mount namespace")
    };

    let tok = home.join("tok.json");
    let tok_arg = tok.to_str().expect("UTF-8 temp path");
    let args = [
        "tokenizer",
        "--vocab",
        "300",
        "--bytes-per-domain",
        "2048",
        "--out",
        tok_arg,
    ];
    let first = run(&args);
    assert!(
        first.status.success(),
        "btm-node tokenizer without the checkout: {}",
        text(&first)
    );
    assert!(tok.is_file(), "no tokenizer written: {}", text(&first));
    let unpacked = home.join("data").join("btm").join("corpus");
    assert!(
        unpacked.is_dir(),
        "the corpus was not unpacked under {}",
        unpacked.display()
    );
    // The provenance travels with the data.
    let readme = std::fs::read_dir(&unpacked)
        .expect("read the unpacked corpus dir")
        .flatten()
        .any(|e| e.path().join("README.md").is_file() && e.path().join("PROVENANCE.md").is_file());
    assert!(
        readme,
        "no README.md/PROVENANCE.md beside the unpacked corpus"
    );

    // A second run uses the unpacked copy.
    std::fs::remove_file(&tok).expect("remove the tokenizer");
    let second = run(&args);
    assert!(second.status.success(), "second run: {}", text(&second));
    assert!(tok.is_file());
}

/// `--version` names the program's version and the protocol it speaks.
#[test]
fn version_names_the_protocol() {
    let home = tempfile::tempdir().expect("temp dir");
    let o = isolated(&exe(), home.path())
        .arg("--version")
        .output()
        .expect("run btm-node --version");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(&format!("btm-node {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(
        out.contains(&format!("protocol {}", btm_protocol::FORMAT_VERSION)),
        "{out}"
    );
}

/// A missing file is reported once: its path once, the OS error once, and what to do.
#[test]
fn missing_file_is_reported_once() {
    let home = tempfile::tempdir().expect("temp dir");
    let missing = home.path().join("no-such-forest.json");
    let missing_s = missing.to_str().expect("UTF-8 temp path");
    let o = isolated(&exe(), home.path())
        .args(["forest", "show", "--forest", missing_s])
        .output()
        .expect("run btm-node forest show");
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches(missing_s).count(), 1, "path not once: {err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "OS error not once: {err}"
    );
    assert!(err.contains("forest create"), "no advice: {err}");
}

/// `experiment --seeds 2` runs two seeds, writes the summary with each finding's verdict, skips
/// finished seeds when run again, and `experiment-plot` draws the finished runs.
#[test]
fn experiment_with_seeds_summarises_and_plots() {
    let home = tempfile::tempdir().expect("temp dir");
    let out = home.path().join("exp");
    let out_s = out.to_str().expect("UTF-8 temp path");
    let args = [
        "experiment",
        "--quick",
        "--steps",
        "16",
        "--eval-tokens",
        "256",
        "--prior-blocks",
        "2",
        "--no-baselines",
        "--seeds",
        "2",
        "--out",
        out_s,
    ];
    let o = isolated(&exe(), home.path())
        .args(args)
        .output()
        .expect("run btm-node experiment");
    assert!(o.status.success(), "{}", text(&o));
    for f in [
        "seed0/results.json",
        "seed1/results.json",
        "summary.json",
        "summary.md",
    ] {
        assert!(out.join(f).exists(), "no {f}: {}", text(&o));
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["seeds"], serde_json::json!([0, 1]));
    let finding = summary["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| {
            f["better"] == "btm_ensemble" && f["worse"] == "dense" && f["side"] == "in_domain"
        })
        .expect("the first finding");
    assert_eq!(finding["diff_pct"]["n"], 2);
    assert!(
        ["reproduced", "contradicted", "inconclusive"]
            .contains(&finding["verdict"].as_str().unwrap())
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("ELMforest beats the compute-matched Transformer-LM"),
        "{md}"
    );

    // Again: both seeds are found finished; nothing trains.
    let again = isolated(&exe(), home.path())
        .args(args)
        .output()
        .expect("rerun btm-node experiment");
    assert!(again.status.success(), "{}", text(&again));
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("finished before").count(), 2, "{err}");
    assert!(!err.contains("dense: 16 updates"), "{err}");

    let png = home.path().join("plot.png");
    let p = isolated(&exe(), home.path())
        .args(["experiment-plot", "--x", "seed-share", "--out"])
        .arg(&png)
        .arg(&out)
        .output()
        .expect("run btm-node experiment-plot");
    assert!(p.status.success(), "{}", text(&p));
    assert!(String::from_utf8_lossy(&p.stdout).contains("| s=0.5 | btm_ensemble |"));
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    // A directory with no finished run is an error that names it.
    let empty = home.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = isolated(&exe(), home.path())
        .args(["experiment-plot", "--out"])
        .arg(&png)
        .arg(&empty)
        .output()
        .expect("run btm-node experiment-plot");
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("no finished experiment"));
}
