//! The dashboard's pages as HTML, each a pure function of the records it
//! shows (the same the JSON API answers) and of the time now, so a page
//! renders the same in a test as in vroomd.
//!
//! Parts with an `id` and `data-live` are what the page script swaps for a
//! newer rendering when an event arrives; ids stay stable across renderings.

use std::collections::BTreeMap;
use std::fmt::Write;

use vroom_types::{
    Event, Instance, InstanceState, Mirror, Network, NodeInfo, Room, Service, Snapshot, Splice,
    Volume,
};

use super::html::{action, age, badge, bytes, esc, seg, table};

/// Every state an instance can be in, in the order the overview counts them.
const STATES: [InstanceState; 6] = [
    InstanceState::Running,
    InstanceState::Starting,
    InstanceState::Restarting,
    InstanceState::Stopping,
    InstanceState::Stopped,
    InstanceState::Failed,
];

/// The room an instance belongs to: its firewall, or a member on its lan or dmz.
pub fn room_of<'a>(rooms: &'a [Room], i: &Instance) -> Option<&'a Room> {
    rooms.iter().find(|r| {
        r.firewall == i.spec.name
            || i.nics
                .iter()
                .any(|n| r.segment_of(n.network.as_str()).is_some())
    })
}

/// Why an instance's health is failing, if it is.
pub fn failing(i: &Instance) -> Option<String> {
    if i.status.state == InstanceState::Failed {
        return Some(
            i.status
                .last_error
                .clone()
                .unwrap_or_else(|| "failed".into()),
        );
    }
    if i.status.state != InstanceState::Running {
        return None;
    }
    match &i.health {
        Some(h) if !h.services_down.is_empty() => {
            Some(format!("services down: {}", h.services_down.join(", ")))
        }
        Some(h) if !h.ready => Some("the guest says it is not ready".into()),
        _ => None,
    }
}

/// One instance as a table row, with its live cells (memory, CPU
/// sparkline) and its actions.
pub fn instance_row(i: &Instance, rooms: &[Room]) -> String {
    let name = i.spec.name.as_str();
    let state = i.status.state;
    let addresses: Vec<String> = i
        .nics
        .iter()
        .map(|n| {
            let role = n.role.as_deref().unwrap_or(n.network.as_str());
            format!("{} <small>{}</small>", esc(&n.shown_cidr()), esc(role))
        })
        .collect();
    let room = match room_of(rooms, i) {
        Some(r) => format!(
            "<a href=\"/ui/rooms/{}\">{}</a>",
            seg(r.name.as_str()),
            esc(r.name.as_str())
        ),
        None => "<span class=\"none\">none</span>".into(),
    };
    format!(
        "<tr data-instance=\"{n}\" data-state=\"{state}\"><td><a href=\"/ui/instances/{s}\">{n}</a></td>\
         <td>{badge}</td><td>{image}</td><td>{room}</td><td>{node}</td><td>{addresses}</td>\
         <td>{mem} MiB <span class=\"rss\" data-rss=\"{n}\"></span></td>\
         <td><svg class=\"spark\" data-spark=\"{n}\" viewBox=\"0 0 60 16\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"CPU of {n}\"></svg></td>\
         <td class=\"actions\">{actions}</td></tr>",
        n = esc(name),
        s = seg(name),
        badge = badge(&state.to_string()),
        image = esc(&i.image_name),
        node = esc(i.node.as_deref().unwrap_or("this host")),
        addresses = addresses.join("<br>"),
        mem = i.mem_mib,
        actions = actions(i),
    )
}

/// Start, stop, restart and snapshot, each enabled where the state allows
/// it, and the console.
fn actions(i: &Instance) -> String {
    use InstanceState::*;
    let name = i.spec.name.as_str();
    let state = i.status.state;
    [
        action(
            "start",
            name,
            "Start",
            matches!(state, Stopped | Failed),
            &format!("Start instance {name}?"),
        ),
        action(
            "stop",
            name,
            "Stop",
            matches!(state, Running | Starting | Restarting),
            &format!("Stop instance {name}? Its guest is shut down."),
        ),
        action(
            "restart",
            name,
            "Restart",
            state == Running,
            &format!("Restart instance {name}?"),
        ),
        action(
            "snapshot",
            name,
            "Snapshot",
            state == Running && !i.spec.ephemeral,
            &format!("Snapshot instance {name}? Its guest is paused meanwhile."),
        ),
        format!(
            "<a class=\"logs\" href=\"/ui/instances/{}#console\">Logs</a>",
            seg(name)
        ),
    ]
    .join(" ")
}

const INSTANCE_HEADERS: [&str; 9] = [
    "name",
    "state",
    "image",
    "room",
    "node",
    "addresses",
    "memory",
    "CPU",
    "actions",
];

/// The instances as a live table.
pub fn instances_table(id: &str, instances: &[Instance], rooms: &[Room], empty: &str) -> String {
    let rows: Vec<String> = instances.iter().map(|i| instance_row(i, rooms)).collect();
    table(id, &INSTANCE_HEADERS, &rows, empty)
}

/// Events, newest first, as a live table.
pub fn events_table(id: &str, events: &[Event]) -> String {
    let rows: Vec<String> = events
        .iter()
        .rev()
        .map(|e| {
            let name = if e.kind == vroom_types::EventKind::Instance {
                format!(
                    "<a href=\"/ui/instances/{}\">{}</a>",
                    seg(&e.name),
                    esc(&e.name)
                )
            } else {
                esc(&e.name)
            };
            let message = e.message.as_deref().unwrap_or("");
            format!(
                "<tr data-seq=\"{seq}\"><td class=\"num\">{seq}</td><td><time>{time}</time></td><td>{kind}</td>\
                 <td>{action}</td><td>{name}</td><td>{room}</td><td>{node}</td><td>{actor}</td><td>{message}</td></tr>",
                seq = e.seq,
                time = esc(&e.time),
                kind = esc(e.kind.as_str()),
                action = badge(&e.action),
                room = esc(e.room.as_deref().unwrap_or("")),
                node = esc(e.node.as_deref().unwrap_or("")),
                actor = esc(&e.actor),
                message = esc(message),
            )
        })
        .collect();
    table(
        id,
        &[
            "seq", "time", "kind", "action", "name", "room", "node", "actor", "message",
        ],
        &rows,
        "No events yet.",
    )
}

/// What the overview shows.
pub struct Overview<'a> {
    pub instances: &'a [Instance],
    /// The cluster's nodes, or `None` for a host alone.
    pub nodes: Option<&'a [NodeInfo]>,
    pub events: &'a [Event],
    pub data_dir: &'a str,
}

pub fn overview(o: &Overview) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in o.instances {
        *counts.entry(i.status.state.to_string()).or_default() += 1;
    }
    let mut out =
        String::from("<h1>Overview</h1><section class=\"cards\" id=\"states\" data-live>");
    let _ = write!(
        out,
        "<a class=\"card\" href=\"/ui/instances\"><span class=\"big\">{}</span> instances</a>",
        o.instances.len()
    );
    for state in STATES {
        let word = state.to_string();
        let n = counts.get(&word).copied().unwrap_or(0);
        let _ = write!(
            out,
            "<div class=\"card\" data-count=\"{w}\"><span class=\"big\">{n}</span> {b}</div>",
            w = esc(&word),
            b = badge(&word)
        );
    }
    out.push_str("</section>");

    out.push_str("<section><h2>Nodes</h2>");
    match o.nodes {
        Some(nodes) => out.push_str(&nodes_table(nodes)),
        None => {
            let _ = write!(
                out,
                "<p id=\"nodes\" data-live>This host alone (not in a cluster); data dir <code>{}</code>.</p>",
                esc(o.data_dir)
            );
        }
    }
    out.push_str("</section>");

    let failing: Vec<String> = o
        .instances
        .iter()
        .filter_map(|i| {
            failing(i).map(|why| {
                format!(
                    "<tr data-instance=\"{n}\"><td><a href=\"/ui/instances/{s}\">{n}</a></td><td>{b}</td><td>{why}</td></tr>",
                    n = esc(i.spec.name.as_str()),
                    s = seg(i.spec.name.as_str()),
                    b = badge(&i.status.state.to_string()),
                    why = esc(&why)
                )
            })
        })
        .collect();
    out.push_str("<section><h2>Failing health</h2>");
    out.push_str(&table(
        "failing",
        &["instance", "state", "why"],
        &failing,
        "Every instance is healthy.",
    ));
    out.push_str("</section><section><h2>Recent events</h2>");
    out.push_str(&events_table("recent", o.events));
    out.push_str("<p><a href=\"/ui/events\">All events</a></p></section>");
    out
}

pub fn instances(instances: &[Instance], rooms: &[Room]) -> String {
    format!(
        "<h1>Instances</h1>{}",
        instances_table(
            "instances",
            instances,
            rooms,
            "No instances: start one with `vroom run IMAGE`."
        )
    )
}

/// One instance: its record, NICs, health, actions and console.
pub fn instance(i: &Instance, rooms: &[Room], now: u64) -> String {
    let name = i.spec.name.as_str();
    let mut out = format!("<h1>Instance {}</h1>", esc(name));
    out.push_str(&instances_table(
        "summary",
        std::slice::from_ref(i),
        rooms,
        "",
    ));
    let _ = write!(
        out,
        "<section id=\"details\" data-live><h2>Details</h2><dl>\
         <dt>id</dt><dd><code>{id}</code></dd>\
         <dt>image</dt><dd>{image} <code>{image_id}</code></dd>\
         <dt>CPUs</dt><dd>{cpus}</dd>\
         <dt>wanted</dt><dd>{desired:?}</dd>\
         <dt>created</dt><dd>{created}</dd>\
         <dt>boot</dt><dd>{boot}</dd>\
         <dt>restarts</dt><dd>{restarts}</dd>\
         <dt>last error</dt><dd>{error}</dd>\
         <dt>health</dt><dd>{health}</dd></dl>",
        id = esc(&i.id),
        image = esc(&i.image_name),
        image_id = esc(&i.image_id),
        cpus = i.spec.cpus,
        desired = i.desired,
        created = age(now, i.created_at),
        boot = i
            .status
            .boot_ms
            .map(|ms| format!("ready {ms} ms after launch"))
            .unwrap_or_else(|| "not ready".into()),
        restarts = i.status.restarts,
        error = esc(i.status.last_error.as_deref().unwrap_or("none")),
        health = esc(&match (&i.health, failing(i)) {
            (_, Some(why)) => why,
            (Some(h), None) if h.ready => "ready".to_string(),
            _ => "not reported".to_string(),
        }),
    );
    let nics: Vec<String> = i
        .nics
        .iter()
        .enumerate()
        .map(|(index, n)| {
            format!(
                "<tr><td>{index}</td><td>{role}</td><td>{net}</td><td>{cidr}</td><td>{gw}</td><td><code>{mac}</code></td><td><code>{tap}</code></td></tr>",
                role = esc(n.role.as_deref().unwrap_or("")),
                net = esc(n.network.as_str()),
                cidr = esc(&n.shown_cidr()),
                gw = n.gateway,
                mac = esc(&n.mac),
                tap = esc(&n.tap),
            )
        })
        .collect();
    out.push_str("<h2>NICs</h2>");
    out.push_str(&table(
        "nics",
        &["#", "role", "network", "address", "gateway", "MAC", "tap"],
        &nics,
        "No NICs.",
    ));
    let config: Vec<String> = i
        .config
        .iter()
        .map(|(k, v)| {
            format!(
                "<tr><td><code>{}</code></td><td><code>{}</code></td></tr>",
                esc(k),
                esc(v)
            )
        })
        .collect();
    out.push_str("<h2>Config</h2>");
    out.push_str(&table(
        "config",
        &["key", "value"],
        &config,
        "No config values.",
    ));
    out.push_str("</section>");
    let _ = write!(
        out,
        "<section class=\"console\" id=\"console\"><h2>Console</h2>\
         <label><input type=\"checkbox\" id=\"follow\" checked> follow</label>\
         <pre id=\"logs\" data-logs=\"{}\" tabindex=\"0\"></pre></section>",
        esc(name)
    );
    out
}

pub fn rooms(rooms: &[Room], instances: &[Instance]) -> String {
    let rows: Vec<String> = rooms
        .iter()
        .map(|r| {
            let members = instances
                .iter()
                .filter(|i| room_of(std::slice::from_ref(r), i).is_some())
                .count();
            format!(
                "<tr data-room=\"{n}\"><td><a href=\"/ui/rooms/{s}\">{n}</a></td><td>{state}</td><td>{domain}</td>\
                 <td>{fw}</td><td>{lan} / {dmz} / {wan}</td><td class=\"num\">{members}</td><td class=\"num\">{exposes}</td></tr>",
                n = esc(r.name.as_str()),
                s = seg(r.name.as_str()),
                state = badge(&r.state.to_string()),
                domain = esc(&r.domain),
                fw = esc(r.firewall.as_str()),
                lan = esc(r.lan.as_str()),
                dmz = esc(r.dmz.as_str()),
                wan = esc(r.wan.as_str()),
                exposes = r.exposes.len(),
            )
        })
        .collect();
    format!(
        "<h1>Rooms</h1>{}",
        table(
            "rooms",
            &[
                "name",
                "state",
                "domain",
                "firewall",
                "lan / dmz / wan",
                "instances",
                "exposed ports"
            ],
            &rows,
            "No rooms: create one with `vroom room create NAME`.",
        )
    )
}

/// Where a service is: its room or its network.
fn service_place(s: &Service) -> String {
    match (&s.spec.room, &s.spec.network) {
        (Some(room), _) => format!(
            "room <a href=\"/ui/rooms/{}\">{}</a>",
            seg(room.as_str()),
            esc(room.as_str())
        ),
        (None, Some(net)) => esc(net.as_str()),
        (None, None) => "-".into(),
    }
}

/// What a service is doing: removing, updating, rolling back, or settled.
fn service_state(s: &Service) -> String {
    if s.removing {
        return badge("removing");
    }
    match &s.update {
        Some(u) => match &u.rolling_back {
            Some(why) => format!(
                "{} to {} <small>{}</small>",
                badge("rolling-back"),
                esc(&u.from),
                esc(why)
            ),
            None => format!("{} {} → {}", badge("updating"), esc(&u.from), esc(&u.to)),
        },
        None if s.converged() => badge("ready"),
        None => badge("converging"),
    }
}

/// Services: each with its numbers, address, load and update state; then
/// each one's members and latest scaling decisions.
pub fn services(services: &[Service], now: u64) -> String {
    let rows: Vec<String> = services
        .iter()
        .map(|s| {
            let address = s
                .address
                .map(|ip| format!("{ip}:{}", s.spec.port))
                .unwrap_or_else(|| "-".into());
            format!(
                "<tr data-service=\"{n}\"><td><a href=\"#service-{id}\">{n}</a></td><td>{image}</td>\
                 <td class=\"num\">{ready}/{desired}</td><td>{scale}</td><td>{address}</td><td>{place}</td>\
                 <td>{load}</td><td>{state}</td></tr>",
                n = esc(s.spec.name.as_str()),
                id = seg(s.spec.name.as_str()),
                image = esc(&s.spec.image),
                ready = s.ready,
                desired = s.desired,
                scale = esc(&s.spec.scale()),
                address = esc(&address),
                place = service_place(s),
                load = s.load.as_ref().map_or("-".into(), |l| esc(&l.to_string())),
                state = service_state(s),
            )
        })
        .collect();
    let mut out = String::from("<h1>Services</h1>");
    out.push_str(&table(
        "services",
        &[
            "name", "image", "ready", "scale", "address", "on", "load", "state",
        ],
        &rows,
        "No services: create one with `vroom service create NAME --image IMAGE`.",
    ));
    // One live part: a service created or removed comes or goes whole.
    out.push_str("<section id=\"service-details\" data-live>");
    for s in services {
        let name = s.spec.name.as_str();
        let _ = write!(
            out,
            "<h2 id=\"service-{id}\">{n} <small>behind {lb}</small></h2>",
            id = seg(name),
            n = esc(name),
            lb = esc(s.balancer.as_str()),
        );
        let members: Vec<String> = s
            .members
            .iter()
            .map(|m| {
                format!(
                    "<tr data-member=\"{n}\"><td><a href=\"/ui/instances/{sg}\">{n}</a></td><td>{state}</td>\
                     <td>{ip}</td><td>{image}</td><td>{balanced}</td></tr>",
                    n = esc(m.name.as_str()),
                    sg = seg(m.name.as_str()),
                    state = m
                        .state
                        .map_or_else(|| badge("making"), |st| badge(&st.to_string())),
                    ip = m.ip.map_or("-".into(), |ip| ip.to_string()),
                    image = esc(&m.image),
                    balanced = if m.balanced { "yes" } else { "no" },
                )
            })
            .collect();
        out.push_str(&table(
            &format!("service-{}-members", seg(name)),
            &["member", "state", "address", "image", "balanced"],
            &members,
            "No members yet.",
        ));
        let decisions: Vec<String> = s
            .decisions
            .iter()
            .rev()
            .map(|d| {
                format!(
                    "<tr><td>{when}</td><td class=\"num\">{from} → {to}</td><td>{why}</td><td>{load}</td></tr>",
                    when = age(now, d.at_ms / 1000),
                    from = d.from,
                    to = d.to,
                    why = esc(&d.reason),
                    load = esc(&d.load.to_string()),
                )
            })
            .collect();
        out.push_str(&table(
            &format!("service-{}-decisions", seg(name)),
            &["when", "members", "why", "measured"],
            &decisions,
            "No scaling decisions yet.",
        ));
    }
    out.push_str("</section>");
    out
}

/// How a room's topology is drawn: Graphviz's SVG, or the text rendering
/// with the reason there is no drawing.
pub enum Drawing {
    Svg(String),
    Text { text: String, why: String },
}

pub fn room(r: &Room, instances: &[Instance], rooms: &[Room], drawing: &Drawing) -> String {
    let mut out = format!("<h1>Room {}</h1>", esc(r.name.as_str()));
    let _ = write!(
        out,
        "<section id=\"room\" data-live><dl><dt>state</dt><dd>{state}</dd><dt>domain</dt><dd>{domain}</dd>\
         <dt>firewall</dt><dd><a href=\"/ui/instances/{fws}\">{fw}</a></dd>\
         <dt>networks</dt><dd>lan {lan}, dmz {dmz}, wan {wan}</dd></dl></section>",
        state = badge(&r.state.to_string()),
        domain = esc(&r.domain),
        fws = seg(r.firewall.as_str()),
        fw = esc(r.firewall.as_str()),
        lan = esc(r.lan.as_str()),
        dmz = esc(r.dmz.as_str()),
        wan = esc(r.wan.as_str()),
    );
    out.push_str("<h2>Topology</h2><figure id=\"topology\" data-live>");
    match drawing {
        Drawing::Svg(svg) => out.push_str(svg),
        Drawing::Text { text, why } => {
            let _ = write!(
                out,
                "<p class=\"empty\">{}</p><pre>{}</pre>",
                esc(why),
                esc(text)
            );
        }
    }
    out.push_str("</figure>");
    let members: Vec<Instance> = instances
        .iter()
        .filter(|i| room_of(std::slice::from_ref(r), i).is_some())
        .cloned()
        .collect();
    out.push_str("<h2>Instances</h2>");
    out.push_str(&instances_table(
        "members",
        &members,
        rooms,
        "No instances in this room yet.",
    ));
    let exposes: Vec<String> = r
        .exposes
        .iter()
        .map(|e| {
            format!(
                "<tr><td>{}/{}</td><td>{}:{}</td></tr>",
                esc(e.proto.as_str()),
                e.port,
                esc(e.to.as_str()),
                e.to_port
            )
        })
        .collect();
    out.push_str("<h2>Exposed ports</h2>");
    out.push_str(&table(
        "exposes",
        &["port", "to"],
        &exposes,
        "Nothing exposed.",
    ));
    out
}

/// Networks, splices and mirrors: what is wired to what.
pub fn wiring(networks: &[Network], splices: &[Splice], mirrors: &[Mirror], now: u64) -> String {
    let nets: Vec<String> = networks
        .iter()
        .map(|n| {
            let kind = match (n.isolated, n.nat) {
                (true, _) => "isolated",
                (false, true) => "NAT",
                (false, false) => "routed",
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
                esc(n.name.as_str()),
                n.subnet,
                kind,
                esc(&n.bridge)
            )
        })
        .collect();
    let splices: Vec<String> = splices
        .iter()
        .map(|s| {
            let last = s
                .events
                .last()
                .map(|e| format!("{} ({})", e.message, age(now, e.at_ms / 1000)))
                .unwrap_or_default();
            format!(
                "<tr data-splice=\"{a}\"><td><a href=\"/ui/instances/{as_}\">{a}</a></td><td><a href=\"/ui/instances/{vs}\">{vm}</a>:{nic}</td>\
                 <td>{net}</td><td>fail {fail}</td><td>{state}</td><td>{last}</td></tr>",
                a = esc(s.appliance.as_str()),
                as_ = seg(s.appliance.as_str()),
                vs = seg(s.vm.as_str()),
                vm = esc(s.vm.as_str()),
                nic = s.nic,
                net = esc(s.network.as_str()),
                fail = esc(&s.fail.to_string()),
                state = badge(&s.state.to_string()),
                last = esc(&last),
            )
        })
        .collect();
    let mirrors: Vec<String> = mirrors
        .iter()
        .map(|m| {
            format!(
                "<tr><td><code>{}</code></td><td>{}:{}</td><td>{}:{}</td><td>{}</td><td>{}</td></tr>",
                esc(&m.id),
                esc(m.vm.as_str()),
                m.nic,
                esc(m.to.as_str()),
                m.to_nic,
                esc(m.filter.as_deref().unwrap_or("all traffic")),
                age(now, m.created_at),
            )
        })
        .collect();
    let mut out = String::from("<h1>Networks, splices and mirrors</h1><h2>Networks</h2>");
    out.push_str(&table(
        "networks",
        &["name", "subnet", "kind", "bridge"],
        &nets,
        "No networks.",
    ));
    out.push_str("<h2>Splices</h2>");
    out.push_str(&table(
        "splices",
        &[
            "appliance",
            "in front of",
            "network",
            "failure",
            "state",
            "last change",
        ],
        &splices,
        "No splices: `vroom splice APPLIANCE --in-front-of VM` puts one in a VM's path.",
    ));
    out.push_str("<h2>Mirrors</h2>");
    out.push_str(&table(
        "mirrors",
        &["id", "from", "to", "filter", "created"],
        &mirrors,
        "No mirrors.",
    ));
    out
}

pub fn snapshots(user: &[Snapshot], warm: &[Snapshot], now: u64) -> String {
    let row = |s: &Snapshot| {
        format!(
            "<tr data-snapshot=\"{n}\"><td>{n}</td><td>{instance}</td><td>{image}</td><td>{created}</td>\
             <td class=\"num\">{pause} ms</td><td class=\"num\">{size}</td><td>{accel}</td></tr>",
            n = esc(s.name.as_str()),
            instance = esc(s.instance.spec.name.as_str()),
            image = esc(&s.instance.image_name),
            created = age(now, s.created_at),
            pause = s.pause_ms,
            size = bytes(s.state_bytes),
            accel = esc(&s.accel.to_string()),
        )
    };
    let headers = [
        "name",
        "instance",
        "image",
        "taken",
        "pause",
        "state",
        "accelerator",
    ];
    let mut out = String::from("<h1>Snapshots</h1>");
    out.push_str(&table(
        "snapshots",
        &headers,
        &user.iter().map(row).collect::<Vec<_>>(),
        "No snapshots: the Snapshot button of a running instance takes one.",
    ));
    out.push_str("<h2>Warm snapshots</h2>");
    out.push_str(&table(
        "warm",
        &headers,
        &warm.iter().map(row).collect::<Vec<_>>(),
        "No warm snapshots (`vroom image warm IMAGE`).",
    ));
    out
}

pub fn volumes(volumes: &[Volume]) -> String {
    let rows: Vec<String> = volumes
        .iter()
        .map(|v| {
            let replication = match &v.replication {
                Some(r) => {
                    let progress = match (r.synced_bytes, r.sync_total_bytes) {
                        (Some(done), Some(total)) if total > 0 => {
                            format!(" {}%", done * 100 / total)
                        }
                        _ => String::new(),
                    };
                    format!(
                        "{} {} → {}{}{}",
                        badge(&r.state.to_string()),
                        esc(&r.primary),
                        esc(&r.replica),
                        progress,
                        r.reason
                            .as_deref()
                            .map(|why| format!(" <small>{}</small>", esc(why)))
                            .unwrap_or_default()
                    )
                }
                None if v.replicas > 1 => badge("unplaced"),
                None => "<span class=\"none\">one copy</span>".into(),
            };
            format!(
                "<tr data-volume=\"{n}\"><td>{n}</td><td class=\"num\">{size} MiB</td><td>{fs}</td><td>{attached}</td>\
                 <td class=\"num\">{allocated}</td><td>{replication}</td><td class=\"num\">{snapshots}</td><td>{export}</td></tr>",
                n = esc(v.name.as_str()),
                size = v.size_mib,
                fs = esc(v.fs.as_str()),
                attached = v
                    .attached_to
                    .as_ref()
                    .map(|i| format!("<a href=\"/ui/instances/{}\">{}</a>", seg(i.as_str()), esc(i.as_str())))
                    .unwrap_or_else(|| "<span class=\"none\">free</span>".into()),
                allocated = bytes(v.allocated_bytes),
                snapshots = v.snapshots.len(),
                export = if v.export.is_some() { "exported" } else { "" },
            )
        })
        .collect();
    format!(
        "<h1>Volumes</h1>{}",
        table(
            "volumes",
            &[
                "name",
                "size",
                "fs",
                "attached to",
                "allocated",
                "replication",
                "snapshots",
                "export"
            ],
            &rows,
            "No data volumes (`vroom volume create NAME --size SIZE`).",
        )
    )
}

pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    let rows: Vec<String> = nodes
        .iter()
        .map(|n| {
            let mut flags = vec![];
            if n.leader {
                flags.push("leader");
            }
            if n.cordoned {
                flags.push("cordoned");
            }
            format!(
                "<tr data-node=\"{name}\"><td>{name}</td><td>{alive}</td><td>{flags}</td><td>{addr}</td>\
                 <td class=\"num\">{free} / {total} MiB free</td><td class=\"num\">{cpus}</td><td class=\"num\">{vms}</td></tr>",
                name = esc(n.name.as_str()),
                alive = badge(if n.alive { "alive" } else { "lost" }),
                flags = flags.join(", "),
                addr = esc(&n.advertise),
                free = n.mem_free_mib,
                total = n.mem_total_mib,
                cpus = n.cpus,
                vms = n.instances.len(),
            )
        })
        .collect();
    table(
        "nodes",
        &[
            "node",
            "state",
            "role",
            "address",
            "memory",
            "CPUs",
            "instances",
        ],
        &rows,
        "No nodes.",
    )
}

pub fn nodes(nodes: Option<&[NodeInfo]>, data_dir: &str) -> String {
    match nodes {
        Some(nodes) => format!("<h1>Cluster nodes</h1>{}", nodes_table(nodes)),
        None => format!(
            "<h1>Cluster nodes</h1><p id=\"nodes\" data-live>This vroomd is not in a cluster: it runs this host's \
             instances alone (data dir <code>{}</code>). `vroom node init` starts a cluster.</p>",
            esc(data_dir)
        ),
    }
}

pub fn events(events: &[Event]) -> String {
    format!(
        "<h1>Events</h1><p>The last {} events, newest first; new ones appear as they happen.</p>{}",
        events.len(),
        events_table("events", events)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, state: InstanceState) -> Instance {
        let mut i: Instance = serde_json::from_value(serde_json::json!({
            "id": "i-1", "spec": {"name": name, "image": "hello", "cpus": 1, "nics": [], "accel": "auto"},
            "image_id": "sha", "image_name": "hello", "mem_mib": 128, "created_at": 0,
            "desired": "running", "nics": [], "config": {},
            "status": {"state": "running", "pid": null, "accel": null, "started_at": null,
                       "boot_ms": null, "restarts": 0, "last_error": null}
        }))
        .unwrap();
        i.status.state = state;
        i
    }

    /// The services page: each service's numbers, address, scale and
    /// update state, then its members and decisions (newest first), with
    /// what it carries escaped.
    #[test]
    fn services_show_members_and_decisions() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "spec": {"name": "shop", "image": "web<2>", "replicas": 2, "max_replicas": 4,
                     "room": "acme", "port": 80, "scale_on": {"p95_ms": 50}},
            "balancer": "shop-lb", "address": "10.0.0.3",
            "members": [
                {"name": "shop-1", "state": "running", "ip": "10.0.0.4", "image": "web", "balanced": true},
                {"name": "shop-3", "state": null, "ip": null, "image": "web<2>", "balanced": false}
            ],
            "ready": 1, "desired": 3, "removing": false,
            "update": {"from": "web", "to": "web<2>", "started_at": 0, "rolling_back": null},
            "load": null,
            "decisions": [
                {"at_ms": 990000, "from": 2, "to": 3, "reason": "p95 over 50 ms",
                 "load": {"window_secs": 3.0, "requests": 30, "requests_per_sec": 10.0, "errors": 0,
                          "slow": 9, "p95_above_ms": 50, "p95_at_most_ms": 100, "in_flight": 2, "cpu_percent": null}},
                {"at_ms": 999000, "from": 3, "to": 2, "reason": "calm",
                 "load": {"window_secs": 3.0, "requests": 3, "requests_per_sec": 1.0, "errors": 0,
                          "slow": 0, "p95_above_ms": null, "p95_at_most_ms": 10, "in_flight": 0, "cpu_percent": null}}
            ],
            "created_at": 0
        }))
        .unwrap();
        let page = services(std::slice::from_ref(&service), 1000);
        for want in [
            "<td class=\"num\">1/3</td>",
            "<td>2..4 on p95&lt;50ms</td>",
            "<td>10.0.0.3:80</td>",
            "room <a href=\"/ui/rooms/acme\">acme</a>",
            "updating</span> web → web&lt;2&gt;",
            "behind shop-lb",
            "<a href=\"/ui/instances/shop-1\">shop-1</a>",
            "s-making",
            "p95 50-100 ms",
        ] {
            assert!(page.contains(want), "{want} in {page}");
        }
        let calm = page.find("calm").unwrap();
        let over = page.find("p95 over 50 ms").unwrap();
        assert!(calm < over, "newest decision first");
        assert!(!page.contains("web<2>"), "escaped");
        assert!(services(&[], 0).contains("No services"));
    }

    /// Each state offers the actions that make sense in it, and a name
    /// that needs escaping is escaped everywhere it appears.
    #[test]
    fn rows_offer_the_actions_of_their_state() {
        let enabled = |row: &str, action: &str| {
            let at = row
                .find(&format!("data-action=\"{action}\""))
                .unwrap_or_else(|| panic!("{action} in {row}"));
            let end = at + row[at..].find('>').unwrap();
            !row[at..end].contains(" disabled")
        };
        for (state, start, stop, restart) in [
            (InstanceState::Running, false, true, true),
            (InstanceState::Stopped, true, false, false),
            (InstanceState::Failed, true, false, false),
            (InstanceState::Stopping, false, false, false),
        ] {
            let row = instance_row(&instance("web", state), &[]);
            assert_eq!(
                (
                    enabled(&row, "start"),
                    enabled(&row, "stop"),
                    enabled(&row, "restart")
                ),
                (start, stop, restart),
                "{state}"
            );
        }
        let mut odd = instance("web", InstanceState::Failed);
        odd.status.last_error = Some("<img src=x onerror=alert(1)>".into());
        let page = overview(&Overview {
            instances: &[odd],
            nodes: None,
            events: &[],
            data_dir: "/var/lib/vroom",
        });
        assert!(!page.contains("<img"), "{page}");
        assert!(page.contains("&lt;img src=x"), "{page}");
    }

    /// The overview counts instances by state and lists the failing ones.
    #[test]
    fn overview_counts_states() {
        let all = [
            instance("a", InstanceState::Running),
            instance("b", InstanceState::Running),
            instance("c", InstanceState::Failed),
        ];
        let page = overview(&Overview {
            instances: &all,
            nodes: None,
            events: &[],
            data_dir: "/d",
        });
        assert!(
            page.contains("data-count=\"running\"><span class=\"big\">2</span>"),
            "{page}"
        );
        assert!(
            page.contains("data-count=\"failed\"><span class=\"big\">1</span>"),
            "{page}"
        );
        assert!(page.contains("<tr data-instance=\"c\">"), "{page}");
        assert!(!page.contains("<tr data-instance=\"a\">"), "{page}");
    }
}
