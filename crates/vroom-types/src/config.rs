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
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigUpdate {
    /// Keys to set, with their new values.
    pub set: ConfigValues,
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
    let reason = if value.len() > MAX_VALUE_LEN {
        Some("must be at most 4096 bytes")
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
