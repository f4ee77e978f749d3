//! The btm network's roles as a library: the volunteer (`volunteer`), the maintainers' node
//! (`maintainer`) and the client (`client`). Each is driven by a config and a stop signal and
//! reports what it does as typed events; the command-line program only parses arguments and
//! prints those events.
