//! Fan-out micro-benchmarks: the cost of handing one encoded message to N
//! subscribers, for the two designs the core issue asked to compare:
//! a tokio `broadcast` channel per room, and a bounded queue per session
//! (what Switchboard uses, through `Outbox`). Run with
//! `cargo bench --bench fanout`; figures are recorded in BENCHMARKS-HISTORY.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::metrics::Metrics;
use switchboard::session::{Delivery, Encoded, Outgoing, WireFrame, outbox};
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

const SUBSCRIBERS: [usize; 2] = [100, 1000];

fn text() -> String {
    format!(
        r#"{{"type":"message","room":"general","seq":1,"from":"alice","ts":1700000000000,"body":{{"text":"{}"}}}}"#,
        "x".repeat(64)
    )
}

fn frame() -> Utf8Bytes {
    Utf8Bytes::from(text())
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_one_message");
    for n in SUBSCRIBERS {
        group.throughput(Throughput::Elements(n as u64));

        // One broadcast channel per room; every subscriber receives from it.
        group.bench_with_input(BenchmarkId::new("tokio_broadcast", n), &n, |b, &n| {
            let (tx, _) = broadcast::channel::<Utf8Bytes>(1024);
            let mut rxs: Vec<_> = (0..n).map(|_| tx.subscribe()).collect();
            let text = frame();
            b.iter(|| {
                tx.send(text.clone()).expect("receivers");
                for rx in &mut rxs {
                    black_box(rx.try_recv().expect("message"));
                }
            });
        });

        // A plain bounded mpsc per session, carrying a shared Arc.
        group.bench_with_input(BenchmarkId::new("mpsc_per_session", n), &n, |b, &n| {
            let chans: Vec<_> = (0..n)
                .map(|_| mpsc::channel::<Arc<Delivery>>(1024))
                .collect();
            let (txs, mut rxs): (Vec<_>, Vec<_>) = chans.into_iter().unzip();
            let d = Arc::new(Delivery::new(
                Arc::from("general"),
                vec![Encoded {
                    seq: 1,
                    frame: WireFrame::text(&text()),
                }],
            ));
            b.iter(|| {
                for tx in &txs {
                    tx.try_send(d.clone()).expect("room");
                }
                for rx in &mut rxs {
                    black_box(rx.try_recv().expect("message"));
                }
            });
        });

        // Switchboard's Outbox: the mpsc plus the byte bound and the policy.
        group.bench_with_input(BenchmarkId::new("switchboard_outbox", n), &n, |b, &n| {
            let metrics = Arc::new(Metrics::default());
            let boxes: Vec<_> = (0..n)
                .map(|_| outbox(1024, 1 << 20, 64, CancellationToken::new(), metrics.clone()))
                .collect();
            let (txs, mut rxs): (Vec<_>, Vec<_>) = boxes.into_iter().unzip();
            let d = Arc::new(Delivery::new(
                Arc::from("general"),
                vec![Encoded {
                    seq: 1,
                    frame: WireFrame::text(&text()),
                }],
            ));
            b.iter(|| {
                for tx in &txs {
                    tx.push_message(&d);
                }
                for rx in &mut rxs {
                    match rx.try_recv() {
                        Some(Outgoing::Message(m)) => {
                            black_box(m);
                        }
                        other => panic!("expected a message, got {other:?}"),
                    }
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
