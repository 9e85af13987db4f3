use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::InvalidInputError;

/// The longest name vroom accepts. Names end up inside file names and
/// interface-name hashes, so they stay short.
pub const MAX_NAME_LEN: usize = 32;

/// A validated name for an instance, a network or an image:
/// `[a-z][a-z0-9-]*`, at most 32 characters, not ending in `-`.
///
/// Because the alphabet excludes `/` and `.`, a `Name` can never traverse
/// paths when it is used as a file name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// [`Name::new`]'s rule as a regular expression, for the API document.
pub const NAME_PATTERN: &str = "^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$";

/// Written by hand so that the document states the same rule as [`Name::new`].
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some(
                "Lowercase letters, digits and '-', starting with a letter and not ending in '-'.",
            ))
            .min_length(Some(1))
            .max_length(Some(MAX_NAME_LEN))
            .pattern(Some(NAME_PATTERN))
            .examples(["hello-1"])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Name {}

impl Name {
    pub fn new(raw: &str) -> Result<Self, InvalidInputError> {
        let reason = if raw.is_empty() {
            Some("must not be empty")
        } else if raw.len() > MAX_NAME_LEN {
            Some("must be at most 32 characters")
        } else if !raw.starts_with(|c: char| c.is_ascii_lowercase()) {
            Some("must start with a lowercase letter")
        } else if !raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            Some("may only contain lowercase letters, digits and '-'")
        } else if raw.ends_with('-') {
            Some("must not end with '-'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidInputError::Name {
                name: raw.to_string(),
                reason,
            }),
            None => Ok(Name(raw.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Name {
    type Err = InvalidInputError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

impl TryFrom<String> for Name {
    type Error = InvalidInputError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Name::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table() {
        let cases: &[(&str, bool)] = &[
            ("hello", true),
            ("hello-1", true),
            ("a", true),
            ("web2", true),
            ("", false),
            ("Hello", false),
            ("1abc", false),
            ("-abc", false),
            ("abc-", false),
            ("a_b", false),
            ("../etc", false),
            ("a/b", false),
            ("a.b", false),
            ("..", false),
            ("abcdefghijabcdefghijabcdefghijab", true),
            ("abcdefghijabcdefghijabcdefghijabc", false),
        ];
        let pattern = regex::Regex::new(NAME_PATTERN).unwrap();
        for (input, ok) in cases {
            assert_eq!(Name::new(input).is_ok(), *ok, "name {input:?}");
            assert_eq!(pattern.is_match(input), *ok, "pattern on {input:?}");
        }
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<Name>("\"../x\"").is_err());
        assert_eq!(
            serde_json::from_str::<Name>("\"ok\"").unwrap().as_str(),
            "ok"
        );
    }
}
