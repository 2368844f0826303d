//! `--plot report.svg`: latency percentiles and throughput per second over
//! the run (plotters, SVG backend; no font files needed).

use std::path::Path;

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{Report, Sample};

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
/// One line: its legend, colour and value per sample.
type Series = (&'static str, RGBColor, fn(&Sample) -> f64);

/// Draws four panels: delivery latency (p50/p90/p99), deliveries per
/// second, sends and acks per second, and open connections. `t` = 0 is the end of the warm-up.
pub fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 1100)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let title = format!(
        "switchboard-loadtest {} ({}, {} clients)",
        report.scenario, report.target, report.clients
    );
    let root = root
        .titled(&title, ("sans-serif", 22))
        .map_err(|e| anyhow!("plot: {e}"))?;
    let panels = root.split_evenly((4, 1));
    let s = &report.timeline;
    let x0 = s.first().map_or(0, |x| x.t) as f64;
    let x1 = (s.last().map_or(1, |x| x.t + 1) as f64).max(x0 + 1.0);
    let lat: [Series; 3] = [
        ("p50", BLUE, |x| x.p50_ms),
        ("p90", GREEN, |x| x.p90_ms),
        ("p99", RED, |x| x.p99_ms),
    ];
    panel(
        &panels[0],
        "delivery latency per second (ms)",
        s,
        (x0, x1),
        &lat,
    )?;
    let del: [Series; 1] = [("delivered/s", MAGENTA, |x| x.delivered as f64)];
    panel(&panels[1], "deliveries per second", s, (x0, x1), &del)?;
    let sa: [Series; 2] = [
        ("sent/s", BLUE, |x| x.sent as f64),
        ("acked/s", GREEN, |x| x.acked as f64),
    ];
    panel(&panels[2], "sends and acks per second", s, (x0, x1), &sa)?;
    let open: [Series; 1] = [("open", BLACK, |x| x.open as f64)];
    panel(&panels[3], "open connections", s, (x0, x1), &open)?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

fn panel(
    area: &Area<'_>,
    caption: &str,
    s: &[Sample],
    (x0, x1): (f64, f64),
    series: &[Series],
) -> anyhow::Result<()> {
    let ymax = s
        .iter()
        .flat_map(|x| series.iter().map(move |(_, _, f)| f(x)))
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds after warm-up")
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    for (name, color, f) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(s.iter().map(|x| (x.t as f64, f(x))), color))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}
