//! The kernel's connection tracking table as the host sees it: how full it
//! is, and how many packets it dropped for being full.
//!
//! The kernel says "nf_conntrack: table full, dropping packet" only at
//! warning level, which the guest's `quiet` console does not print: a
//! firewall could drop new connections for minutes with nothing in `vroom
//! logs`. So vroom-init reads the counters itself, reports them in every
//! health report, and writes one console line per interval in which the
//! count of drops grew.
//!
//! Sources (Linux 6.1): `/proc/sys/net/netfilter/nf_conntrack_{count,max}`
//! and `/proc/net/stat/nf_conntrack`, a header line of column names and
//! one line of hex counters per CPU; `drop` counts the packets dropped
//! because no entry could be made.

use std::fs;
use std::time::{Duration, Instant};

use vroom_agent_proto::ConntrackUsage;

const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const STAT: &str = "/proc/net/stat/nf_conntrack";
/// How often the watcher looks at the drop counter.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// The table's usage, when the guest's kernel tracks connections.
pub fn usage() -> Option<ConntrackUsage> {
    let number = |path: &str| fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    Some(ConntrackUsage {
        entries: number(COUNT)?,
        max: number(MAX)?,
        dropped: fs::read_to_string(STAT)
            .ok()
            .and_then(|text| column_sum(&text, "drop"))
            .unwrap_or(0),
    })
}

/// The sum over CPUs of one column of `/proc/net/stat/nf_conntrack`.
fn column_sum(text: &str, column: &str) -> Option<u64> {
    let mut lines = text.lines();
    let index = lines.next()?.split_whitespace().position(|c| c == column)?;
    lines.try_fold(0u64, |sum, line| {
        let field = line.split_whitespace().nth(index)?;
        Some(sum.saturating_add(u64::from_str_radix(field, 16).ok()?))
    })
}

/// Says on the console when the table dropped packets since the last look,
/// or has just become full (the kernel may still make room by evicting
/// closing connections, so a full table does not drop at once).
#[derive(Debug, Default)]
pub struct DropWatch {
    last_look: Option<Instant>,
    dropped: u64,
    full: bool,
}

impl DropWatch {
    /// Looks at most every [`WATCH_EVERY`]; returns the line to log, if any.
    pub fn look(&mut self, now: Instant) -> Option<String> {
        if self.last_look.is_some_and(|at| now < at + WATCH_EVERY) {
            return None;
        }
        self.last_look = Some(now);
        self.observe(usage()?)
    }

    fn observe(&mut self, usage: ConntrackUsage) -> Option<String> {
        let new = usage.dropped.saturating_sub(self.dropped);
        let was_full = std::mem::replace(&mut self.full, usage.entries >= usage.max);
        self.dropped = usage.dropped;
        let table = format!("table {} of {} entries", usage.entries, usage.max);
        if new > 0 {
            Some(format!(
                "connection tracking table full: {new} packets dropped ({table}, {} dropped since boot); raise conntrack_max or the appliance's memory",
                usage.dropped
            ))
        } else if self.full && !was_full {
            Some(format!(
                "connection tracking table full ({table}): new connections are dropped unless closing ones can be evicted; raise conntrack_max or the appliance's memory"
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real 6.1 two-CPU table, with drops on the second CPU.
    const STAT_TEXT: &str = "\
entries  clashres found new invalid ignore delete delete_list insert insert_failed drop  early_drop icmp_error  expect_new expect_create expect_delete search_restart
000003ff  00000000 00000000 00000000 00000005 00000010 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000
000003ff  00000000 00000000 00000000 00000001 00000002 00000000 00000000 00000000 00000003 000000d0 00000007 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn columns_are_summed_over_cpus_by_name() {
        assert_eq!(column_sum(STAT_TEXT, "drop"), Some(0xd0));
        assert_eq!(column_sum(STAT_TEXT, "early_drop"), Some(7));
        assert_eq!(column_sum(STAT_TEXT, "invalid"), Some(6));
        assert_eq!(column_sum(STAT_TEXT, "nope"), None);
        assert_eq!(column_sum("", "drop"), None);
        assert_eq!(column_sum("drop\nzz\n", "drop"), None, "not hex");
    }

    #[test]
    fn new_drops_and_a_table_becoming_full_are_said() {
        let mut watch = DropWatch::default();
        let at = |entries, dropped| ConntrackUsage {
            entries,
            max: 1024,
            dropped,
        };
        assert_eq!(watch.observe(at(10, 0)), None);
        let line = watch.observe(at(1024, 208)).unwrap();
        assert!(
            line.starts_with(
                "connection tracking table full: 208 packets dropped (table 1024 of 1024"
            ),
            "{line}"
        );
        assert_eq!(watch.observe(at(1024, 208)), None, "nothing new");
        assert!(watch
            .observe(at(1024, 210))
            .unwrap()
            .contains(": 2 packets dropped"));
        assert_eq!(watch.observe(at(500, 210)), None, "room again");
        let full = watch.observe(at(3012, 210)).unwrap();
        assert!(
            full.starts_with("connection tracking table full (table 3012 of 1024 entries)"),
            "{full}"
        );
        assert_eq!(watch.observe(at(3000, 210)), None, "said once while full");
    }
}
