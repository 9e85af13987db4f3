//! Events: one for every change of state vroomd makes or sees, kept in a
//! numbered log that clients read as history and follow live
//! (`GET /v1/events`, `vroom events`).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Instance,
    Config,
    Splice,
    Mirror,
    Snapshot,
    Room,
    Network,
    Image,
    Volume,
    Node,
    Migration,
    Service,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::Instance,
        EventKind::Config,
        EventKind::Splice,
        EventKind::Mirror,
        EventKind::Snapshot,
        EventKind::Room,
        EventKind::Network,
        EventKind::Image,
        EventKind::Volume,
        EventKind::Node,
        EventKind::Migration,
        EventKind::Service,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Instance => "instance",
            EventKind::Config => "config",
            EventKind::Splice => "splice",
            EventKind::Mirror => "mirror",
            EventKind::Snapshot => "snapshot",
            EventKind::Room => "room",
            EventKind::Network => "network",
            EventKind::Image => "image",
            EventKind::Volume => "volume",
            EventKind::Node => "node",
            EventKind::Migration => "migration",
            EventKind::Service => "service",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventKind {
    type Err = EventQueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                EventQueryError(format!(
                    "unknown event kind {s:?} (one of: {})",
                    EventKind::ALL.map(|k| k.as_str()).join(", ")
                ))
            })
    }
}

/// One change of state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// This daemon's event number: increasing, never reused (numbers may be
    /// skipped after a crash); `since=SEQ` resumes after it.
    pub seq: u64,
    /// When it happened: RFC 3339, UTC, milliseconds.
    pub time: String,
    /// The cluster node it happened on; absent on a host alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Who caused it: `uid:N` (a local API caller, from the socket's peer
    /// credentials), `cert:NAME` (a cluster API caller, from its client
    /// certificate), or `vroomd` (the daemon's own policy: supervision,
    /// recovery, failover).
    pub actor: String,
    pub kind: EventKind,
    /// What happened, e.g. `created`, `ready`, `failed`, `applied`.
    pub action: String,
    /// The object's name (an instance, a room, a volume...).
    pub name: String,
    /// The object's id where it has one besides its name (an instance's,
    /// a snapshot's, an image's, a config version's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The room the object is in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Why, or what came of it, in words: a failure's reason, a timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Measurements, for machines: e.g. `{"boot_ms": 1830}`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// One line of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventLine {
    Event(Event),
    /// Sent every 15 s on a quiet stream, so a client knows it is alive.
    Heartbeat {
        /// The last event number given out so far.
        seq: u64,
    },
    /// The client missed events it can no longer get (it asked for a
    /// number older than what is kept, or fell behind a live stream): it
    /// must list the current state again and follow from `seq`.
    Reset {
        reason: String,
        seq: u64,
        /// The node whose log `seq` numbers (in a cluster).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
}

/// An invalid events query: its one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventQueryError(pub String);

/// The most events one history request returns.
pub const MAX_EVENTS_LIMIT: usize = 10_000;

/// Which events a client wants: every filter given must match (a filter
/// with several values matches any of them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub kinds: BTreeSet<EventKind>,
    pub actions: BTreeSet<String>,
    pub names: BTreeSet<String>,
    pub rooms: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
}

impl EventFilter {
    pub fn matches(&self, event: &Event) -> bool {
        let any = |set: &BTreeSet<String>, value: Option<&str>| {
            set.is_empty() || value.is_some_and(|v| set.contains(v))
        };
        (self.kinds.is_empty() || self.kinds.contains(&event.kind))
            && any(&self.actions, Some(&event.action))
            && any(&self.names, Some(&event.name))
            && any(&self.rooms, event.room.as_deref())
            && any(&self.nodes, event.node.as_deref())
    }

    /// Adds `KEY=VALUE[,VALUE...]` (what `vroom events --filter` takes).
    pub fn add(&mut self, key: &str, values: &str) -> Result<(), EventQueryError> {
        for value in values.split(',') {
            let value = value.trim();
            if value.is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
                return Err(EventQueryError(format!(
                    "filter {key}: {value:?} is not a value (1 to 128 printable characters)"
                )));
            }
            match key {
                "kind" => {
                    self.kinds.insert(value.parse()?);
                }
                "action" => {
                    self.actions.insert(value.into());
                }
                "name" => {
                    self.names.insert(value.into());
                }
                "room" => {
                    self.rooms.insert(value.into());
                }
                "node" => {
                    self.nodes.insert(value.into());
                }
                other => {
                    return Err(EventQueryError(format!(
                        "unknown event filter {other:?} (one of: kind, action, name, room, node)"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The filter as query pairs, for a client.
    pub fn to_query(&self) -> Vec<(&'static str, String)> {
        let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
        let mut pairs = vec![];
        if !self.kinds.is_empty() {
            let kinds: Vec<&str> = self.kinds.iter().map(|k| k.as_str()).collect();
            pairs.push(("kind", kinds.join(",")));
        }
        for (key, set) in [
            ("action", &self.actions),
            ("name", &self.names),
            ("room", &self.rooms),
            ("node", &self.nodes),
        ] {
            if !set.is_empty() {
                pairs.push((key, join(set)));
            }
        }
        pairs
    }
}

/// A `GET /v1/events` request, parsed from its query string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    pub filter: EventFilter,
    /// Only events after this number.
    pub since: Option<u64>,
    /// Only events up to this number (a history: the stream ends).
    pub until: Option<u64>,
    /// At most this many events (a history: the stream ends).
    pub limit: Option<usize>,
    /// Keep the stream open for new events (the default unless `until` or
    /// `limit` is given).
    pub follow: bool,
    /// Every node of the cluster (`node=*`): one stream merged from every
    /// node's log.
    pub all_nodes: bool,
    /// Where a merged stream resumes: each node's last event seen.
    pub cursor: EventCursor,
}

/// A place in the merged stream of several nodes' logs: for each node, the
/// number of the last event seen (`n1:12,n2:40`). Each node numbers its own
/// events, so one number cannot say where several logs were left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCursor(pub std::collections::BTreeMap<String, u64>);

impl EventCursor {
    /// Records that `node`'s events up to `seq` were seen.
    pub fn advance(&mut self, node: &str, seq: u64) {
        let at = self.0.entry(node.to_string()).or_default();
        *at = (*at).max(seq);
    }

    pub fn get(&self, node: &str) -> Option<u64> {
        self.0.get(node).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for EventCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (node, seq) in &self.0 {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{node}:{seq}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for EventCursor {
    type Err = EventQueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cursor = EventCursor::default();
        for part in s.split(',').map(str::trim) {
            let parsed = part.rsplit_once(':').and_then(|(node, seq)| {
                let node_ok = !node.is_empty()
                    && node.len() <= 128
                    && !node.chars().any(|c| c.is_control() || c == ',' || c == ':');
                Some((node, seq.parse::<u64>().ok()?)).filter(|_| node_ok)
            });
            let Some((node, seq)) = parsed else {
                return Err(EventQueryError(format!(
                    "cursor: {part:?} is not NODE:NUMBER (a merged stream resumes from each node's last event, e.g. n1:12,n2:40)"
                )));
            };
            cursor.advance(node, seq);
        }
        Ok(cursor)
    }
}

impl EventQuery {
    /// Parses `since`, `until`, `limit`, `follow` and the filters from a
    /// URL query's decoded pairs; unknown keys and malformed values are
    /// refused.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, EventQueryError> {
        let mut query = EventQuery::default();
        let mut follow = None;
        let number = |key: &str, value: &str| {
            value
                .parse::<u64>()
                .map_err(|_| EventQueryError(format!("{key}: {value:?} is not an event number")))
        };
        for (key, value) in pairs {
            match key {
                "since" => query.since = Some(number(key, value)?),
                "cursor" => query.cursor = value.parse()?,
                "node" if value.split(',').any(|v| v.trim() == "*") => {
                    if value.trim() != "*" {
                        return Err(EventQueryError(format!(
                            "node: {value:?} mixes * (every node) with names"
                        )));
                    }
                    query.all_nodes = true;
                }
                "until" => query.until = Some(number(key, value)?),
                "limit" => {
                    let limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_EVENTS_LIMIT).contains(n));
                    query.limit = Some(limit.ok_or_else(|| {
                        EventQueryError(format!(
                            "limit: {value:?} is not a count from 1 to {MAX_EVENTS_LIMIT}"
                        ))
                    })?);
                }
                "follow" => {
                    follow = Some(match value {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(EventQueryError(format!(
                                "follow: {value:?} is not true or false"
                            )))
                        }
                    })
                }
                _ => query.filter.add(key, value)?,
            }
        }
        if let (Some(since), Some(until)) = (query.since, query.until) {
            if until < since {
                return Err(EventQueryError(format!(
                    "until ({until}) is before since ({since})"
                )));
            }
        }
        let history = query.until.is_some() || query.limit.is_some();
        query.follow = follow.unwrap_or(!history);
        if query.all_nodes && !query.filter.nodes.is_empty() {
            return Err(EventQueryError(
                "node: * (every node) and node names exclude each other".into(),
            ));
        }
        if query.merged() {
            if query.since.is_some() {
                return Err(EventQueryError(
                    "since: a stream of several nodes resumes from a cursor (cursor=n1:12,n2:40), not one number".into(),
                ));
            }
            if query.until.is_some() {
                return Err(EventQueryError(
                    "until: each node numbers its own events; ask one node (node=NAME) for a range"
                        .into(),
                ));
            }
        } else if !query.cursor.is_empty() {
            return Err(EventQueryError(
                "cursor: only for a stream of several nodes (node=* or node=a,b); one log resumes from since".into(),
            ));
        }
        if query.follow && query.until.is_some() {
            return Err(EventQueryError(
                "until and follow exclude each other".into(),
            ));
        }
        Ok(query)
    }

    /// The query as URL pairs, for a client.
    /// Whether the answer merges several nodes' logs (`node=*`, or more
    /// than one node named).
    pub fn merged(&self) -> bool {
        self.all_nodes || self.filter.nodes.len() > 1
    }

    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = self.filter.to_query();
        if self.all_nodes {
            pairs.push(("node", "*".into()));
        }
        if !self.cursor.is_empty() {
            pairs.push(("cursor", self.cursor.to_string()));
        }
        if let Some(since) = self.since {
            pairs.push(("since", since.to_string()));
        }
        if let Some(until) = self.until {
            pairs.push(("until", until.to_string()));
        }
        if let Some(limit) = self.limit {
            pairs.push(("limit", limit.to_string()));
        }
        pairs.push(("follow", self.follow.to_string()));
        pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, action: &str, name: &str, room: Option<&str>) -> Event {
        Event {
            seq: 1,
            time: "2026-12-06T00:00:00.000Z".into(),
            node: None,
            actor: "vroomd".into(),
            kind,
            action: action.into(),
            name: name.into(),
            id: None,
            room: room.map(Into::into),
            message: None,
            detail: Default::default(),
        }
    }

    #[test]
    fn filters_match_every_key_and_any_value() {
        let query = EventQuery::from_pairs([
            ("kind", "instance,volume"),
            ("action", "ready"),
            ("room", "shop"),
        ])
        .unwrap();
        let f = &query.filter;
        assert!(f.matches(&event(EventKind::Instance, "ready", "web", Some("shop"))));
        assert!(f.matches(&event(EventKind::Volume, "ready", "db", Some("shop"))));
        assert!(!f.matches(&event(EventKind::Instance, "stopped", "web", Some("shop"))));
        assert!(!f.matches(&event(EventKind::Instance, "ready", "web", None)));
        assert!(!f.matches(&event(EventKind::Splice, "ready", "web", Some("shop"))));
        assert!(EventFilter::default().matches(&event(EventKind::Node, "lost", "n1", None)));
    }

    #[test]
    fn a_query_round_trips_through_its_pairs() {
        let query = EventQuery::from_pairs([
            ("kind", "instance"),
            ("name", "a,b"),
            ("since", "7"),
            ("limit", "20"),
        ])
        .unwrap();
        assert!(!query.follow, "a limit makes a history");
        let pairs = query.to_pairs();
        let back = EventQuery::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str()))).unwrap();
        assert_eq!(back, query);
        assert!(EventQuery::from_pairs([]).unwrap().follow);
        // A merged stream of every node, resumed from a cursor.
        let merged =
            EventQuery::from_pairs([("node", "*"), ("cursor", "n2:40, n1:12"), ("kind", "node")])
                .unwrap();
        assert!(merged.all_nodes && merged.merged() && merged.follow);
        assert_eq!(merged.cursor.to_string(), "n1:12,n2:40");
        let pairs = merged.to_pairs();
        let back = EventQuery::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str()))).unwrap();
        assert_eq!(back, merged);
        // Several names merge too; one name is that node's own log.
        assert!(EventQuery::from_pairs([("node", "a,b")]).unwrap().merged());
        assert!(!EventQuery::from_pairs([("node", "a")]).unwrap().merged());
    }

    #[test]
    fn a_cursor_keeps_each_nodes_newest_number() {
        let mut cursor: EventCursor = "a:3".parse().unwrap();
        cursor.advance("a", 2);
        cursor.advance("b", 9);
        assert_eq!(cursor.to_string(), "a:3,b:9");
        assert_eq!(cursor.get("b"), Some(9));
        assert_eq!(cursor.get("c"), None);
    }

    #[test]
    fn malformed_queries_are_refused_with_their_reason() {
        for (pairs, says) in [
            (
                vec![("since", "-1")],
                "since: \"-1\" is not an event number",
            ),
            (vec![("since", "abc")], "not an event number"),
            (vec![("limit", "0")], "limit: \"0\" is not a count"),
            (vec![("limit", "100001")], "is not a count"),
            (vec![("kind", "vm")], "unknown event kind \"vm\""),
            (vec![("colour", "red")], "unknown event filter \"colour\""),
            (vec![("name", "")], "is not a value"),
            (vec![("name", "a\nb")], "is not a value"),
            (
                vec![("since", "9"), ("until", "3")],
                "until (3) is before since (9)",
            ),
            (
                vec![("until", "3"), ("follow", "true")],
                "exclude each other",
            ),
            (vec![("follow", "maybe")], "not true or false"),
            (vec![("cursor", "n1")], "is not NODE:NUMBER"),
            (
                vec![("node", "*"), ("cursor", "n1:x")],
                "is not NODE:NUMBER",
            ),
            (vec![("node", "*"), ("cursor", ":4")], "is not NODE:NUMBER"),
            (
                vec![("cursor", "n1:4")],
                "only for a stream of several nodes",
            ),
            (vec![("node", "*"), ("since", "4")], "resumes from a cursor"),
            (vec![("node", "a,b"), ("until", "4")], "ask one node"),
            (vec![("node", "a,*")], "mixes * (every node) with names"),
            (vec![("node", "*"), ("node", "a")], "exclude each other"),
        ] {
            let err = EventQuery::from_pairs(pairs.clone())
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{pairs:?}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn lines_are_tagged_by_type() {
        let line = EventLine::Event(event(EventKind::Instance, "ready", "web", None));
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["type"], "event");
        assert_eq!(json["kind"], "instance");
        assert!(json.get("detail").is_none(), "empty detail is left out");
        let reset = serde_json::to_string(&EventLine::Reset {
            reason: "gone".into(),
            seq: 4,
            node: None,
        })
        .unwrap();
        assert_eq!(reset, r#"{"type":"reset","reason":"gone","seq":4}"#);
    }
}
