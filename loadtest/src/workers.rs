//! `--workers N`: the parent spawns N copies of this binary, each owning
//! every Nth connection and sharing one clock (`--start-at-us`). Each child
//! prints a progress line per second (`P sent delivered acked open`) and, at
//! the end, one line `R <json>` holding its counts and its HDR histograms in
//! hdrhistogram's V2 format; the parent merges them into one report.

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::cli::Scenario;
use crate::conn::now_us;
use crate::metrics::{Clock, lock};
use crate::report::{Collected, Report};
use crate::{Probe, progress_bar};

/// Options the parent handles itself and does not pass on.
const PARENT_ONLY: [&str; 6] = [
    "--workers",
    "--server-pid",
    "--plot",
    "--json-out",
    "--slo-p99-ms",
    "--threads",
];
const PARENT_ONLY_FLAGS: [&str; 2] = ["--json", "--quiet"];

fn child_args(n: u32) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let s = a.to_string_lossy();
        if PARENT_ONLY.contains(&s.as_ref()) {
            args.next();
            continue;
        }
        if PARENT_ONLY.iter().any(|p| s.starts_with(&format!("{p}=")))
            || PARENT_ONLY_FLAGS.contains(&s.as_ref())
        {
            continue;
        }
        out.push(a);
    }
    // One runtime thread each: N processes already spread over the CPUs.
    out.push("--threads".into());
    out.push(if n > 1 { "1" } else { "2" }.into());
    out
}

pub async fn run_parent(s: &Scenario) -> anyhow::Result<Report> {
    let common = s.common();
    let n = common.workers;
    let exe = std::env::current_exe().context("finding this binary")?;
    let ramp_s = match s {
        Scenario::Connect(_) => 0.0,
        _ => f64::from(s.clients()) / f64::from(common.ramp_up.max(1)),
    };
    let setup_s = if matches!(s, Scenario::History(_)) {
        10.0
    } else {
        2.0
    };
    let start_at = now_us() + ((ramp_s * 1.2 + setup_s) * 1e6) as u64;
    let warmup = if matches!(s, Scenario::Connect(_)) {
        0
    } else {
        common.warmup_us()
    };
    let clock = Clock::new(start_at, warmup, common.duration_us());
    let probe = Probe::new(common.server_pid);
    let me = Probe::new(Some(std::process::id()));
    let me_task = me.watch(move || Some(clock), || 0);
    let base = child_args(n);
    let progress: Arc<Mutex<Vec<[u64; 4]>>> = Arc::new(Mutex::new(vec![[0; 4]; n as usize]));
    let mut children = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&base)
            .args(["--worker", &i.to_string()])
            .args(["--worker-count", &n.to_string()])
            .args(["--start-at-us", &start_at.to_string()])
            .arg("--quiet")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawning a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let progress = progress.clone();
        children.spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut result = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("P ") {
                    let v: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
                    if let [a, b, c, d] = v[..] {
                        lock(&progress)[i as usize] = [a, b, c, d];
                    }
                } else if let Some(rest) = line.strip_prefix("R ") {
                    result = Some(Collected::from_wire(rest)?);
                }
            }
            let status = child.wait().await?;
            match result {
                Some(r) if status.success() => anyhow::Ok(r),
                _ => bail!("worker {i} failed ({status})"),
            }
        });
    }
    let bar = progress_bar(common);
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let sum = lock(&progress).iter().fold([0u64; 4], |acc, p| {
                    [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2], acc[3] + p[3]]
                });
                bar.set_message(format!(
                    "{n} workers | {} conns | sent {}/s delivered {}/s acked {}/s",
                    sum[3], sum[0], sum[1], sum[2]
                ));
                bar.tick();
            }
        })
    };
    let open_now = {
        let progress = progress.clone();
        move || lock(&progress).iter().map(|p| p[3]).sum::<u64>()
    };
    let sampler = probe.watch(move || Some(clock), open_now.clone());
    let limit = Duration::from_micros(clock.stop.saturating_sub(now_us()))
        + crate::scenario::DRAIN
        + Duration::from_secs(60);
    let mut merged = Collected::default();
    let gathered = tokio::time::timeout(limit, async {
        while let Some(done) = children.join_next().await {
            merged.merge(done??);
        }
        anyhow::Ok(())
    })
    .await;
    ticker.abort();
    bar.finish_and_clear();
    gathered.context("workers did not finish in time")??;
    let finished = now_us();
    merged.loadgen_cpu_seconds += me.finish(me_task, 0).map_or(0.0, |u| u.cpu_seconds);
    let server = probe.finish(sampler, open_now());
    let mut clock = clock;
    clock.stop = clock.stop.min(finished);
    Ok(Report::build(
        s.name(),
        s.clients(),
        common,
        &merged,
        crate::measured_seconds(s, clock, finished),
        server,
    ))
}
