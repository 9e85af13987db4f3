//! Typed config schemas: what `vroom config set` accepts for an appliance, and
//! how each value looks to the appliance's templates.
//!
//! Values are stored as strings on the config volume. A field of a list type
//! holds comma-separated items, each checked on its own; an empty string is the
//! empty list.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{ConfigValues, InvalidInputError};

/// The schema of an appliance's config, by key.
pub type ConfigSchema = BTreeMap<String, ConfigField>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    #[default]
    String,
    Int,
    Bool,
    Port,
    Ipv4,
    Cidr,
    /// A port forward: `[tcp/|udp/]PORT:IP[:PORT]`, e.g. `8080:10.0.2.10:80`.
    Forward,
    /// A host record: `NAME=IP`, e.g. `nas.lan=10.0.1.5`.
    Host,
}

/// One config key's type and constraints.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigField {
    #[serde(rename = "type")]
    pub kind: FieldType,
    /// Comma-separated items of `kind`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub list: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Integers: the smallest allowed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Integers: the largest allowed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// Strings: the longest allowed value, in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Strings: the allowed values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
}

/// A port forward as templates see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Forward {
    proto: &'static str,
    port: u16,
    to_ip: Ipv4Addr,
    to_port: u16,
}

impl ConfigField {
    /// Checks a stored value; the error reads after the key, e.g. "must be an integer".
    pub fn check(&self, value: &str) -> Result<(), String> {
        if !self.list {
            return self.check_item(value);
        }
        for item in list_items(value) {
            self.check_item(item)
                .map_err(|reason| format!("item {item:?} {reason}"))?;
        }
        Ok(())
    }

    fn check_item(&self, value: &str) -> Result<(), String> {
        match self.kind {
            FieldType::String => {
                if let Some(max) = self.max_len.filter(|m| value.chars().count() > *m) {
                    return Err(format!("must be at most {max} characters"));
                }
                if let Some(choices) = &self.choices {
                    if !choices.iter().any(|c| c == value) {
                        return Err(format!("must be one of {}", choices.join(", ")));
                    }
                }
                Ok(())
            }
            FieldType::Int => {
                let n: i64 = value
                    .parse()
                    .map_err(|_| "must be an integer".to_string())?;
                if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                    return Err(format!(
                        "must be between {} and {}",
                        self.min.map_or("-inf".into(), |m| m.to_string()),
                        self.max.map_or("inf".into(), |m| m.to_string())
                    ));
                }
                Ok(())
            }
            FieldType::Bool => match value {
                "true" | "false" => Ok(()),
                _ => Err("must be true or false".into()),
            },
            FieldType::Port => parse_port(value).map(|_| ()),
            FieldType::Ipv4 => parse_ipv4(value).map(|_| ()),
            FieldType::Cidr => value
                .parse::<Ipv4Net>()
                .map(|_| ())
                .map_err(|_| "must be an IPv4 CIDR such as 10.0.0.0/24".into()),
            FieldType::Forward => parse_forward(value).map(|_| ()),
            FieldType::Host => parse_host(value).map(|_| ()),
        }
    }

    /// The value as templates see it: numbers, booleans, lists and records
    /// where the type says so. Call it on checked values only; anything that
    /// does not parse is passed through as a string.
    pub fn template_value(&self, value: &str) -> Value {
        if self.list {
            return Value::Array(list_items(value).map(|i| self.item_value(i)).collect());
        }
        self.item_value(value)
    }

    fn item_value(&self, value: &str) -> Value {
        let parsed = match self.kind {
            FieldType::Int => value.parse::<i64>().ok().map(Value::from),
            FieldType::Port => parse_port(value).ok().map(Value::from),
            FieldType::Bool => value.parse::<bool>().ok().map(Value::from),
            FieldType::Cidr => value.parse::<Ipv4Net>().ok().map(|net| {
                json!({
                    "cidr": net.to_string(),
                    "network": net.network().to_string(),
                    "prefix": net.prefix_len(),
                    "netmask": net.netmask().to_string(),
                })
            }),
            FieldType::Forward => parse_forward(value).ok().map(|f| {
                json!({
                    "proto": f.proto,
                    "port": f.port,
                    "to_ip": f.to_ip.to_string(),
                    "to_port": f.to_port,
                })
            }),
            FieldType::Host => parse_host(value)
                .ok()
                .map(|(name, ip)| json!({ "name": name, "ip": ip.to_string() })),
            FieldType::String | FieldType::Ipv4 => None,
        };
        parsed.unwrap_or_else(|| Value::from(value))
    }
}

/// Checks a whole set of values against a schema: every key must be declared
/// and every value must pass its field's checks.
pub fn check_config(schema: &ConfigSchema, values: &ConfigValues) -> Result<(), InvalidInputError> {
    for (key, value) in values {
        let field = schema
            .get(key)
            .ok_or_else(|| InvalidInputError::UnknownConfigKey {
                key: key.clone(),
                known: schema.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        field
            .check(value)
            .map_err(|reason| InvalidInputError::ConfigType {
                key: key.clone(),
                value: value.clone(),
                reason,
            })?;
    }
    Ok(())
}

fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("must be a port number from 1 to 65535".into()),
    }
}

fn parse_ipv4(value: &str) -> Result<Ipv4Addr, String> {
    value
        .parse::<Ipv4Addr>()
        .map_err(|_| "must be an IPv4 address".into())
}

/// `[tcp/|udp/]PORT:IP[:PORT]`; the target port defaults to the outside one.
fn parse_forward(value: &str) -> Result<Forward, String> {
    let usage = || "must look like [tcp/|udp/]PORT:IP[:PORT], e.g. 8080:10.0.2.10:80".to_string();
    let (proto, rest) = match value.split_once('/') {
        Some(("tcp", rest)) => ("tcp", rest),
        Some(("udp", rest)) => ("udp", rest),
        Some(_) => return Err(usage()),
        None => ("tcp", value),
    };
    let mut parts = rest.split(':');
    let (Some(port), Some(ip)) = (parts.next(), parts.next()) else {
        return Err(usage());
    };
    let port = parse_port(port).map_err(|_| usage())?;
    let to_ip = parse_ipv4(ip).map_err(|_| usage())?;
    let to_port = match parts.next() {
        Some(p) => parse_port(p).map_err(|_| usage())?,
        None => port,
    };
    if parts.next().is_some() {
        return Err(usage());
    }
    Ok(Forward {
        proto,
        port,
        to_ip,
        to_port,
    })
}

/// `NAME=IP` where NAME is a DNS name.
fn parse_host(value: &str) -> Result<(&str, Ipv4Addr), String> {
    let usage = || "must look like NAME=IP, e.g. nas.lan=10.0.1.5".to_string();
    let (name, ip) = value.split_once('=').ok_or_else(usage)?;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(usage());
    }
    Ok((name, parse_ipv4(ip).map_err(|_| usage())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(kind: FieldType, list: bool) -> ConfigField {
        ConfigField {
            kind,
            list,
            ..ConfigField::default()
        }
    }

    #[test]
    fn values_table() {
        let cases: &[(FieldType, bool, &str, bool)] = &[
            (FieldType::Int, false, "42", true),
            (FieldType::Int, false, "4x", false),
            (FieldType::Bool, false, "true", true),
            (FieldType::Bool, false, "yes", false),
            (FieldType::Port, false, "0", false),
            (FieldType::Port, false, "65535", true),
            (FieldType::Ipv4, false, "10.0.0.1", true),
            (FieldType::Ipv4, false, "10.0.0", false),
            (FieldType::Cidr, false, "10.0.0.0/24", true),
            (FieldType::Forward, false, "8080:10.0.2.10:80", true),
            (FieldType::Forward, false, "udp/53:10.0.2.10", true),
            (FieldType::Forward, false, "sctp/53:10.0.2.10", false),
            (FieldType::Forward, false, "8080:10.0.2.10:80:1", false),
            (FieldType::Forward, false, "8080", false),
            (FieldType::Host, false, "nas.lan=10.0.1.5", true),
            (FieldType::Host, false, "-bad=10.0.1.5", false),
            (FieldType::Host, false, "nas", false),
            (FieldType::Forward, true, "", true),
            (FieldType::Forward, true, "80:10.0.0.2, 443:10.0.0.2", true),
            (FieldType::Forward, true, "80:10.0.0.2,nonsense", false),
        ];
        for (kind, list, value, ok) in cases {
            assert_eq!(
                field(*kind, *list).check(value).is_ok(),
                *ok,
                "{kind:?} list={list} {value:?}"
            );
        }
    }

    #[test]
    fn template_values_are_typed() {
        let forwards = field(FieldType::Forward, true).template_value("8080:10.0.2.10:80");
        assert_eq!(
            forwards,
            json!([{ "proto": "tcp", "port": 8080, "to_ip": "10.0.2.10", "to_port": 80 }])
        );
        assert_eq!(
            field(FieldType::Bool, false).template_value("true"),
            json!(true)
        );
        assert_eq!(field(FieldType::Int, true).template_value(""), json!([]));
        assert_eq!(
            field(FieldType::String, false).template_value("a,b"),
            json!("a,b")
        );
    }

    #[test]
    fn config_is_checked_against_the_schema() {
        let schema: ConfigSchema = [("port".to_string(), field(FieldType::Port, false))].into();
        let values = |k: &str, v: &str| -> ConfigValues { [(k.to_string(), v.to_string())].into() };
        assert!(check_config(&schema, &values("port", "80")).is_ok());
        let err = check_config(&schema, &values("port", "http")).unwrap_err();
        assert!(err.to_string().contains("must be a port number"), "{err}");
        let err = check_config(&schema, &values("prot", "80")).unwrap_err();
        assert!(err.to_string().contains("known: port"), "{err}");
    }
}
