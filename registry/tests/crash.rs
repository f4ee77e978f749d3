//! A child process applies registry updates in a loop and is killed with SIGKILL at varying
//! moments; after each kill the store holds a complete registry (the old or the new one),
//! never a mix, and never goes backwards.

use std::process::{Command, Stdio};
use std::time::Duration;

use btm_protocol::{Registry, Signed};
use btm_registry::Store;

use crate::common::*;

const CHILD_ENV: &str = "BTM_CRASH_CHILD_DB";

/// The child: does nothing in a normal test run; with `BTM_CRASH_CHILD_DB` set it updates the
/// registry of that database forever (until killed).
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut store = Store::open(&path).unwrap();
    loop {
        let version = store
            .trusted()
            .unwrap()
            .unwrap()
            .registry
            .map_or(0, |r| r.record().version);
        // Make the body large (many domains) so each write spans several pages.
        let mut next = registry(version + 1, &format!("v{}", version + 1));
        next.domains = (0..200)
            .map(|i| domain(&format!("d{i:03}-{}", version + 1)))
            .collect();
        let env = signed(next, &[0, 1]).encode();
        assert!(accepted(store.update_registry(&env, NOW)));
    }
}

fn check_consistent(db: &std::path::Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    // Every stored registry row is complete: its envelope decodes and its id column matches.
    let mut stmt = conn
        .prepare("SELECT version, id, envelope FROM registries ORDER BY version")
        .unwrap();
    let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (version, id, envelope) in &rows {
        let env = Signed::<Registry>::decode(envelope).unwrap();
        assert_eq!(env.record().version as i64, *version);
        assert_eq!(env.id().0.to_vec(), *id);
    }
    // The versions are contiguous: each committed update is entirely there.
    for pair in rows.windows(2) {
        assert_eq!(pair[0].0 + 1, pair[1].0);
    }
    // The trusted pointer names the newest row and its id.
    let (tv, tid): (i64, Vec<u8>) = conn
        .query_row(
            "SELECT registry_version, registry_id FROM trusted",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let newest = rows.last().unwrap();
    assert_eq!((tv, &tid), (newest.0, &newest.1));
    let store = Store::open(db).unwrap();
    let registry = store.trusted().unwrap().unwrap().registry.unwrap();
    assert_eq!(registry.record().version as i64, tv);
    registry.record().version
}

#[test]
fn sigkill_during_registry_updates_leaves_the_old_or_the_new() {
    let (dir, store) = store();
    drop(store);
    let db = dir.path().join("node.db");
    let exe = std::env::current_exe().unwrap();
    let mut last = 5;
    for round in 0..10u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200 + 31 * round));
        child.kill().unwrap(); // SIGKILL on Unix
        let status = child.wait().unwrap();
        assert!(!status.success(), "the child was killed, it did not finish");
        let version = check_consistent(&db);
        assert!(version >= last, "went back from {last} to {version}");
        last = version;
    }
    assert!(last > 5 + 10, "the child made progress: reached v{last}");
    eprintln!("crash test: 10 kills, reached registry v{last}");
}
