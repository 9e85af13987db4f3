//! Rate limiting of the warnings a guest can make vroomd log.
//!
//! Anything a guest controls (bytes on its agent channel, protocol breaches)
//! must not be able to fill the host's log: each instance gets a
//! [`WarnLimiter`] that lets a burst of warnings through per window and
//! counts the rest. The count is reported once the window is over, as
//! "suppressed N similar warnings from instance X in the last 10 s": on the
//! next warning, on a [`WarnLimiter::tick`] after the window, or when the
//! source ends ([`WarnLimiter::flush`]). At most `burst + 1` lines per
//! window and instance reach the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vroom_base::LockExt;

/// The window over which warnings are counted.
pub const WARN_WINDOW: Duration = Duration::from_secs(10);
/// How many warnings per window and instance are logged.
pub const WARN_BURST: u32 = 5;

/// The pure counting state, driven by the instants given to it (so tests
/// run on a fake clock).
#[derive(Debug)]
struct Window {
    length: Duration,
    burst: u32,
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// What to do with one warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Whether this warning is logged.
    pub log: bool,
    /// How many warnings the window that just ended suppressed, to be
    /// reported before this one.
    pub suppressed_before: Option<u64>,
}

impl Window {
    fn admit(&mut self, now: Instant) -> Admission {
        let mut suppressed_before = None;
        let expired = self
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.length);
        if expired {
            if self.suppressed > 0 {
                suppressed_before = Some(self.suppressed);
            }
            self.start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        let log = self.logged < self.burst;
        if log {
            self.logged += 1;
        } else {
            self.suppressed += 1;
        }
        Admission {
            log,
            suppressed_before,
        }
    }

    /// The count of a window that is over, once.
    fn expire(&mut self, now: Instant) -> Option<u64> {
        let over = self
            .start
            .is_some_and(|start| now.saturating_duration_since(start) >= self.length);
        if !over {
            return None;
        }
        self.start = None;
        self.logged = 0;
        self.flush()
    }

    fn flush(&mut self) -> Option<u64> {
        let suppressed = std::mem::take(&mut self.suppressed);
        (suppressed > 0).then_some(suppressed)
    }
}

/// Per-instance limiter of guest-triggered warnings.
#[derive(Debug)]
pub struct WarnLimiter {
    instance: String,
    window: Mutex<Window>,
}

impl WarnLimiter {
    pub fn new(instance: impl Into<String>) -> Self {
        Self::with_limits(instance, WARN_WINDOW, WARN_BURST)
    }

    pub fn with_limits(instance: impl Into<String>, window: Duration, burst: u32) -> Self {
        WarnLimiter {
            instance: instance.into(),
            window: Mutex::new(Window {
                length: window,
                burst,
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Decides about one warning at `now`.
    pub fn admit(&self, now: Instant) -> Admission {
        self.lock().admit(now)
    }

    /// Logs a warning through `emit` unless this instance's window is full;
    /// reports what the previous window suppressed first.
    pub fn warn(&self, emit: impl FnOnce()) {
        let admission = self.admit(Instant::now());
        if let Some(n) = admission.suppressed_before {
            self.report(n);
        }
        if admission.log {
            emit();
        }
    }

    /// Reports what a window that is over suppressed, for a source that
    /// went quiet: call it now and then (at least once per window).
    pub fn tick(&self) {
        let suppressed = self.lock().expire(Instant::now());
        if let Some(n) = suppressed {
            self.report(n);
        }
    }

    /// Reports what was suppressed and not yet reported, e.g. when the
    /// channel that produced the warnings closes.
    pub fn flush(&self) {
        let suppressed = self.lock().flush();
        if let Some(n) = suppressed {
            self.report(n);
        }
    }

    fn report(&self, n: u64) {
        let secs = self.lock().length.as_secs();
        tracing::warn!(
            instance = %self.instance,
            suppressed = n,
            "suppressed {n} similar warnings from instance {} in the last {secs} s",
            self.instance
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock_unpoisoned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (seconds since the start at which a warning comes, logged?, suppressed count reported before it)
    type Step = (u64, bool, Option<u64>);

    #[test]
    fn the_limiter_passes_a_burst_per_window_and_counts_the_rest() {
        let table: &[(&str, &[Step])] = &[
            (
                "a quiet guest is never limited",
                &[(0, true, None), (30, true, None), (60, true, None)],
            ),
            (
                "the fourth warning in a window is suppressed and reported in the next",
                &[
                    (0, true, None),
                    (1, true, None),
                    (2, true, None),
                    (3, false, None),
                    (9, false, None),
                    (10, true, Some(2)),
                ],
            ),
            (
                "a window starts at its first warning, not on a grid",
                &[
                    (5, true, None),
                    (6, true, None),
                    (7, true, None),
                    (8, false, None),
                    (14, false, None),
                    (15, true, Some(2)),
                    (16, true, None),
                ],
            ),
            (
                "a report is given once",
                &[
                    (0, true, None),
                    (0, true, None),
                    (0, true, None),
                    (0, false, None),
                    (20, true, Some(1)),
                    (40, true, None),
                ],
            ),
        ];
        for (what, steps) in table {
            let limiter = WarnLimiter::with_limits("x", Duration::from_secs(10), 3);
            let t0 = Instant::now();
            for (i, (at, log, before)) in steps.iter().enumerate() {
                let got = limiter.admit(t0 + Duration::from_secs(*at));
                assert_eq!(
                    got,
                    Admission {
                        log: *log,
                        suppressed_before: *before
                    },
                    "{what}: step {i} at {at}s"
                );
            }
        }
    }

    #[test]
    fn a_window_that_is_over_reports_its_count_once_without_a_new_warning() {
        let limiter = WarnLimiter::with_limits("x", Duration::from_secs(10), 1);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        limiter.admit(at(0));
        limiter.admit(at(1));
        limiter.admit(at(2));
        let mut window = limiter.lock();
        assert_eq!(window.expire(at(9)), None, "the window is still open");
        assert_eq!(window.expire(at(10)), Some(2));
        assert_eq!(window.expire(at(30)), None, "reported once");
        drop(window);
        assert_eq!(
            limiter.admit(at(31)),
            Admission {
                log: true,
                suppressed_before: None
            },
            "a new window starts with the next warning"
        );
    }

    #[test]
    fn a_flood_logs_at_most_a_burst_and_one_report_per_window() {
        let limiter = WarnLimiter::with_limits("x", Duration::from_secs(10), 5);
        let t0 = Instant::now();
        let mut lines = 0;
        // 100 warnings a second for a minute.
        for ms in (0..60_000u64).step_by(10) {
            let a = limiter.admit(t0 + Duration::from_millis(ms));
            lines += u64::from(a.log) + u64::from(a.suppressed_before.is_some());
        }
        // Six windows: five warnings each, and a report for each of the
        // five windows that ended.
        assert_eq!(lines, 6 * 5 + 5);
        assert_eq!(limiter.lock().flush(), Some(1000 - 5));
        assert_eq!(limiter.lock().flush(), None, "flushed once");
    }
}
