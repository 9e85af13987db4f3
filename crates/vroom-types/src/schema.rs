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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// A service's address: `IP:PORT`, e.g. `10.0.2.10:80`.
    Endpoint,
}

/// One config key's type and constraints.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The value is a secret (a password): `vroom config get`, `inspect`
    /// and `config diff` show `********` in its place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
}

/// What `vroom config get`, `inspect` and diffs show for a secret value.
pub const SECRET_MASK: &str = "********";

/// A port forward as templates see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Forward {
    proto: &'static str,
    port: u16,
    to_ip: Ipv4Addr,
    to_port: u16,
}

impl ConfigField {
    /// The value as shown to people: a secret one is masked unless it is
    /// empty (an unset secret is no secret, and shows that it is unset).
    pub fn shown<'a>(&self, value: &'a str) -> &'a str {
        if self.secret && !value.is_empty() {
            SECRET_MASK
        } else {
            value
        }
    }

    /// Checks a stored value; the error reads after the key, e.g. "must be an integer".
    pub fn check(&self, value: &str) -> Result<(), String> {
        if !self.list {
            return self.check_item(value);
        }
        for item in list_items(value) {
            self.check_item(item).map_err(|reason| match self.secret {
                true => format!("an item {reason}"),
                false => format!("item {item:?} {reason}"),
            })?;
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
            FieldType::Endpoint => parse_endpoint(value).map(|_| ()),
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
            FieldType::Endpoint => parse_endpoint(value)
                .ok()
                .map(|(ip, port)| json!({ "ip": ip.to_string(), "port": port })),
            FieldType::String | FieldType::Ipv4 => None,
        };
        parsed.unwrap_or_else(|| Value::from(value))
    }
}

/// The values as shown to people: every secret field's value masked (see
/// [`ConfigField::shown`]); keys the schema does not know are shown as they are.
pub fn shown_config(schema: &ConfigSchema, values: &ConfigValues) -> ConfigValues {
    values
        .iter()
        .map(|(key, value)| {
            let shown = schema.get(key).map_or(value.as_str(), |f| f.shown(value));
            (key.clone(), shown.to_string())
        })
        .collect()
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
        // An error names the value, but not a secret one: errors are shown
        // and may be logged.
        field
            .check(value)
            .map_err(|reason| InvalidInputError::ConfigType {
                key: key.clone(),
                value: field.shown(value).to_string(),
                reason,
            })?;
    }
    Ok(())
}

/// Every key of the schema must have a value: a whole config (import,
/// reset) that leaves one out could not render.
pub fn check_complete(
    schema: &ConfigSchema,
    values: &ConfigValues,
) -> Result<(), InvalidInputError> {
    let missing: Vec<&str> = schema
        .keys()
        .filter(|k| !values.contains_key(*k))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(InvalidInputError::MissingConfigKeys {
        missing: missing.join(", "),
    })
}

/// A cross-field rule of a config schema, e.g. `dhcp_first <= dhcp_last` or
/// `dhcp_first in nics.lan`, checked on the host before a change reaches the
/// guest (and by the guest again). See docs/recipes.md for the grammar.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConfigRule {
    /// `A <= B`, `A < B` (integer or port keys), or `A in nics.ROLE` (the
    /// value lies inside the subnet of the NIC with that role).
    pub rule: String,
    /// A bool key: the rule applies only while it is `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

/// A rule, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RuleExpr<'a> {
    /// `left <= right`, or `left < right` when `strict`.
    Order {
        left: &'a str,
        right: &'a str,
        strict: bool,
    },
    /// `key in nics.role`.
    InSubnet { key: &'a str, role: &'a str },
}

fn parse_rule(rule: &str) -> Result<RuleExpr<'_>, String> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    match words.as_slice() {
        [left, op @ ("<=" | "<"), right] => Ok(RuleExpr::Order {
            left,
            right,
            strict: *op == "<",
        }),
        [key, "in", nics] => match nics.strip_prefix("nics.") {
            Some(role) if !role.is_empty() => Ok(RuleExpr::InSubnet { key, role }),
            _ => Err(format!("{nics:?} must name a NIC as nics.ROLE")),
        },
        _ => Err("must read KEY <= KEY, KEY < KEY or KEY in nics.ROLE".into()),
    }
}

impl ConfigRule {
    /// Checks the rule against a schema and the appliance's NIC roles, when
    /// the recipe is loaded.
    pub fn validate(&self, schema: &ConfigSchema, nic_roles: &[String]) -> Result<(), String> {
        let field = |key: &str| {
            schema
                .get(key)
                .ok_or_else(|| format!("{key:?} is not a config key"))
        };
        match parse_rule(&self.rule)? {
            RuleExpr::Order { left, right, .. } => {
                for key in [left, right] {
                    let f = field(key)?;
                    if !matches!(f.kind, FieldType::Int | FieldType::Port) || f.list {
                        return Err(format!("{key:?} must be a single int or port to compare"));
                    }
                }
            }
            RuleExpr::InSubnet { key, role } => {
                let f = field(key)?;
                if matches!(
                    f.kind,
                    FieldType::String | FieldType::Bool | FieldType::Port
                ) {
                    return Err(format!(
                        "{key:?} must be of type int, ipv4, cidr, forward or host to lie in a subnet"
                    ));
                }
                if !nic_roles.iter().any(|r| r == role) {
                    return Err(format!("the appliance has no NIC with role {role:?}"));
                }
            }
        }
        if let Some(when) = &self.when {
            let f = field(when)?;
            if f.kind != FieldType::Bool || f.list {
                return Err(format!("when: {when:?} must be a bool key"));
            }
        }
        Ok(())
    }

    /// Checks values that already passed [`check_config`]. `nics` maps each
    /// attached NIC's role to its subnet; a rule about a NIC that is not
    /// attached does not apply.
    pub fn check(
        &self,
        values: &ConfigValues,
        nics: &BTreeMap<String, Ipv4Net>,
        schema: &ConfigSchema,
    ) -> Result<(), InvalidInputError> {
        if let Some(when) = &self.when {
            if values.get(when).map(String::as_str) != Some("true") {
                return Ok(());
            }
        }
        let Ok(expr) = parse_rule(&self.rule) else {
            // Rules are validated when the recipe is loaded; an image that
            // carries a broken one anyway does not make every change fail.
            return Ok(());
        };
        let fail = |key: &str, value: &str, reason: String| InvalidInputError::ConfigType {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        match expr {
            RuleExpr::Order {
                left,
                right,
                strict,
            } => {
                let (Some(l), Some(r)) = (values.get(left), values.get(right)) else {
                    return Ok(());
                };
                let (Ok(a), Ok(b)) = (l.parse::<i64>(), r.parse::<i64>()) else {
                    return Ok(());
                };
                if (strict && a >= b) || (!strict && a > b) {
                    let bound = if strict { "below" } else { "at most" };
                    return Err(fail(left, l, format!("must be {bound} {right} ({r})")));
                }
            }
            RuleExpr::InSubnet { key, role } => {
                let (Some(value), Some(net)) = (values.get(key), nics.get(role)) else {
                    return Ok(());
                };
                let net = net.trunc();
                let kind = schema.get(key).map(|f| f.kind).unwrap_or_default();
                let field = schema.get(key).cloned().unwrap_or_default();
                let items: Vec<&str> = if field.list {
                    list_items(value).collect()
                } else {
                    vec![value.as_str()]
                };
                for item in items {
                    let inside = match kind {
                        FieldType::Int => item
                            .parse::<u32>()
                            .ok()
                            .and_then(|n| host_number(net, n))
                            .is_some(),
                        FieldType::Ipv4 => parse_ipv4(item).is_ok_and(|ip| net.contains(&ip)),
                        FieldType::Cidr => item
                            .parse::<Ipv4Net>()
                            .is_ok_and(|sub| net.contains(&sub.trunc())),
                        FieldType::Forward => {
                            parse_forward(item).is_ok_and(|f| net.contains(&f.to_ip))
                        }
                        FieldType::Host => parse_host(item).is_ok_and(|(_, ip)| net.contains(&ip)),
                        FieldType::Endpoint => {
                            parse_endpoint(item).is_ok_and(|(ip, _)| net.contains(&ip))
                        }
                        FieldType::String | FieldType::Bool | FieldType::Port => true,
                    };
                    if !inside {
                        let reason = match kind {
                            FieldType::Int => format!(
                                "must be a host number of {role}'s subnet {net} (1 to {})",
                                host_count(net)
                            ),
                            _ => format!("must lie inside {role}'s subnet {net}"),
                        };
                        let reason = if field.list {
                            format!("item {item:?} {reason}")
                        } else {
                            reason
                        };
                        return Err(fail(key, value, reason));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks every rule; the first that fails is the error.
pub fn check_rules(
    rules: &[ConfigRule],
    schema: &ConfigSchema,
    values: &ConfigValues,
    nics: &BTreeMap<String, Ipv4Net>,
) -> Result<(), InvalidInputError> {
    rules
        .iter()
        .try_for_each(|rule| rule.check(values, nics, schema))
}

/// The usable host numbers of a subnet: not the network, not the broadcast.
fn host_count(net: Ipv4Net) -> u32 {
    let size = 1u64 << (32 - u32::from(net.prefix_len()));
    size.saturating_sub(2).min(u64::from(u32::MAX)) as u32
}

/// The n-th address of a subnet, if it is a host address (the same rule as
/// the templates' `host` filter).
pub fn host_number(net: Ipv4Net, n: u32) -> Option<Ipv4Addr> {
    let net = net.trunc();
    let ip = u32::from(net.network())
        .checked_add(n)
        .map(Ipv4Addr::from)?;
    (n > 0 && net.contains(&ip) && ip != net.broadcast()).then_some(ip)
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

/// `IP:PORT`.
fn parse_endpoint(value: &str) -> Result<(Ipv4Addr, u16), String> {
    let usage = || "must look like IP:PORT, e.g. 10.0.2.10:80".to_string();
    let (ip, port) = value.split_once(':').ok_or_else(usage)?;
    Ok((
        parse_ipv4(ip).map_err(|_| usage())?,
        parse_port(port).map_err(|_| usage())?,
    ))
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
            (FieldType::Endpoint, false, "10.0.2.10:80", true),
            (
                FieldType::Endpoint,
                true,
                "10.0.2.10:80,10.0.2.11:8080",
                true,
            ),
            (FieldType::Endpoint, false, "10.0.2.10", false),
            (FieldType::Endpoint, false, "10.0.2.10:0", false),
            (FieldType::Endpoint, false, "web:80", false),
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

    fn fw_schema() -> ConfigSchema {
        [
            ("dhcp", field(FieldType::Bool, false)),
            ("dhcp_first", field(FieldType::Int, false)),
            ("dhcp_last", field(FieldType::Int, false)),
            ("dns", field(FieldType::Ipv4, true)),
            ("forward", field(FieldType::Forward, true)),
            ("hosts", field(FieldType::Host, true)),
            ("name", field(FieldType::String, false)),
            ("port", field(FieldType::Port, false)),
        ]
        .into_iter()
        .map(|(k, f)| (k.to_string(), f))
        .collect()
    }

    fn rule(rule: &str, when: Option<&str>) -> ConfigRule {
        ConfigRule {
            rule: rule.into(),
            when: when.map(str::to_string),
        }
    }

    #[test]
    fn rules_are_validated_against_schema_and_nics() {
        let roles = vec!["lan".to_string(), "wan".to_string()];
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            ("dhcp_first <= dhcp_last", Some("dhcp"), None),
            ("dhcp_first < port", None, None),
            ("dhcp_first in nics.lan", None, None),
            ("dns in nics.wan", None, None),
            ("forward in nics.lan", None, None),
            (
                "dhcp_first <= nope",
                None,
                Some("\"nope\" is not a config key"),
            ),
            (
                "dns <= dhcp_last",
                None,
                Some("must be a single int or port"),
            ),
            (
                "dhcp_first in nics.dmz",
                None,
                Some("no NIC with role \"dmz\""),
            ),
            (
                "dhcp_first in lan",
                None,
                Some("must name a NIC as nics.ROLE"),
            ),
            ("name in nics.lan", None, Some("must be of type int")),
            (
                "dhcp_first == dhcp_last",
                None,
                Some("must read KEY <= KEY"),
            ),
            (
                "dhcp_first <= dhcp_last",
                Some("name"),
                Some("must be a bool key"),
            ),
            (
                "dhcp_first <= dhcp_last",
                Some("gone"),
                Some("\"gone\" is not"),
            ),
        ];
        for (text, when, want) in cases {
            let got = rule(text, *when).validate(&fw_schema(), &roles);
            match want {
                None => assert!(got.is_ok(), "{text}: {got:?}"),
                Some(want) => {
                    let err = got.expect_err(text);
                    assert!(err.contains(want), "{text}: {err}");
                }
            }
        }
    }

    #[test]
    fn rules_table() {
        let nics: BTreeMap<String, Ipv4Net> =
            [("lan".to_string(), "10.0.1.1/24".parse().unwrap())].into();
        let base: ConfigValues = [
            ("dhcp", "true"),
            ("dhcp_first", "100"),
            ("dhcp_last", "199"),
            ("dns", ""),
            ("forward", ""),
            ("hosts", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // (rule, when, changes to the base values, expected error)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a [(&'a str, &'a str)],
            Option<&'a str>,
        );
        let cases: &[Case] = &[
            ("dhcp_first <= dhcp_last", None, &[], None),
            (
                "dhcp_first <= dhcp_last",
                None,
                &[("dhcp_first", "199")],
                None,
            ),
            (
                "dhcp_first <= dhcp_last",
                None,
                &[("dhcp_first", "200")],
                Some("must be at most dhcp_last (199)"),
            ),
            (
                "dhcp_first < dhcp_last",
                None,
                &[("dhcp_first", "199")],
                Some("must be below dhcp_last (199)"),
            ),
            (
                "dhcp_first <= dhcp_last",
                Some("dhcp"),
                &[("dhcp_first", "200"), ("dhcp", "false")],
                None,
            ),
            (
                "dhcp_first in nics.lan",
                None,
                &[("dhcp_first", "254")],
                None,
            ),
            (
                "dhcp_first in nics.lan",
                None,
                &[("dhcp_first", "300")],
                Some("must be a host number of lan's subnet 10.0.1.0/24 (1 to 254)"),
            ),
            (
                "dhcp_first in nics.lan",
                None,
                &[("dhcp_first", "255")],
                Some("host number"),
            ),
            (
                "dhcp_first in nics.dmz",
                None,
                &[("dhcp_first", "300")],
                None,
            ),
            (
                "dns in nics.lan",
                None,
                &[("dns", "10.0.1.5,10.0.1.6")],
                None,
            ),
            (
                "dns in nics.lan",
                None,
                &[("dns", "10.0.1.5,10.0.2.6")],
                Some("item \"10.0.2.6\" must lie inside lan's subnet 10.0.1.0/24"),
            ),
            (
                "forward in nics.lan",
                None,
                &[("forward", "80:10.0.1.9:8080")],
                None,
            ),
            (
                "forward in nics.lan",
                None,
                &[("forward", "80:10.9.1.9")],
                Some("must lie inside"),
            ),
            (
                "hosts in nics.lan",
                None,
                &[("hosts", "a.lan=10.0.3.1")],
                Some("must lie inside"),
            ),
        ];
        for (text, when, changes, want) in cases {
            let mut values = base.clone();
            for (k, v) in *changes {
                values.insert(k.to_string(), v.to_string());
            }
            let got = check_rules(&[rule(text, *when)], &fw_schema(), &values, &nics);
            match want {
                None => assert!(got.is_ok(), "{text} {changes:?}: {got:?}"),
                Some(want) => {
                    let err = got.expect_err(text).to_string();
                    assert!(err.contains(want), "{text} {changes:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn a_whole_config_must_name_every_key() {
        let schema = fw_schema();
        let err = check_complete(&schema, &ConfigValues::new()).unwrap_err();
        assert!(
            err.to_string().contains("dhcp, dhcp_first, dhcp_last"),
            "{err}"
        );
        let full: ConfigValues = schema.keys().map(|k| (k.clone(), String::new())).collect();
        assert!(check_complete(&schema, &full).is_ok());
    }

    #[test]
    fn secret_values_are_masked_for_people() {
        let secret = ConfigField {
            secret: true,
            ..field(FieldType::String, true)
        };
        let schema: ConfigSchema = [
            ("users".to_string(), secret.clone()),
            ("port".to_string(), field(FieldType::Port, false)),
        ]
        .into();
        // (key, stored value, shown)
        let cases = [
            ("users", "app:s3cret-pass", SECRET_MASK),
            ("users", "", ""),
            ("port", "5432", "5432"),
            ("unknown", "x", "x"),
        ];
        for (key, value, want) in cases {
            let values: ConfigValues = [(key.to_string(), value.to_string())].into();
            assert_eq!(shown_config(&schema, &values)[key], want, "{key}={value}");
        }
        // A refused value is not repeated in the error.
        let long = ConfigField {
            max_len: Some(4),
            ..secret.clone()
        };
        let schema: ConfigSchema = [("users".to_string(), long)].into();
        let values: ConfigValues = [("users".to_string(), "app:s3cret-pass".to_string())].into();
        let err = check_config(&schema, &values).unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
        // The checks and templates still see the value itself.
        assert!(secret.check("app:s3cret-pass").is_ok());
        assert_eq!(secret.template_value("a:b"), json!(["a:b"]));
    }

    /// Schemas without the flag (every image built before it) read and
    /// write as before: an image's id is its manifest's digest.
    #[test]
    fn the_secret_flag_is_optional_on_the_wire() {
        let old = r#"{"type":"string","max_len":10}"#;
        let parsed: ConfigField = serde_json::from_str(old).unwrap();
        assert!(!parsed.secret);
        assert_eq!(serde_json::to_string(&parsed).unwrap(), old);
        let secret: ConfigField =
            serde_json::from_str(r#"{"type":"string","secret":true}"#).unwrap();
        assert!(secret.secret);
        assert_eq!(
            serde_json::to_string(&secret).unwrap(),
            r#"{"type":"string","secret":true}"#
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
