//! Command-line arguments: one struct per scenario, all sharing [`Common`].
//! Tests build these with `Cli::try_parse_from`, like a user would.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "switchboard-loadtest",
    version,
    about = "Load generator for Switchboard (and for plain broadcast servers, with --raw)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Real use: users over Zipf-popular rooms, Poisson sends, typing, churn,
    /// drops with resume, slow readers.
    Chat(ChatArgs),
    /// One room, N subscribers, one publisher at a fixed rate or full speed.
    Fanout(FanoutArgs),
    /// A connection storm: TLS handshakes + upgrade + join per second.
    Connect(ConnectArgs),
    /// Hold N idle connections, to measure the server's memory per connection.
    Idle(IdleArgs),
    /// History reads: clients paging a pre-filled room's history.
    History(HistoryArgs),
    /// Churn with sends for a long time, sampling the server's memory and
    /// descriptors from its /metrics; fails past a drift limit.
    Soak(SoakArgs),
}

impl Scenario {
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Chat(a) => &a.common,
            Scenario::Fanout(a) => &a.common,
            Scenario::Connect(a) => &a.common,
            Scenario::Idle(a) => &a.common,
            Scenario::History(a) => &a.common,
            Scenario::Soak(a) => &a.common,
        }
    }

    pub fn common_mut(&mut self) -> &mut Common {
        match self {
            Scenario::Chat(a) => &mut a.common,
            Scenario::Fanout(a) => &mut a.common,
            Scenario::Connect(a) => &mut a.common,
            Scenario::Idle(a) => &mut a.common,
            Scenario::History(a) => &mut a.common,
            Scenario::Soak(a) => &mut a.common,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Chat(_) => "chat",
            Scenario::Fanout(_) => "fanout",
            Scenario::Connect(_) => "connect",
            Scenario::Idle(_) => "idle",
            Scenario::History(_) => "history",
            Scenario::Soak(_) => "soak",
        }
    }

    /// Connections this run opens (for the report and worker shares).
    pub fn clients(&self) -> u32 {
        match self {
            Scenario::Chat(a) => a.users,
            Scenario::Fanout(a) => a.clients,
            Scenario::Connect(a) => a.clients,
            Scenario::Idle(a) => a.clients,
            Scenario::History(a) => a.clients,
            Scenario::Soak(a) => a.clients,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server URL, `wss://` or `ws://`, e.g. `ws://127.0.0.1:8080/ws`.
    /// Several (comma-separated, or the flag repeated) spread the
    /// connections round robin: connection i goes to URL i mod n, and a
    /// lost connection reconnects to the next URL.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 1,
        default_value = "wss://127.0.0.1:8443/ws"
    )]
    pub url: Vec<String>,
    /// Most attempts to reconnect a connection the server closed with a
    /// reconnect code, or that died, each to the next URL; 0 = never.
    #[arg(long, default_value_t = 10)]
    pub reconnect_attempts: u32,
    /// The first backoff step of the reconnect policy, which is the Rust
    /// client's (PROTOCOL.md §11): it doubles per failed attempt up to 2 s,
    /// each pause drawn from the upper half of its step; "reconnect at
    /// once" codes wait the client's jitter only.
    #[arg(long, default_value_t = 100)]
    pub reconnect_backoff_ms: u64,
    /// CA certificate (PEM) to trust for `wss://` [default: certs/ca.pem].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (benchmarks only).
    #[arg(long)]
    pub insecure: bool,
    /// Plain broadcast server (every text frame goes to every client): no
    /// welcome, join or ack; the publisher numbers its own frames.
    #[arg(long)]
    pub raw: bool,
    /// nats-server's WebSocket listener: the NATS protocol (CONNECT, SUB to
    /// the room as a subject, PUB, MSG) carrying raw mode's self-numbered
    /// frames; the publisher's echo stands in for the ack.
    #[arg(long, conflicts_with_all = ["raw", "join_in_url"])]
    pub nats: bool,
    /// Join a connection's first room in the upgrade URL (`?join=ROOM`),
    /// so `welcome` and `joined` come back with the 101, instead of sending
    /// a `join` frame.
    #[arg(long, conflicts_with = "raw")]
    pub join_in_url: bool,
    /// Server PID: report its CPU time and memory from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time into this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No live progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// New connections per second while ramping up.
    #[arg(long = "ramp-up", alias = "ramp", default_value_t = 2000)]
    pub ramp_up: u32,
    /// Seconds of load before measuring starts (left out of the figures).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds of measured load (idle: seconds to hold; connect: longest storm).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Exit non-zero when the scenario's main p99 latency exceeds this (ms).
    #[arg(long)]
    pub slo_p99_ms: Option<f64>,
    /// Bind client sockets to these source addresses, round robin:
    /// `127.0.0.2-127.0.0.60` or a comma list (gets past ~28k ports per address).
    #[arg(long)]
    pub source_ips: Option<String>,
    /// Spread the connections over N worker processes (past one process's
    /// open-files limit) and merge their histograms into one report.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Runtime threads per process [default: the number of CPUs allowed].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Random seed (room choice, arrivals).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Internal: this process is worker INDEX of `--worker-count`.
    #[arg(long, hide = true)]
    pub worker: Option<u32>,
    #[arg(long, hide = true, default_value_t = 1)]
    pub worker_count: u32,
    /// Internal: the load starts at this Unix time (µs), shared by workers.
    #[arg(long, hide = true)]
    pub start_at_us: Option<u64>,
}

impl Common {
    /// Whether this process owns share `i` of the connections.
    pub fn owns(&self, i: u32) -> bool {
        match self.worker {
            Some(w) => i % self.worker_count.max(1) == w,
            None => true,
        }
    }

    /// Whether this process runs the single actors (publisher, seeder).
    pub fn is_leader(&self) -> bool {
        self.worker.is_none_or(|w| w == 0)
    }

    /// The URLs as given, comma-separated (the one URL when alone).
    pub fn urls(&self) -> String {
        self.url.join(",")
    }

    pub fn warmup_us(&self) -> u64 {
        secs_to_us(self.warmup)
    }

    pub fn duration_us(&self) -> u64 {
        secs_to_us(self.duration)
    }

    /// A server without Switchboard's protocol: a plain broadcast server
    /// (`--raw`) or nats-server (`--nats`).
    pub fn foreign(&self) -> bool {
        self.raw || self.nats
    }
}

pub fn secs_to_us(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        (s * 1e6) as u64
    } else {
        0
    }
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users, one connection each.
    #[arg(long, default_value_t = 1000)]
    pub users: u32,
    /// Rooms; popularity follows Zipf.
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// Rooms each user is in.
    #[arg(long, default_value_t = 3)]
    pub rooms_per_user: u32,
    /// Zipf exponent of room popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Messages per second per user (Poisson arrivals).
    #[arg(long, default_value_t = 0.05)]
    pub rate: f64,
    /// Chance that a send is preceded by a typing event.
    #[arg(long, default_value_t = 0.5)]
    pub typing: f64,
    /// Mean seconds between one user's leave+join (churn); 0 = none.
    #[arg(long, default_value_t = 30.0)]
    pub churn_interval: f64,
    /// Share of users that drop their connection and resume with `since`.
    #[arg(long, default_value_t = 0.05)]
    pub drop_share: f64,
    /// Mean seconds between one dropping user's drops.
    #[arg(long, default_value_t = 10.0)]
    pub drop_interval: f64,
    /// Share of users that read deliberately slowly.
    #[arg(long, default_value_t = 0.01)]
    pub slow_share: f64,
    /// A slow reader's pause after each frame, ms.
    #[arg(long, default_value_t = 20)]
    pub slow_delay_ms: u64,
    /// Most un-acked sends per user.
    #[arg(long, default_value_t = 16)]
    pub window: u32,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers in the room.
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    /// Messages per second from the publisher; 0 = full speed (window-bound).
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Un-acked sends the publisher keeps in flight at full speed.
    #[arg(long, default_value_t = 64)]
    pub window: u32,
    /// Rooms; subscribers are spread round robin, one publisher per room.
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Publishers per room, each at `--rate` (or full speed), connections
    /// numbered after the subscribers (so spread over the URLs); a
    /// subscriber reads until every one's end marker.
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Room name prefix.
    #[arg(long, default_value = "fanout")]
    pub room: String,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open in all.
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,
    /// Connection attempts per second; 0 = as fast as `--concurrency` allows.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Attempts in flight at once at full speed.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Keep every connection open until the end instead of closing it.
    #[arg(long)]
    pub hold: bool,
    /// Room each connection joins.
    #[arg(long, default_value = "storm")]
    pub room: String,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to hold (each joined to one room unless --raw).
    #[arg(long, default_value_t = 1000)]
    pub clients: u32,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
}

#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub common: Common,
    /// Readers, each with one request in flight.
    #[arg(long, default_value_t = 10)]
    pub clients: u32,
    /// Rooms to read.
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Messages to write into each room first (none if it already has them).
    #[arg(long, default_value_t = 2000)]
    pub messages: u64,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Churners, each one connection at a time: connect, join, send, leave, close.
    #[arg(long, default_value_t = 200)]
    pub clients: u32,
    /// Rooms the churners pick from.
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// Rooms each session joins.
    #[arg(long, default_value_t = 3)]
    pub rooms_per_session: u32,
    /// Keyed messages each session sends (and waits to be acked).
    #[arg(long, default_value_t = 3)]
    pub messages: u32,
    /// Pause between one churner's sessions, ms.
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// The server's admin metrics, `http://HOST:PORT/metrics` (else
    /// /proc/PID of `--server-pid`).
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Bearer token for `--metrics-url`, when the admin listener wants one.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Seconds between samples of the server's memory and descriptors.
    #[arg(long, default_value_t = 1.0)]
    pub sample_interval: f64,
    /// Fail when the server's RSS grows by more than this (MiB) from the
    /// first window of samples to the last.
    #[arg(long, default_value_t = 64.0)]
    pub max_rss_drift_mib: f64,
    /// Fail when the server's open descriptors grow by more than this.
    #[arg(long, default_value_t = 64)]
    pub max_fd_drift: u64,
}
