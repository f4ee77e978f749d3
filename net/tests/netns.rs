//! Network namespaces for tests whose traffic must not use loopback alone (mDNS skips loopback
//! interfaces) and must not leave the host either.
//!
//! A test calls [`run_confined`] with its own name. Outside a namespace that re-runs the test
//! binary, filtered to that one test, inside a new network namespace (`unshare --net`, or with a
//! user namespace when not root) in which a veth pair carries the documentation address
//! 192.0.2.1/24 (RFC 5737, TEST-NET-1) and the multicast route. Both ends of the pair are in
//! the namespace, so nothing it sends can reach a real interface. Inside, `run_confined`
//! returns `Inside` and the test does its work.
//!
//! Where namespaces cannot be made (no `unshare`/`ip`, no privileges) the test prints SKIPPED,
//! unless `BTM_REQUIRE_NETNS` is set (as `.ci/run` does), which turns that into a failure.

use std::process::Command;

/// Set in the re-run child: the namespace is ready.
const CHILD: &str = "BTM_TEST_IN_NETNS";
/// The veth end that carries the namespace's non-loopback address.
pub const IFACE: &str = "btmtest0";
pub const ADDR: &str = "192.0.2.1";
/// Runs of the confined test before it counts as failed. One: the failures once seen here were
/// two dials meeting (fixed in the event loop), not lost multicast.
const ATTEMPTS: usize = 1;

pub enum Confined {
    /// This process is inside the namespace: do the test's work here.
    Inside,
    /// The test ran in a child inside the namespace and passed.
    Passed,
    /// Namespaces are not available here (and not required).
    Skipped,
}

fn setup_script() -> String {
    format!(
        "set -e
ip link set lo up
ip link add {IFACE} type veth peer name btmtest1
ip addr add {ADDR}/24 dev {IFACE}
ip link set {IFACE} up
ip link set btmtest1 up
ip route add 224.0.0.0/4 dev {IFACE}"
    )
}

fn unshare() -> Command {
    btm_testkit::unshare("--net")
}

/// Whether this process is in a namespace made by [`run_confined`]: the test's interface is in
/// this process's own view of the network (`/proc/self/net/dev` follows the namespace).
pub fn inside() -> bool {
    std::env::var_os(CHILD).is_some()
        && std::fs::read_to_string("/proc/self/net/dev").is_ok_and(|d| d.contains(IFACE))
}

/// Runs the test named `test` (its full path in this binary) inside a fresh network namespace.
pub fn run_confined(test: &str) -> Confined {
    if std::env::var_os(CHILD).is_some() {
        assert!(
            inside(),
            "{CHILD} is set but {IFACE} is not in this network namespace"
        );
        return Confined::Inside;
    }
    // Probe: can a namespace with the veth pair be made here?
    let probe = unshare().args(["sh", "-c", &setup_script()]).output();
    if !btm_testkit::namespace_available(test, "network namespace", probe) {
        return Confined::Skipped;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let script = format!("{}\nexec \"$0\" \"$@\"", setup_script());
    // Each attempt gets a fresh namespace.
    let mut failures = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let out = unshare()
            .args(["sh", "-c", &script])
            .arg(&exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .expect("run the test in a network namespace");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && stdout.contains("1 passed") {
            if attempt > 1 {
                eprintln!("{test}: passed on attempt {attempt} of {ATTEMPTS}");
            }
            return Confined::Passed;
        }
        eprintln!(
            "{test}: attempt {attempt} of {ATTEMPTS} failed ({})",
            out.status
        );
        failures.push(format!(
            "attempt {attempt} ({}):\n{stdout}\n{stderr}",
            out.status
        ));
    }
    panic!(
        "{test} failed {ATTEMPTS} times inside its network namespace:\n{}",
        failures.join("\n")
    );
}
