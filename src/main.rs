//! The `switchboard` binary: parse flags, load config, bind, run.
//!
//! Precedence: built-in defaults, then the TOML file (`--config`), then
//! `SWITCHBOARD_*` environment variables, then flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use switchboard::store::Durability;
use switchboard::{Config, Listeners};
use tokio::net::TcpListener;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard",
    version,
    about = "A TLS WebSocket chat gateway with durable history and gap-free resume."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(Box<ServeArgs>),
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum DurabilityArg {
    Immediate,
    None,
}

/// Every option overrides the same key of the config file.
#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// TOML config file; its keys are the config reference (README).
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// TLS WebSocket listener [default: 127.0.0.1:8443].
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Also serve plain ws:// here (behind a TLS proxy, or for benchmarks).
    #[arg(long, env = "SWITCHBOARD_PLAIN_LISTEN")]
    plain_listen: Option<SocketAddr>,
    /// Serve only the plain listener; no TLS listener.
    #[arg(long, env = "SWITCHBOARD_NO_TLS")]
    no_tls: bool,
    /// Certificate chain, PEM [default: certs/server.pem; generated with certs/ca.pem when missing].
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key, PEM [default: certs/server.key].
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Directory of the history file [default: data].
    #[arg(long, env = "SWITCHBOARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Handshake timeout in ms [default: 10000].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Most concurrent connections; past it upgrades get HTTP 503 [default: 16384].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Largest message/frame in bytes; past it the session closes with 1009 [default: 65536].
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// WebSocket read buffer per connection, bytes [default: 4096].
    #[arg(long, env = "SWITCHBOARD_READ_BUFFER_BYTES")]
    read_buffer_bytes: Option<usize>,
    /// Outbound queue bound per session, bytes; past it the session is a slow consumer [default: 1048576].
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// Outbound queue bound per session, frames [default: 4096].
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_FRAMES")]
    outbound_queue_frames: Option<usize>,
    /// Write deadline in ms; a slower write closes the session as a slow consumer [default: 10000].
    #[arg(long, env = "SWITCHBOARD_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    /// Server ping interval in ms; silent for two closes with 4102 [default: 25000].
    #[arg(long, env = "SWITCHBOARD_HEARTBEAT_INTERVAL_MS")]
    heartbeat_interval_ms: Option<u64>,
    /// Most messages replayed on resume; more answers recovered:false [default: 1000].
    #[arg(long, env = "SWITCHBOARD_REPLAY_CAP")]
    replay_cap: Option<u64>,
    /// Commit durability [default: immediate].
    #[arg(long, env = "SWITCHBOARD_DURABILITY", value_enum)]
    durability: Option<DurabilityArg>,
    /// Most appends per commit; 1 commits every message alone [default: 1024].
    #[arg(long, env = "SWITCHBOARD_COMMIT_MAX_BATCH")]
    commit_max_batch: Option<usize>,
    /// Idempotency key retention in seconds [default: 86400].
    #[arg(long, env = "SWITCHBOARD_IDEMPOTENCY_TTL_SECS")]
    idempotency_ttl_secs: Option<u64>,
    /// Shutdown grace period in ms [default: 10000].
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// Internal HTTP listener: /healthz, /readyz, /metrics, admin API, /dashboard [default: 127.0.0.1:9090].
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Admin API and dashboard bearer token, 16+ characters; without one they answer 401.
    /// Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

impl ServeArgs {
    /// Applies every given option over `config`.
    fn apply(&self, config: &mut Config) {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { config.$field = v; } )* };
        }
        set!(
            listen,
            tls_cert,
            tls_key,
            data_dir,
            handshake_timeout_ms,
            max_connections,
            max_message_bytes,
            read_buffer_bytes,
            outbound_queue_bytes,
            outbound_queue_frames,
            write_timeout_ms,
            heartbeat_interval_ms,
            replay_cap,
            commit_max_batch,
            idempotency_ttl_secs,
            shutdown_grace_ms
        );
        if self.plain_listen.is_some() {
            config.plain_listen = self.plain_listen;
        }
        if self.admin_listen.is_some() {
            config.admin_listen = self.admin_listen;
        }
        if let Some(token) = &self.admin_token {
            config.admin_token = Some(switchboard::config::Secret::new(token.clone()));
        }
        if let Some(d) = self.durability {
            config.durability = match d {
                DurabilityArg::Immediate => Durability::Immediate,
                DurabilityArg::None => Durability::None,
            };
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        None => ServeArgs::parse_from_env_only(),
    };
    init_tracing(args.log_format.unwrap_or(LogFormat::Pretty));

    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    args.apply(&mut config);
    config.validate()?;
    warn!(
        "dev mode: no auth configured; the user comes from ?user=NAME and only loopback addresses are served"
    );

    let mut listeners = Listeners::default();
    if !args.no_tls {
        if switchboard::tls::ensure_dev_certs(&config.tls_cert, &config.tls_key)? {
            info!(cert = %config.tls_cert.display(), "generated a development CA and certificate");
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let ca = config.tls_cert.with_file_name("ca.pem");
        // Printed on stdout, one line per listener, so scripts and tests can
        // read the bound address (port 0 picks a free port).
        println!("listening on wss://{addr}/ws");
        println!(
            "  try: websocat --ca-file {} 'wss://{addr}/ws?user=alice'",
            ca.display()
        );
        listeners.tls = Some(listener);
    }
    if let Some(plain) = config.plain_listen {
        let listener = TcpListener::bind(plain)
            .await
            .with_context(|| format!("cannot listen on {plain}"))?;
        println!("listening on ws://{}/ws", listener.local_addr()?);
        listeners.plain = Some(listener);
    }
    anyhow::ensure!(
        listeners.tls.is_some() || listeners.plain.is_some(),
        "--no-tls needs --plain-listen"
    );
    if let Some(admin) = config.admin_listen {
        let listener = TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on {admin} (admin_listen)"))?;
        let addr = listener.local_addr()?;
        println!(
            "admin on http://{addr} (dashboard: http://{addr}/dashboard, metrics: http://{addr}/metrics)"
        );
        listeners.admin = Some(listener);
    }
    switchboard::run(config, listeners, shutdown_signal()).await?;
    Ok(())
}

impl ServeArgs {
    /// `switchboard` with no command: serve, still honouring the environment.
    fn parse_from_env_only() -> ServeArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Only::parse_from(["switchboard"]).serve
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
