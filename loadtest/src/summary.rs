//! What a `soak` run measured and concluded: the server's process figures
//! sampled over time ([`SoakSample`]), how each series drifted ([`Drift`])
//! and the verdict against the run's limits ([`SoakSummary::judge`]). It is
//! plain data, shared by the scenario that fills it, the metrics that hold
//! it and the report that prints it; it must not read anything (no `/proc`,
//! no network) nor name those modules, so that none of them loops back here.

use serde::{Deserialize, Serialize};

/// Bytes in a MiB, for the limits and the report.
pub const MIB: f64 = 1024.0 * 1024.0;

/// Share of the samples in each of the first, middle and last windows.
const WINDOW_SHARE: usize = 10;
/// Growth over the second half still called level: this share of the
/// whole drift.
const PLATEAU_SHARE: f64 = 0.2;
/// ... or this share of the first window's value (noise).
const NOISE_SHARE: f64 = 0.01;

/// One reading of the server's process figures.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SoakSample {
    /// Seconds from the end of the warm-up (negative during it).
    pub t: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub cpu_seconds: Option<f64>,
    /// Messages acked to the churners so far (whole run).
    pub stored: u64,
}

/// How one series moved over the measured samples.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Drift {
    /// Mean of the first window.
    pub first: f64,
    /// Mean of the window around the middle sample.
    pub middle: f64,
    /// Mean of the last window.
    pub last: f64,
    /// `last - first`.
    pub drift: f64,
    /// `last - middle`: what the second half added.
    pub second_half: f64,
    /// The second half added at most a fifth of the drift (or noise).
    pub plateaued: bool,
}

impl Drift {
    /// The drift of `values` (in time order); `None` with fewer than two.
    pub fn of(values: &[f64]) -> Option<Drift> {
        let n = values.len();
        if n < 2 {
            return None;
        }
        let w = (n / WINDOW_SHARE).max(1);
        let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
        let first = mean(&values[..w]);
        let last = mean(&values[n - w..]);
        let mid_start = (n / 2).saturating_sub(w / 2).min(n - w);
        let middle = mean(&values[mid_start..mid_start + w]);
        let drift = last - first;
        let second_half = last - middle;
        let tolerance = (PLATEAU_SHARE * drift.max(0.0)).max(NOISE_SHARE * first.abs());
        Some(Drift {
            first,
            middle,
            last,
            drift,
            second_half,
            plateaued: second_half <= tolerance,
        })
    }
}

/// What a soak measured and concluded.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct SoakSummary {
    /// Where the samples came from (`/metrics` URL or `/proc/PID`).
    pub source: String,
    pub samples: Vec<SoakSample>,
    /// Over the measured samples; `None` with fewer than two.
    pub rss: Option<Drift>,
    pub fds: Option<Drift>,
    /// Server CPU seconds between the first and last measured sample.
    pub server_cpu_seconds: Option<f64>,
    pub cycles: u64,
    pub failed_cycles: u64,
    pub max_rss_drift_bytes: f64,
    pub max_fd_drift: f64,
    pub failures: Vec<String>,
}

impl SoakSummary {
    /// Computes the drifts from the samples taken at or after the warm-up,
    /// and the failures against the two thresholds.
    pub fn judge(&mut self) {
        let measured: Vec<&SoakSample> = self.samples.iter().filter(|s| s.t >= 0.0).collect();
        let rss: Vec<f64> = measured.iter().map(|s| s.rss_bytes as f64).collect();
        let fds: Vec<f64> = measured.iter().map(|s| s.open_fds as f64).collect();
        self.rss = Drift::of(&rss);
        self.fds = Drift::of(&fds);
        self.server_cpu_seconds = match (measured.first(), measured.last()) {
            (Some(a), Some(b)) => b.cpu_seconds.zip(a.cpu_seconds).map(|(b, a)| b - a),
            _ => None,
        };
        self.failures.clear();
        match (self.rss, self.fds) {
            (Some(rss), Some(fds)) => {
                if rss.drift > self.max_rss_drift_bytes {
                    self.failures.push(format!(
                        "server RSS drifted by {:+.1} MiB ({:.1} -> {:.1} MiB), past the limit of {:.1} MiB",
                        rss.drift / MIB,
                        rss.first / MIB,
                        rss.last / MIB,
                        self.max_rss_drift_bytes / MIB
                    ));
                }
                if fds.drift > self.max_fd_drift {
                    self.failures.push(format!(
                        "server descriptors drifted by {:+.1} ({:.1} -> {:.1}), past the limit of {}",
                        fds.drift, fds.first, fds.last, self.max_fd_drift
                    ));
                }
            }
            _ => self.failures.push(format!(
                "fewer than two samples of the server's memory in the measured window (from {})",
                self.source
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(rss_mib: &[f64], fds: &[u64], max_mib: f64, max_fds: f64) -> SoakSummary {
        let mut s = SoakSummary {
            source: "test".into(),
            samples: rss_mib
                .iter()
                .zip(fds)
                .enumerate()
                .map(|(i, (r, f))| SoakSample {
                    t: i as f64 - 1.0,
                    rss_bytes: (r * MIB) as u64,
                    open_fds: *f,
                    cpu_seconds: Some(i as f64 * 0.5),
                    stored: i as u64 * 100,
                })
                .collect(),
            max_rss_drift_bytes: max_mib * MIB,
            max_fd_drift: max_fds,
            ..SoakSummary::default()
        };
        s.judge();
        s
    }

    #[test]
    fn linear_growth_drifts_and_does_not_level_off() {
        // The warm-up sample (t < 0) is left out.
        let rss: Vec<f64> = std::iter::once(500.0)
            .chain((0..40).map(|i| 11.0 + 1.5 * f64::from(i)))
            .collect();
        let fds = vec![20; rss.len()];
        let s = summary(&rss, &fds, 16.0, 8.0);
        let d = s.rss.expect("rss drift");
        assert!((d.first - 13.25 * MIB).abs() < 0.01 * MIB, "{d:?}");
        assert!((d.drift - 54.0 * MIB).abs() < 0.01 * MIB, "{d:?}");
        assert!(!d.plateaued, "{d:?}");
        assert_eq!(s.failures.len(), 1, "{:?}", s.failures);
        assert!(s.failures[0].contains("RSS drifted by +54.0 MiB"));
        assert_eq!(s.fds.map(|f| (f.drift, f.plateaued)), Some((0.0, true)));
        assert_eq!(s.server_cpu_seconds, Some(19.5));
    }

    #[test]
    fn growth_that_levels_off_plateaus_and_passes_a_generous_limit() {
        let rss: Vec<f64> = (0..40)
            .map(|i| 60.0 - 40.0 * (-f64::from(i) / 4.0).exp())
            .collect();
        let fds: Vec<u64> = (0..40).map(|i| 30 + i % 3).collect();
        let s = summary(&rss, &fds, 64.0, 8.0);
        let d = s.rss.expect("rss drift");
        assert!(d.drift > 20.0 * MIB && d.plateaued, "{d:?}");
        assert!(s.fds.is_some_and(|f| f.plateaued));
        assert!(s.failures.is_empty(), "{:?}", s.failures);
        // The same run against a limit of 0 bytes fails.
        let strict = summary(&rss, &fds, 0.0, 8.0);
        assert_eq!(strict.failures.len(), 1, "{:?}", strict.failures);
    }

    #[test]
    fn leaking_descriptors_fail() {
        let rss = vec![40.0; 20];
        let fds: Vec<u64> = (0..20).map(|i| 30 + 5 * i).collect();
        let s = summary(&rss, &fds, 64.0, 8.0);
        assert!(s.rss.is_some_and(|d| d.drift == 0.0 && d.plateaued));
        assert_eq!(s.failures.len(), 1, "{:?}", s.failures);
        assert!(s.failures[0].contains("descriptors drifted"));
    }

    #[test]
    fn too_few_samples_fail() {
        let s = summary(&[10.0, 10.0], &[3, 3], 64.0, 8.0);
        assert!(s.rss.is_none());
        assert!(
            s.failures[0].contains("fewer than two samples"),
            "{:?}",
            s.failures
        );
    }
}
