//! What vroom asks of a QEMU, checked against that binary's own account of
//! itself: every QMP command vroom sends with every argument it passes
//! (against `query-qmp-schema`), and every machine and device property on
//! its command line (against `-machine microvm,help` and `-device
//! NAME,help`). vroom uses only what QEMU 7.2 and 10.0 both have; this is
//! how that stays true (`vroom setup` runs it on the QEMU it finds, the
//! tests on 7.2 and 10.0). A unit test checks that every command the
//! crate's sources send is listed in [`QMP`].

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::qmp::{QmpError, Session};

/// Every QMP command vroom sends, with the arguments it passes. An
/// argument of a union (`blockdev-add`) is looked for in every variant.
pub const QMP: &[(&str, &[&str])] = &[
    ("qmp_capabilities", &[]),
    ("system_powerdown", &[]),
    ("query-status", &[]),
    ("stop", &[]),
    ("cont", &[]),
    ("getfd", &["fdname"]),
    ("closefd", &["fdname"]),
    (
        "migrate-set-parameters",
        &["max-bandwidth", "downtime-limit"],
    ),
    ("migrate", &["uri"]),
    ("migrate-incoming", &["uri"]),
    ("migrate_cancel", &[]),
    ("query-migrate", &[]),
    ("block_resize", &["device", "size"]),
    (
        "blockdev-add",
        &[
            "driver",
            "node-name",
            "server",
            "export",
            "reconnect-delay",
            "vote-threshold",
            "children",
        ],
    ),
    ("blockdev-del", &["node-name"]),
    ("query-named-block-nodes", &["flat"]),
    (
        "blockdev-mirror",
        &[
            "job-id",
            "device",
            "target",
            "sync",
            "copy-mode",
            "on-source-error",
            "on-target-error",
            "auto-dismiss",
        ],
    ),
    ("x-blockdev-change", &["parent", "node", "child"]),
    ("query-block", &[]),
    ("query-blockstats", &[]),
    ("query-block-jobs", &[]),
    ("block-job-resume", &["device"]),
    ("block-job-cancel", &["device", "force"]),
    ("block-job-dismiss", &["id"]),
];

/// The QMP commands vroom sends although QEMU marks them `unstable` (no
/// compatibility promise between releases), each with why. Any other use
/// of an unstable command or argument is reported like a missing one, so
/// that relying on one is a decision, checked on every QEMU vroom runs on.
pub const UNSTABLE_ACCEPTED: &[(&str, &str)] = &[(
    "x-blockdev-change",
    "swaps a replication's NBD connection under its paused mirror job, so a \
     resumed replica is sent only what it missed (QEMU 7.2 and 10.0 both \
     mark it unstable and behave the same; tests/qemu10.rs and tests/cluster.rs \
     resume on each)",
)];

/// The members of QMP replies vroom reads (`a.b`: member `b` of member
/// `a`; an array reply is looked at per element).
pub const QMP_REPLIES: &[(&str, &[&str])] = &[
    ("query-status", &["status"]),
    (
        "query-migrate",
        &["status", "total-time", "downtime", "error-desc"],
    ),
    ("query-named-block-nodes", &["node-name"]),
    ("query-block", &["device", "inserted.dirty-bitmaps"]),
    (
        "query-blockstats",
        &[
            "device",
            "stats.rd_bytes",
            "stats.wr_bytes",
            "stats.rd_operations",
            "stats.wr_operations",
            "stats.flush_operations",
        ],
    ),
    (
        "query-block-jobs",
        &[
            "device",
            "status",
            "ready",
            "io-status",
            "offset",
            "len",
            "error",
        ],
    ),
];

/// The machine, device and accelerator properties of vroom's command line
/// ([`crate::cmdline::qemu_args`]): the help command that lists them, and
/// the names it must list.
pub const PROPERTIES: &[(&str, &str, &[&str])] = &[
    ("-machine", "microvm,help", &["acpi"]),
    ("-device", "virtio-blk-device,help", &["drive", "serial"]),
    ("-device", "virtio-net-device,help", &["netdev", "mac"]),
    ("-device", "virtio-serial-device,help", &[]),
    ("-device", "virtserialport,help", &["chardev", "name"]),
];

#[derive(Debug, thiserror::Error)]
pub enum CheckCompatError {
    #[error("cannot start {binary} to read its QMP schema")]
    Start {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} did not open its QMP socket within 10 s")]
    NoSocket { binary: String },
    #[error("cannot read the QMP schema of {binary}")]
    Schema {
        binary: String,
        #[source]
        source: QmpError,
    },
}

/// What `binary` lacks of what vroom uses, one item per line (empty: all
/// there). Starts it once with `-machine none` for its QMP schema, then
/// once per property list.
pub fn missing(binary: &Path) -> Result<Vec<String>, CheckCompatError> {
    let schema = qmp_schema(binary)?;
    let mut missing = missing_from_schema(&schema);
    let env = crate::vmm::prefix_of(binary)
        .map(|p| crate::vmm::env_in(&p))
        .unwrap_or_default();
    for (flag, help, names) in PROPERTIES {
        let listed = crate::vmm::run_bounded_env(binary, &[flag, help], &env).unwrap_or_default();
        for name in *names {
            let shown = listed
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{name}=")));
            if !shown {
                missing.push(format!("{flag} {help}: no property {name}"));
            }
        }
        if listed.is_empty() {
            missing.push(format!("{flag} {help}: not known"));
        }
    }
    Ok(missing)
}

/// The commands and arguments of [`QMP`] that `schema` (the return value
/// of `query-qmp-schema`) does not have.
pub fn missing_from_schema(schema: &Value) -> Vec<String> {
    let entries: Vec<&Value> = schema.as_array().into_iter().flatten().collect();
    let by_name = |name: &str| entries.iter().copied().find(|e| e["name"] == name);
    let mut missing = vec![];
    let mut command_entry = |command: &str| {
        let entry = entries
            .iter()
            .copied()
            .find(|e| e["meta-type"] == "command" && e["name"] == command);
        let gone = format!("QMP command {command}");
        if entry.is_none() && !missing.contains(&gone) {
            missing.push(gone);
        }
        entry
    };
    let commands: Vec<_> = QMP
        .iter()
        .map(|(c, a)| (command_entry(c), *c, *a))
        .collect();
    let replies: Vec<_> = QMP_REPLIES
        .iter()
        .map(|(c, p)| (command_entry(c), *c, *p))
        .collect();
    for (entry, command, args) in commands {
        let Some(entry) = entry else { continue };
        if deprecated(entry) {
            missing.push(format!("QMP command {command} is deprecated"));
        }
        let accepted = UNSTABLE_ACCEPTED.iter().any(|(c, _)| *c == command);
        if unstable(entry) && !accepted {
            missing.push(format!("QMP command {command} is unstable"));
        }
        let arg_type = entry["arg-type"].as_str().unwrap_or_default();
        for arg in args {
            match find_member(&by_name, arg_type, arg, 0) {
                None => missing.push(format!("QMP {command} argument {arg}")),
                Some(m) if deprecated(m) => {
                    missing.push(format!("QMP {command} argument {arg} is deprecated"))
                }
                Some(m) if unstable(m) && !accepted => {
                    missing.push(format!("QMP {command} argument {arg} is unstable"))
                }
                Some(_) => {}
            }
        }
    }
    for (entry, command, paths) in replies {
        let Some(entry) = entry else { continue };
        for path in paths {
            let mut ty = entry["ret-type"].as_str().unwrap_or_default().to_string();
            let mut found = true;
            for part in path.split('.') {
                let element = by_name(&ty)
                    .filter(|t| t["meta-type"] == "array")
                    .and_then(|t| t["element-type"].as_str());
                if let Some(element) = element {
                    ty = element.to_string();
                }
                match find_member(&by_name, &ty, part, 0) {
                    Some(m) if !deprecated(m) => {
                        ty = m["type"].as_str().unwrap_or_default().to_string();
                    }
                    _ => {
                        found = false;
                        break;
                    }
                }
            }
            if !found {
                missing.push(format!("QMP {command} reply member {path}"));
            }
        }
    }
    missing
}

fn deprecated(entry: &Value) -> bool {
    has_feature(entry, "deprecated")
}

fn unstable(entry: &Value) -> bool {
    has_feature(entry, "unstable")
}

fn has_feature(entry: &Value, feature: &str) -> bool {
    entry["features"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == feature))
}

/// Member `member` of object type `name`, among its own members or in any
/// variant of a union.
fn find_member<'a>(
    by_name: &dyn Fn(&str) -> Option<&'a Value>,
    name: &str,
    member: &str,
    depth: usize,
) -> Option<&'a Value> {
    let ty = by_name(name)?;
    if depth > 4 {
        return None;
    }
    let own = ty["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == member);
    own.or_else(|| {
        ty["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["type"].as_str())
            .find_map(|variant| find_member(by_name, variant, member, depth + 1))
    })
}

/// `query-qmp-schema` of `binary`, started with no machine and stopped
/// again.
pub fn qmp_schema(binary: &Path) -> Result<Value, CheckCompatError> {
    let name = binary.display().to_string();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vroom-qmp-schema-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|source| CheckCompatError::Start {
        binary: name.clone(),
        source,
    })?;
    let socket = dir.join("qmp.sock");
    let mut command = std::process::Command::new(binary);
    if let Some(prefix) = crate::vmm::prefix_of(binary) {
        command.envs(crate::vmm::env_in(&prefix));
    }
    let child = command
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(source) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(CheckCompatError::Start {
                binary: name,
                source,
            });
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = loop {
        let gone = child.try_wait().ok().flatten().is_some();
        if socket.exists() {
            // The file appears at bind(), before QEMU listens: a refused
            // connection is tried again until the deadline.
            match Session::connect(&socket) {
                Ok(mut qmp) => {
                    break qmp
                        .execute("query-qmp-schema", Value::Null)
                        .map_err(|source| CheckCompatError::Schema {
                            binary: name.clone(),
                            source,
                        })
                }
                Err(source) if gone || Instant::now() > deadline => {
                    break Err(CheckCompatError::Schema {
                        binary: name.clone(),
                        source,
                    })
                }
                Err(_) => {}
            }
        }
        if Instant::now() > deadline || gone {
            break Err(CheckCompatError::NoSocket {
                binary: name.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every command the crate's sources send is in [`QMP`], so the check
    /// covers what vroom really uses.
    #[test]
    fn every_command_sent_is_listed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut sent = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap() == "compat.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            for pattern in [
                "execute(\n",
                "execute(",
                "execute_with_fd(",
                "qmp::execute(&",
            ] {
                for piece in code.split(pattern).skip(1) {
                    // The first string literal is the command (after the
                    // socket, for `qmp::execute`).
                    let Some(literal) = piece.split('"').nth(1) else {
                        continue;
                    };
                    let head = piece.split('"').next().unwrap_or_default();
                    if head.contains(';') || head.contains('{') {
                        continue;
                    }
                    sent.insert(literal.to_string());
                }
            }
        }
        assert!(sent.contains("blockdev-mirror"), "the scan works: {sent:?}");
        let listed: Vec<&str> = QMP.iter().map(|(c, _)| *c).collect();
        for command in &sent {
            assert!(
                listed.contains(&command.as_str()),
                "{command} is sent but not in compat::QMP"
            );
        }
    }

    /// The QEMUs on this machine (Debian's, and the QEMU 10 prefix that
    /// `vroom setup --qemu 10` unpacks) have everything vroom uses.
    #[test]
    fn the_installed_qemus_have_everything_vroom_uses() {
        let installed: Vec<&Path> = [
            "/usr/bin/qemu-system-x86_64",
            "/var/cache/vroom/qemu/10/usr/bin/qemu-system-x86_64",
        ]
        .into_iter()
        .map(Path::new)
        .filter(|p| p.exists())
        .collect();
        for binary in installed {
            let lacks = missing(binary).unwrap();
            assert!(lacks.is_empty(), "{} lacks {lacks:?}", binary.display());
        }
    }

    #[test]
    fn a_schema_without_a_command_or_an_argument_is_reported() {
        let mut schema = vec![];
        for (command, args) in QMP {
            let arg_type = format!("args-{command}");
            schema.push(json!({"name": command, "meta-type": "command", "arg-type": arg_type}));
            let members: Vec<Value> = args.iter().map(|a| json!({"name": a})).collect();
            schema.push(json!({"name": arg_type, "meta-type": "object", "members": members}));
        }
        // Replies: the command's ret-type, members typed by name.
        for (command, paths) in QMP_REPLIES {
            let entry = schema
                .iter_mut()
                .find(|e| e["name"] == *command && e["meta-type"] == "command")
                .unwrap();
            entry["ret-type"] = json!(format!("ret-{command}"));
            // Paths that share their first member (`stats.a`, `stats.b`)
            // share its type.
            let mut by_first: Vec<(&str, Vec<Value>)> = vec![];
            for path in *paths {
                let (first, rest) = path.split_once('.').unwrap_or((path, ""));
                let at = match by_first.iter().position(|(f, _)| *f == first) {
                    Some(at) => at,
                    None => {
                        by_first.push((first, vec![]));
                        by_first.len() - 1
                    }
                };
                if !rest.is_empty() {
                    by_first[at].1.push(json!({"name": rest, "type": "str"}));
                }
            }
            let mut members = vec![];
            for (first, inner) in by_first {
                let ty = format!("ret-{command}-{first}");
                members.push(json!({"name": first, "type": ty}));
                schema.push(json!({"name": ty, "meta-type": "object", "members": inner}));
            }
            schema.push(json!({"name": format!("ret-{command}"), "meta-type": "object", "members": members}));
        }
        assert_eq!(
            missing_from_schema(&Value::Array(schema.clone())),
            Vec::<String>::new()
        );
        // A deprecated argument is reported as such.
        let mut old = schema.clone();
        for e in &mut old {
            if e["name"] == "args-migrate" {
                e["members"] = json!([{"name": "uri", "features": ["deprecated"]}]);
            }
        }
        assert_eq!(
            missing_from_schema(&Value::Array(old)),
            vec!["QMP migrate argument uri is deprecated".to_string()]
        );
        // Unstable: x-blockdev-change is, in 7.2 and 10.0, and accepted;
        // another command or argument that becomes unstable is reported.
        let mut unstable = schema.clone();
        for e in &mut unstable {
            if ["x-blockdev-change", "block-job-resume"].contains(&e["name"].as_str().unwrap()) {
                e["features"] = json!(["unstable"]);
            }
            if e["name"] == "args-blockdev-mirror" {
                e["members"][0]["features"] = json!(["unstable"]);
            }
        }
        assert_eq!(
            missing_from_schema(&Value::Array(unstable)),
            vec![
                "QMP blockdev-mirror argument job-id is unstable".to_string(),
                "QMP command block-job-resume is unstable".to_string(),
            ]
        );
        // blockdev-mirror without copy-mode, and no x-blockdev-change.
        let changed: Vec<Value> = schema
            .iter()
            .filter(|e| e["name"] != "x-blockdev-change")
            .map(|e| {
                let mut e = e.clone();
                if e["name"] == "args-blockdev-mirror" {
                    e["members"] = json!([{"name": "job-id"}, {"name": "device"}]);
                }
                e
            })
            .collect();
        let missing = missing_from_schema(&Value::Array(changed));
        assert!(missing.contains(&"QMP blockdev-mirror argument copy-mode".to_string()));
        assert!(missing.contains(&"QMP command x-blockdev-change".to_string()));
        // A member found in a union's variant counts.
        let union = json!([
            {"name": "blockdev-add", "meta-type": "command", "arg-type": "opts"},
            {"name": "opts", "meta-type": "object", "members": [{"name": "driver"}],
             "variants": [{"case": "nbd", "type": "nbd-opts"}]},
            {"name": "nbd-opts", "meta-type": "object", "members": [{"name": "server"}]},
        ]);
        let missing = missing_from_schema(&union);
        assert!(!missing.iter().any(|m| m.ends_with("argument server")));
        assert!(missing.iter().any(|m| m.ends_with("argument export")));
    }

    /// The host's QEMU (Debian 12's 7.2 on our machines) has everything;
    /// `crates/vroom/tests/qemu10.rs` checks QEMU 10.
    #[test]
    fn the_hosts_qemu_has_what_vroom_uses() {
        let binary = crate::vmm::locate(None).expect("qemu-system-x86_64 on PATH (vroom setup)");
        assert_eq!(missing(&binary).unwrap(), Vec::<String>::new());
    }
}
