//! The autoscaler's arithmetic: readings of the balancer's counters and
//! the members' CPU, a short window over them, and the decision to add or
//! remove members. Pure: the pass reads, this decides.
//!
//! The balancer (recipes/lb) counts, per worker, the responses it passed
//! on and how many took longer than half, one, two and four times the
//! latency target. More than 5 % of a window's responses over the target
//! is a 95th percentile over it; the buckets bound the percentile for the
//! events. A reload starts a new worker with counters at zero: a reading
//! below the one before is taken as a restart from zero.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use vroom_types::{ScaleTarget, ServiceLoad};

/// How far back a measurement looks.
pub const WINDOW: Duration = Duration::from_secs(3);
/// How long a breach lasts before members are added.
const OUT_AFTER: Duration = Duration::from_secs(2);
/// How long the load stays low before a member is removed.
const IN_AFTER: Duration = Duration::from_secs(30);
/// No scale-in this soon after a scale-out.
const IN_COOLDOWN: Duration = Duration::from_secs(60);
/// Fewer responses than this in a window say little about a percentile:
/// only that most of them were slow, or that there were none.
const MIN_REQUESTS: u64 = 10;
/// The share of responses over the target that makes the p95 miss it.
const P95_SHARE: f64 = 0.05;
/// The latency buckets, as multiples of the target (halves).
pub const BUCKETS: [u32; 4] = [1, 2, 4, 8];

/// The balancer's counters since its worker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    /// Responses slower than BUCKETS[i] / 2 times the target.
    pub over: [u64; 4],
    pub errors: u64,
    pub in_flight: u32,
}

impl Counters {
    /// The balancer's `/vroom` page: `KEY VALUE` lines.
    pub fn parse(text: &str) -> Result<Counters, String> {
        let mut c = Counters::default();
        let mut seen = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("bad counter line {line:?}"))?;
            let value: u64 = value
                .trim()
                .parse()
                .map_err(|_| format!("bad counter value in {line:?}"))?;
            match key {
                "requests" => c.requests = value,
                "over1" => c.over[0] = value,
                "over2" => c.over[1] = value,
                "over4" => c.over[2] = value,
                "over8" => c.over[3] = value,
                "errors" => c.errors = value,
                "in_flight" => c.in_flight = value as u32,
                _ => continue,
            }
            seen += 1;
        }
        if seen < 7 {
            return Err(format!("the balancer's counters are incomplete: {text:?}"));
        }
        Ok(c)
    }

    /// What happened between `before` and `self` (a counter below its
    /// earlier value restarted from zero).
    fn since(&self, before: &Counters) -> Counters {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        let reset = self.requests < before.requests;
        let d = |now, then| if reset { now } else { d(now, then) };
        Counters {
            requests: d(self.requests, before.requests),
            over: std::array::from_fn(|i| d(self.over[i], before.over[i])),
            errors: d(self.errors, before.errors),
            in_flight: self.in_flight,
        }
    }

    fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        for i in 0..4 {
            self.over[i] += other.over[i];
        }
        self.errors += other.errors;
        self.in_flight = other.in_flight;
    }
}

/// One look at a service.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    /// Absent when the balancer could not be read.
    pub counters: Option<Counters>,
    /// Each running member's CPU seconds so far.
    pub cpu: BTreeMap<String, f64>,
}

/// What the autoscaler decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub to: u32,
    pub reason: String,
    pub load: ServiceLoad,
}

/// What a service asks of its autoscaler.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub target: ScaleTarget,
    pub min: u32,
    pub max: u32,
}

/// How a window's load stands against the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judgement {
    Over,
    Within,
    Under,
    Unknown,
}

/// One service's readings and timers.
#[derive(Debug)]
pub struct Scaler {
    readings: VecDeque<Reading>,
    /// Since when the load has been over the target, and under it.
    over_since: Option<Instant>,
    under_since: Option<Instant>,
    /// Since when every member has been up (a window that began before
    /// says nothing about the members that came since).
    steady_since: Option<Instant>,
    last_out: Option<Instant>,
    /// Since when each member running has failed its health check.
    pub unhealthy: BTreeMap<String, Instant>,
    /// The last read of the balancer's counters worked.
    pub counters_read: bool,
}

impl Default for Scaler {
    fn default() -> Self {
        Scaler {
            readings: VecDeque::new(),
            over_since: None,
            under_since: None,
            steady_since: None,
            last_out: None,
            unhealthy: BTreeMap::new(),
            counters_read: true,
        }
    }
}

impl Scaler {
    pub fn observe(&mut self, reading: Reading) {
        let horizon = reading.at.checked_sub(WINDOW + Duration::from_secs(2));
        self.readings.push_back(reading);
        while self.readings.len() > 2 && horizon.is_some_and(|h| self.readings[1].at < h) {
            self.readings.pop_front();
        }
    }

    /// The load over the last window, once it spans at least a second.
    pub fn load(&self, target: Option<ScaleTarget>) -> Option<ServiceLoad> {
        let last = self.readings.back()?;
        let start = last.at.checked_sub(WINDOW).unwrap_or(last.at);
        let first_index = self
            .readings
            .iter()
            .position(|r| r.at >= start)
            .map(|i| i.saturating_sub(1))?;
        let first = &self.readings[first_index];
        let secs = last.at.duration_since(first.at).as_secs_f64();
        if secs < 0.9 {
            return None;
        }
        let mut sum = Counters::default();
        let mut counted = false;
        let window: Vec<&Reading> = self.readings.iter().skip(first_index).collect();
        for pair in window.windows(2) {
            if let (Some(a), Some(b)) = (&pair[0].counters, &pair[1].counters) {
                sum.add(&b.since(a));
                counted = true;
            }
        }
        let cpu = {
            let shared: Vec<f64> = last
                .cpu
                .iter()
                .filter_map(|(name, now)| first.cpu.get(name).map(|then| now - then))
                .collect();
            (!shared.is_empty())
                .then(|| shared.iter().sum::<f64>() / shared.len() as f64 / secs * 100.0)
        };
        if !counted && cpu.is_none() {
            return None;
        }
        let mut load = ServiceLoad {
            window_secs: secs,
            requests: sum.requests,
            requests_per_sec: sum.requests as f64 / secs,
            errors: sum.errors,
            slow: 0,
            p95_above_ms: None,
            p95_at_most_ms: None,
            in_flight: last.counters.map(|c| c.in_flight).unwrap_or(0),
            cpu_percent: cpu,
        };
        if let (Some(ScaleTarget::P95Ms(target)), true) = (target, sum.requests > 0) {
            load.slow = sum.over[1];
            // The p95 is above a bucket's bound when more than 5 % of the
            // responses were slower than it.
            let bound = |i: usize| target * BUCKETS[i] / 2;
            let over = |i: usize| sum.over[i] as f64 > P95_SHARE * sum.requests as f64;
            let highest_over = (0..4).rev().find(|&i| over(i));
            load.p95_above_ms = highest_over.map(bound);
            load.p95_at_most_ms = match highest_over {
                None => Some(bound(0)),
                Some(3) => None,
                Some(i) => Some(bound(i + 1)),
            };
        }
        Some(load)
    }

    /// How the load stands against the target.
    fn judge(target: ScaleTarget, load: &ServiceLoad) -> Judgement {
        match target {
            ScaleTarget::P95Ms(ms) => {
                if load.requests < MIN_REQUESTS {
                    return if load.requests == 0 && load.in_flight == 0 {
                        Judgement::Under
                    } else if load.slow * 2 > load.requests {
                        // So slow that few answers came, most of them late.
                        Judgement::Over
                    } else {
                        // Idle keep-alive connections, or too few answers.
                        Judgement::Unknown
                    };
                }
                if load.p95_above_ms.is_some_and(|above| above >= ms) {
                    Judgement::Over
                } else if load.p95_at_most_ms.is_some_and(|at_most| at_most <= ms / 2) {
                    Judgement::Under
                } else {
                    Judgement::Within
                }
            }
            ScaleTarget::CpuPercent(p) => match load.cpu_percent {
                None => Judgement::Unknown,
                Some(cpu) if cpu > f64::from(p) => Judgement::Over,
                Some(cpu) if cpu < f64::from(p) / 2.0 => Judgement::Under,
                Some(_) => Judgement::Within,
            },
        }
    }

    /// Looks at the latest window: `members` is how many the service has
    /// now, `ready` how many of them are up and balanced.
    pub fn decide(
        &mut self,
        now: Instant,
        policy: Policy,
        members: u32,
        ready: u32,
    ) -> Option<Decision> {
        if ready < members {
            // Members are starting (or failing): wait for them.
            self.steady_since = None;
            self.over_since = None;
            return None;
        }
        let steady = *self.steady_since.get_or_insert(now);
        let load = self.load(Some(policy.target))?;
        // A window that began before the last member came up measures
        // fewer members than there are.
        if now.duration_since(steady) < WINDOW {
            return None;
        }
        match Self::judge(policy.target, &load) {
            // Not enough to go on: the timers wait.
            Judgement::Unknown => None,
            Judgement::Over => {
                self.under_since = None;
                let since = *self.over_since.get_or_insert(now);
                if now.duration_since(since) < OUT_AFTER || members >= policy.max {
                    return None;
                }
                let to = out_to(policy, members, &load);
                self.over_since = None;
                self.steady_since = None;
                self.last_out = Some(now);
                Some(Decision {
                    to,
                    reason: format!(
                        "over {} for {}s",
                        policy.target,
                        now.duration_since(since).as_secs()
                    ),
                    load,
                })
            }
            Judgement::Under => {
                self.over_since = None;
                let since = *self.under_since.get_or_insert(now);
                let cooled = self
                    .last_out
                    .is_none_or(|t| now.duration_since(t) >= IN_COOLDOWN);
                if now.duration_since(since) < IN_AFTER || !cooled || members <= policy.min {
                    return None;
                }
                self.under_since = None;
                self.steady_since = None;
                Some(Decision {
                    to: members - 1,
                    reason: format!(
                        "well under {} for {}s",
                        policy.target,
                        now.duration_since(since).as_secs()
                    ),
                    load,
                })
            }
            Judgement::Within => {
                self.over_since = None;
                self.under_since = None;
                None
            }
        }
    }
}

/// How many members a breach asks for: by the CPU's ratio to its target,
/// or half as many again (twice as many when the p95 is over twice the
/// target); at least one more, at most twice as many and the maximum.
fn out_to(policy: Policy, members: u32, load: &ServiceLoad) -> u32 {
    let wanted = match policy.target {
        ScaleTarget::CpuPercent(p) => {
            let cpu = load.cpu_percent.unwrap_or(f64::from(p));
            (f64::from(members) * cpu / f64::from(p)).ceil() as u32
        }
        ScaleTarget::P95Ms(ms) => {
            let factor = if load.p95_above_ms.is_some_and(|a| a >= ms * 2) {
                2.0
            } else {
                1.5
            };
            (f64::from(members) * factor).ceil() as u32
        }
    };
    wanted.max(members + 1).min(members * 2).min(policy.max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(requests: u64, over: [u64; 4]) -> Counters {
        Counters {
            requests,
            over,
            errors: 0,
            in_flight: 4,
        }
    }

    fn reading(t0: Instant, ms: u64, c: Counters) -> Reading {
        Reading {
            at: t0 + Duration::from_millis(ms),
            counters: Some(c),
            cpu: BTreeMap::new(),
        }
    }

    const LATENCY: Policy = Policy {
        target: ScaleTarget::P95Ms(100),
        min: 1,
        max: 6,
    };

    #[test]
    fn counters_parse_and_refuse_garbage() {
        let c = Counters::parse(
            "requests 20\nover1 9\nover2 8\nover4 1\nover8 0\nerrors 3\nin_flight 4\n",
        )
        .unwrap();
        assert_eq!(
            c,
            Counters {
                requests: 20,
                over: [9, 8, 1, 0],
                errors: 3,
                in_flight: 4
            }
        );
        assert!(Counters::parse("requests 20\n").is_err());
        assert!(Counters::parse("requests x\n").is_err());
        assert!(Counters::parse("<html>").is_err());
    }

    /// The p95 is bounded by the buckets: 10 % over 100 ms and 2 % over
    /// 200 ms is a p95 between 100 and 200 ms.
    #[test]
    fn a_window_bounds_the_p95_and_survives_a_reload() {
        let t0 = Instant::now();
        let mut s = Scaler::default();
        s.observe(reading(t0, 0, counters(1000, [500, 100, 40, 0])));
        s.observe(reading(t0, 1000, counters(2000, [700, 200, 60, 0])));
        let load = s.load(Some(LATENCY.target)).unwrap();
        assert_eq!(load.requests, 1000);
        assert_eq!(
            (load.p95_above_ms, load.p95_at_most_ms),
            (Some(100), Some(200))
        );
        // A reload: the worker's counters start again from zero.
        s.observe(reading(t0, 2000, counters(500, [0, 0, 0, 0])));
        let load = s.load(Some(LATENCY.target)).unwrap();
        assert_eq!(load.requests, 1500);
        assert_eq!(load.slow, 100);
        assert_eq!(load.p95_above_ms, Some(100), "{load:?}");
        // All fast.
        let mut fast = Scaler::default();
        fast.observe(reading(t0, 0, counters(0, [0; 4])));
        fast.observe(reading(t0, 1000, counters(1000, [10, 0, 0, 0])));
        let load = fast.load(Some(LATENCY.target)).unwrap();
        assert_eq!((load.p95_above_ms, load.p95_at_most_ms), (None, Some(50)));
        // Slower than every bucket.
        fast.observe(reading(t0, 2000, counters(2000, [1000, 1000, 1000, 1000])));
        let load = fast.load(Some(LATENCY.target)).unwrap();
        assert_eq!((load.p95_above_ms, load.p95_at_most_ms), (Some(400), None));
    }

    /// A breach held for two seconds adds members (twice as many when the
    /// p95 is over twice the target), then nothing more until the new
    /// members are up and a whole window has measured them.
    #[test]
    fn a_sustained_breach_scales_out_once_then_waits_for_the_new_members() {
        let t0 = Instant::now();
        let mut s = Scaler::default();
        let mut requests = 0;
        let mut over = [0u64; 4];
        let mut decisions = vec![];
        for tick in 0..=16u64 {
            requests += 100;
            // 30 % over 200 ms: p95 above 200.
            for (i, o) in over.iter_mut().enumerate() {
                *o += [40, 30, 30, 0][i];
            }
            s.observe(reading(t0, tick * 1000, counters(requests, over)));
            let now = t0 + Duration::from_millis(tick * 1000);
            let members = if decisions.is_empty() { 2 } else { 4 };
            // The new members take two seconds to come up.
            let ready = if decisions.is_empty() || tick >= 9 {
                members
            } else {
                2
            };
            if let Some(d) = s.decide(now, LATENCY, members, ready) {
                decisions.push((tick, d));
            }
        }
        assert_eq!(decisions.len(), 2, "{decisions:?}");
        let (tick, first) = &decisions[0];
        // Steady for a window (3 s), then over for 2 s.
        assert_eq!(*tick, 5, "{decisions:?}");
        assert_eq!(first.to, 4, "twice as many: {first:?}");
        assert!(first.reason.contains("over p95<100ms"), "{}", first.reason);
        assert_eq!(first.load.p95_above_ms, Some(200));
        // Up at 9, a window to 12, then over 2 s more.
        assert_eq!(decisions[1].0, 14, "{decisions:?}");
        assert_eq!(decisions[1].1.to, 6, "capped at the maximum");
    }

    /// A load well under the target for 30 s removes one member, not
    /// sooner, and not below the minimum; a load between half the target
    /// and the target changes nothing.
    #[test]
    fn scale_in_is_slow_and_one_at_a_time() {
        let t0 = Instant::now();
        let mut s = Scaler::default();
        let mut decisions = vec![];
        let mut members = 3;
        for tick in 0..=80u64 {
            s.observe(reading(t0, tick * 1000, counters(tick * 100, [0; 4])));
            let now = t0 + Duration::from_millis(tick * 1000);
            if let Some(d) = s.decide(now, LATENCY, members, members) {
                members = d.to;
                decisions.push((tick, d.to));
            }
        }
        assert_eq!(decisions.first().map(|d| d.1), Some(2), "{decisions:?}");
        assert!(decisions[0].0 >= 33, "{decisions:?}");
        for pair in decisions.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= 30, "{decisions:?}");
        }
        assert_eq!(decisions.len(), 2, "{decisions:?}");
        assert_eq!(members, 1);

        let mut middling = Scaler::default();
        for tick in 0..=80u64 {
            // 3 % over 50 ms, 2 % over 100: p95 between 50 and 100.
            let c = counters(tick * 100, [tick * 6, tick * 2, 0, 0]);
            middling.observe(reading(t0, tick * 1000, c));
            let now = t0 + Duration::from_millis(tick * 1000);
            assert_eq!(middling.decide(now, LATENCY, 3, 3), None, "tick {tick}");
        }
    }

    /// A member so slow that few responses come in a window is over the
    /// target all the same; a window with too few responses to judge
    /// neither starts nor stops the timers.
    #[test]
    fn few_slow_responses_are_a_breach() {
        let t0 = Instant::now();
        let mut s = Scaler::default();
        let mut decision = None;
        for tick in 0..=10u64 {
            // Two responses a second, all over 400 ms.
            let c = counters(tick * 2, [tick * 2; 4]);
            s.observe(reading(t0, tick * 1000, c));
            if let Some(d) = s.decide(t0 + Duration::from_secs(tick), LATENCY, 1, 1) {
                decision = Some((tick, d));
                break;
            }
        }
        let (tick, d) = decision.expect("a breach");
        assert_eq!(tick, 5, "{d:?}");
        assert_eq!(d.to, 2);
        // Idle keep-alive connections: no responses, connections open.
        let mut idle = Scaler::default();
        for tick in 0..=40u64 {
            idle.observe(reading(t0, tick * 1000, counters(0, [0; 4])));
            assert_eq!(
                idle.decide(t0 + Duration::from_secs(tick), LATENCY, 2, 2),
                None
            );
        }
    }

    /// CPU over its target asks for members in proportion.
    #[test]
    fn cpu_scales_in_proportion() {
        let t0 = Instant::now();
        let policy = Policy {
            target: ScaleTarget::CpuPercent(50),
            min: 2,
            max: 10,
        };
        let mut s = Scaler::default();
        let mut decision = None;
        for tick in 0..=8u64 {
            let cpu: BTreeMap<String, f64> = (0..2)
                .map(|m| (format!("web-{m}"), tick as f64 * 0.9))
                .collect();
            s.observe(Reading {
                at: t0 + Duration::from_secs(tick),
                counters: None,
                cpu,
            });
            if let Some(d) = s.decide(t0 + Duration::from_secs(tick), policy, 2, 2) {
                decision = Some(d);
                break;
            }
        }
        let d = decision.expect("90 % against 50 %");
        assert_eq!(d.to, 4, "2 × 90/50 rounded up: {d:?}");
        assert!((d.load.cpu_percent.unwrap() - 90.0).abs() < 1.0);
    }
}
