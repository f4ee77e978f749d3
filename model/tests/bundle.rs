//! The corpus carried in the program: complete, unpacked atomically, checked before use.

use std::path::{Path, PathBuf};

use btm_model::bundle::{self, FILES};
use btm_model::data::{Corpus, EVAL_DOMAINS, TRAIN_DOMAINS};

fn source_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/corpus")
}

fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).unwrap();
            out.push(rel.to_str().unwrap().replace('\\', "/"));
        }
    }
}

#[test]
fn carries_every_file_of_data_corpus() {
    let root = source_corpus();
    let mut on_disk = Vec::new();
    files_under(&root, &root, &mut on_disk);
    on_disk.sort();
    let mut carried: Vec<String> = FILES.iter().map(|(n, _)| n.to_string()).collect();
    carried.sort();
    assert_eq!(
        carried, on_disk,
        "bundle::FILES must list every file of data/corpus"
    );
    for (name, bytes) in FILES {
        assert_eq!(
            std::fs::read(root.join(name)).unwrap(),
            *bytes,
            "{name} differs from data/corpus"
        );
    }
}

#[test]
fn unpacks_once_and_reads_like_the_source_tree() {
    let home = tempfile::tempdir().unwrap();
    let dir = bundle::unpack_under(home.path()).unwrap();
    assert_eq!(dir, home.path().join(bundle::SUBDIR).join(bundle::id()));
    bundle::verify(&dir).unwrap();
    for f in ["README.md", "PROVENANCE.md", "SHA256SUMS"] {
        assert!(dir.join(f).is_file(), "{f} not unpacked");
    }
    let mut domains: Vec<String> = TRAIN_DOMAINS
        .iter()
        .chain(EVAL_DOMAINS.iter())
        .map(|s| s.to_string())
        .collect();
    domains.sort();
    assert_eq!(Corpus::new(&dir).domains().unwrap(), domains);
    // Nothing but the final directory is left beside it.
    let names: Vec<_> = std::fs::read_dir(home.path().join(bundle::SUBDIR))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(bundle::id())]);
    // A second call uses the copy as it is.
    let stamp = std::fs::metadata(dir.join("README.md"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(bundle::unpack_under(home.path()).unwrap(), dir);
    assert_eq!(
        std::fs::metadata(dir.join("README.md"))
            .unwrap()
            .modified()
            .unwrap(),
        stamp
    );
}

#[test]
fn a_damaged_or_half_written_copy_is_never_used() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join(bundle::SUBDIR).join(bundle::id());
    // Half written: the directory with only some files, one of them cut short (as a crash
    // of a program that wrote in place would leave it).
    let (name, bytes) = FILES
        .iter()
        .find(|(n, _)| n.ends_with("train.jsonl.zst"))
        .unwrap();
    std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
    std::fs::write(dir.join(name), &bytes[..bytes.len() / 2]).unwrap();
    assert!(bundle::verify(&dir).is_err());
    // And a temporary directory some crashed unpacking left behind.
    let stale = home
        .path()
        .join(bundle::SUBDIR)
        .join(format!(".unpacking-{}-1-0", bundle::id()));
    std::fs::create_dir_all(&stale).unwrap();

    assert_eq!(bundle::unpack_under(home.path()).unwrap(), dir);
    bundle::verify(&dir).unwrap();
    assert_eq!(std::fs::read(dir.join(name)).unwrap(), *bytes);

    // Edited after unpacking: one byte changed, same length. Replaced again.
    let mut edited = bytes.to_vec();
    edited[0] ^= 1;
    std::fs::write(dir.join(name), &edited).unwrap();
    let err = bundle::verify(&dir).unwrap_err().to_string();
    assert!(err.contains(name), "{err}");
    bundle::unpack_under(home.path()).unwrap();
    assert_eq!(std::fs::read(dir.join(name)).unwrap(), *bytes);
}

#[test]
fn an_unwritable_data_home_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    // A file where the data home should be: nothing can be created under it, even by root.
    let home = tmp.path().join("not-a-dir");
    std::fs::write(&home, b"").unwrap();
    let err = bundle::unpack_under(&home).unwrap_err().to_string();
    assert!(err.contains(home.to_str().unwrap()), "{err}");
}
