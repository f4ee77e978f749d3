//! The `btm-node` program under another name, so that the end-to-end tests of this crate can
//! run it as separate processes (Cargo gives a crate's tests the paths of its own binaries only).

fn main() {
    btm_cli::main();
}
