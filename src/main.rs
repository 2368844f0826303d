//! The `switchboard` binary: parse flags, load config, bind, run.
//!
//! Precedence: built-in defaults, then the TOML file (`--config`), then
//! `SWITCHBOARD_*` environment variables, then flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use switchboard::config::LogFormat;
use switchboard::store::Durability;
use switchboard::{Config, Listeners, Server};
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
    /// Mint a client token (HS256) from the configured secret, for operators and tests.
    Token(TokenArgs),
    /// Take a consistent backup of a running server's store through its admin API.
    Backup(BackupArgs),
}

/// `switchboard backup --to FILE`: restore by stopping the server and putting
/// FILE in place as `data_dir/switchboard.redb` (docs/operators.md).
#[derive(Args, Debug)]
struct BackupArgs {
    /// Where to write the backup (a redb file); written to FILE.partial, fsync'd, then renamed.
    #[arg(long)]
    to: PathBuf,
    /// The server's admin listener [default: the config's admin_listen, else 127.0.0.1:9090].
    #[arg(long, env = "SWITCHBOARD_ADMIN_LISTEN")]
    admin: Option<SocketAddr>,
    /// The admin bearer token. Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// TOML config file to take `admin_listen` and `admin_token` from.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
}

/// `switchboard token --user alice --grant 'general:rw' --grant 'team-*:r' --ttl 1h`
#[derive(Args, Debug)]
struct TokenArgs {
    /// The user (the token's `sub`).
    #[arg(long)]
    user: String,
    /// A grant, `ROOM_PATTERN:RIGHTS` with rights r, w or rw; `*` matches any run of characters. Repeatable.
    #[arg(long = "grant")]
    grants: Vec<String>,
    /// Lifetime, e.g. `90s`, `15m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: std::time::Duration,
    /// TOML config file holding the secret (`auth_hs256_secret[_file]`, `auth_issuer`, `auth_audience`).
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// The HS256 secret (32+ bytes). Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "SWITCHBOARD_AUTH_HS256_SECRET", hide_env_values = true)]
    auth_hs256_secret: Option<String>,
    /// A file holding the HS256 secret.
    #[arg(long, env = "SWITCHBOARD_AUTH_HS256_SECRET_FILE")]
    auth_hs256_secret_file: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum LogFormatArg {
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
    /// Log format [default: pretty].
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormatArg>,
    /// Log filter, e.g. `info` or `switchboard=debug,info`; RUST_LOG wins when set [default: info].
    #[arg(long, env = "SWITCHBOARD_LOG_LEVEL")]
    log_level: Option<String>,
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
    /// Run as a cluster node over these NATS URLs (comma-separated); sets `cluster.urls` (docs/cluster.md) [default: alone, on redb].
    #[arg(long, env = "SWITCHBOARD_CLUSTER", value_delimiter = ',')]
    cluster: Vec<String>,
    /// This node's id in the cluster [default: <hostname>-<pid>].
    #[arg(long, env = "SWITCHBOARD_NODE_ID")]
    node_id: Option<String>,
    /// Handshake timeout in ms [default: 10000].
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Most concurrent connections; past it upgrades get HTTP 503 [default: 16384].
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Largest message/frame in bytes; past it the session closes with 1009 [default: 65536].
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// WebSocket read buffer per connection, bytes [default: 512].
    #[arg(long, env = "SWITCHBOARD_READ_BUFFER_BYTES")]
    read_buffer_bytes: Option<usize>,
    /// Outbound queue bound per session, bytes; past it a session that does not drain is a slow consumer [default: 1048576].
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// Outbound queue bound per session, frames [default: 4096].
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_FRAMES")]
    outbound_queue_frames: Option<usize>,
    /// Write deadline in ms; a slower write closes the session as a slow consumer [default: 10000].
    #[arg(long, env = "SWITCHBOARD_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    /// Server ping interval in ms; nothing in the interval after a ping closes with 4102 [default: 25000].
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
    /// Messages logged before they are indexed, in one transaction [default: 65536].
    #[arg(long, env = "SWITCHBOARD_INDEX_BATCH")]
    index_batch: Option<u64>,
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
    /// HS256 secret for client tokens (32+ bytes); setting any auth key turns dev mode off.
    /// Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "SWITCHBOARD_AUTH_HS256_SECRET", hide_env_values = true)]
    auth_hs256_secret: Option<String>,
    /// A file holding the HS256 secret.
    #[arg(long, env = "SWITCHBOARD_AUTH_HS256_SECRET_FILE")]
    auth_hs256_secret_file: Option<PathBuf>,
    /// RS256 public key (PEM) for client tokens.
    #[arg(long, env = "SWITCHBOARD_AUTH_RS256_PUBLIC_KEY")]
    auth_rs256_public_key: Option<PathBuf>,
    /// ES256 public key (PEM) for client tokens.
    #[arg(long, env = "SWITCHBOARD_AUTH_ES256_PUBLIC_KEY")]
    auth_es256_public_key: Option<PathBuf>,
    /// Required `iss` of client tokens [default: not checked].
    #[arg(long, env = "SWITCHBOARD_AUTH_ISSUER")]
    auth_issuer: Option<String>,
    /// Required `aud` of client tokens [default: not checked].
    #[arg(long, env = "SWITCHBOARD_AUTH_AUDIENCE")]
    auth_audience: Option<String>,
    /// A browser origin allowed to open a client socket (repeatable; comma-separated in the environment) [default: none].
    #[arg(
        long = "allowed-origin",
        env = "SWITCHBOARD_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
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
            index_batch,
            idempotency_ttl_secs,
            shutdown_grace_ms
        );
        if self.plain_listen.is_some() {
            config.plain_listen = self.plain_listen;
        }
        if self.admin_listen.is_some() {
            config.admin_listen = self.admin_listen;
        }
        if let Some(format) = self.log_format {
            config.log_format = match format {
                LogFormatArg::Pretty => LogFormat::Pretty,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        if let Some(level) = &self.log_level {
            config.log_level = level.clone();
        }
        if let Some(secret) = &self.auth_hs256_secret {
            config.auth_hs256_secret = Some(switchboard::config::Secret::new(secret.clone()));
        }
        macro_rules! set_opt {
            ($($field:ident),*) => { $( if self.$field.is_some() { config.$field = self.$field.clone(); } )* };
        }
        set_opt!(
            auth_hs256_secret_file,
            auth_rs256_public_key,
            auth_es256_public_key,
            auth_issuer,
            auth_audience
        );
        if !self.allowed_origins.is_empty() {
            config.allowed_origins = self.allowed_origins.clone();
        }
        if !self.cluster.is_empty() {
            config.cluster.get_or_insert_with(Default::default).urls = self.cluster.clone();
        }
        if let Some(id) = &self.node_id {
            config.cluster.get_or_insert_with(Default::default).node_id = Some(id.clone());
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

/// Logs to stderr; `RUST_LOG` overrides the configured level.
fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(_) => tracing_subscriber::EnvFilter::try_new(&config.log_level)
            .with_context(|| format!("invalid log_level `{}`", config.log_level))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// jemalloc, not glibc's allocator. Memory here often moves between
/// threads: a session allocates a message's body and the store writer
/// frees it; the writer allocates each message's frame and sessions free
/// it. glibc answered that with arena locks and free-list consolidation
/// (about a fifth of the session threads' samples in figure 6), and kept
/// the peak of a burst of handshakes resident. Measured in BENCHMARKS-HISTORY.md.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Token(args)) => return mint(args),
        Some(Command::Backup(args)) => {
            return tokio::task::spawn_blocking(move || backup(args)).await?;
        }
        None => ServeArgs::parse_from_env_only(),
    };
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    args.apply(&mut config);
    init_tracing(&config)?;
    config.validate()?;
    if config.dev_mode() {
        warn!(
            "dev mode: no auth configured; the user comes from ?user=NAME and only loopback addresses are served"
        );
    }

    anyhow::ensure!(
        !args.no_tls || config.plain_listen.is_some(),
        "--no-tls needs --plain-listen"
    );
    if !args.no_tls && switchboard::tls::ensure_dev_certs(&config.tls_cert, &config.tls_key)? {
        info!(cert = %config.tls_cert.display(), "generated a development CA and certificate");
    }
    // Everything that can fail (TLS, the token key, the store) before any
    // listener is bound: nothing is announced that cannot be served.
    let server = Server::open(config.clone(), !args.no_tls).await?;

    let mut listeners = Listeners::default();
    if !args.no_tls {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        listeners.tls = Some(listener);
    }
    if let Some(plain) = config.plain_listen {
        let listener = TcpListener::bind(plain)
            .await
            .with_context(|| format!("cannot listen on {plain}"))?;
        listeners.plain = Some(listener);
    }
    if let Some(admin) = config.admin_listen {
        let listener = TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on {admin} (admin_listen)"))?;
        listeners.admin = Some(listener);
    }
    // Printed on stdout, one line per listener, once all are bound, so
    // scripts and tests can read the bound address (port 0 picks a free port).
    if let Some(listener) = &listeners.tls {
        let addr = listener.local_addr()?;
        let ca = config.tls_cert.with_file_name("ca.pem");
        println!("listening on wss://{addr}/ws");
        if config.demo_page_enabled() {
            println!("  chat: open https://localhost:{}/", addr.port());
        }
        if config.dev_mode() {
            println!(
                "  try: websocat --ca-file {} 'wss://{addr}/ws?user=alice'",
                ca.display()
            );
        } else {
            println!(
                "  try: websocat --ca-file {} -H \"Authorization: Bearer $(switchboard token --user alice --grant '*:rw')\" 'wss://{addr}/ws'",
                ca.display()
            );
        }
    }
    if let Some(listener) = &listeners.plain {
        println!("listening on ws://{}/ws", listener.local_addr()?);
    }
    if let Some(listener) = &listeners.admin {
        let addr = listener.local_addr()?;
        println!(
            "admin on http://{addr} (dashboard: http://{addr}/dashboard, metrics: http://{addr}/metrics)"
        );
    }
    let server = server.listen_on(listeners);
    let certs = server.certs();
    tokio::select! {
        r = server.serve(shutdown_signal()) => r?,
        () = reload_on_sighup(certs) => {}
    }
    Ok(())
}

/// Prints a token for `args` on stdout.
fn mint(args: TokenArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(secret) = args.auth_hs256_secret {
        config.auth_hs256_secret = Some(switchboard::config::Secret::new(secret));
    }
    if args.auth_hs256_secret_file.is_some() {
        config.auth_hs256_secret_file = args.auth_hs256_secret_file;
    }
    let secret = switchboard::auth::hs256_secret(&config)?.context(
        "no HS256 secret: set SWITCHBOARD_AUTH_HS256_SECRET, --auth-hs256-secret-file or the config's auth_hs256_secret",
    )?;
    let claims = switchboard::auth::MintClaims {
        sub: args.user,
        exp: switchboard::auth::now_unix().saturating_add(args.ttl.as_secs()),
        iss: config.auth_issuer.clone(),
        aud: config.auth_audience.clone(),
        grants: args.grants,
        ..Default::default()
    };
    println!("{}", switchboard::auth::mint_hs256(&secret, &claims)?);
    Ok(())
}

/// Downloads a backup from the admin API into `args.to`, then opens it to
/// check that it is a whole store. Blocking.
fn backup(args: BackupArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let addr = args
        .admin
        .or(config.admin_listen)
        .context("no admin address: give --admin or set admin_listen")?;
    let token = args
        .admin_token
        .or_else(|| config.admin_token.map(|t| t.expose().to_owned()))
        .context("no admin token: set SWITCHBOARD_ADMIN_TOKEN or --admin-token")?;
    let mut stream = std::net::TcpStream::connect(addr)
        .with_context(|| format!("cannot connect to the admin listener {addr}"))?;
    write!(
        stream,
        "POST /admin/api/backup HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .context("cannot send the backup request")?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .context("no answer from the admin listener")?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {status_line:?}"))?;
    let mut length = None;
    let mut epoch = String::new();
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .context("the answer's headers are cut off")?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case(switchboard::admin::BACKUP_EPOCH_HEADER) {
                epoch = value.trim().to_owned();
            }
        }
    }
    if status != 200 {
        let mut body = String::new();
        let _ = reader.take(64 * 1024).read_to_string(&mut body);
        anyhow::bail!(
            "the server refused the backup (HTTP {status}): {}",
            body.trim()
        );
    }
    let length = length.context("the backup answer has no Content-Length")?;
    let written = switchboard::store::write_file_durably(&args.to, &mut reader, length)?;
    let (of, chunks) = switchboard::store::verify_backup(&args.to)
        .with_context(|| format!("{} is not a readable backup", args.to.display()))?;
    anyhow::ensure!(
        of == epoch,
        "the backup names epoch {of}, the server said {epoch}"
    );
    println!(
        "backup of epoch {epoch} written to {} ({written} bytes, {chunks} message chunks)",
        args.to.display()
    );
    Ok(())
}

/// Reloads the TLS certificate and key on every SIGHUP; never returns.
async fn reload_on_sighup(certs: Option<std::sync::Arc<switchboard::tls::CertStore>>) {
    #[cfg(unix)]
    if let Some(certs) = certs {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                while hup.recv().await.is_some() {
                    match certs.reload() {
                        Ok(()) => info!("SIGHUP: reloaded the TLS certificate and key"),
                        Err(e) => {
                            warn!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate")
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }
    #[cfg(not(unix))]
    let _ = certs;
    std::future::pending::<()>().await;
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
