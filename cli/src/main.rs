//! `btm-node`: the command-line front end of the btm network (see the library for the commands).

fn main() {
    btm_cli::main();
}
