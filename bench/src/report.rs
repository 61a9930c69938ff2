//! Results of a bench run and their renderings: JSON (every field, for tools), a Markdown
//! table (for docs/benchmarks.md), a one-line summary per case (for the terminal).

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// None for an empty histogram: a figure from no samples would be a made-up number.
    pub fn from_histogram_ns(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Percentiles {
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1e3,
        })
    }
}

/// The physical floor of a case behind the link emulator: the same workload's local latency
/// (at RTT 0) plus the RTT. Nothing over a link of that RTT can do better.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Floor {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Pattern, block size, queue depth, connections, rate: what makes two cases comparable.
pub type WorkloadKey = (String, u32, u32, u32, Option<u64>);

/// One measured case: one target, one workload, one RTT.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseResult {
    /// The target's label (e.g. "stretch", "qemu-nbd") and its NBD URI.
    pub target: String,
    pub uri: String,
    pub rw: String,
    pub block_size_bytes: u32,
    pub queue_depth: u32,
    pub connections: u32,
    /// Emulated round-trip time added in front of the target; 0 means direct.
    pub rtt_us: u64,
    /// Fixed offered load, or None for closed-loop.
    pub rate_ops_per_s: Option<u64>,
    pub ops: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    /// Latency of all ops; per kind when that kind ran.
    pub latency_us: Option<Percentiles>,
    pub read_latency_us: Option<Percentiles>,
    pub write_latency_us: Option<Percentiles>,
    pub floor: Option<Floor>,
}

impl CaseResult {
    /// The workload without target and RTT: cases with equal keys are comparable.
    pub fn workload_key(&self) -> WorkloadKey {
        (
            self.rw.clone(),
            self.block_size_bytes,
            self.queue_depth,
            self.connections,
            self.rate_ops_per_s,
        )
    }

    pub fn workload_label(&self) -> String {
        format!(
            "{} {} qd{}",
            self.rw,
            size_label(self.block_size_bytes),
            self.queue_depth
        )
    }
}

/// Reference target over another on one workload, both at RTT 0 (or the same RTT).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratio {
    pub workload: String,
    pub rtt_us: u64,
    pub reference: String,
    pub other: String,
    /// reference IOPS / other IOPS: above 1 means the reference is faster.
    pub iops_ratio: f64,
    /// reference p50 / other p50: below 1 means the reference answers sooner.
    pub p50_ratio: f64,
    pub p99_ratio: f64,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    pub kernel: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        Machine {
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel,
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub tool: String,
    pub started_unix_s: u64,
    pub machine: Machine,
    pub cases: Vec<CaseResult>,
    pub ratios: Vec<Ratio>,
}

impl Report {
    /// Fills each case's floor from the same target and workload at RTT 0.
    pub fn compute_floors(&mut self) {
        let locals: Vec<(String, WorkloadKey, Percentiles)> = self
            .cases
            .iter()
            .filter(|c| c.rtt_us == 0)
            .filter_map(|c| {
                c.latency_us
                    .clone()
                    .map(|p| (c.target.clone(), c.workload_key(), p))
            })
            .collect();
        for c in self.cases.iter_mut().filter(|c| c.rtt_us > 0) {
            let key = c.workload_key();
            if let Some((_, _, local)) = locals.iter().find(|(t, k, _)| *t == c.target && *k == key)
            {
                let rtt = c.rtt_us as f64;
                c.floor = Some(Floor {
                    p50_us: local.p50 + rtt,
                    p99_us: local.p99 + rtt,
                });
            }
        }
    }

    /// Ratios of the first target over each other target, per workload and RTT.
    pub fn compute_ratios(&mut self) {
        let Some(reference) = self.cases.first().map(|c| c.target.clone()) else {
            return;
        };
        let mut out = Vec::new();
        for r in self.cases.iter().filter(|c| c.target == reference) {
            for o in self.cases.iter().filter(|c| {
                c.target != reference
                    && c.workload_key() == r.workload_key()
                    && c.rtt_us == r.rtt_us
            }) {
                let (Some(rl), Some(ol)) = (&r.latency_us, &o.latency_us) else {
                    continue;
                };
                out.push(Ratio {
                    workload: r.workload_label(),
                    rtt_us: r.rtt_us,
                    reference: reference.clone(),
                    other: o.target.clone(),
                    iops_ratio: safe_div(r.iops, o.iops),
                    p50_ratio: safe_div(rl.p50, ol.p50),
                    p99_ratio: safe_div(rl.p99, ol.p99),
                });
            }
        }
        self.ratios = out;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Column headers of the cases table, in order.
    pub const CASE_COLUMNS: [&'static str; 14] = [
        "target",
        "workload",
        "conns",
        "RTT ms",
        "rate ops/s",
        "IOPS",
        "MB/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "floor p50 µs",
        "floor p99 µs",
    ];

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        s.push_str(&format!(
            "Machine: {} ({} CPUs, {:.1} GiB RAM), Linux {}.\n\n",
            m.cpu_model,
            m.cpus,
            m.memory_bytes as f64 / (1u64 << 30) as f64,
            m.kernel
        ));
        s.push_str(&format!("| {} |\n", Self::CASE_COLUMNS.join(" | ")));
        s.push_str(&format!("|{}\n", "---|".repeat(Self::CASE_COLUMNS.len())));
        for c in &self.cases {
            let p = c.latency_us.clone().unwrap_or_default();
            let dash = || "-".to_string();
            let row = [
                c.target.clone(),
                c.workload_label(),
                c.connections.to_string(),
                fmt_num(c.rtt_us as f64 / 1e3),
                c.rate_ops_per_s
                    .map_or_else(|| "closed".into(), |r| r.to_string()),
                format!("{:.0}", c.iops),
                format!("{:.1}", c.mb_per_s),
                fmt_num(p.p50),
                fmt_num(p.p90),
                fmt_num(p.p99),
                fmt_num(p.p99_9),
                fmt_num(p.max),
                c.floor.as_ref().map_or_else(dash, |f| fmt_num(f.p50_us)),
                c.floor.as_ref().map_or_else(dash, |f| fmt_num(f.p99_us)),
            ];
            s.push_str(&format!("| {} |\n", row.join(" | ")));
        }
        if !self.ratios.is_empty() {
            s.push_str("\n| workload | RTT ms | compared | IOPS ratio | p50 ratio | p99 ratio |\n");
            s.push_str("|---|---|---|---|---|---|\n");
            for r in &self.ratios {
                s.push_str(&format!(
                    "| {} | {} | {} / {} | {:.2} | {:.2} | {:.2} |\n",
                    r.workload,
                    fmt_num(r.rtt_us as f64 / 1e3),
                    r.reference,
                    r.other,
                    r.iops_ratio,
                    r.p50_ratio,
                    r.p99_ratio
                ));
            }
        }
        s
    }
}

/// The terminal line for one finished case.
pub fn summary_line(c: &CaseResult) -> String {
    let p = c.latency_us.clone().unwrap_or_default();
    let floor = c.floor.as_ref().map_or_else(String::new, |f| {
        format!(" (floor p50 {} µs)", fmt_num(f.p50_us))
    });
    format!(
        "{} {} rtt={}ms: {:.0} IOPS, {:.1} MB/s, p50 {} p90 {} p99 {} p99.9 {} max {} µs{}{}",
        c.target,
        c.workload_label(),
        fmt_num(c.rtt_us as f64 / 1e3),
        c.iops,
        c.mb_per_s,
        fmt_num(p.p50),
        fmt_num(p.p90),
        fmt_num(p.p99),
        fmt_num(p.p99_9),
        fmt_num(p.max),
        floor,
        if c.errors > 0 {
            format!(", {} errors", c.errors)
        } else {
            String::new()
        }
    )
}

fn safe_div(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// Three significant figures without exponent noise.
pub fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn size_label(bytes: u32) -> String {
    if bytes % (1024 * 1024) == 0 {
        format!("{}M", bytes / (1024 * 1024))
    } else if bytes % 1024 == 0 {
        format!("{}K", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}
