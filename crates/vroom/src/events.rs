//! `vroom events`: the event log, one line an event (`--json`: the API's
//! lines as they come).

use anyhow::{bail, Result};
use vroom_client::Client;
use vroom_types::{Event, EventLine, EventQuery};

/// How many events `vroom events` shows when asked for nothing else.
const DEFAULT_HISTORY: usize = 100;

/// The query of `vroom events`'s flags.
pub fn query(
    follow: bool,
    since: Option<&str>,
    until: Option<u64>,
    limit: Option<usize>,
    filters: &[String],
    all_nodes: bool,
) -> Result<EventQuery> {
    let mut pairs: Vec<(String, String)> = vec![];
    for filter in filters {
        let Some((key, value)) = filter.split_once('=') else {
            bail!("--filter {filter:?}: expected KEY=VALUE (kind, action, name, room, node)");
        };
        pairs.push((key.to_string(), value.to_string()));
    }
    if all_nodes {
        pairs.push(("node".into(), "*".into()));
    }
    if let Some(since) = since {
        // Several nodes' stream resumes from a cursor.
        let key = if since.contains(':') {
            "cursor"
        } else {
            "since"
        };
        pairs.push((key.into(), since.to_string()));
    }
    if let Some(until) = until {
        pairs.push(("until".into(), until.to_string()));
    }
    // Without a range, the recent history; with --follow alone, only what
    // happens from now on.
    let limit =
        limit.or((since.is_none() && until.is_none() && !follow).then_some(DEFAULT_HISTORY));
    if let Some(limit) = limit {
        pairs.push(("limit".into(), limit.to_string()));
    }
    let mut query = EventQuery::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    query.follow = follow;
    Ok(query)
}

pub async fn events(client: &Client, query: EventQuery, json: bool) -> Result<()> {
    use std::io::Write;
    // History and following are one request when the history is bounded by
    // `since` alone, or several nodes' stream is asked for (vroomd follows
    // each from where its history ended); otherwise the history comes
    // first, then a follow from its last number.
    let follow_after =
        query.follow && !query.merged() && (query.limit.is_some() || query.until.is_some());
    let mut first = query.clone();
    if follow_after {
        first.follow = false;
    }
    let mut last = first.since;
    let mut stream = client.events(&first).await?;
    let mut out = std::io::stdout().lock();
    loop {
        while let Some(line) = stream.next().await {
            let line = line?;
            match &line {
                EventLine::Event(e) => last = Some(e.seq),
                EventLine::Reset { seq, .. } => last = Some(*seq),
                EventLine::Heartbeat { .. } => {}
            }
            if json {
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            } else if let Some(text) = render(&line) {
                writeln!(out, "{text}")?;
            }
            out.flush()?;
        }
        if !follow_after || first.follow {
            return Ok(());
        }
        // The history is out: now follow from where it ended.
        first = EventQuery {
            filter: query.filter.clone(),
            // After an empty history: from now on.
            since: last,
            follow: true,
            ..EventQuery::default()
        };
        stream = client.events(&first).await?;
    }
}

/// One event as a line for people; heartbeats are not shown.
pub fn render(line: &EventLine) -> Option<String> {
    match line {
        EventLine::Event(e) => Some(render_event(e)),
        EventLine::Reset { reason, seq, .. } => Some(format!(
            "-- events were lost: {reason}; the state may have changed (`vroom ps`); following from {seq}"
        )),
        EventLine::Heartbeat { .. } => None,
    }
}

fn render_event(e: &Event) -> String {
    let mut text = format!(
        "{} {:>6} {:<8} {:<10} {}",
        e.time, e.seq, e.kind, e.action, e.name
    );
    if let Some(room) = &e.room {
        text.push_str(&format!(" room={room}"));
    }
    if let Some(node) = &e.node {
        text.push_str(&format!(" node={node}"));
    }
    for (key, value) in &e.detail {
        match value {
            serde_json::Value::String(s) => text.push_str(&format!(" {key}={s}")),
            other => text.push_str(&format!(" {key}={other}")),
        }
    }
    text.push_str(&format!(" by={}", e.actor));
    if let Some(message) = &e.message {
        text.push_str(&format!(": {message}"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_the_query_the_api_takes() {
        let q = query(false, None, None, None, &[], false).unwrap();
        assert_eq!((q.limit, q.follow), (Some(DEFAULT_HISTORY), false));
        let q = query(true, None, None, None, &[], false).unwrap();
        assert_eq!((q.limit, q.since, q.follow), (None, None, true));
        let q = query(
            true,
            Some("4"),
            None,
            None,
            &["kind=instance,volume".into()],
            false,
        )
        .unwrap();
        assert_eq!(
            (q.since, q.follow, q.filter.kinds.len()),
            (Some(4), true, 2)
        );
        // Every node: a cursor resumes it, and a history then follows in
        // one request.
        let q = query(true, Some("n1:4,n2:9"), None, Some(5), &[], true).unwrap();
        assert!(q.all_nodes && q.follow);
        assert_eq!(q.cursor.to_string(), "n1:4,n2:9");
        let err = query(false, Some("4"), None, None, &[], true).unwrap_err();
        assert!(err.to_string().contains("resumes from a cursor"), "{err}");
        for (filters, says) in [
            (vec!["kind"], "expected KEY=VALUE"),
            (vec!["kind=vm"], "unknown event kind"),
            (vec!["colour=red"], "unknown event filter"),
        ] {
            let filters: Vec<String> = filters.into_iter().map(Into::into).collect();
            let err = query(false, None, None, None, &filters, false)
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn an_event_is_one_line_with_its_reason_last() {
        let line = EventLine::Event(Event {
            seq: 7,
            time: "2026-12-06T10:00:00.000Z".into(),
            node: Some("n1".into()),
            actor: "uid:0".into(),
            kind: vroom_types::EventKind::Instance,
            action: "failed".into(),
            name: "web".into(),
            id: Some("abc".into()),
            room: Some("shop".into()),
            message: Some("the guest never became ready".into()),
            detail: [("boot_ms".to_string(), 12.into())].into_iter().collect(),
        });
        assert_eq!(
            render(&line).unwrap(),
            "2026-12-06T10:00:00.000Z      7 instance failed     web room=shop node=n1 boot_ms=12 by=uid:0: the guest never became ready"
        );
        assert_eq!(render(&EventLine::Heartbeat { seq: 1 }), None);
    }
}
