//! Workload-following preference (DESIGN §6 "Preference"), sans-IO.
//!
//! A plain link cut has a predictable winner per CG: the preferred site proposes its detach at
//! once, the other waits `preference_delay_us`. By default the preference follows the workload
//! — the site that writes most — so that a cut keeps the VMs' own site running. Moving it too
//! eagerly would make the winner of a cut depend on the last second's I/O, so a site claims
//! the preference only when, over `windows_needed` consecutive windows, it wrote at least
//! `bytes_min` and at least `ratio_min` times what the peer wrote, and not sooner than
//! `change_interval_min_us` after the last change it proposed. A pinned preference is never
//! moved by the workload (the map refuses it too).

use serde::{Deserialize, Serialize};

use crate::map::{CgId, Command, Preference, Site};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PreferenceConfig {
    /// Length of one measurement window.
    pub window_us: u64,
    /// Consecutive windows this site must dominate before it claims the preference.
    pub windows_needed: u32,
    /// This site's bytes must be at least this multiple of the peer's in a window.
    pub ratio_min: f64,
    /// A window with fewer bytes written here does not count (idle is not a workload).
    pub bytes_min: u64,
    /// Least time between two changes this site proposes.
    pub change_interval_min_us: u64,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        PreferenceConfig {
            window_us: 10_000_000,
            windows_needed: 3,
            ratio_min: 2.0,
            bytes_min: 1 << 20,
            change_interval_min_us: 300_000_000,
        }
    }
}

/// One site's view of one CG's workload; fed once per window.
#[derive(Debug, Clone)]
pub struct PreferenceTracker {
    cfg: PreferenceConfig,
    streak: u32,
    last_change_us: Option<u64>,
}

impl PreferenceTracker {
    pub fn new(cfg: PreferenceConfig) -> PreferenceTracker {
        PreferenceTracker {
            cfg,
            streak: 0,
            last_change_us: None,
        }
    }

    pub fn config(&self) -> &PreferenceConfig {
        &self.cfg
    }

    /// One window ended: `mine` and `peer` are the bytes each site wrote in it. Returns the
    /// command to propose if this site should now be preferred.
    pub fn on_window(
        &mut self,
        now_us: u64,
        cg: CgId,
        me: Site,
        current: Preference,
        mine: u64,
        peer: u64,
    ) -> Option<Command> {
        let pinned = matches!(current, Preference::Pinned(_));
        if pinned || current.site() == me {
            self.streak = 0;
            return None;
        }
        let dominates =
            mine >= self.cfg.bytes_min && (mine as f64) >= self.cfg.ratio_min * peer as f64;
        if !dominates {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let interval_ok = self
            .last_change_us
            .is_none_or(|t| now_us.saturating_sub(t) >= self.cfg.change_interval_min_us);
        if self.streak < self.cfg.windows_needed || !interval_ok {
            return None;
        }
        self.streak = 0;
        self.last_change_us = Some(now_us);
        Some(Command::SetPreference {
            cg,
            preference: Preference::Workload(me),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn tracker() -> PreferenceTracker {
        PreferenceTracker::new(PreferenceConfig {
            window_us: 1_000,
            windows_needed: 3,
            ratio_min: 2.0,
            bytes_min: MIB,
            change_interval_min_us: 100_000,
        })
    }

    // The preference moves only after the site dominated several windows in a row.
    #[test]
    fn claims_after_consecutive_dominant_windows_only() {
        let mut t = tracker();
        let cur = Preference::Workload(Site::A);
        assert_eq!(t.on_window(1, 7, Site::B, cur, 10 * MIB, MIB), None);
        assert_eq!(t.on_window(2, 7, Site::B, cur, 10 * MIB, MIB), None);
        // A balanced window breaks the streak.
        assert_eq!(t.on_window(3, 7, Site::B, cur, 2 * MIB, 2 * MIB), None);
        assert_eq!(t.on_window(4, 7, Site::B, cur, 10 * MIB, MIB), None);
        assert_eq!(t.on_window(5, 7, Site::B, cur, 10 * MIB, MIB), None);
        assert_eq!(
            t.on_window(6, 7, Site::B, cur, 10 * MIB, MIB),
            Some(Command::SetPreference {
                cg: 7,
                preference: Preference::Workload(Site::B)
            })
        );
    }

    // Hysteresis: no second change within the minimum interval, however strong the workload.
    #[test]
    fn minimum_interval_between_changes() {
        let mut t = tracker();
        let cur = Preference::Workload(Site::A);
        for now in 1..=3 {
            let _ = t.on_window(now, 7, Site::B, cur, 10 * MIB, 0);
        }
        assert!(t.last_change_us.is_some());
        // The map went back to A (say the peer claimed it); B dominates again at once.
        for now in 4..=20 {
            assert_eq!(
                t.on_window(now, 7, Site::B, cur, 10 * MIB, 0),
                None,
                "at {now}"
            );
        }
        let later = 3 + 100_000;
        assert!(t.on_window(later, 7, Site::B, cur, 10 * MIB, 0).is_some());
    }

    #[test]
    fn pinned_idle_and_already_preferred_never_claim() {
        let mut t = tracker();
        for now in 1..=10 {
            let pinned = Preference::Pinned(Site::A);
            assert_eq!(t.on_window(now, 7, Site::B, pinned, 100 * MIB, 0), None);
            let mine = Preference::Workload(Site::B);
            assert_eq!(t.on_window(now, 7, Site::B, mine, 100 * MIB, 0), None);
            // Below bytes_min: idle, even with the peer idler still.
            let cur = Preference::Workload(Site::A);
            assert_eq!(t.on_window(now, 7, Site::B, cur, MIB / 2, 0), None);
        }
    }
}
