//! A live session's state machine under arbitrary frame sequences.
//!
//! One tokio runtime and one real server (plain `ws://` listener on
//! `127.0.0.1:0`, redb in a temp dir, dev mode) start lazily once per fuzz
//! process. Each input is split into frames (`fuzz/shared/session.rs` has
//! the format), played as one session of user `fuzz`, and then a fresh
//! client must still get `welcome`, `pong` and an `ack`. Any panic, on any
//! server thread, aborts the process (libfuzzer-sys installs an aborting
//! panic hook), so it is a crash too.

#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard::{Config, Listeners, Server};
use tokio::runtime::Runtime;

#[path = "../shared/session.rs"]
mod session;

struct Harness {
    runtime: Runtime,
    addr: SocketAddr,
}

static HARNESS: OnceLock<Harness> = OnceLock::new();

fn harness() -> &'static Harness {
    HARNESS.get_or_init(|| match start() {
        Ok(h) => h,
        Err(e) => panic!("the fuzz server did not start: {e}"),
    })
}

/// A data dir of this process: `$TMPDIR/switchboard-fuzz-session-<pid>`.
/// Those of processes that are gone are removed first (a fuzz process ends
/// by `exit`, which runs no destructors).
fn data_dir() -> Result<PathBuf, String> {
    const PREFIX: &str = "switchboard-fuzz-session-";
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                continue;
            };
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn start() -> Result<Harness, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = Config {
        data_dir: data_dir()?.join("data"),
        ..Config::default()
    };
    session::configure(&mut config);
    let bind = config
        .plain_listen
        .ok_or("the fuzz config has no plain listener")?;
    let addr = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let listeners = Listeners {
            plain: Some(listener),
            ..Listeners::default()
        };
        let server = Server::start(config, listeners)
            .await
            .map_err(|e| format!("{e:?}"))?;
        tokio::spawn(server.serve(std::future::pending()));
        Ok::<_, String>(addr)
    })?;
    Ok(Harness { runtime, addr })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    h.runtime.block_on(async {
        if let Err(e) = session::drive(h.addr, data).await {
            panic!("the session misbehaved: {e}");
        }
        if let Err(e) = session::check_alive(h.addr).await {
            panic!("the server no longer serves a fresh client: {e}");
        }
    });
});
