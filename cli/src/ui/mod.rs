//! The web UI a node serves (`--ui ADDR` on `join` and `seed publish`, `btm-node ui` for a
//! client): four read-only pages (the network, its domains, this node, the forest) that draw
//! themselves from a JSON API under `/api/` and poll it every two seconds.
//!
//! - `http`: a minimal, bounded HTTP/1.1 server (GET and HEAD, one request per connection);
//! - `activity`: what this node's role did, recorded from its events and the node's
//!   observations (phase, training curve, verdicts, verification queue);
//! - `api`: the JSON documents, built from the running node, the activity and a forest
//!   directory;
//! - `static/`: one page template (`page.html`, filled in with each page's name and title), the
//!   forest page's ensemble box, one script and one style sheet, compiled into the binary. The script
//!   builds the page with `textContent` and `createElement` only, never `innerHTML`, so every
//!   string that came from the network (domain descriptions, ids, reasons) is shown as text;
//!   the content security policy allows only this server's own script besides.
//!
//! The server binds loopback unless given another address, and refuses requests whose `Host`
//! is a DNS name other than localhost (a page elsewhere reaching it by DNS rebinding).

mod activity;
mod api;
pub(crate) mod http;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use btm_net::Node;
use btm_roles::Events;
use clap::Args;

pub use activity::Activity;

/// The default address of `--ui` with no value: loopback only.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8340";

/// The web UI's flags.
#[derive(Debug, Args, Clone, Default)]
pub struct UiArgs {
    /// Serve the web UI on this address (with no value: 127.0.0.1:8340; port 0 picks a free
    /// one). Binds loopback unless given another address.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = DEFAULT_ADDR)]
    pub ui: Option<SocketAddr>,
    /// The forest the UI's forest page shows: its report (from `forest report`) and an
    /// ensemble box (default: none).
    #[arg(long, value_name = "DIR")]
    pub ui_forest: Option<PathBuf>,
}

/// What a UI shows besides the node.
#[derive(Debug, Clone)]
pub struct UiConfig {
    pub addr: SocketAddr,
    /// The role the node plays (`volunteer`, `maintainer`, `client`).
    pub role: String,
    pub data_dir: PathBuf,
    /// A forest directory (or its forest.json) for the forest page.
    pub forest: Option<PathBuf>,
}

pub(crate) struct State {
    node: Node,
    config: UiConfig,
    activity: Arc<Activity>,
    /// One ensemble request at a time (it runs models).
    ensemble: tokio::sync::Semaphore,
}

impl http::Handler for State {
    fn handle(
        self: Arc<Self>,
        request: http::Request,
    ) -> impl std::future::Future<Output = http::Response> + Send {
        api::route(self, request)
    }
}

/// A running web UI; stops when dropped.
pub struct Ui {
    addr: SocketAddr,
    activity: Arc<Activity>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Ui {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ui").field("addr", &self.addr).finish()
    }
}

impl Ui {
    /// Binds `config.addr` and serves the UI of `node` (call inside a tokio runtime).
    pub async fn start(node: &Node, config: UiConfig) -> Result<Ui> {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("the web UI cannot listen on {}", config.addr))?;
        let addr = listener.local_addr()?;
        let activity = Arc::new(Activity::new(&config.role));
        let observer = tokio::spawn(activity.clone().observe(node.clone()));
        let state = Arc::new(State {
            node: node.clone(),
            config,
            activity: activity.clone(),
            ensemble: tokio::sync::Semaphore::new(1),
        });
        let server = tokio::spawn(http::serve(listener, state));
        Ok(Ui {
            addr,
            activity,
            tasks: vec![observer, server],
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's address for a person: `http://ADDR/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// What the role reports, recorded for the node page.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// `events` with this UI listening as well.
    pub fn tee(&self, events: Events) -> Events {
        let a = self.activity.clone();
        Events::new(move |e| {
            a.on(e);
            events.emit(e.clone());
        })
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The events a long-running role reports to: the reporter's, and the web UI's too when
/// `--ui` asks for one (started here; keep the returned UI alive while the role runs).
pub(crate) async fn role_events(
    args: &UiArgs,
    node: &Node,
    role: &str,
    data_dir: &std::path::Path,
    status: &crate::net::StatusFile,
    reporter: &std::sync::Arc<crate::report::Reporter>,
) -> Result<(Option<Ui>, btm_roles::Events)> {
    let ui = start_ui(args, node, role, data_dir, Some(status), |m| {
        reporter.line(m)
    })
    .await?;
    let events = match &ui {
        Some(ui) => ui.tee(reporter.events()),
        None => reporter.events(),
    };
    Ok((ui, events))
}

/// Starts the UI when `--ui` was given, says where, and records its address in `status.json`.
async fn start_ui(
    args: &UiArgs,
    node: &Node,
    role: &str,
    data_dir: &std::path::Path,
    status: Option<&crate::net::StatusFile>,
    say: impl Fn(String),
) -> Result<Option<Ui>> {
    let Some(addr) = args.ui else {
        return Ok(None);
    };
    let ui = Ui::start(
        node,
        UiConfig {
            addr,
            role: role.into(),
            data_dir: data_dir.to_path_buf(),
            forest: args.ui_forest.clone(),
        },
    )
    .await?;
    if !addr.ip().is_loopback() {
        say(format!(
            "warning: the web UI listens on {addr}, reachable from other machines"
        ));
    }
    say(format!("web UI on {}", ui.url()));
    if let Some(s) = status {
        let url = ui.url();
        s.update(|s| s.ui = Some(url));
    }
    Ok(Some(ui))
}
