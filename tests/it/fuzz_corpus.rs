//! Replays the `session` fuzz corpus (`fuzz/corpus/session/`) against a real
//! server, splitting and judging each input with the code the fuzz target
//! uses (`fuzz/shared/session.rs`): every session must answer or close
//! cleanly, no server thread may panic, and after each input a fresh client
//! must still get `welcome`, `pong` and an `ack`. The crashes the fuzzer
//! found are in the corpus too (`crash-*`, `finding-*`), so they stay fixed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::{Fixture, TestServer};

#[path = "../../fuzz/shared/session.rs"]
mod session_input;

#[allow(dead_code)]
#[path = "../../fuzz/shared/decode.rs"]
mod decode_input;

/// The name of the replay runtime's threads (workers and blocking pool).
const THREAD: &str = "fuzz-corpus-replay";
static SERVER_PANICKED: AtomicBool = AtomicBool::new(false);

/// Notes any panic on a replay runtime's threads. A panicking session task
/// is caught by tokio and would only drop one connection, so the replay
/// looks for it here; the fuzz target aborts on it instead.
fn watch_for_server_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with(THREAD))
        {
            SERVER_PANICKED.store(true, Ordering::SeqCst);
        }
        previous(info);
    }));
}

/// The files of `fuzz/corpus/<target>`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    files.sort();
    files
}

/// Plays each file, in order, against one fresh server, checking after each
/// that the server still serves. (Each check's `send` is acknowledged after
/// every earlier `send`, so an input reads what earlier inputs stored.)
fn replay(files: &[PathBuf]) {
    assert!(!files.is_empty(), "nothing to replay");
    watch_for_server_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREAD)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let server = TestServer::start_with(Fixture::new(), session_input::configure).await;
        let addr = server.plain_addr.expect("plain listener");
        let started = std::time::Instant::now();
        let (mut answered, mut closed) = (0, 0);
        for path in files {
            let data = std::fs::read(path).expect("read input");
            let outcome = session_input::drive(addr, &data)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if outcome.answered {
                answered += 1;
            } else {
                closed += 1;
            }
            session_input::check_alive(addr)
                .await
                .unwrap_or_else(|e| panic!("after {}: {e}", path.display()));
            assert!(
                !SERVER_PANICKED.load(Ordering::SeqCst),
                "a server thread panicked while replaying {}",
                path.display()
            );
        }
        eprintln!(
            "replayed {} inputs in {:?}: {answered} sessions answered, {closed} closed by the server",
            files.len(),
            started.elapsed()
        );
        server.stop().await;
    });
}

#[test]
fn fuzz_limits_match_the_server_defaults() {
    assert_eq!(
        switchboard::Config::default().max_body_depth,
        decode_input::MAX_DEPTH
    );
}

#[test]
fn session_corpus_replays_against_a_live_server() {
    replay(&inputs("session"));
}
