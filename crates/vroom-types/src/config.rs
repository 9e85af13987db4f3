use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::InvalidInputError;

/// An appliance's configuration: flat keys to string values, as stored on the
/// config volume and rendered into the appliance's templates.
pub type ConfigValues = BTreeMap<String, String>;

const MAX_KEY_LEN: usize = 64;
/// Values are small by design: the whole volume is a 1.44 MB floppy.
pub const MAX_VALUE_LEN: usize = 4096;

/// A request to change some config values of an instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    /// Keys to set, with their new values.
    pub set: ConfigValues,
}

/// What made a config version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ConfigOrigin {
    /// The image's seed config, when the instance was created.
    Create,
    /// `config set`.
    Set,
    /// `config import`: a whole config.
    Import,
    /// `config reset`: back to the seed config.
    Reset,
    /// `config rollback`: the values of an earlier version (`rollback_to`).
    Rollback,
}

/// One version of an instance's config, as kept in its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigVersion {
    /// Counts up from 1, the config the instance was created with.
    pub version: u64,
    /// When it was accepted, in seconds since the Unix epoch.
    pub time: u64,
    pub origin: ConfigOrigin,
    /// For a rollback: the version whose values it restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    /// The keys whose value differs from the version before.
    pub changed: Vec<String>,
    pub values: ConfigValues,
}

/// A line of `config history`: a version without its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigVersionSummary {
    pub version: u64,
    pub time: u64,
    pub origin: ConfigOrigin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<u64>,
    pub changed: Vec<String>,
}

/// The body of `GET /v1/instances/{name}/config/history`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigHistory {
    /// The version in force.
    pub current: u64,
    pub versions: Vec<ConfigVersionSummary>,
}

/// One key that differs between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigChange {
    pub key: String,
    /// The value in the older version; absent when the key was added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// The value in the newer version; absent when the key was removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
}

/// The body of `GET /v1/instances/{name}/config/diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConfigDiff {
    pub from: u64,
    pub to: u64,
    pub changes: Vec<ConfigChange>,
}

/// The body of `POST /v1/instances/{name}/config/rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigRollback {
    /// The version whose values to restore; the one before the current when absent.
    #[serde(default, deserialize_with = "crate::json_int::optional")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub version: Option<u64>,
}

/// The keys that differ between two configs, in key order.
pub fn config_diff(old: &ConfigValues, new: &ConfigValues) -> Vec<ConfigChange> {
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| ConfigChange {
            key: k.clone(),
            old: old.get(k).cloned(),
            new: new.get(k).cloned(),
        })
        .collect()
}

/// An instance's config history as the daemon stores it: the versions kept,
/// oldest first, and a change that was sent to the guest but not yet
/// recorded as accepted (`pending`). A daemon that dies between the guest's
/// acknowledgement and the record finds `pending` at the next start and
/// settles it by comparing it with the config the guest (or the volume) has.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConfigLog {
    pub versions: Vec<ConfigVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<ConfigVersion>,
    /// The version in force when it is not the newest: a restore or an
    /// ephemeral restart went back to an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force: Option<u64>,
}

impl ConfigLog {
    /// How many versions are kept; older ones are dropped.
    pub const KEEP: usize = 32;

    /// A history whose first version is the config an instance was created with.
    pub fn start(values: ConfigValues, time: u64) -> Self {
        ConfigLog {
            versions: vec![ConfigVersion {
                version: 1,
                time,
                origin: ConfigOrigin::Create,
                rollback_to: None,
                changed: values.keys().cloned().collect(),
                values,
            }],
            pending: None,
            in_force: None,
        }
    }

    /// The version in force.
    pub fn current(&self) -> Option<&ConfigVersion> {
        self.in_force
            .and_then(|v| self.get(v))
            .or_else(|| self.versions.last())
    }

    /// Makes a kept version the one in force again without a new version
    /// (its values came back with the VM's state or its seed). Returns
    /// whether `version` is kept.
    pub fn back_to(&mut self, version: u64) -> bool {
        if self.get(version).is_none() {
            return false;
        }
        let newest = self.versions.last().map(|v| v.version);
        self.in_force = (newest != Some(version)).then_some(version);
        true
    }

    /// Makes the newest kept version with exactly these values the one in
    /// force; false when none has them.
    pub fn back_to_values(&mut self, values: &ConfigValues) -> bool {
        let found = self
            .versions
            .iter()
            .rev()
            .find(|v| &v.values == values)
            .map(|v| v.version);
        found.is_some_and(|v| self.back_to(v))
    }

    pub fn get(&self, version: u64) -> Option<&ConfigVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The version before the current one, if it is still kept.
    pub fn previous(&self) -> Option<&ConfigVersion> {
        let current = self.current()?.version;
        self.versions.iter().rev().find(|v| v.version < current)
    }

    /// The version a change to `values` would become; `None` when nothing
    /// changes, since that is no new version.
    pub fn propose(
        &self,
        values: ConfigValues,
        origin: ConfigOrigin,
        rollback_to: Option<u64>,
        time: u64,
    ) -> Option<ConfigVersion> {
        let empty = ConfigValues::new();
        let current = self.current().map_or(&empty, |c| &c.values);
        let changed: Vec<String> = config_diff(current, &values)
            .into_iter()
            .map(|c| c.key)
            .collect();
        if changed.is_empty() && self.current().is_some() {
            return None;
        }
        let last = self.versions.last().map_or(0, |c| c.version);
        let pending = self.pending.as_ref().map_or(0, |p| p.version);
        Some(ConfigVersion {
            version: last.max(pending) + 1,
            time,
            origin,
            rollback_to,
            changed,
            values,
        })
    }

    /// Records an accepted version, drops the oldest beyond [`Self::KEEP`]
    /// and forgets the pending change.
    pub fn commit(&mut self, version: ConfigVersion) {
        self.pending = None;
        self.in_force = None;
        self.versions.push(version);
        let excess = self.versions.len().saturating_sub(Self::KEEP);
        self.versions.drain(..excess);
    }

    pub fn history(&self) -> ConfigHistory {
        ConfigHistory {
            current: self.current().map_or(0, |c| c.version),
            versions: self
                .versions
                .iter()
                .map(|v| ConfigVersionSummary {
                    version: v.version,
                    time: v.time,
                    origin: v.origin,
                    rollback_to: v.rollback_to,
                    changed: v.changed.clone(),
                })
                .collect(),
        }
    }
}

/// Config keys are `[a-z][a-z0-9_.-]*`, at most 64 characters.
pub fn validate_config_key(key: &str) -> Result<(), InvalidInputError> {
    let reason = if key.is_empty() {
        Some("must not be empty")
    } else if key.len() > MAX_KEY_LEN {
        Some("must be at most 64 characters")
    } else if !key.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("must start with a lowercase letter")
    } else if !key
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
    {
        Some("may only contain lowercase letters, digits, '_', '.' and '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidInputError::ConfigKey {
            key: key.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Config values are printable text of at most 4096 bytes.
pub fn validate_config_value(key: &str, value: &str) -> Result<(), InvalidInputError> {
    // Counted in characters, as the API document's `maxLength` counts.
    let reason = if value.chars().count() > MAX_VALUE_LEN {
        Some("must be at most 4096 characters")
    } else if value.chars().any(|c| c.is_control() && c != '\t') {
        Some("must not contain control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidInputError::ConfigValue {
            key: key.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Parses `KEY=VALUE` as typed on the command line.
pub fn parse_assignment(raw: &str) -> Result<(String, String), InvalidInputError> {
    let (key, value) = raw
        .split_once('=')
        .ok_or_else(|| InvalidInputError::ConfigAssignment {
            raw: raw.to_string(),
        })?;
    validate_config_key(key)?;
    validate_config_value(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_table() {
        let cases: &[(&str, bool)] = &[
            ("greeting", true),
            ("dns.server_1", true),
            ("a-b", true),
            ("", false),
            ("Greeting", false),
            ("1x", false),
            ("a b", false),
            ("a/b", false),
        ];
        for (key, ok) in cases {
            assert_eq!(validate_config_key(key).is_ok(), *ok, "key {key:?}");
        }
    }

    fn values(pairs: &[(&str, &str)]) -> ConfigValues {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn diff_names_added_changed_and_removed_keys() {
        let old = values(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let new = values(&[("a", "1"), ("b", "20"), ("d", "4")]);
        let diff = config_diff(&old, &new);
        let got: Vec<(&str, Option<&str>, Option<&str>)> = diff
            .iter()
            .map(|c| (c.key.as_str(), c.old.as_deref(), c.new.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("b", Some("2"), Some("20")),
                ("c", Some("3"), None),
                ("d", None, Some("4")),
            ]
        );
        assert!(config_diff(&new, &new).is_empty());
    }

    #[test]
    fn history_counts_up_skips_no_ops_and_keeps_the_newest() {
        let mut log = ConfigLog::start(values(&[("a", "0")]), 10);
        assert_eq!(log.current().unwrap().version, 1);
        assert_eq!(
            log.propose(values(&[("a", "0")]), ConfigOrigin::Set, None, 11),
            None,
            "an unchanged config is no new version"
        );
        for i in 1..=40u64 {
            let v = log
                .propose(
                    values(&[("a", &i.to_string())]),
                    ConfigOrigin::Set,
                    None,
                    10 + i,
                )
                .unwrap();
            assert_eq!(v.version, i + 1);
            assert_eq!(v.changed, vec!["a".to_string()]);
            log.commit(v);
        }
        assert_eq!(log.versions.len(), ConfigLog::KEEP);
        assert_eq!(log.current().unwrap().version, 41);
        assert_eq!(log.previous().unwrap().version, 40);
        assert_eq!(log.versions[0].version, 41 - ConfigLog::KEEP as u64 + 1);
        assert!(log.get(1).is_none(), "the oldest were dropped");
        assert_eq!(log.get(30).unwrap().values, values(&[("a", "29")]));
        let history = log.history();
        assert_eq!(history.current, 41);
        assert_eq!(history.versions.len(), ConfigLog::KEEP);
    }

    #[test]
    fn a_pending_change_reserves_its_number_until_settled() {
        let mut log = ConfigLog::start(values(&[("a", "0")]), 1);
        let v2 = log
            .propose(values(&[("a", "1")]), ConfigOrigin::Set, None, 2)
            .unwrap();
        log.pending = Some(v2.clone());
        let next = log
            .propose(values(&[("a", "2")]), ConfigOrigin::Set, None, 3)
            .unwrap();
        assert_eq!(
            next.version, 3,
            "never reuses a number that may be in a guest"
        );
        log.commit(v2);
        assert_eq!(log.pending, None);
        assert_eq!(log.current().unwrap().version, 2);
        let json = serde_json::to_string(&log).unwrap();
        assert_eq!(serde_json::from_str::<ConfigLog>(&json).unwrap(), log);
    }

    #[test]
    fn assignments_table() {
        assert_eq!(
            parse_assignment("greeting=hi there").unwrap(),
            ("greeting".into(), "hi there".into())
        );
        assert_eq!(
            parse_assignment("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert_eq!(parse_assignment("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_assignment("novalue").is_err());
        assert!(parse_assignment("a=line\nbreak").is_err());
        assert!(parse_assignment(&format!("a={}", "x".repeat(5000))).is_err());
    }
}
