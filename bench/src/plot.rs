//! SVG line charts written by hand (no plotting crate): latency percentiles against RTT
//! with the physical floor, and IOPS against queue depth.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::report::{fmt_num, Report};

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 330.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Log2 x axis (queue depths 1, 2, 4, ...).
    pub log2_x: bool,
    pub series: Vec<Series>,
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick values for [0, max]: 1, 2 or 5 times a power of ten, about five of them.
fn ticks(max: f64) -> Vec<f64> {
    if max <= 0.0 || !max.is_finite() {
        return vec![0.0, 1.0];
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let n = (max / step).ceil() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

impl Chart {
    pub fn render(&self) -> String {
        // Tall enough for the legend, one line per series.
        let height = HEIGHT.max(TOP + 20.0 + self.series.len() as f64 * 18.0 + BOTTOM);
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let tx = |x: f64| if self.log2_x { x.max(1e-9).log2() } else { x };
        let (mut xmin, mut xmax, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for &(x, y) in pts {
            xmin = xmin.min(tx(x));
            xmax = xmax.max(tx(x));
            ymax = ymax.max(y);
        }
        if !xmin.is_finite() {
            (xmin, xmax) = (0.0, 1.0);
        }
        if !self.log2_x {
            xmin = xmin.min(0.0);
        }
        if xmax <= xmin {
            xmax = xmin + 1.0;
        }
        let yticks = ticks(ymax * 1.05);
        let ytop = yticks.last().copied().unwrap_or(1.0).max(1e-9);
        let (pw, ph) = (WIDTH - LEFT - RIGHT, height - TOP - BOTTOM);
        let px = |x: f64| LEFT + (tx(x) - xmin) / (xmax - xmin) * pw;
        let py = |y: f64| TOP + ph - y / ytop * ph;

        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(
            s,
            r#"<rect width="{WIDTH}" height="{height}" fill="white"/>"#
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            escape(&self.title)
        );
        // Grid and y ticks.
        for t in &yticks {
            let y = py(*t);
            let _ = write!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
                LEFT + pw
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                fmt_num(*t)
            );
        }
        // X ticks: the distinct x values of the data, which are the settings that ran.
        let mut xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for x in xs {
            let xp = px(x);
            let _ = write!(
                s,
                r#"<line x1="{xp:.1}" y1="{:.1}" x2="{xp:.1}" y2="{:.1}" stroke="black"/>"#,
                TOP + ph,
                TOP + ph + 5.0
            );
            let _ = write!(
                s,
                r#"<text x="{xp:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph + 18.0,
                fmt_num(x)
            );
        }
        let _ = write!(
            s,
            r#"<rect x="{LEFT}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="black"/>"#
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            height - 15.0,
            escape(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let mut points = series.points.clone();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> = points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                path.join(" ")
            );
            for &(x, y) in &points {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    px(x),
                    py(y)
                );
            }
            let ly = TOP + 10.0 + i as f64 * 18.0;
            let lx = LEFT + pw + 12.0;
            let _ = write!(
                s,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
                lx + 24.0
            );
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 30.0,
                ly + 4.0,
                escape(&series.label)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Latency p50/p99 (ms) against RTT (ms) per target and workload, with the floor dashed.
/// None when fewer than two RTTs ran.
pub fn latency_vs_rtt(report: &Report) -> Option<String> {
    let mut rtts: Vec<u64> = report.cases.iter().map(|c| c.rtt_us).collect();
    rtts.sort_unstable();
    rtts.dedup();
    if rtts.len() < 2 {
        return None;
    }
    let mut groups: BTreeMap<String, Vec<&crate::report::CaseResult>> = BTreeMap::new();
    for c in &report.cases {
        groups
            .entry(format!("{} {}", c.target, c.workload_label()))
            .or_default()
            .push(c);
    }
    let mut series = Vec::new();
    for (label, cases) in groups {
        let pick = |f: &dyn Fn(&crate::report::CaseResult) -> Option<f64>| -> Vec<(f64, f64)> {
            cases
                .iter()
                .filter_map(|c| f(c).map(|v| (c.rtt_us as f64 / 1e3, v / 1e3)))
                .collect()
        };
        series.push(Series {
            label: format!("{label} p50"),
            points: pick(&|c| c.latency_us.as_ref().map(|p| p.p50)),
            dashed: false,
        });
        series.push(Series {
            label: format!("{label} p99"),
            points: pick(&|c| c.latency_us.as_ref().map(|p| p.p99)),
            dashed: false,
        });
        let mut floor = pick(&|c| c.floor.as_ref().map(|f| f.p50_us));
        // The floor at RTT 0 is the local p50 itself.
        floor.extend(pick(&|c| {
            if c.rtt_us == 0 {
                c.latency_us.as_ref().map(|p| p.p50)
            } else {
                None
            }
        }));
        if floor.len() >= 2 {
            series.push(Series {
                label: format!("{label} floor p50"),
                points: floor,
                dashed: true,
            });
        }
    }
    Some(
        Chart {
            title: "Latency against round-trip time".into(),
            x_label: "emulated RTT (ms)".into(),
            y_label: "latency (ms)".into(),
            log2_x: false,
            series,
        }
        .render(),
    )
}

/// IOPS against queue depth per target, workload kind and RTT. None when fewer than two
/// queue depths ran.
pub fn iops_vs_qd(report: &Report) -> Option<String> {
    let mut qds: Vec<u32> = report.cases.iter().map(|c| c.queue_depth).collect();
    qds.sort_unstable();
    qds.dedup();
    if qds.len() < 2 {
        return None;
    }
    let mut groups: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for c in &report.cases {
        let label = format!(
            "{} {} {} rtt {}ms",
            c.target,
            c.rw,
            crate::report::size_label(c.block_size_bytes),
            fmt_num(c.rtt_us as f64 / 1e3)
        );
        groups
            .entry(label)
            .or_default()
            .push((f64::from(c.queue_depth), c.iops));
    }
    let series = groups
        .into_iter()
        .map(|(label, points)| Series {
            label,
            points,
            dashed: false,
        })
        .collect();
    Some(
        Chart {
            title: "IOPS against queue depth".into(),
            x_label: "queue depth per connection (log2)".into(),
            y_label: "IOPS".into(),
            log2_x: true,
            series,
        }
        .render(),
    )
}
