//! Appliance templates: MiniJinja (Jinja2 syntax) files that vroom-init renders
//! into the services' own config files at boot and after every config change.
//!
//! A template sees:
//! - every config key whose name is an identifier, as a typed value (see
//!   [`ConfigField::template_value`](crate::ConfigField::template_value));
//! - `config`: all config keys, for names such as `dns.server`;
//! - `nics`: the attached NICs by role, each with `dev`, `ip`, `prefix`,
//!   `cidr` (the network, e.g. `10.0.1.0/24`), `netmask`, `gateway` (empty
//!   when none) and `mac`;
//! - `hostname`.
//!
//! Two filters are added to MiniJinja's builtins: `cidr | host(n)` is the n-th
//! address of a subnet, e.g. `{{ nics.lan.cidr | host(100) }}` is `10.0.1.100`;
//! `value | shell` quotes a value as one shell word.
//!
//! Block tags eat their own line (`trim_blocks`, `lstrip_blocks`), so loops in
//! config files read naturally. Printing an undefined name is an error, which
//! the builder turns into a failed build; `{% if nics.dmz %}` is allowed.
//! Files ending in `.html` or `.xml` are HTML-escaped.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value};
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::{ConfigSchema, ConfigValues, TemplateSpec};

/// Names a config key may not take because templates use them.
pub const RESERVED_TEMPLATE_NAMES: &[&str] = &["config", "nics", "hostname"];

/// One attached NIC as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateNic {
    /// The interface name in the guest (the role, e.g. `lan`).
    pub dev: String,
    pub ip: String,
    pub prefix: u8,
    pub cidr: String,
    pub netmask: String,
    pub gateway: String,
    pub mac: String,
}

impl TemplateNic {
    /// An L2 port: a name and a MAC, no address.
    pub fn l2(dev: &str, mac: &str) -> Self {
        TemplateNic {
            dev: dev.to_string(),
            ip: String::new(),
            prefix: 0,
            cidr: String::new(),
            netmask: String::new(),
            gateway: String::new(),
            mac: mac.to_string(),
        }
    }

    pub fn new(dev: &str, ip: Ipv4Addr, prefix: u8, gateway: Option<Ipv4Addr>, mac: &str) -> Self {
        let net = Ipv4Net::new(ip, prefix.min(32)).unwrap_or_default();
        TemplateNic {
            dev: dev.to_string(),
            ip: ip.to_string(),
            prefix,
            cidr: net.trunc().to_string(),
            netmask: net.netmask().to_string(),
            gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
            mac: mac.to_string(),
        }
    }
}

/// Everything a template can refer to.
pub struct TemplateContext {
    root: serde_json::Map<String, serde_json::Value>,
}

impl TemplateContext {
    pub fn new(
        schema: &ConfigSchema,
        values: &ConfigValues,
        nics: &BTreeMap<String, TemplateNic>,
        hostname: &str,
    ) -> Self {
        let typed: serde_json::Map<String, serde_json::Value> = values
            .iter()
            .map(|(key, raw)| {
                let value = match schema.get(key) {
                    Some(field) => field.template_value(raw),
                    None => serde_json::Value::from(raw.as_str()),
                };
                (key.clone(), value)
            })
            .collect();
        let mut root = serde_json::Map::new();
        for (key, value) in &typed {
            let identifier = key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if identifier && !RESERVED_TEMPLATE_NAMES.contains(&key.as_str()) {
                root.insert(key.clone(), value.clone());
            }
        }
        root.insert("config".into(), serde_json::Value::Object(typed));
        root.insert(
            "nics".into(),
            serde_json::to_value(nics).unwrap_or_default(),
        );
        root.insert("hostname".into(), hostname.into());
        TemplateContext { root }
    }
}

impl TemplateSpec {
    /// Renders the template; the error names the file and line.
    pub fn render(&self, ctx: &TemplateContext) -> Result<String, String> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.add_filter("host", host_filter);
        env.add_filter("shell", |value: String| shell_quote(&value));
        env.render_named_str(&self.path, &self.template, Value::from(Serde(&ctx.root)))
            .map_err(|e| match e.line() {
                Some(line) => format!("{} line {line}: {}", self.path, e.kind_and_detail()),
                None => format!("{}: {}", self.path, e.kind_and_detail()),
            })
    }
}

fn host_filter(cidr: String, n: u32) -> Result<String, minijinja::Error> {
    let invalid = |msg: String| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg);
    let net: Ipv4Net = cidr
        .parse()
        .map_err(|_| invalid(format!("host: {cidr:?} is not a CIDR")))?;
    let net = net.trunc();
    let ip = u32::from(net.network()).checked_add(n).map(Ipv4Addr::from);
    match ip {
        Some(ip) if n > 0 && net.contains(&ip) && ip != net.broadcast() => Ok(ip.to_string()),
        _ => Err(invalid(format!("host: {net} has no host number {n}"))),
    }
}

/// One POSIX shell word: single quotes, with embedded ones closed and escaped.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

trait KindAndDetail {
    fn kind_and_detail(&self) -> String;
}

impl KindAndDetail for minijinja::Error {
    fn kind_and_detail(&self) -> String {
        match self.detail() {
            Some(detail) => format!("{} ({detail})", self.kind()),
            None => self.kind().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConfigField, FieldType};

    fn ctx(values: &[(&str, &str)]) -> TemplateContext {
        let schema: ConfigSchema = [
            (
                "forward".to_string(),
                ConfigField {
                    kind: FieldType::Forward,
                    list: true,
                    ..ConfigField::default()
                },
            ),
            (
                "dhcp".to_string(),
                ConfigField {
                    kind: FieldType::Bool,
                    ..ConfigField::default()
                },
            ),
        ]
        .into();
        let values: ConfigValues = values
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let nics = [(
            "lan".to_string(),
            TemplateNic::new(
                "lan",
                "10.0.1.1".parse().unwrap(),
                24,
                None,
                "52:54:00:00:00:01",
            ),
        )]
        .into();
        TemplateContext::new(&schema, &values, &nics, "fw")
    }

    fn render(path: &str, template: &str, ctx: &TemplateContext) -> Result<String, String> {
        TemplateSpec {
            path: path.into(),
            template: template.into(),
        }
        .render(ctx)
    }

    #[test]
    fn renders_typed_values_nics_and_loops() {
        let c = ctx(&[
            ("greeting", "<hi>"),
            ("forward", "8080:10.0.2.10:80,udp/53:10.0.2.11"),
            ("dhcp", "false"),
            ("dns.server", "1.1.1.1"),
        ]);
        let cases: &[(&str, &str, &str)] = &[
            ("/run/a.html", "<h1>{{ greeting }}</h1>", "<h1>&lt;hi&gt;</h1>"),
            ("/run/a.conf", "{{ greeting }}", "<hi>"),
            (
                "/run/a.conf",
                "{% for f in forward %}\n{{ f.proto }} {{ f.port }} -> {{ f.to_ip }}:{{ f.to_port }}\n{% endfor %}\n",
                "tcp 8080 -> 10.0.2.10:80\nudp 53 -> 10.0.2.11:53\n",
            ),
            ("/run/a.conf", "{% if dhcp %}on{% else %}off{% endif %}", "off"),
            ("/run/a.conf", "{{ config['dns.server'] }}", "1.1.1.1"),
            ("/run/a.conf", "{{ nics.lan.dev }} {{ nics.lan.cidr }}", "lan 10.0.1.0/24"),
            ("/run/a.conf", "{% if nics.dmz %}dmz{% endif %}-", "-"),
            ("/run/a.conf", "{{ hostname }}", "fw"),
            ("/run/a.conf", "{{ nics.lan.cidr | host(100) }}", "10.0.1.100"),
            ("/run/a.sh", "x {{ greeting | shell }}", "x '<hi>'"),
            ("/run/a.sh", "{{ \"it's; rm\" | shell }}", r"'it'\''s; rm'"),
        ];
        for (path, template, want) in cases {
            assert_eq!(render(path, template, &c).unwrap(), *want, "{template:?}");
        }
    }

    /// The host's `KEY in nics.ROLE` rule accepts exactly the host numbers
    /// the guest's `host` filter can render, so a change the host lets
    /// through never fails on that in the guest.
    #[test]
    fn subnet_rules_agree_with_the_host_filter() {
        use crate::{check_rules, ConfigRule};
        let schema: ConfigSchema = [(
            "first".to_string(),
            ConfigField {
                kind: FieldType::Int,
                ..ConfigField::default()
            },
        )]
        .into();
        let rules = [ConfigRule {
            rule: "first in nics.lan".into(),
            when: None,
        }];
        for prefix in 22..=31u8 {
            let nic = TemplateNic::new("lan", "10.0.4.1".parse().unwrap(), prefix, None, "m");
            let nets = [("lan".to_string(), nic.cidr.parse().unwrap())].into();
            let nics = [("lan".to_string(), nic)].into();
            for n in 0..=1100u32 {
                let values: ConfigValues = [("first".to_string(), n.to_string())].into();
                let ctx = TemplateContext::new(&schema, &values, &nics, "fw");
                let rendered = render("/run/a", "{{ nics.lan.cidr | host(first) }}", &ctx);
                let allowed = check_rules(&rules, &schema, &values, &nets);
                assert_eq!(
                    allowed.is_ok(),
                    rendered.is_ok(),
                    "/{prefix} host {n}: rule {allowed:?}, template {rendered:?}"
                );
            }
        }
    }

    #[test]
    fn undefined_names_and_syntax_errors_fail_with_the_line() {
        let c = ctx(&[]);
        let err = render("/run/a.conf", "ok\n{{ greting }}", &c).unwrap_err();
        assert!(err.starts_with("/run/a.conf line 2:"), "{err}");
        let err = render("/run/a.conf", "{% for %}", &c).unwrap_err();
        assert!(err.contains("syntax error"), "{err}");
        assert!(render("/run/a.conf", "{{ nics.dmz.ip }}", &c).is_err());
        let err = render("/run/a.conf", "{{ nics.lan.cidr | host(255) }}", &c).unwrap_err();
        assert!(err.contains("10.0.1.0/24 has no host number 255"), "{err}");
    }
}
