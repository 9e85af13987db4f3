//! The event log: every change of state, numbered, kept (the last
//! [`KEPT_EVENTS`], in the state store, so history survives a restart) and
//! sent live to followers.
//!
//! A follower never slows the daemon: each gets a bounded channel, and one
//! that falls [`LIVE_BUFFER`] events behind is told so with a `reset` line
//! (it lists the state again) instead of being waited for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::broadcast;
use vroom_base::LockExt;
use vroom_types::{Event, EventKind, EventLine, EventQuery};

use crate::metrics::Metrics;
use crate::store::StateStore;

/// How many events are kept for history, in memory and in the store.
pub const KEPT_EVENTS: usize = 10_000;

/// How far a live follower may fall behind before it is reset.
pub const LIVE_BUFFER: usize = 4096;

/// Who the daemon acts for when it acts on its own (supervision, recovery,
/// failover).
pub const DAEMON_ACTOR: &str = "vroomd";

tokio::task_local! {
    static ACTOR: String;
}

/// Runs `work` on behalf of `actor` (`uid:N`, `cert:NAME`): the events it
/// causes name them. Work spawned off onto other tasks is the daemon's.
pub async fn acting_for<F: std::future::Future>(actor: String, work: F) -> F::Output {
    ACTOR.scope(actor, work).await
}

/// Who the current task acts for.
pub fn current_actor() -> String {
    ACTOR
        .try_with(Clone::clone)
        .unwrap_or_else(|_| DAEMON_ACTOR.to_string())
}

/// An event about to be logged: what the caller knows; the log adds the
/// number, time, node and actor.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    pub action: String,
    pub name: String,
    pub id: Option<String>,
    pub room: Option<String>,
    pub message: Option<String>,
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl NewEvent {
    pub fn new(kind: EventKind, action: impl Into<String>, name: impl Into<String>) -> Self {
        NewEvent {
            kind,
            action: action.into(),
            name: name.into(),
            id: None,
            room: None,
            message: None,
            detail: Default::default(),
        }
    }
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    pub fn room(mut self, room: Option<impl Into<String>>) -> Self {
        self.room = room.map(Into::into);
        self
    }
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.detail.insert(key.into(), value.into());
        self
    }
}

struct Kept {
    events: VecDeque<Event>,
    last: u64,
}

pub struct EventLog {
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    node: OnceLock<String>,
    kept: Mutex<Kept>,
    live: broadcast::Sender<Event>,
}

impl EventLog {
    /// The log, with the history the store kept.
    pub fn open(store: Arc<dyn StateStore>) -> Arc<Self> {
        let events: VecDeque<Event> = match store.events() {
            Ok(events) => events.into(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the event history; starting a new one");
                VecDeque::new()
            }
        };
        let last = events.back().map(|e| e.seq).unwrap_or(0);
        Arc::new(EventLog {
            store,
            metrics: Arc::new(Metrics::new()),
            node: OnceLock::new(),
            kept: Mutex::new(Kept { events, last }),
            live: broadcast::channel(LIVE_BUFFER).0,
        })
    }

    /// Names this host's cluster node in its events (set once, at start).
    pub fn set_node(&self, node: &str) {
        let _ = self.node.set(node.to_string());
    }

    /// The cluster node named in events, if any.
    pub fn node(&self) -> Option<String> {
        self.node.get().cloned()
    }

    /// The daemon's counted metrics, which every event feeds.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The last number given out.
    pub fn last_seq(&self) -> u64 {
        self.kept.lock_unpoisoned().last
    }

    /// Logs an event: kept, saved, then sent to followers. Returns its number.
    pub fn emit(&self, new: NewEvent) -> u64 {
        let mut kept = self.kept.lock_unpoisoned();
        kept.last += 1;
        let event = Event {
            seq: kept.last,
            time: now_rfc3339(),
            node: self.node.get().cloned(),
            actor: current_actor(),
            kind: new.kind,
            action: new.action,
            name: new.name,
            id: new.id,
            room: new.room,
            message: new.message,
            detail: new.detail,
        };
        tracing::debug!(target: "vroom::events", seq = event.seq, kind = %event.kind,
            action = %event.action, name = %event.name, "event");
        if let Err(e) = crate::blocking::blocking(|| self.store.append_event(&event, KEPT_EVENTS)) {
            tracing::warn!(error = %e, seq = event.seq, "cannot save an event; it is kept in memory only");
        }
        self.metrics.observe_event(&event);
        kept.events.push_back(event.clone());
        while kept.events.len() > KEPT_EVENTS {
            kept.events.pop_front();
        }
        // No follower is not an error.
        let _ = self.live.send(event);
        kept.last
    }

    /// Every event from now on, as it is logged (a receiver that falls
    /// behind loses the oldest and is told so).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    /// Opens a reading of the log for `query`: the history it asks for,
    /// then (when it follows) what happens from now on, with nothing lost
    /// or repeated in between.
    pub fn read(&self, query: EventQuery) -> EventReader {
        let kept = self.kept.lock_unpoisoned();
        // Subscribed under the lock: every event after the history copied
        // below reaches this receiver.
        let live = query.follow.then(|| self.live.subscribe());
        let oldest = kept.events.front().map(|e| e.seq).unwrap_or(kept.last + 1);
        let mut lines = VecDeque::new();
        let mut after = match query.since {
            // A follower without `since` wants what happens from now on; a
            // history without it, what is kept.
            None if query.follow => kept.last,
            None => 0,
            Some(since) if since > kept.last => {
                lines.push_back(EventLine::Reset {
                    reason: format!(
                        "there is no event {since} yet (the last is {}): this vroomd's log started again",
                        kept.last
                    ),
                    seq: kept.last,
                    node: self.node(),
                });
                kept.last
            }
            Some(since) if since + 1 < oldest => {
                lines.push_back(EventLine::Reset {
                    reason: format!(
                        "events after {since} are no longer kept (the oldest kept is {oldest})"
                    ),
                    seq: kept.last,
                    node: self.node(),
                });
                kept.last
            }
            Some(since) => since,
        };
        let mut history: Vec<&Event> = kept
            .events
            .iter()
            .filter(|e| e.seq > after)
            .filter(|e| query.until.is_none_or(|until| e.seq <= until))
            .filter(|e| query.filter.matches(e))
            .collect();
        if let Some(limit) = query.limit {
            // From `since`, the first `limit`; without it, the latest.
            if query.since.is_some() {
                history.truncate(limit);
            } else {
                history.drain(..history.len().saturating_sub(limit));
            }
        }
        if let Some(last) = history.last() {
            after = after.max(last.seq);
        }
        lines.extend(history.into_iter().cloned().map(EventLine::Event));
        let history_ends = query.until.is_some() || query.limit.is_some() || !query.follow;
        EventReader {
            lines,
            live: if history_ends { None } else { live },
            after: if query.follow {
                kept.last.max(after)
            } else {
                after
            },
            query,
            node: self.node(),
        }
    }
}

impl EventLog {
    /// The kept events `query` asks for (its history, never live ones).
    pub fn history(&self, mut query: EventQuery) -> Vec<Event> {
        query.follow = false;
        self.read(query)
            .lines
            .into_iter()
            .filter_map(|line| match line {
                EventLine::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }
}

/// One client's reading of the log.
pub struct EventReader {
    lines: VecDeque<EventLine>,
    live: Option<broadcast::Receiver<Event>>,
    /// Live events up to this number were in the history (or skipped by a
    /// reset): not sent again.
    after: u64,
    query: EventQuery,
    node: Option<String>,
}

impl EventReader {
    /// The next line; `None` once a history is over.
    pub async fn next(&mut self) -> Option<EventLine> {
        if let Some(line) = self.lines.pop_front() {
            return Some(line);
        }
        let live = self.live.as_mut()?;
        loop {
            match live.recv().await {
                Ok(event) if event.seq <= self.after => continue,
                Ok(event) => {
                    self.after = event.seq;
                    if self.query.filter.matches(&event) {
                        return Some(EventLine::Event(event));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Skip what is still buffered: the follower relists.
                    let mut newest = self.after + missed;
                    while let Ok(event) = live.try_recv() {
                        newest = newest.max(event.seq);
                    }
                    self.after = newest;
                    return Some(EventLine::Reset {
                        reason: format!(
                            "this follower fell more than {LIVE_BUFFER} events behind ({missed} missed)"
                        ),
                        seq: newest,
                        node: self.node.clone(),
                    });
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Now, as RFC 3339 in UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemStore;

    fn log() -> (Arc<MemStore>, Arc<EventLog>) {
        let store = Arc::new(MemStore::default());
        let log = EventLog::open(store.clone());
        (store, log)
    }

    fn query(pairs: &[(&str, &str)]) -> EventQuery {
        EventQuery::from_pairs(pairs.iter().copied()).unwrap()
    }

    fn instance(action: &str, name: &str) -> NewEvent {
        NewEvent::new(EventKind::Instance, action, name)
    }

    async fn drain(reader: &mut EventReader) -> Vec<EventLine> {
        let mut lines = vec![];
        while let Some(line) = reader.next().await {
            lines.push(line);
        }
        lines
    }

    fn seqs(lines: &[EventLine]) -> Vec<u64> {
        lines
            .iter()
            .map(|l| match l {
                EventLine::Event(e) => e.seq,
                other => panic!("not an event: {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn history_survives_a_restart_and_numbers_go_on() {
        let (store, log) = log();
        for name in ["a", "b", "c"] {
            log.emit(instance("created", name));
        }
        drop(log);
        let log = EventLog::open(store);
        assert_eq!(log.last_seq(), 3);
        assert_eq!(log.emit(instance("removed", "a")), 4);
        let mut reader = log.read(query(&[("since", "1"), ("follow", "false")]));
        assert_eq!(seqs(&drain(&mut reader).await), vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn a_follower_gets_history_then_live_events_once_each() {
        let (_, log) = log();
        log.emit(instance("created", "a"));
        log.emit(instance("created", "b"));
        let mut reader = log.read(query(&[("since", "0")]));
        log.emit(instance("ready", "a"));
        let mut got = vec![];
        for _ in 0..3 {
            got.push(reader.next().await.unwrap());
        }
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        // Without `since`, a follower starts from now.
        let mut reader = log.read(query(&[("name", "b")]));
        log.emit(instance("ready", "a"));
        log.emit(instance("ready", "b"));
        assert_eq!(seqs(&[reader.next().await.unwrap()]), vec![5]);
    }

    #[tokio::test]
    async fn limits_take_the_first_after_since_or_else_the_latest() {
        let (_, log) = log();
        for i in 0..10 {
            log.emit(instance("created", &format!("i{i}")));
        }
        let mut r = log.read(query(&[("limit", "3")]));
        assert_eq!(seqs(&drain(&mut r).await), vec![8, 9, 10]);
        let mut r = log.read(query(&[("since", "2"), ("limit", "3")]));
        assert_eq!(seqs(&drain(&mut r).await), vec![3, 4, 5]);
        let mut r = log.read(query(&[("since", "2"), ("until", "4")]));
        assert_eq!(seqs(&drain(&mut r).await), vec![3, 4]);
        let mut r = log.read(query(&[("follow", "false"), ("name", "i7,i1")]));
        assert_eq!(seqs(&drain(&mut r).await), vec![2, 8]);
    }

    #[tokio::test]
    async fn a_gap_no_longer_kept_or_a_number_never_given_is_a_reset() {
        let (store, log) = log();
        for _ in 0..(KEPT_EVENTS + 5) {
            log.emit(instance("created", "a"));
        }
        assert_eq!(
            store.events().unwrap().len(),
            KEPT_EVENTS,
            "the store forgets too"
        );
        let last = log.last_seq();
        let mut r = log.read(query(&[("since", "2"), ("follow", "false")]));
        let lines = drain(&mut r).await;
        assert!(
            matches!(&lines[..], [EventLine::Reset { seq, reason, .. }] if *seq == last && reason.contains("no longer kept")),
            "{lines:?}"
        );
        // The oldest kept follows on from `since` exactly: no gap, no reset.
        let mut r = log.read(query(&[("since", "5"), ("limit", "1")]));
        assert_eq!(seqs(&drain(&mut r).await), vec![6]);
        let mut r = log.read(query(&[("since", &(last + 10).to_string())]));
        log.emit(instance("ready", "a"));
        let first = r.next().await.unwrap();
        assert!(
            matches!(first, EventLine::Reset { ref reason, .. } if reason.contains("started again")),
            "{first:?}"
        );
        assert_eq!(seqs(&[r.next().await.unwrap()]), vec![last + 1]);
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_is_reset_and_never_slows_the_log() {
        let (_, log) = log();
        let mut slow = log.read(query(&[]));
        let started = std::time::Instant::now();
        for _ in 0..(LIVE_BUFFER + 100) {
            log.emit(instance("created", "a"));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let last = log.last_seq();
        match slow.next().await.unwrap() {
            EventLine::Reset { seq, reason, .. } => {
                assert_eq!(seq, last);
                assert!(reason.contains("fell more than"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        log.emit(instance("ready", "a"));
        assert_eq!(seqs(&[slow.next().await.unwrap()]), vec![last + 1]);
    }

    #[tokio::test]
    async fn events_name_who_caused_them() {
        let (_, log) = log();
        log.emit(instance("restarted", "a"));
        acting_for("uid:1000".into(), async {
            log.emit(instance("stopped", "a"))
        })
        .await;
        log.set_node("n1");
        log.emit(instance("started", "a"));
        let mut r = log.read(query(&[("follow", "false")]));
        let lines = drain(&mut r).await;
        let who: Vec<(String, Option<String>)> = lines
            .iter()
            .map(|l| match l {
                EventLine::Event(e) => (e.actor.clone(), e.node.clone()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            who,
            vec![
                ("vroomd".into(), None),
                ("uid:1000".into(), None),
                ("vroomd".into(), Some("n1".into()))
            ]
        );
        let time = match &lines[0] {
            EventLine::Event(e) => e.time.clone(),
            _ => unreachable!(),
        };
        assert_eq!(time.len(), "2026-12-06T00:00:00.000Z".len(), "{time}");
        assert!(time.ends_with('Z'));
    }
}
