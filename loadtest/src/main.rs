//! `switchboard-loadtest`: the Switchboard load generator. See the
//! library (`loadtest`) for the scenarios and `loadtest/README.md` for use.
//!
//! Exit status: 0 when the run passed; 1 when messages were lost or
//! duplicated, no connection was made, `--slo-p99-ms` was missed or a
//! `soak` drifted past its limit; 2 when the run itself failed.

use clap::Parser;
use loadtest::{Cli, collect};

/// jemalloc, as the server: glibc's allocator took about 4 % of the
/// generator's core in a TLS connection storm (free-list consolidation),
/// time the generator then did not spend on the server under test.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli = Cli::parse();
    let common = cli.scenario.common();
    let threads = common
        .threads
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(2)
        .max(1);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchboard-loadtest: no runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(async {
        if common.worker.is_some() {
            // A worker: hand the measurements to the parent on stdout.
            return match collect(&cli.scenario, true).await.and_then(|c| c.to_wire()) {
                Ok(line) => {
                    println!("R {line}");
                    0
                }
                Err(e) => {
                    eprintln!("switchboard-loadtest worker: {e:#}");
                    2
                }
            };
        }
        match loadtest::run(&cli.scenario).await {
            Ok(report) => {
                if common.json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.to_table());
                }
                if report.passed() { 0 } else { 1 }
            }
            Err(e) => {
                eprintln!("switchboard-loadtest: {e:#}");
                2
            }
        }
    });
    // Anything still open is dropped without waiting.
    runtime.shutdown_background();
    std::process::exit(code);
}
