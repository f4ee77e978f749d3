//! The corpus carried inside the program, so that a copied or installed `btm-node` needs no
//! source tree.
//!
//! Every file of `data/corpus` (the zstd splits, about 5 MB, with the README and provenance
//! notes) is compiled in with `include_bytes!`. On first use it is unpacked to
//! `<data home>/btm/corpus/<id>/`, where the data home is `$XDG_DATA_HOME`, else
//! `~/.local/share`, else (when that cannot be written) the temporary directory, and `<id>`
//! is a hash of the carried files, so programs carrying different corpora never share a copy.
//!
//! The files are written into a temporary directory beside the final one, synced, and the
//! directory renamed into place in one step: the final directory is either absent or complete.
//! Every process checks each file of it against the bytes it carries before using it, and
//! unpacks afresh when one differs (a damaged or edited copy), so a half-written or altered
//! copy is never read. `$BTM_CORPUS` or a command's `--corpus` bypass all of this.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;

macro_rules! carried {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_bytes!(concat!("../../data/corpus/", $name)) as &[u8])),*]
    };
}

/// Every file of `data/corpus`, by its path relative to that directory (a test checks that
/// the list names every file there). A static, not a const: a const is copied into each place
/// that uses it, and the binary carried the corpus twice.
pub static FILES: &[(&str, &[u8])] = carried![
    "PROVENANCE.md",
    "README.md",
    "SHA256SUMS",
    "build.sh",
    "build_corpus.py",
    "packages.lock",
    "sanity.md",
    "sanity.py",
    "stats.json",
    "bible_kjv/test.jsonl.zst",
    "bible_kjv/train.jsonl.zst",
    "bible_kjv/valid.jsonl.zst",
    "bible_web/test.jsonl.zst",
    "bible_web/valid.jsonl.zst",
    "c_headers/test.jsonl.zst",
    "c_headers/train.jsonl.zst",
    "c_headers/valid.jsonl.zst",
    "debian_changelogs/test.jsonl.zst",
    "debian_changelogs/train.jsonl.zst",
    "debian_changelogs/valid.jsonl.zst",
    "dict_foldoc/test.jsonl.zst",
    "dict_foldoc/valid.jsonl.zst",
    "dict_gcide/test.jsonl.zst",
    "dict_gcide/train.jsonl.zst",
    "dict_gcide/valid.jsonl.zst",
    "kernel_docs/test.jsonl.zst",
    "kernel_docs/train.jsonl.zst",
    "kernel_docs/valid.jsonl.zst",
    "licenses/test.jsonl.zst",
    "licenses/valid.jsonl.zst",
    "manpages/test.jsonl.zst",
    "manpages/train.jsonl.zst",
    "manpages/valid.jsonl.zst",
    "novels_austen/test.jsonl.zst",
    "novels_austen/train.jsonl.zst",
    "novels_austen/valid.jsonl.zst",
    "python_code/test.jsonl.zst",
    "python_code/train.jsonl.zst",
    "python_code/valid.jsonl.zst",
    "rust_code/test.jsonl.zst",
    "rust_code/valid.jsonl.zst",
];

/// Where unpacked copies live under a data home.
pub const SUBDIR: &str = "btm/corpus";

/// The carried corpus's id: the first 16 hex digits of a BLAKE3 hash over every file's name,
/// length and bytes.
pub fn id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut h = blake3::Hasher::new();
        for (name, bytes) in FILES {
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        h.finalize().to_hex()[..16].to_string()
    })
}

/// The data homes to unpack under, preferred first.
fn data_homes() -> Vec<PathBuf> {
    let absolute = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    let mut out = Vec::new();
    if let Some(x) = absolute(std::env::var_os("XDG_DATA_HOME")) {
        out.push(x);
    } else if let Some(h) = absolute(std::env::var_os("HOME")) {
        out.push(h.join(".local").join("share"));
    }
    out.push(std::env::temp_dir());
    out
}

/// The directory of this process's unpacked copy of the carried corpus, unpacked on the
/// first call (see the module documentation for where).
pub fn dir() -> Result<&'static Path, Error> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut tried = Vec::new();
        for home in data_homes() {
            match unpack_under(&home) {
                Ok(dir) => return Ok(dir),
                Err(e) => tried.push(e.to_string()),
            }
        }
        Err(format!(
            "the corpus carried in this program could not be unpacked ({}); set XDG_DATA_HOME \
             to a writable directory, or pass --corpus (or set BTM_CORPUS) with a corpus \
             directory such as data/corpus of a btm checkout",
            tried.join("; ")
        ))
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|e| Error::Data(e.clone()))
}

/// Checks that `dir` holds every carried file with exactly the carried bytes.
pub fn verify(dir: &Path) -> Result<(), Error> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        if len != bytes.len() as u64
            || std::fs::read(&path).map_err(|e| Error::io(&path, e))? != *bytes
        {
            return Err(Error::Data(format!(
                "{} differs from the corpus carried in this program",
                path.display()
            )));
        }
    }
    Ok(())
}

/// A name no other process or call uses at the same time.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        ".{prefix}-{}-{}-{}",
        id(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes every carried file under `dir` (which must not exist) and syncs them.
fn write_files(dir: &Path) -> Result<(), Error> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let mut f = std::fs::File::create_new(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
    }
    let mut dirs: Vec<PathBuf> = FILES
        .iter()
        .filter_map(|(name, _)| dir.join(name).parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        sync_dir(&d);
    }
    Ok(())
}

/// The carried corpus unpacked under the data home `home`, as `<home>/btm/corpus/<id>`: an
/// existing complete copy is used as it is, anything else is replaced by a fresh one.
pub fn unpack_under(home: &Path) -> Result<PathBuf, Error> {
    let parent = home.join(SUBDIR);
    let dir = parent.join(id());
    if verify(&dir).is_ok() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(unique("unpacking"));
    if let Err(e) = write_files(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A copy that is there but fails the check (damaged or edited): set it aside first. Checked
    // again here because another process may have just put a complete one in place.
    if dir.exists() && verify(&dir).is_err() {
        let old = parent.join(unique("damaged"));
        if std::fs::rename(&dir, &old).is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process may have renamed its complete copy into place first.
        if verify(&dir).is_err() {
            return Err(Error::io(&dir, e));
        }
    }
    sync_dir(&parent);
    verify(&dir)?;
    Ok(dir)
}
