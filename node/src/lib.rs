//! The btm network's roles as a library: the [`Volunteer`], the maintainers' node
//! ([`Maintainer`]) and the [`Client`]. Each is driven by a config and a [`Stop`] signal, works
//! on a running [`btm_net::Node`], and reports what it does as typed [`Event`]s; the
//! command-line program only parses arguments and prints those events.
//!
//! ```no_run
//! # async fn f(node: btm_net::Node) -> Result<(), btm_roles::Error> {
//! use btm_roles::{Events, Stop, Volunteer, VolunteerConfig};
//! let stop = Stop::new();
//! let events = Events::new(|e| println!("{}", serde_json::to_string(e).unwrap_or_default()));
//! let mut config = VolunteerConfig::new("runs/node");
//! config.exit_after_announce = true;
//! let outcome = Volunteer::new(config).run(&node, &stop, &events).await?;
//! # Ok(()) }
//! ```

pub mod client;
mod common;
mod council;
mod error;
mod events;
pub mod maintainer;
mod serve;
mod stop;
pub mod volunteer;

/// How a branch starts: the forest's one enum, used by [`BranchPolicy`] and [`Event::Branched`].
pub use btm_model::forest::manifest::InitKind;
pub use client::{Client, ClientConfig, FetchRequest, FetchedElm, Listing};
pub use common::{own_verdicts, short, wait_registry};
pub use error::{Error, Result};
pub use events::{Event, Events, Phase, TrainingStart};
pub use maintainer::{DomainFiles, Maintainer, MaintainerConfig, Published, SeedFiles};
pub use serve::serve;
pub use stop::Stop;
pub use volunteer::{BranchPolicy, Outcome, TrainSettings, Volunteer, VolunteerConfig};
