//! Recipes, format version 1: the declarative TOML description of an
//! appliance that the builder turns into an image. See `docs/recipes.md`.
//!
//! Loading a recipe validates all of it before anything is built, so a bad
//! recipe fails first with a precise message naming the field: unknown
//! fields, invalid names, config defaults that break their own schema,
//! templates that use undeclared keys, files outside the recipe's directory.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use vroom_core::error::chain;
use vroom_input::{open_input, read_input, OpenInputError};
use vroom_types::template::{TemplateContext, TemplateNic, RESERVED_TEMPLATE_NAMES};
use vroom_types::{
    check_rules, parse_mem_mib, validate_config_key, ApplianceSpec, ConfigField as SchemaField,
    ConfigRule, ConfigSchema, ConfigValues, FieldType, Name, ServiceSpec, TemplateSpec, VolumeDecl,
    MIN_MEM_MIB,
};

/// The NIC roles a recipe may declare.
pub const NIC_ROLES: &[&str] = &[
    "wan",
    "lan",
    "dmz",
    "outside",
    "inside",
    "mirror-sink",
    "mgmt",
];
const COMPONENTS: &[&str] = &["main", "contrib", "non-free", "non-free-firmware"];

/// The largest `recipe.toml` read.
pub const MAX_RECIPE_BYTES: u64 = 1 << 20;
/// The largest template read (templates travel inside the image's manifest).
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;
/// The largest file a recipe's `files` may copy into an image.
pub const MAX_SOURCE_BYTES: u64 = 64 << 20;
/// The most bytes of all files a recipe references, together.
pub const MAX_RECIPE_INPUT_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LoadRecipeError {
    #[error("cannot read recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: OpenInputError,
    },
    #[error("recipe {path} is not valid TOML for a vroom recipe: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("recipe {path}: {field}: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub version: String,
    pub debian: DebianSpec,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub dirs: Vec<String>,
    #[serde(default)]
    pub users: Vec<UserSpec>,
    /// Symbolic links, e.g. busybox applets (no maintainer script makes them).
    #[serde(default)]
    pub symlinks: Vec<SymlinkSpec>,
    #[serde(default)]
    pub services: Vec<RecipeService>,
    #[serde(default)]
    pub config: BTreeMap<String, ConfigField>,
    #[serde(default)]
    pub templates: Vec<RecipeTemplate>,
    #[serde(default)]
    pub nics: Vec<String>,
    pub memory: MemorySpec,
    pub health: Option<HealthSpec>,
    #[serde(default = "default_writable")]
    pub writable: Vec<String>,
    /// Kernel parameters vroom-init sets at boot.
    #[serde(default)]
    pub sysctl: BTreeMap<String, toml::Value>,
    /// Kernel modules the appliance needs, loaded at boot with their
    /// dependencies (the guest has no modprobe).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Cross-field rules of the config schema, e.g. `dhcp_first <= dhcp_last`.
    #[serde(default)]
    pub config_rules: Vec<ConfigRule>,
    /// A command (argv, `argv[0]` absolute) run in a clone before its
    /// services continue, e.g. to regenerate keys a copy must not share.
    #[serde(default)]
    pub on_clone: Vec<String>,
    /// Data volumes the appliance needs; `vroom run` creates what the user
    /// does not name.
    #[serde(default)]
    pub volumes: Vec<RecipeVolume>,
}

/// `[[volumes]]`: a data volume, e.g. `{ name = "data", path =
/// "/var/lib/postgresql", size = "1G" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeVolume {
    pub name: String,
    pub path: String,
    /// Default size, e.g. `1G` (see [`vroom_types::parse_volume_size_mib`]).
    pub size: String,
    #[serde(default)]
    pub fs: vroom_types::VolumeFs,
    /// Programs on it may run.
    #[serde(default)]
    pub exec: bool,
}

fn default_writable() -> Vec<String> {
    vec!["/run".into(), "/tmp".into(), "/var".into()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianSpec {
    pub suite: String,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    pub packages: Vec<PackageSpec>,
    /// Packages to leave out of the closure, with whatever only they needed.
    #[serde(default)]
    pub prune: Vec<String>,
}

fn default_components() -> Vec<String> {
    vec!["main".into()]
}

/// A package, by name or with paths to leave out of the image.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PackageSpec {
    Name(String),
    Detailed {
        name: String,
        #[serde(default)]
        exclude: Vec<String>,
    },
}

impl PackageSpec {
    pub fn name(&self) -> &str {
        match self {
            PackageSpec::Name(n) | PackageSpec::Detailed { name: n, .. } => n,
        }
    }
    pub fn excludes(&self) -> &[String] {
        match self {
            PackageSpec::Name(_) => &[],
            PackageSpec::Detailed { exclude, .. } => exclude,
        }
    }
}

/// An extra file: its content inline, or a `source` path inside the recipe's directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub path: String,
    pub source: Option<String>,
    pub content: Option<String>,
    /// Octal, e.g. "0755"; "0644" when absent.
    pub mode: Option<String>,
}

/// Links from each of `paths` to `target`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkSpec {
    pub target: String,
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    pub uid: u32,
    pub gid: Option<u32>,
    pub home: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    Never,
    /// Runs to completion (e.g. loading a ruleset): the appliance is ready
    /// only once it succeeded, and a config change waits for its rerun.
    Oneshot,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeService {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default = "always")]
    pub restart: RestartPolicy,
    /// Restart after a config change (for daemons that read their files once).
    #[serde(default)]
    pub restart_on_config: bool,
    /// Checks a rendered config before it is put in force, e.g.
    /// `["/usr/sbin/nft", "-c", "-f", "/run/firewall/nftables.conf"]`: an
    /// argument naming a template's path is given the staged copy instead.
    #[serde(default)]
    pub check: Vec<String>,
}

fn always() -> RestartPolicy {
    RestartPolicy::Always
}

/// One config key: its type, factory default and constraints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigField {
    #[serde(rename = "type")]
    pub kind: FieldType,
    /// Comma-separated items of `type`.
    #[serde(default)]
    pub list: bool,
    pub default: toml::Value,
    pub description: Option<String>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub max_len: Option<usize>,
    /// Allowed values (strings only).
    pub choices: Option<Vec<String>>,
    /// A password or key: shown masked by `vroom config get` and `inspect`.
    #[serde(default)]
    pub secret: bool,
}

impl ConfigField {
    /// The default as the string stored on the config volume; a list may be
    /// written as a TOML array.
    pub fn default_string(&self) -> Option<String> {
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        };
        match &self.default {
            toml::Value::Array(items) if self.list => Some(
                items
                    .iter()
                    .map(scalar)
                    .collect::<Option<Vec<_>>>()?
                    .join(","),
            ),
            v => scalar(v),
        }
    }

    /// The schema entry the image carries and `vroom config set` enforces.
    pub fn schema(&self) -> SchemaField {
        SchemaField {
            kind: self.kind,
            list: self.list,
            description: self.description.clone(),
            min: self.min,
            max: self.max,
            max_len: self.max_len,
            choices: self.choices.clone(),
            secret: self.secret,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeTemplate {
    /// Where the rendered file goes in the guest (under a writable directory).
    pub path: String,
    /// The template file, inside the recipe's directory.
    pub source: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    pub default: String,
    pub min: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// A fixed port, or the name of a `port` config key whose value is checked.
    pub tcp: HealthPort,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HealthPort {
    Fixed(u16),
    ConfigKey(String),
}

/// A validated recipe with its directory and template texts.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    /// When set, every file the build reads must belong to this uid (a
    /// build asked for by a non-root caller; see [`vroom_input`]).
    pub owner: Option<u32>,
    /// The recipe file itself.
    pub path: PathBuf,
    pub dir: PathBuf,
    pub default_mem_mib: u64,
    pub min_mem_mib: u64,
    /// Template sources, read and checked.
    pub templates: Vec<TemplateSpec>,
    /// `sysctl` with every value as a string.
    pub sysctl: BTreeMap<String, String>,
}

impl LoadedRecipe {
    /// The guest's part of the image this recipe describes.
    pub fn appliance(&self) -> ApplianceSpec {
        let r = &self.recipe;
        ApplianceSpec {
            seed_config: r
                .config
                .iter()
                .filter_map(|(k, f)| Some((k.clone(), f.default_string()?)))
                .collect::<ConfigValues>(),
            nic_roles: r.nics.clone(),
            on_clone: r.on_clone.clone(),
            volumes: r
                .volumes
                .iter()
                .map(|v| VolumeDecl {
                    name: Name::new(&v.name).expect("checked by validate"),
                    path: v.path.clone(),
                    size_mib: vroom_types::parse_volume_size_mib(&v.size)
                        .expect("checked by validate"),
                    fs: v.fs,
                    exec: v.exec,
                })
                .collect(),
            writable: r.writable.clone(),
            templates: self.templates.clone(),
            services: r
                .services
                .iter()
                .map(|s| ServiceSpec {
                    name: s.name.clone(),
                    command: s.command.clone(),
                    restart: s.restart == RestartPolicy::Always,
                    restart_on_config: s.restart_on_config,
                    oneshot: s.restart == RestartPolicy::Oneshot,
                    check: s.check.clone(),
                    ..Default::default()
                })
                .collect(),
            health_tcp_port: match r.health.as_ref().map(|h| &h.tcp) {
                Some(HealthPort::Fixed(port)) => Some(*port),
                _ => None,
            },
            health_tcp_config: match r.health.as_ref().map(|h| &h.tcp) {
                Some(HealthPort::ConfigKey(key)) => Some(key.clone()),
                _ => None,
            },
            config_schema: self.schema(),
            sysctl: self.sysctl.clone(),
            config_rules: r.config_rules.clone(),
            network_files: false,
        }
    }

    pub fn schema(&self) -> ConfigSchema {
        schema_of(&self.recipe.config)
    }

    /// A file named by the recipe, resolved inside its directory (symbolic
    /// links within the directory followed, so the result names the file
    /// itself); open it with [`vroom_input::open_input`].
    pub fn source_path(&self, relative: &str) -> Result<PathBuf, String> {
        inside_dir(&self.dir, relative)
    }

    /// Every file the image is made from, beside its packages: the recipe
    /// file, then each `files` source and template, as (name in the recipe,
    /// resolved path), sorted and without repeats.
    pub fn input_files(&self) -> Result<Vec<(String, PathBuf)>, String> {
        let mut names: BTreeSet<&str> = BTreeSet::new();
        for f in &self.recipe.files {
            if let Some(source) = &f.source {
                names.insert(source);
            }
        }
        for t in &self.recipe.templates {
            names.insert(&t.source);
        }
        let mut files = vec![(String::new(), self.path.clone())];
        for name in names {
            files.push((name.to_string(), self.source_path(name)?));
        }
        Ok(files)
    }
}

pub fn load(path: &Path) -> Result<LoadedRecipe, LoadRecipeError> {
    load_owned(path, None)
}

/// Loads a recipe whose files must all belong to `owner` when it is set.
pub fn load_owned(path: &Path, owner: Option<u32>) -> Result<LoadedRecipe, LoadRecipeError> {
    let read_err = |source| LoadRecipeError::Read {
        path: path.into(),
        source,
    };
    let bytes = read_input(path, MAX_RECIPE_BYTES, owner).map_err(read_err)?;
    let text = String::from_utf8(bytes).map_err(|_| LoadRecipeError::Parse {
        path: path.into(),
        message: "the file is not UTF-8 text".into(),
    })?;
    let recipe: Recipe = toml::from_str(&text).map_err(|e| LoadRecipeError::Parse {
        path: path.into(),
        // One line, with where: toml's message may span several.
        message: {
            let what = e
                .message()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ");
            match e.span() {
                Some(span) => {
                    let before = &text.as_bytes()[..span.start.min(text.len())];
                    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
                    format!("line {line}: {what}")
                }
                None => what,
            }
        },
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    validate(recipe, dir, path, owner)
}

fn validate(
    recipe: Recipe,
    dir: PathBuf,
    path: &Path,
    owner: Option<u32>,
) -> Result<LoadedRecipe, LoadRecipeError> {
    let bad = |field: &str, reason: String| LoadRecipeError::Invalid {
        path: path.into(),
        field: field.into(),
        reason,
    };

    Name::new(&recipe.name).map_err(|e| bad("name", e.to_string()))?;
    if recipe.version.is_empty()
        || !recipe
            .version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c))
    {
        return Err(bad("version", "use letters, digits and . + ~ -".into()));
    }
    if recipe.debian.suite.is_empty()
        || !recipe
            .debian
            .suite
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(bad(
            "debian.suite",
            format!("{:?} is not a suite name", recipe.debian.suite),
        ));
    }
    for c in &recipe.debian.components {
        if !COMPONENTS.contains(&c.as_str()) {
            return Err(bad(
                "debian.components",
                format!("unknown component {c:?} (known: {})", COMPONENTS.join(", ")),
            ));
        }
    }
    if recipe.debian.packages.is_empty() {
        return Err(bad(
            "debian.packages",
            "at least one package is needed".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    for p in &recipe.debian.packages {
        let n = p.name();
        let valid = n.len() >= 2
            && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !valid {
            return Err(bad(
                "debian.packages",
                format!("{n:?} is not a Debian package name"),
            ));
        }
        if !seen.insert(n) {
            return Err(bad("debian.packages", format!("{n} is listed twice")));
        }
        for x in p.excludes() {
            guest_path(x).map_err(|r| bad(&format!("debian.packages.{n}.exclude"), r))?;
        }
    }

    for w in &recipe.writable {
        let p = guest_path(w).map_err(|r| bad("writable", r))?;
        if p == "/" {
            return Err(bad(
                "writable",
                "the root itself cannot be writable; name directories".into(),
            ));
        }
    }
    for d in &recipe.dirs {
        guest_path(d).map_err(|r| bad("dirs", r))?;
    }
    let mut volume_names = BTreeSet::new();
    let mut volume_paths = BTreeSet::new();
    for (i, v) in recipe.volumes.iter().enumerate() {
        let field = format!("volumes[{i}]");
        Name::new(&v.name).map_err(|e| bad(&field, e.to_string()))?;
        vroom_types::check_mount_path(&v.path).map_err(|e| bad(&field, e.to_string()))?;
        vroom_types::parse_volume_size_mib(&v.size).map_err(|e| bad(&field, e.to_string()))?;
        if !volume_names.insert(v.name.as_str()) {
            return Err(bad(&field, format!("volume {} is declared twice", v.name)));
        }
        if !volume_paths.insert(v.path.as_str()) {
            return Err(bad(
                &field,
                format!("two volumes are mounted at {}", v.path),
            ));
        }
    }
    for (i, f) in recipe.files.iter().enumerate() {
        let field = format!("files[{i}]");
        guest_path(&f.path).map_err(|r| bad(&field, r))?;
        match (&f.source, &f.content) {
            (Some(src), None) => {
                let full = inside_dir(&dir, src).map_err(|r| bad(&field, r))?;
                // Refused now, with the field named, rather than midway through a build.
                open_input(&full, MAX_SOURCE_BYTES, owner).map_err(|e| bad(&field, chain(&e)))?;
            }
            (None, Some(_)) => {}
            _ => return Err(bad(&field, "give exactly one of source or content".into())),
        }
        if let Some(mode) = &f.mode {
            u32::from_str_radix(mode, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| bad(&field, format!("mode {mode:?} is not octal")))?;
        }
    }
    for (i, link) in recipe.symlinks.iter().enumerate() {
        let field = format!("symlinks[{i}]");
        guest_path(&link.target).map_err(|r| bad(&field, r))?;
        for path in &link.paths {
            let p = guest_path(path).map_err(|r| bad(&field, r))?;
            if p == "/" || p == link.target {
                return Err(bad(
                    &field,
                    format!("{p} cannot be a link to {}", link.target),
                ));
            }
        }
    }
    let mut users = BTreeSet::new();
    for u in &recipe.users {
        Name::new(&u.name).map_err(|e| bad("users", e.to_string()))?;
        if u.uid == 0 || !users.insert(u.name.clone()) {
            return Err(bad(
                "users",
                format!("user {} needs a unique name and a uid other than 0", u.name),
            ));
        }
        // It becomes a field of a passwd line: nothing that ends the field.
        if let Some(home) = &u.home {
            guest_path(home).map_err(|r| bad("users", format!("home of {}: {r}", u.name)))?;
            if home.contains([':', '\n']) {
                return Err(bad(
                    "users",
                    format!("home of {} may not contain ':' or a newline", u.name),
                ));
            }
        }
    }

    for (key, field) in &recipe.config {
        let name = format!("config.{key}");
        validate_config_key(key).map_err(|e| bad(&name, e.to_string()))?;
        let default = field
            .default_string()
            .ok_or_else(|| bad(&name, "default must be a string, integer or boolean".into()))?;
        if RESERVED_TEMPLATE_NAMES.contains(&key.as_str()) {
            return Err(bad(
                &name,
                format!("{key:?} is reserved for templates; choose another name"),
            ));
        }
        field
            .schema()
            .check(&default)
            .map_err(|r| bad(&name, format!("default {default:?} {r}")))?;
        if field.choices.is_some() && field.kind != FieldType::String {
            return Err(bad(&name, "choices apply to strings only".into()));
        }
        if (field.min.is_some() || field.max.is_some()) && field.kind != FieldType::Int {
            return Err(bad(&name, "min and max apply to integers only".into()));
        }
    }
    for m in &recipe.modules {
        let ok = !m.is_empty()
            && m.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(bad("modules", format!("{m:?} is not a module name")));
        }
    }
    let mut sysctl = BTreeMap::new();
    for (key, value) in &recipe.sysctl {
        let field = format!("sysctl.{key}");
        let key_ok = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && !key.starts_with('.')
            && !key.contains("..");
        if !key_ok {
            return Err(bad(&field, "not a kernel parameter name".into()));
        }
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            _ => return Err(bad(&field, "must be a string or an integer".into())),
        };
        sysctl.insert(key.clone(), value);
    }
    let seed: ConfigValues = recipe
        .config
        .iter()
        .filter_map(|(k, f)| Some((k.clone(), f.default_string()?)))
        .collect();
    let schema = schema_of(&recipe.config);
    // Templates are rendered once with the seed config and every declared
    // NIC role, so that typos and syntax errors fail the build, not the boot.
    let sample_nics: BTreeMap<String, TemplateNic> = recipe
        .nics
        .iter()
        .enumerate()
        .map(|(i, role)| {
            let ip = Ipv4Addr::new(10, 0, i as u8, 1);
            let mac = format!("52:54:00:00:00:{i:02x}");
            let gateway = Ipv4Addr::new(10, 0, i as u8, 254);
            (
                role.clone(),
                TemplateNic::new(role, ip, 24, Some(gateway), &mac),
            )
        })
        .collect();
    let sample = TemplateContext::new(&schema, &seed, &sample_nics, &recipe.name);

    let mut templates = Vec::new();
    for (i, t) in recipe.templates.iter().enumerate() {
        let field = format!("templates[{i}]");
        let dest = guest_path(&t.path).map_err(|r| bad(&field, r))?;
        if !recipe
            .writable
            .iter()
            .any(|w| dest.starts_with(&format!("{}/", w.trim_end_matches('/'))))
        {
            return Err(bad(
                &field,
                format!(
                    "{dest} is not under a writable directory ({})",
                    recipe.writable.join(", ")
                ),
            ));
        }
        let source = inside_dir(&dir, &t.source).map_err(|r| bad(&field, r))?;
        let text = read_input(&source, MAX_TEMPLATE_BYTES, owner)
            .map_err(|e| bad(&field, chain(&e)))
            .and_then(|bytes| {
                String::from_utf8(bytes)
                    .map_err(|_| bad(&field, format!("{} is not UTF-8 text", t.source)))
            })?;
        let template = TemplateSpec {
            path: dest,
            template: text,
        };
        template
            .render(&sample)
            .map_err(|e| bad(&field, format!("{}: {e}", t.source)))?;
        templates.push(template);
    }

    let mut names = BTreeSet::new();
    for s in &recipe.services {
        let field = format!("services.{}", s.name);
        Name::new(&s.name).map_err(|e| bad("services", e.to_string()))?;
        if !names.insert(&s.name) {
            return Err(bad(&field, "service names must be unique".into()));
        }
        match s.command.first() {
            Some(argv0) if argv0.starts_with('/') => {}
            _ => {
                return Err(bad(
                    &field,
                    "command must start with an absolute path".into(),
                ))
            }
        }
    }
    for s in &recipe.services {
        if s.check.is_empty() {
            continue;
        }
        let field = format!("services.{}.check", s.name);
        if !s.check[0].starts_with('/') {
            return Err(bad(&field, "must start with an absolute path".into()));
        }
        if !s
            .check
            .iter()
            .any(|arg| templates.iter().any(|t| arg.contains(&t.path)))
        {
            return Err(bad(
                &field,
                "must name the path of a template it checks (it is given the staged copy)".into(),
            ));
        }
    }
    for (i, rule) in recipe.config_rules.iter().enumerate() {
        rule.validate(&schema, &recipe.nics)
            .map_err(|r| bad(&format!("config_rules[{i}] {:?}", rule.rule), r))?;
    }
    if let Err(e) = check_rules(&recipe.config_rules, &schema, &seed, &BTreeMap::new()) {
        return Err(bad(
            "config_rules",
            format!("the defaults break a rule: {e}"),
        ));
    }
    for role in &recipe.nics {
        if !NIC_ROLES.contains(&role.as_str()) {
            return Err(bad(
                "nics",
                format!("unknown role {role:?} (known: {})", NIC_ROLES.join(", ")),
            ));
        }
    }
    let default_mem_mib =
        parse_mem_mib(&recipe.memory.default).map_err(|e| bad("memory.default", e.to_string()))?;
    let min_mem_mib =
        parse_mem_mib(&recipe.memory.min).map_err(|e| bad("memory.min", e.to_string()))?;
    if min_mem_mib < MIN_MEM_MIB {
        return Err(bad(
            "memory.min",
            format!("the guest kernel needs at least {MIN_MEM_MIB} MiB"),
        ));
    }
    if default_mem_mib < min_mem_mib {
        return Err(bad("memory.default", "must not be below memory.min".into()));
    }
    match recipe.health.as_ref().map(|h| &h.tcp) {
        Some(HealthPort::Fixed(0)) => {
            return Err(bad("health.tcp", "port 0 cannot be checked".into()))
        }
        Some(HealthPort::ConfigKey(key))
            if recipe
                .config
                .get(key)
                .is_none_or(|f| f.kind != FieldType::Port || f.list) =>
        {
            return Err(bad(
                "health.tcp",
                format!("{key:?} is not a config key of type port"),
            ))
        }
        _ => {}
    }
    Ok(LoadedRecipe {
        recipe,
        owner,
        path: path.into(),
        dir,
        default_mem_mib,
        min_mem_mib,
        templates,
        sysctl,
    })
}

fn schema_of(config: &BTreeMap<String, ConfigField>) -> ConfigSchema {
    config
        .iter()
        .map(|(k, f)| (k.clone(), f.schema()))
        .collect()
}

/// An absolute guest path without `..`.
fn guest_path(raw: &str) -> Result<String, String> {
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(format!("{raw:?} must be an absolute path"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{raw:?} must not contain .."));
    }
    Ok(path.display().to_string())
}

/// Resolves a recipe-relative file and refuses anything outside the recipe's
/// directory, whether by an absolute path, by `..`, or through a symlink.
fn inside_dir(dir: &Path, relative: &str) -> Result<PathBuf, String> {
    let rel = Path::new(relative);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{relative} is outside the recipe's directory"));
    }
    let root = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the recipe directory: {e}"))?;
    let full = root
        .join(rel)
        .canonicalize()
        .map_err(|_| format!("{relative} does not exist in the recipe's directory"))?;
    if !full.starts_with(&root) {
        return Err(format!("{relative} is outside the recipe's directory"));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web"
version = "1.0"
nics = ["lan"]

[debian]
suite = "bookworm"
packages = ["busybox-static", { name = "nginx-light", exclude = ["/usr/share/nginx/html"] }]

[[services]]
name = "httpd"
command = ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/run/www"]

[config.greeting]
type = "string"
default = "hi"
max_len = 64

[config.port]
type = "port"
default = 80

[[templates]]
path = "/run/www/index.html"
source = "index.html"

[memory]
default = "128M"
min = "128M"

[health]
tcp = 80
"#;

    fn write_recipe(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("index.html"),
            "<h1>{{greeting}}</h1> on {{ port }}",
        )
        .unwrap();
        let path = dir.path().join("recipe.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_good_recipe_loads_into_an_appliance() {
        let (_dir, path) = write_recipe(GOOD);
        let loaded = load(&path).unwrap();
        let appliance = loaded.appliance();
        assert_eq!(
            appliance.seed_config,
            [
                ("greeting".into(), "hi".into()),
                ("port".into(), "80".into())
            ]
            .into()
        );
        assert_eq!(
            appliance.templates[0].template,
            "<h1>{{greeting}}</h1> on {{ port }}"
        );
        assert_eq!(appliance.writable, vec!["/run", "/tmp", "/var"]);
        assert_eq!(appliance.health_tcp_port, Some(80));
        assert!(appliance.services[0].restart);
        assert_eq!(
            loaded.recipe.debian.packages[1].excludes(),
            ["/usr/share/nginx/html"]
        );
        assert_eq!(loaded.default_mem_mib, 128);
    }

    #[test]
    fn checks_rules_and_secrets_reach_the_appliance() {
        let text = GOOD
            .replace("max_len = 64\n", "max_len = 64\nsecret = true\n")
            .replace(
                "\"/run/www\"]\n",
                "\"/run/www\"]\ncheck = [\"/bin/test\", \"-s\", \"/run/www/index.html\"]\n",
            )
            .replace(
                "[memory]",
                "[[config_rules]]\nrule = \"port <= port\"\n\n[memory]",
            );
        let (_dir, path) = write_recipe(&text);
        let appliance = load(&path).unwrap().appliance();
        assert_eq!(
            appliance.services[0].check,
            ["/bin/test", "-s", "/run/www/index.html"]
        );
        assert_eq!(appliance.config_rules[0].rule, "port <= port");
        assert!(appliance.config_schema["greeting"].secret);
        assert!(!appliance.config_schema["port"].secret);
    }

    #[test]
    fn bad_recipes_fail_with_the_field_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("name = \"web\"", "name = \"Web\"", "name: invalid name"),
            ("version = \"1.0\"", "version = \"1 0\"", "version:"),
            (
                "suite = \"bookworm\"",
                "suite = \"book worm\"",
                "debian.suite",
            ),
            (
                "packages = [\"busybox-static\",",
                "packages = [\"Busybox\",",
                "\"Busybox\" is not a Debian package name",
            ),
            (
                "packages = [\"busybox-static\",",
                "packages = [\"nginx-light\",",
                "nginx-light is listed twice",
            ),
            (
                "default = \"hi\"",
                "default = \"hi\"\nextra = 1",
                "unknown field `extra`",
            ),
            (
                "type = \"port\"\ndefault = 80",
                "type = \"port\"\ndefault = 0",
                "config.port: default \"0\" must be a port",
            ),
            (
                "max_len = 64",
                "max_len = 1",
                "config.greeting: default \"hi\" must be at most 1 characters",
            ),
            (
                "source = \"index.html\"",
                "source = \"../etc/passwd\"",
                "outside the recipe's directory",
            ),
            (
                "source = \"index.html\"",
                "source = \"missing.html\"",
                "missing.html does not exist",
            ),
            (
                "source = \"index.html\"",
                "source = \"/etc/passwd\"",
                "/etc/passwd is outside the recipe's directory",
            ),
            (
                "exclude = [\"/usr/share/nginx/html\"]",
                "exclude = [\"usr/share\"]",
                "must be an absolute path",
            ),
            (
                "path = \"/run/www/index.html\"",
                "path = \"/etc/index.html\"",
                "not under a writable directory",
            ),
            (
                "command = [\"/bin/busybox\",",
                "command = [\"busybox\",",
                "command must start with an absolute path",
            ),
            (
                "nics = [\"lan\"]",
                "nics = [\"dmx\"]",
                "unknown role \"dmx\"",
            ),
            (
                "min = \"128M\"",
                "min = \"32M\"",
                "memory.min: memory 32 MiB is below the 64 MiB the guest kernel needs",
            ),
            (
                "default = \"128M\"",
                "default = \"lots\"",
                "memory.default: invalid memory size",
            ),
            ("tcp = 80", "tcp = 0", "health.tcp"),
            (
                "[config.port]",
                "[config.Port]",
                "config.Port: invalid config key",
            ),
            (
                "\"/run/www\"]\n",
                "\"/run/www\"]\ncheck = [\"/bin/true\"]\n",
                "services.httpd.check: must name the path of a template",
            ),
            (
                "\"/run/www\"]\n",
                "\"/run/www\"]\ncheck = [\"test\", \"-s\", \"/run/www/index.html\"]\n",
                "services.httpd.check: must start with an absolute path",
            ),
            (
                "[memory]",
                "[[config_rules]]\nrule = \"port <= greeting\"\n[memory]",
                "config_rules[0] \"port <= greeting\": \"greeting\" must be a single int or port",
            ),
            (
                "[memory]",
                "[[config_rules]]\nrule = \"port in nics.wan\"\n[memory]",
                "must be of type int",
            ),
            (
                "[memory]",
                "[[config_rules]]\nrule = \"port < port\"\n[memory]",
                "config_rules: the defaults break a rule",
            ),
            (
                "[memory]",
                "[[config_rules]]\nrule = \"port <= port\"\nwhen = \"greeting\"\n[memory]",
                "when: \"greeting\" must be a bool key",
            ),
            (
                "[memory]",
                "[[users]]\nname = \"svc\"\nuid = 100\nhome = \"/x\\nr00t::0:0::/:/bin/sh\"\n[memory]",
                "home of svc may not contain ':' or a newline",
            ),
            (
                "[memory]",
                "[[users]]\nname = \"svc\"\nuid = 100\nhome = \"relative\"\n[memory]",
                "users: home of svc:",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "fixture lacks {from:?}");
            let (_dir, path) = write_recipe(&GOOD.replacen(from, to, 1));
            let err = load(&path)
                .expect_err(&format!("{to:?} should be refused"))
                .to_string();
            assert!(err.contains(want), "{to:?}: expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn templates_may_only_use_declared_keys() {
        let (dir, path) = write_recipe(GOOD);
        std::fs::write(dir.path().join("index.html"), "{{greeting}} {{nope}}").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("templates[0]: index.html: /run/www/index.html line 1: undefined value"),
            "{err}"
        );
    }

    #[test]
    fn symlinks_cannot_escape_the_recipe_dir() {
        let (dir, path) =
            write_recipe(&GOOD.replace("source = \"index.html\"", "source = \"link.html\""));
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.html")).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("link.html is outside the recipe's directory"),
            "{err}"
        );
    }

    /// Untrusted paths: the recipe itself and every file it names must be a
    /// regular file with one link, under its cap; anything else fails fast,
    /// naming the file and what it is (a FIFO used to hang the build).
    #[test]
    fn recipe_files_must_be_regular_single_link_and_bounded() {
        let fifo = |path: &Path| {
            let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        };
        let with_file = GOOD.replace(
            "[[templates]]",
            "[[files]]\npath = \"/etc/extra\"\nsource = \"extra\"\n\n[[templates]]",
        );
        type Setup = fn(&Path, &dyn Fn(&Path));
        let cases: &[(&str, Setup, &str)] = &[
            (
                "template is a FIFO",
                |d, fifo| {
                    std::fs::write(d.join("extra"), "x").unwrap();
                    std::fs::remove_file(d.join("index.html")).unwrap();
                    fifo(&d.join("index.html"));
                },
                "templates[0]: ",
            ),
            (
                "file source is a FIFO",
                |d, fifo| fifo(&d.join("extra")),
                "is a FIFO, not a regular file",
            ),
            (
                "file source is a hard link",
                |d, _| {
                    std::fs::write(d.join("outside"), "secret").unwrap();
                    std::fs::hard_link(d.join("outside"), d.join("extra")).unwrap();
                },
                "files[0]: ",
            ),
            (
                "file source is too large",
                |d, _| {
                    let f = std::fs::File::create(d.join("extra")).unwrap();
                    f.set_len(MAX_SOURCE_BYTES + 1).unwrap();
                },
                "is larger than the 67108864 bytes allowed",
            ),
            (
                "template is too large",
                |d, _| {
                    std::fs::write(d.join("extra"), "x").unwrap();
                    let f = std::fs::File::create(d.join("index.html")).unwrap();
                    f.set_len(MAX_TEMPLATE_BYTES + 1).unwrap();
                },
                "is larger than the 1048576 bytes allowed",
            ),
        ];
        for (what, setup, want) in cases {
            let (dir, path) = write_recipe(&with_file);
            setup(dir.path(), &fifo);
            let started = std::time::Instant::now();
            let err = chain(&load(&path).expect_err(what));
            assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
            let kind = ["a FIFO", "hard links", "larger than"];
            assert!(kind.iter().any(|k| err.contains(k)), "{what}: {err:?}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{what}"
            );
        }
        // The recipe file itself.
        let dir = tempfile::tempdir().unwrap();
        fifo(&dir.path().join("recipe.toml"));
        let huge = dir.path().join("huge.toml");
        std::fs::File::create(&huge)
            .unwrap()
            .set_len(MAX_RECIPE_BYTES + 1)
            .unwrap();
        for (path, want) in [
            (
                dir.path().join("recipe.toml"),
                "is a FIFO, not a regular file",
            ),
            ("/dev/zero".into(), "/dev/zero is a character device"),
            (huge, "is larger than the 1048576 bytes allowed"),
        ] {
            let err = chain(&load(&path).unwrap_err());
            assert!(err.starts_with("cannot read recipe"), "{err}");
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }

    /// Only the recipe and the files it names make the build key: a FIFO or
    /// socket elsewhere in its directory is never opened.
    #[test]
    fn input_files_are_the_recipe_and_what_it_names() {
        let text = GOOD.replace(
            "[[templates]]",
            "[[files]]\npath = \"/etc/a\"\nsource = \"index.html\"\n\n[[templates]]",
        );
        let (dir, path) = write_recipe(&text);
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let loaded = load(&path).unwrap();
        let names: Vec<String> = loaded
            .input_files()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["", "index.html"]);
    }

    /// The annotated example in docs/recipes.md is a valid recipe.
    #[test]
    fn documented_example_loads() {
        let doc = include_str!("../../../docs/recipes.md");
        let example = doc
            .split("```toml")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        let (dir, path) = write_recipe(example);
        std::fs::write(dir.path().join("index.html"), "<h1>{{greeting}}</h1>").unwrap();
        let loaded = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(loaded.recipe.dirs, vec!["/srv/www"]);
        assert_eq!(
            loaded.recipe.files[0].content.as_deref(),
            Some("managed by vroom\n")
        );
    }

    /// Every recipe shipped in the repository loads.
    #[test]
    fn shipped_recipes_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&root).unwrap().flatten() {
            let recipe = entry.path().join("recipe.toml");
            let r = load(&recipe).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                r.recipe.name,
                entry.file_name().to_string_lossy(),
                "a recipe lives in a directory of its name"
            );
            loaded += 1;
        }
        assert!(loaded >= 1);
    }
}
