//! `--report FILE.html`: what a run measured, as one self-contained page
//! (inline SVG, no script, no network): the medians as a table, latency
//! percentiles against offered load (a `--sweep`), achieved against
//! offered throughput, and each target's throughput over time. Each chart
//! is also written beside it as `FILE-<chart>.svg`, for documents that
//! show pictures.

use std::fmt::Write as _;

use crate::load::{Mode, Report};

/// The rounds measured at one load.
pub struct Step {
    /// The load.
    pub mode: Mode,
    /// Every round, per target.
    pub rounds: Vec<Vec<Report>>,
    /// The median round per target.
    pub medians: Vec<Report>,
}

const COLORS: &[&str] = &["#2f6fde", "#d13b3b", "#1f9d55", "#8a5cd1", "#c77700", "#0f8a9d"];

/// One line of a chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    color: &'static str,
    dash: &'static str,
}

/// The page.
pub fn html(title: &str, steps: &[Step]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font:14px/1.4 system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#1d2330}}\
         table{{border-collapse:collapse;font-variant-numeric:tabular-nums}}\
         td,th{{padding:.3rem .7rem;border-bottom:1px solid #e3e6eb;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}svg{{width:100%;height:auto}}\
         </style></head><body><h1>{t}</h1>",
        t = escape(title)
    );
    out.push_str("<h2>Medians</h2><table><tr><th>target</th><th>load</th><th>req/s</th><th>p50 ms</th>");
    out.push_str("<th>p90 ms</th><th>p99 ms</th><th>max ms</th><th>lost</th></tr>");
    for s in steps {
        for r in &s.medians {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td></tr>",
                escape(&r.target), s.mode, r.throughput, r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms, r.lost
            );
        }
    }
    out.push_str("</table>");
    for (_, title, svg) in charts(steps) {
        let _ = write!(out, "<h2>{}</h2>{svg}", escape(&title));
    }
    out.push_str("</body></html>\n");
    out
}

/// The charts of a run: (file stem, title, SVG). Latency and achieved
/// throughput against offered load need a sweep of two rates or more.
pub fn charts(steps: &[Step]) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let targets: Vec<String> =
        steps.first().map(|s| s.medians.iter().map(|r| r.target.clone()).collect()).unwrap_or_default();
    let offered: Vec<f64> = steps
        .iter()
        .filter_map(|s| match s.mode {
            Mode::Rate(r) => Some(r),
            Mode::Window(_) => None,
        })
        .collect();
    if offered.len() >= 2 {
        let mut latency = Vec::new();
        let mut achieved = Vec::new();
        for (t, name) in targets.iter().enumerate() {
            let color = COLORS[t % COLORS.len()];
            let at = |f: fn(&Report) -> f64| -> Vec<(f64, f64)> {
                offered.iter().zip(steps).filter_map(|(o, s)| s.medians.get(t).map(|r| (*o, f(r)))).collect()
            };
            for (q, dash, f) in [
                ("p50", "", (|r: &Report| r.p50_ms) as fn(&Report) -> f64),
                ("p90", "6 4", |r: &Report| r.p90_ms),
                ("p99", "2 3", |r: &Report| r.p99_ms),
            ] {
                latency.push(Series { name: format!("{name} {q}"), points: at(f), color, dash });
            }
            achieved.push(Series { name: name.clone(), points: at(|r| r.throughput), color, dash: "" });
        }
        let top = offered.iter().copied().fold(0.0, f64::max);
        achieved.push(Series {
            name: "offered".into(),
            points: vec![(0.0, 0.0), (top, top)],
            color: "#999",
            dash: "4 4",
        });
        let title = "Latency percentiles against offered load".to_string();
        out.push(("latency", title, chart("offered load, requests/s", "ms", &latency, &[])));
        let title = "Achieved against offered throughput".to_string();
        out.push(("throughput", title, chart("offered load, requests/s", "answered/s", &achieved, &[])));
    }
    // each target's own measured time, its rounds one after another
    let mut over_time = Vec::new();
    let mut markers = Vec::new();
    for (t, name) in targets.iter().enumerate() {
        let mut points = Vec::new();
        let mut at = 0.0;
        for s in steps {
            if t == 0 && steps.len() > 1 {
                let label = match s.mode {
                    Mode::Rate(r) => format!("{r}/s"),
                    Mode::Window(w) => format!("window {w}"),
                };
                markers.push((at, label));
            }
            for r in s.rounds.get(t).into_iter().flatten() {
                for (i, second) in r.timeline.chunks(10).enumerate() {
                    let answered: u32 = second.iter().sum();
                    points.push((at + i as f64 + 0.5, answered as f64 * 10.0 / second.len() as f64));
                }
                at += r.timeline.len() as f64 / 10.0;
            }
        }
        if !points.is_empty() {
            over_time.push(Series { name: name.clone(), points, color: COLORS[t % COLORS.len()], dash: "" });
        }
    }
    if !over_time.is_empty() {
        // each target's rounds one after another (targets ran in alternating rounds)
        let title = "Throughput over time, each target's measured rounds one after another".to_string();
        out.push(("over-time", title, chart("seconds of measured rounds", "answered/s", &over_time, &markers)));
    }
    out
}

/// A line chart as SVG, both axes from 0; `markers` are labelled vertical lines.
fn chart(x_label: &str, y_label: &str, series: &[Series], markers: &[(f64, String)]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 320.0;
    const L: f64 = 64.0;
    const R: f64 = 16.0;
    const T: f64 = 40.0;
    const B: f64 = 44.0;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (x_max, y_max) = all.fold((0.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let (x_max, y_max) = (nice(x_max), nice(y_max));
    let x = |v: f64| L + v / x_max * (W - L - R);
    let y = |v: f64| H - B - v / y_max * (H - T - B);
    let mut s = format!("<svg viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\" font-size=\"12\">");
    for i in 0..=4 {
        let (vx, vy) = (x_max * i as f64 / 4.0, y_max * i as f64 / 4.0);
        let _ = write!(
            s,
            "<line x1=\"{L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e3e6eb\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#667085\">{}</text>\
             <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#667085\">{}</text>",
            W - R,
            L - 6.0,
            y(vy) + 4.0,
            label(vy),
            x(vx),
            H - B + 16.0,
            label(vx),
            y = y(vy),
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#667085\">{}</text>\
         <text x=\"12\" y=\"{:.1}\" fill=\"#667085\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        L + (W - L - R) / 2.0,
        H - 8.0,
        escape(x_label),
        T + (H - T - B) / 2.0,
        T + (H - T - B) / 2.0,
        escape(y_label)
    );
    for (at, text) in markers {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{T}\" y2=\"{1}\" stroke=\"#bbb\" stroke-dasharray=\"3 3\"/>\
             <text x=\"{2:.1}\" y=\"{3}\" fill=\"#667085\" font-size=\"11\">{4}</text>",
            x(*at),
            H - B,
            x(*at) + 3.0,
            T + 12.0,
            escape(text)
        );
    }
    let mut legend_x = L;
    for se in series {
        let points: Vec<String> = se.points.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" stroke-dasharray=\"{d}\" points=\"{p}\"/>\
             <line x1=\"{lx:.1}\" x2=\"{lx2:.1}\" y1=\"16\" y2=\"16\" stroke=\"{c}\" stroke-width=\"3\" stroke-dasharray=\"{d}\"/>\
             <text x=\"{tx:.1}\" y=\"20\">{n}</text>",
            c = se.color,
            d = se.dash,
            p = points.join(" "),
            lx = legend_x,
            lx2 = legend_x + 18.0,
            tx = legend_x + 22.0,
            n = escape(&se.name),
        );
        legend_x += 34.0 + se.name.len() as f64 * 7.0;
    }
    s.push_str("</svg>");
    s
}

/// The next round number at or above `v` (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8
/// times a power of ten).
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0].iter().map(|m| m * p).find(|m| *m >= v).unwrap_or(10.0 * p)
}

fn label(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(target: &str, p50: f64, throughput: f64) -> Report {
        Report {
            target: target.into(),
            sent: 10,
            answered: 10,
            lost: 0,
            duplicates: 0,
            cache_hits: 0,
            throughput,
            p50_ms: p50,
            p90_ms: p50 * 2.0,
            p95_ms: p50 * 2.5,
            p99_ms: p50 * 3.0,
            max_ms: p50 * 4.0,
            tokens_per_s: 0.0,
            ttft_p50_ms: None,
            ttft_p99_ms: None,
            timeline: vec![5; 20],
        }
    }

    #[test]
    fn a_sweep_draws_latency_against_load_and_throughput_over_time() {
        let steps: Vec<Step> = [100.0, 200.0]
            .iter()
            .map(|r| Step {
                mode: Mode::Rate(*r),
                rounds: vec![vec![report("fleet<1>", r / 100.0, *r)]],
                medians: vec![report("fleet<1>", r / 100.0, *r)],
            })
            .collect();
        let page = html("run", &steps);
        assert!(page.contains("Latency percentiles against offered load") && page.contains("Throughput over time"));
        // names are escaped; 2 s of 5 answers per 100 ms is 50/s, twice
        assert!(page.contains("fleet&lt;1&gt; p99") && !page.contains("fleet<1>"));
        assert_eq!(page.matches("<polyline").count(), 3 + 2 + 1);
        assert_eq!((nice(0.0), nice(7.0), nice(120.0), nice(2.2)), (1.0, 8.0, 150.0, 2.5));
    }
}
