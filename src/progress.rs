//! Resync progress of a running site: samples the replica's dirty-block count, derives a rate
//! and an ETA, logs them while a resync runs, and answers the admin API's status.
//!
//! The count comes from `DriverStats::dirty_blocks` (blocks that may differ from the peer).
//! Every local write is dirty until the peer acknowledges it, so a non-empty set alone is not
//! a resync: one starts when the link comes up (a new session) with blocks dirty, and ends
//! when the set is empty. Only decreases count towards the rate: new writes during a resync
//! make the set grow, and that growth says nothing about how fast the copy goes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stretch_replicator::ReplicatedVolume;
use tracing::info;

/// How often the dirty count is sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// The rate is averaged over this many samples (10 s at 500 ms).
const SAMPLES_MAX: usize = 20;
/// How often the site logs progress while a resync runs.
const LOG_INTERVAL: Duration = Duration::from_secs(2);

/// A snapshot of resync progress.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Progress {
    /// A resync is copying: the link came up with blocks dirty, is still up, and the set has
    /// not emptied since.
    pub(crate) active: bool,
    pub(crate) blocks_left: u64,
    /// Blocks settled per second over the recent window; 0 when none settled.
    pub(crate) rate_blocks_per_s: f64,
    /// Seconds until `blocks_left` reaches zero at the current rate; None without a rate.
    pub(crate) eta_s: Option<f64>,
}

/// What one sample changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    None,
    ResyncStarted,
    ResyncComplete,
}

#[derive(Default)]
struct Samples {
    /// (when, dirty blocks), oldest first, at most `SAMPLES_MAX`.
    window: VecDeque<(Instant, u64)>,
    link_up: bool,
    /// Link sessions so far: a change means the link went down and up between two samples.
    sessions: u64,
    resyncing: bool,
}

impl Samples {
    fn push(&mut self, at: Instant, dirty_blocks: u64, link_up: bool, sessions: u64) -> Change {
        let dirty_before = self.window.back().map_or(0, |&(_, dirty)| dirty);
        if self.window.len() == SAMPLES_MAX {
            self.window.pop_front();
        }
        self.window.push_back((at, dirty_blocks));
        let reconnected = link_up && (!self.link_up || sessions != self.sessions);
        self.link_up = link_up;
        self.sessions = sessions;
        if dirty_blocks == 0 {
            let was = std::mem::take(&mut self.resyncing);
            // A resync short enough to start and end between two samples still completed.
            return if was || (reconnected && dirty_before > 0) {
                Change::ResyncComplete
            } else {
                Change::None
            };
        }
        if reconnected && !self.resyncing {
            self.resyncing = true;
            return Change::ResyncStarted;
        }
        Change::None
    }

    fn progress(&self) -> Progress {
        let Some(&(newest_at, blocks_left)) = self.window.back() else {
            return Progress::default();
        };
        let (oldest_at, _) = self.window.front().copied().unwrap_or((newest_at, 0));
        let settled: u64 = self
            .window
            .iter()
            .zip(self.window.iter().skip(1))
            .map(|(&(_, before), &(_, after))| before.saturating_sub(after))
            .sum();
        let span_s = newest_at.duration_since(oldest_at).as_secs_f64();
        let rate_blocks_per_s = if span_s > 0.0 {
            settled as f64 / span_s
        } else {
            0.0
        };
        let eta_s = (rate_blocks_per_s > 0.0).then(|| blocks_left as f64 / rate_blocks_per_s);
        Progress {
            active: self.resyncing && self.link_up,
            blocks_left,
            rate_blocks_per_s,
            eta_s,
        }
    }
}

/// Samples a replicated volume's dirty count in the background; stops when dropped.
pub(crate) struct ResyncMonitor {
    samples: Arc<Mutex<Samples>>,
    task: tokio::task::JoinHandle<()>,
}

impl ResyncMonitor {
    /// Starts sampling `device`; logs when a resync starts, its progress every ~2 s, and
    /// once "resync complete" when the dirty set empties.
    pub(crate) fn start(device: Arc<ReplicatedVolume>) -> ResyncMonitor {
        let samples = Arc::new(Mutex::new(Samples::default()));
        let shared = samples.clone();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut last_log: Option<Instant> = None;
            loop {
                interval.tick().await;
                let stats = device.driver_stats();
                let sessions = device.link_stats().sessions;
                let now = Instant::now();
                let (change, progress) = {
                    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    let change = s.push(now, stats.dirty_blocks, stats.link_up, sessions);
                    (change, s.progress())
                };
                match change {
                    Change::ResyncStarted => {
                        info!(
                            blocks_left = progress.blocks_left,
                            "resync started: blocks differ from the peer"
                        );
                        last_log = Some(now);
                    }
                    Change::ResyncComplete => {
                        info!("resync complete: no block differs from the peer");
                        last_log = None;
                    }
                    Change::None => {}
                }
                if progress.active {
                    let due = last_log.is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL);
                    if due {
                        info!(
                            blocks_left = progress.blocks_left,
                            rate_blocks_per_s = format_args!("{:.0}", progress.rate_blocks_per_s),
                            eta = %format_eta(progress.eta_s),
                            "resync in progress"
                        );
                        last_log = Some(now);
                    }
                }
            }
        });
        ResyncMonitor { samples, task }
    }

    /// The latest progress.
    pub(crate) fn progress(&self) -> Progress {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .progress()
    }
}

impl Drop for ResyncMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// "12s", "3m05s", "1h02m" or "unknown".
pub(crate) fn format_eta(eta_s: Option<f64>) -> String {
    let Some(eta_s) = eta_s.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "unknown".into();
    };
    let secs = eta_s.round() as u64;
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_only_settled_blocks_and_gives_an_eta() {
        let start = Instant::now();
        let mut s = Samples::default();
        assert_eq!(s.push(start, 1000, true, 1), Change::ResyncStarted);
        // New writes while copying raise the count; they must not lower the rate.
        s.push(start + Duration::from_secs(1), 1100, true, 1);
        s.push(start + Duration::from_secs(2), 900, true, 1);
        s.push(start + Duration::from_secs(4), 500, true, 1);
        let p = s.progress();
        assert!(p.active);
        assert_eq!(p.blocks_left, 500);
        // 200 + 400 settled over 4 s.
        assert!((p.rate_blocks_per_s - 150.0).abs() < 1e-9, "{p:?}");
        let eta = p.eta_s.expect("a rate gives an ETA");
        assert!((eta - 500.0 / 150.0).abs() < 1e-9);
        assert_eq!(
            s.push(start + Duration::from_secs(5), 0, true, 1),
            Change::ResyncComplete
        );
        assert!(!s.progress().active);
    }

    #[test]
    fn writes_in_flight_without_a_reconnect_are_not_a_resync() {
        let start = Instant::now();
        let mut s = Samples::default();
        assert_eq!(s.push(start, 0, true, 1), Change::None);
        // Every local write is dirty until the peer acknowledges it.
        assert_eq!(
            s.push(start + Duration::from_secs(1), 64, true, 1),
            Change::None
        );
        assert!(!s.progress().active);
        assert_eq!(
            s.push(start + Duration::from_secs(2), 0, true, 1),
            Change::None
        );
        // A link flap between two samples shows as a new session.
        assert_eq!(
            s.push(start + Duration::from_secs(3), 64, true, 2),
            Change::ResyncStarted
        );
        assert!(s.progress().active);
        // A link flap whose resync finished between two samples is still reported.
        assert_eq!(
            s.push(start + Duration::from_secs(4), 0, true, 2),
            Change::ResyncComplete
        );
        assert_eq!(
            s.push(start + Duration::from_secs(5), 8, false, 2),
            Change::None
        );
        assert_eq!(
            s.push(start + Duration::from_secs(6), 0, true, 3),
            Change::ResyncComplete
        );
    }

    #[test]
    fn no_rate_no_eta_and_link_down_is_not_a_resync() {
        let start = Instant::now();
        let mut s = Samples::default();
        s.push(start, 10, false, 0);
        s.push(start + Duration::from_secs(1), 10, false, 0);
        let p = s.progress();
        assert!(!p.active, "nothing copies while the link is down");
        assert_eq!(p.eta_s, None);
        assert_eq!(format_eta(p.eta_s), "unknown");
    }

    #[test]
    fn the_window_is_bounded() {
        let start = Instant::now();
        let mut s = Samples::default();
        for i in 0..(SAMPLES_MAX as u64 * 3) {
            s.push(start + Duration::from_secs(i), 10_000 - i, true, 1);
        }
        assert_eq!(s.window.len(), SAMPLES_MAX);
        assert!((s.progress().rate_blocks_per_s - 1.0).abs() < 1e-9);
    }

    #[test]
    fn eta_formats() {
        assert_eq!(format_eta(Some(12.4)), "12s");
        assert_eq!(format_eta(Some(185.0)), "3m05s");
        assert_eq!(format_eta(Some(3720.0)), "1h02m");
        assert_eq!(format_eta(Some(f64::INFINITY)), "unknown");
    }
}
