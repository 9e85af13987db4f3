//! One stream of several cluster nodes' event logs (`node=*`, or several
//! names): each node numbers its own events, so the stream's place is a
//! cursor (`n1:12,n2:40`) rather than one number.
//!
//! A history (`limit`) asks every node for its part and sorts the answer by
//! time. A follower first learns where each node's log stands (or takes the
//! client's cursor), then follows every node from there, each through its
//! own task that reconnects to a node that went away. A node that could not
//! be read at first gets a `reset` when it is reached: what it logged
//! meanwhile is not in the stream.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use vroom_core::events::{EventLog, EventReader};
use vroom_types::{Event, EventCursor, EventLine, EventQuery, MAX_EVENTS_LIMIT};

use crate::Service;

/// How long one node may take to answer a history.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a follower waits before reading a node again that went away.
const RETRY: Duration = Duration::from_secs(2);
/// How often a follower of every node looks for nodes that joined.
const DISCOVER: Duration = Duration::from_secs(5);

/// A merged stream's lines, each with the cursor that resumes after it.
pub(crate) type Merged = mpsc::Receiver<(EventLine, EventCursor)>;

/// One node's log: this host's, or another node's read over its API.
enum Lines {
    Local(Box<EventReader>),
    Remote(mpsc::Receiver<EventLine>),
}

impl Lines {
    async fn next(&mut self) -> Option<EventLine> {
        match self {
            Lines::Local(reader) => reader.next().await,
            Lines::Remote(rx) => rx.recv().await,
        }
    }
}

/// Reads the cluster's nodes and their logs for a merged `query`.
#[derive(Clone)]
pub(crate) struct Cluster {
    pub log: Arc<EventLog>,
    pub vroomd: Service,
}

impl Cluster {
    /// The nodes the query names, or every node for `node=*`; empty on a
    /// host outside a cluster.
    pub async fn nodes(&self, query: &EventQuery) -> Vec<String> {
        if !query.all_nodes {
            return query.filter.nodes.iter().cloned().collect();
        }
        match self.vroomd.nodes().await {
            Ok(nodes) => nodes.into_iter().map(|n| n.name.to_string()).collect(),
            Err(_) => vec![],
        }
    }

    /// `query` for `node`'s own log.
    fn for_node(query: &EventQuery, node: &str) -> EventQuery {
        let mut one = query.clone();
        one.all_nodes = false;
        one.cursor = EventCursor::default();
        one.filter.nodes = [node.to_string()].into();
        one
    }

    async fn open(&self, node: &str, query: EventQuery) -> Result<Lines, String> {
        if self.log.node().as_deref() == Some(node) {
            return Ok(Lines::Local(Box::new(self.log.read(query))));
        }
        match self.vroomd.peer_events(node, &query).await {
            Ok(Some(rx)) => Ok(Lines::Remote(rx)),
            Ok(None) => Ok(Lines::Local(Box::new(self.log.read(query)))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A history of `node`'s log, whole, or `Err` when it cannot be read
    /// in time.
    async fn history(&self, node: &str, query: EventQuery) -> Result<Vec<EventLine>, String> {
        let read = async {
            let mut lines = self.open(node, query).await?;
            let mut all = vec![];
            while let Some(line) = lines.next().await {
                all.push(line);
            }
            Ok(all)
        };
        tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .map_err(|_| format!("node {node} did not answer in {READ_TIMEOUT:?}"))?
    }

    /// The number of `node`'s newest event, whatever it is about.
    async fn position(&self, node: &str) -> Result<u64, String> {
        let newest = EventQuery {
            limit: Some(1),
            ..Cluster::for_node(&EventQuery::default(), node)
        };
        let lines = self.history(node, newest).await?;
        Ok(lines.iter().map(seq_of).max().unwrap_or(0))
    }

    /// The merged answer to `query` (a merged one), line by line.
    pub async fn stream(self, query: EventQuery) -> Merged {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let nodes = self.nodes(&query).await;
            // Where each node is followed from: the client's cursor (a node
            // it has not seen: from its first event kept); without one,
            // where its log stood before its history was read.
            let mut from: BTreeMap<String, From> = nodes
                .iter()
                .map(|node| {
                    let from = match query.cursor.get(node) {
                        Some(seq) => From::Seq(seq),
                        None if !query.cursor.is_empty() => From::Seq(0),
                        None => From::Unknown,
                    };
                    (node.clone(), from)
                })
                .collect();
            if query.cursor.is_empty() {
                let positions = nodes.iter().map(|node| self.position(node));
                for (node, at) in nodes.iter().zip(futures::future::join_all(positions).await) {
                    if let Ok(seq) = at {
                        from.insert(node.clone(), From::Seq(seq));
                    }
                }
            }
            // A fresh follower wants only what happens from now on.
            let history = if query.follow && query.cursor.is_empty() && query.limit.is_none() {
                vec![]
            } else {
                self.histories(&nodes, &query).await
            };
            // The cursor before the first line: where each node stood
            // before its first line in the stream, else where it stands.
            let mut cursor = EventCursor::default();
            for (node, at) in &from {
                let first = history.iter().find(|(n, _)| n == node);
                match (first, at) {
                    (Some((_, EventLine::Event(e))), _) if query.cursor.is_empty() => {
                        cursor.advance(node, e.seq - 1)
                    }
                    (_, From::Seq(seq)) => cursor.advance(node, *seq),
                    _ => {}
                }
            }
            for (node, line) in history {
                let seq = seq_of(&line);
                cursor.advance(&node, seq);
                if let Some(From::Seq(at)) = from.get_mut(&node) {
                    *at = (*at).max(seq);
                }
                if tx.send((line, cursor.clone())).await.is_err() {
                    return;
                }
            }
            if query.follow {
                self.follow(query, from, cursor, tx).await;
            }
        });
        rx
    }

    /// Every node's part of a history, each node's resets first, then the
    /// events sorted by time and cut to the query's limit. A node that
    /// cannot be read is left out (a follower gets a reset for it later).
    async fn histories(&self, nodes: &[String], query: &EventQuery) -> Vec<(String, EventLine)> {
        let reads = nodes.iter().map(|node| {
            let mut one = Cluster::for_node(query, node);
            one.follow = false;
            if !query.cursor.is_empty() {
                one.since = Some(query.cursor.get(node).unwrap_or(0));
                one.limit = Some(query.limit.unwrap_or(MAX_EVENTS_LIMIT));
            }
            async move { (node.clone(), self.history(node, one).await) }
        });
        let mut resets = vec![];
        let mut events: Vec<Event> = vec![];
        for (node, read) in futures::future::join_all(reads).await {
            for line in read.unwrap_or_default() {
                match line {
                    EventLine::Event(e) => events.push(e),
                    // The client's cursor is older than the node keeps.
                    EventLine::Reset { reason, seq, .. } => resets.push((
                        node.clone(),
                        EventLine::Reset {
                            reason: format!("node {node}: {reason}"),
                            seq,
                            node: Some(node.clone()),
                        },
                    )),
                    EventLine::Heartbeat { .. } => {}
                }
            }
        }
        events.sort_by(|a, b| (&a.time, &a.node, a.seq).cmp(&(&b.time, &b.node, b.seq)));
        if let Some(limit) = query.limit {
            if query.cursor.is_empty() {
                events.drain(..events.len().saturating_sub(limit));
            } else {
                events.truncate(limit);
            }
        }
        resets
            .into_iter()
            .chain(events.into_iter().map(|e| {
                let node = e.node.clone().unwrap_or_default();
                (node, EventLine::Event(e))
            }))
            .collect()
    }

    /// Follows every node from `cursor` until the client goes away.
    async fn follow(
        self,
        query: EventQuery,
        from: BTreeMap<String, From>,
        cursor: EventCursor,
        tx: mpsc::Sender<(EventLine, EventCursor)>,
    ) {
        let (lines_tx, mut lines) = mpsc::channel::<(String, EventLine)>(1024);
        let mut followed = BTreeSet::new();
        let start = |node: String, from: From| {
            let one = Cluster::for_node(&query, &node);
            tokio::spawn(self.clone().follow_node(node, one, from, lines_tx.clone()));
        };
        for (node, from) in from {
            followed.insert(node.clone());
            start(node, from);
        }
        let mut cursor = cursor;
        let mut discover = tokio::time::interval(DISCOVER);
        discover.tick().await;
        loop {
            tokio::select! {
                line = lines.recv() => {
                    let Some((node, line)) = line else { return };
                    match &line {
                        EventLine::Event(e) => cursor.advance(&node, e.seq),
                        EventLine::Reset { seq, .. } => cursor.advance(&node, *seq),
                        EventLine::Heartbeat { .. } => continue,
                    }
                    if tx.send((line, cursor.clone())).await.is_err() {
                        return;
                    }
                }
                _ = discover.tick(), if query.all_nodes => {
                    for node in self.nodes(&query).await {
                        if !followed.contains(&node) {
                            // It joined after the stream began: all it logged
                            // is news.
                            followed.insert(node.clone());
                            start(node, From::Seq(0));
                        }
                    }
                }
                _ = tx.closed() => return,
            }
        }
    }

    /// Passes on `node`'s events after `from`, reading again (after
    /// [`RETRY`]) whenever its stream ends, until the merged stream closes.
    async fn follow_node(
        self,
        node: String,
        mut query: EventQuery,
        mut from: From,
        tx: mpsc::Sender<(String, EventLine)>,
    ) {
        query.follow = true;
        query.limit = None;
        query.until = None;
        loop {
            let opened = match from {
                From::Seq(seq) => {
                    query.since = Some(seq);
                    self.open(&node, query.clone()).await
                }
                // Never read: from where it stands now, saying what may be
                // missing.
                From::Unknown => match self.position(&node).await {
                    Ok(seq) => {
                        from = From::Seq(seq);
                        let reset = EventLine::Reset {
                            reason: format!(
                                "node {node} could not be read when this stream began: events it logged before now are not in it"
                            ),
                            seq,
                            node: Some(node.clone()),
                        };
                        if tx.send((node.clone(), reset)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            if let Ok(mut stream) = opened {
                loop {
                    let line = tokio::select! {
                        line = stream.next() => line,
                        _ = tx.closed() => return,
                    };
                    let Some(mut line) = line else { break };
                    match &mut line {
                        EventLine::Event(e) => from = From::Seq(e.seq),
                        EventLine::Reset { seq, node: of, .. } => {
                            from = From::Seq(*seq);
                            of.get_or_insert_with(|| node.clone());
                        }
                        EventLine::Heartbeat { .. } => continue,
                    }
                    if tx.send((node.clone(), line)).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

/// Where a node's log is followed from.
#[derive(Clone, Copy)]
enum From {
    Seq(u64),
    Unknown,
}

fn seq_of(line: &EventLine) -> u64 {
    match line {
        EventLine::Event(e) => e.seq,
        EventLine::Reset { seq, .. } | EventLine::Heartbeat { seq } => *seq,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use vroom_core::events::NewEvent;
    use vroom_core::service::{Local, Vroomd};
    use vroom_core::testing::{MemStore, TestEngine};
    use vroom_core::{Engine, OpError};
    use vroom_types::*;

    use super::*;

    /// This host as node n1, and a node n2 whose log is read as a peer's,
    /// which can be taken away.
    struct TwoNodes {
        local: Local,
        n2: Arc<EventLog>,
        n2_down: AtomicBool,
    }

    fn info(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.parse().unwrap(),
            advertise: "127.0.0.1".into(),
            alive: true,
            cordoned: false,
            leader: false,
            mem_total_mib: 0,
            mem_free_mib: 0,
            cpus: 1,
            joined_at: 0,
            instances: vec![],
        }
    }

    #[async_trait::async_trait]
    impl Vroomd for TwoNodes {
        fn engine(&self) -> &Arc<Engine> {
            self.local.engine()
        }
        async fn list(&self) -> Vec<Instance> {
            self.local.list().await
        }
        async fn run(&self, req: RunRequest) -> Result<Instance, OpError> {
            self.local.run(req).await
        }
        async fn inspect(&self, name: &str) -> Result<Instance, OpError> {
            self.local.inspect(name).await
        }
        async fn remove(&self, name: &str, force: bool) -> Result<(), OpError> {
            self.local.remove(name, force).await
        }
        async fn act(&self, name: &str, action: InstanceAction) -> Result<Instance, OpError> {
            self.local.act(name, action).await
        }
        async fn migrate(&self, name: &str, to: &str) -> Result<Migration, OpError> {
            self.local.migrate(name, to).await
        }
        async fn nodes(&self) -> Result<Vec<NodeInfo>, OpError> {
            Ok(vec![info("n1"), info("n2")])
        }
        async fn node(&self, name: &str) -> Result<NodeInfo, OpError> {
            Ok(info(name))
        }
        async fn cordon(&self, name: &str, cordoned: bool) -> Result<NodeInfo, OpError> {
            self.local.cordon(name, cordoned).await
        }
        async fn drain(&self, name: &str, force: bool) -> Result<DrainReport, OpError> {
            self.local.drain(name, force).await
        }
        async fn remove_node(&self, name: &str) -> Result<(), OpError> {
            self.local.remove_node(name).await
        }
        async fn peer_events(
            &self,
            node: &str,
            query: &EventQuery,
        ) -> Result<Option<mpsc::Receiver<EventLine>>, OpError> {
            if node != "n2" {
                return Ok(None);
            }
            if self.n2_down.load(Ordering::SeqCst) {
                return Err(OpError::new(ErrorCode::Conflict, "n2 is unreachable"));
            }
            let (tx, rx) = mpsc::channel(16);
            let mut reader = self.n2.read(query.clone());
            tokio::spawn(async move {
                while let Some(line) = reader.next().await {
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Some(rx))
        }
    }

    fn emit(log: &EventLog, name: &str) {
        log.emit(NewEvent::new(EventKind::Network, "created", name));
        // Times are in milliseconds: keep the order the test means.
        std::thread::sleep(Duration::from_millis(3));
    }

    async fn take(rx: &mut Merged, n: usize) -> Vec<(String, String)> {
        let mut got = vec![];
        while got.len() < n {
            let (line, cursor) = tokio::time::timeout(Duration::from_secs(15), rx.recv())
                .await
                .expect("the merged stream went quiet")
                .expect("the merged stream ended");
            let what = match line {
                EventLine::Event(e) => format!("{}/{}", e.node.unwrap(), e.name),
                EventLine::Reset { node, reason, .. } => {
                    format!("reset {}: {reason}", node.unwrap())
                }
                EventLine::Heartbeat { .. } => continue,
            };
            got.push((what, cursor.to_string()));
        }
        got
    }

    fn names(got: &[(String, String)]) -> Vec<&str> {
        got.iter().map(|(what, _)| what.as_str()).collect()
    }

    /// Two nodes' logs as one stream: a history sorted by time with a
    /// cursor after each line, a resume from a cursor, live events of both,
    /// and a node that could not be read at first gets a reset when it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_nodes_logs_are_one_stream_resumed_by_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let t = TestEngine::new(dir.path());
        let n1 = t.engine.events().clone();
        n1.set_node("n1");
        let n2 = EventLog::open(Arc::new(MemStore::default()));
        n2.set_node("n2");
        let two = Arc::new(TwoNodes {
            local: Local::new(t.engine.clone()),
            n2: n2.clone(),
            n2_down: AtomicBool::new(false),
        });
        let cluster = Cluster {
            log: n1.clone(),
            vroomd: two.clone(),
        };
        let base = |pairs: &[(&str, &str)]| {
            let mut pairs = pairs.to_vec();
            pairs.push(("kind", "network"));
            EventQuery::from_pairs(pairs).unwrap()
        };
        emit(&n1, "a1");
        emit(&n2, "b1");
        emit(&n1, "a2");
        emit(&n2, "b2");

        // The latest three, by time, across both nodes.
        let mut rx = cluster
            .clone()
            .stream(base(&[("node", "*"), ("limit", "3")]))
            .await;
        let got = take(&mut rx, 3).await;
        assert_eq!(names(&got), ["n2/b1", "n1/a2", "n2/b2"]);
        assert!(rx.recv().await.is_none(), "a history ends");
        let after_b1 = got[0].1.clone();
        assert!(after_b1.contains("n2:1"), "{after_b1}");

        // Resumed after b1: what came later on either node.
        let mut q = base(&[("node", "n1,n2"), ("follow", "false")]);
        q.cursor = after_b1.parse().unwrap();
        let got = take(&mut cluster.clone().stream(q).await, 2).await;
        assert_eq!(names(&got), ["n1/a2", "n2/b2"]);

        // A follower from now on sees new events of both nodes.
        let mut live = cluster.clone().stream(base(&[("node", "*")])).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        emit(&n2, "b3");
        emit(&n1, "a3");
        let got = take(&mut live, 2).await;
        let mut seen = names(&got);
        seen.sort();
        assert_eq!(seen, ["n1/a3", "n2/b3"]);
        assert_eq!(got[1].1, "n1:3,n2:3", "the cursor names both nodes");

        // n2 away when a follower starts: once reached, a reset says what
        // may be missing, then its events come.
        two.n2_down.store(true, Ordering::SeqCst);
        let mut late = cluster.clone().stream(base(&[("node", "*")])).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        emit(&n1, "a4");
        assert_eq!(names(&take(&mut late, 1).await), ["n1/a4"]);
        emit(&n2, "b4");
        two.n2_down.store(false, Ordering::SeqCst);
        let got = take(&mut late, 1).await;
        assert!(
            got[0].0.starts_with("reset n2: node n2 could not be read"),
            "{got:?}"
        );
        emit(&n2, "b5");
        assert_eq!(names(&take(&mut late, 1).await), ["n2/b5"]);
    }
}
