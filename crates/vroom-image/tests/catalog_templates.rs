//! Every catalog template, rendered with every kind of value its schema
//! allows, passes the check its service runs before a config is put in force
//! (`nft -c`, `dnsmasq --test`), and every rendered shell script parses.
//!
//! A key whose values render wrongly (a CIDR printed as a record, a host
//! name the domain does not qualify) is caught here, on the host's copies of
//! the same tools, instead of by a user whose `vroom config set` fails.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use vroom_image::recipe::{self, LoadedRecipe};
use vroom_types::template::{TemplateContext, TemplateNic};
use vroom_types::ConfigValues;
use vroom_types::{check_config, check_rules, ConfigField, FieldType};

fn catalog() -> Vec<LoadedRecipe> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
    let mut recipes: Vec<LoadedRecipe> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path().join("recipe.toml"))
        .filter(|p| p.is_file())
        .map(|p| recipe::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    recipes.sort_by(|a, b| a.recipe.name.cmp(&b.recipe.name));
    assert!(
        recipes.len() >= 6,
        "the catalog was not found in {}",
        dir.display()
    );
    recipes
}

fn catalog_recipe(name: &str) -> LoadedRecipe {
    catalog()
        .into_iter()
        .find(|r| r.recipe.name == name)
        .unwrap_or_else(|| panic!("no catalog recipe {name}"))
}

/// Values a user could set, by type; those the schema or the recipe's rules
/// refuse are left out by the caller, as `config set` would refuse them.
fn samples(key: &str, field: &ConfigField, default: Option<&str>) -> Vec<String> {
    let items: Vec<&str> = match field.kind {
        FieldType::Bool => vec!["true", "false"],
        FieldType::Port => vec!["1", "80", "65535"],
        FieldType::Ipv4 => vec!["10.0.2.7", "192.168.1.1"],
        FieldType::Cidr => vec!["10.252.1.200/32", "192.168.0.0/16", "0.0.0.0/0"],
        FieldType::Forward => vec![
            "8080:10.0.3.10:80",
            "udp/53:10.0.3.10",
            "tcp/443:10.0.3.11:8443",
        ],
        FieldType::Host => vec!["printer=10.0.2.5", "nas.office.lan=10.0.2.6"],
        FieldType::Endpoint => vec!["10.0.2.7:80", "10.0.2.8:8080"],
        FieldType::Int => return ints(field, default),
        FieldType::String => return strings(key, field, default),
    };
    let mut values: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    if field.list {
        values.push(String::new());
        values.push(items.join(","));
    }
    values
}

fn ints(field: &ConfigField, default: Option<&str>) -> Vec<String> {
    let mut values: Vec<String> = [field.min, field.max]
        .into_iter()
        .flatten()
        .map(|n| n.to_string())
        .collect();
    if let (Some(min), Some(max)) = (field.min, field.max) {
        values.push((min + (max - min) / 2).to_string());
    }
    values.extend(default.map(str::to_string));
    values
}

/// Strings are free text to the schema; each catalog key gets values of the
/// form its description asks for.
fn strings(key: &str, field: &ConfigField, default: Option<&str>) -> Vec<String> {
    if let Some(choices) = &field.choices {
        return choices.clone();
    }
    let mut values: Vec<String> = match key {
        "domain" => vec!["office.lan".into(), "example.com".into()],
        "lease_time" => vec!["30m".into(), "infinite".into()],
        "filter" => vec!["tcp port 80 and not host 10.0.0.1".into(), String::new()],
        "users" => vec![
            "app:correct-horse".into(),
            "app:it's \"quoted\"; $HOME `x` \\n".into(),
            "app:s3cret-pass,report_2:pass:with:colons".into(),
            String::new(),
        ],
        "databases" => vec!["app".into(), "shop:postgres,app_2".into(), String::new()],
        _ => vec![
            "Hello & <welcome>".into(),
            "it's \"quoted\"; $HOME `x`".into(),
        ],
    };
    values.extend(default.map(str::to_string));
    values
}

fn nics(recipe: &LoadedRecipe) -> BTreeMap<String, TemplateNic> {
    recipe
        .recipe
        .nics
        .iter()
        .enumerate()
        .map(|(i, role)| {
            let net = i as u8 + 1;
            let nic = TemplateNic::new(
                role,
                Ipv4Addr::new(10, 0, net, 2),
                24,
                Some(Ipv4Addr::new(10, 0, net, 1)),
                &format!("52:54:00:00:00:{net:02x}"),
            );
            (role.clone(), nic)
        })
        .collect()
}

/// Renders every template of `recipe` with `values` under `root`, then runs
/// each service's check (its paths moved under `root`) and `sh -n` on every
/// rendered script; the error says which failed and why.
fn render_and_check(
    recipe: &LoadedRecipe,
    values: &ConfigValues,
    root: &Path,
) -> Result<(), String> {
    let schema = recipe.schema();
    let ctx = TemplateContext::new(&schema, values, &nics(recipe), "appliance");
    let mut rendered: Vec<(String, PathBuf)> = vec![];
    for template in &recipe.templates {
        let text = template.render(&ctx)?;
        let path = root.join(template.path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        rendered.push((template.path.clone(), path));
    }
    // A check may run a script the recipe ships: the recipe's own copy.
    let shipped: Vec<(String, PathBuf)> = recipe
        .recipe
        .files
        .iter()
        .filter_map(|f| Some((f.path.clone(), recipe.source_path(f.source.as_ref()?).ok()?)))
        .collect();
    let moved = |arg: &str| {
        rendered
            .iter()
            .chain(&shipped)
            .fold(arg.to_string(), |arg, (guest, host)| {
                arg.replace(guest, &host.display().to_string())
            })
    };
    let mut checks: Vec<Vec<String>> = recipe
        .recipe
        .services
        .iter()
        .filter(|s| !s.check.is_empty())
        .map(|s| s.check.iter().map(|a| moved(a)).collect())
        .collect();
    for (guest, host) in &rendered {
        if guest.ends_with(".sh")
            || std::fs::read_to_string(host)
                .unwrap()
                .starts_with("#!/bin/sh")
        {
            checks.push(vec!["sh".into(), "-n".into(), host.display().to_string()]);
        }
    }
    for argv in checks {
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let host_cannot_judge = argv[0].ends_with("nft") && only_kernel_refusals(&said);
        if !out.status.success() && !host_cannot_judge {
            return Err(format!("{} refused it: {}", argv.join(" "), said.trim()));
        }
    }
    Ok(())
}

/// nft parses a whole file before the kernel sees a rule, so a file whose
/// only errors are the kernel's refusals parsed: the host's kernel lacks
/// what the guest's has (bridge connection tracking, here). The guest's
/// own check runs in the splice test (crates/vroom/tests/splice.rs).
fn only_kernel_refusals(said: &str) -> bool {
    let errors: Vec<&str> = said.lines().filter(|l| l.contains("Error:")).collect();
    !errors.is_empty() && errors.iter().all(|l| l.contains("Could not process rule"))
}

#[test]
fn every_catalog_template_renders_every_value_its_schema_allows_into_a_file_its_check_accepts() {
    let mut failures = vec![];
    let mut checked = 0;
    for recipe in catalog() {
        let appliance = recipe.appliance();
        let schema = appliance.config_schema.clone();
        let seed = appliance.seed_config.clone();
        let nets = nics(&recipe)
            .into_iter()
            .map(|(role, nic)| (role, nic.cidr.parse().unwrap()))
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        render_and_check(&recipe, &seed, tmp.path())
            .unwrap_or_else(|e| panic!("{} with its seed config: {e}", recipe.recipe.name));
        for (key, field) in &schema {
            let mut usable = 0;
            for value in samples(key, field, seed.get(key).map(String::as_str)) {
                let mut values = seed.clone();
                values.insert(key.clone(), value.clone());
                let allowed = check_config(&schema, &values).is_ok()
                    && check_rules(&appliance.config_rules, &schema, &values, &nets).is_ok();
                if !allowed {
                    continue;
                }
                usable += 1;
                checked += 1;
                if let Err(e) = render_and_check(&recipe, &values, tmp.path()) {
                    failures.push(format!("{} {key}={value}: {e}", recipe.recipe.name));
                }
            }
            assert!(
                usable > 0,
                "{} {key}: no sample value passes its schema; add one to this test",
                recipe.recipe.name
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} values fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The dns appliance answers for `NAME` and for `NAME.DOMAIN`: a host
/// record without a dot is qualified by the configured domain.
#[test]
fn the_domain_qualifies_host_records() {
    let recipe = catalog_recipe("dns");
    let schema = recipe.schema();
    let mut values = recipe.appliance().seed_config;
    values.insert("domain".into(), "office.lan".into());
    values.insert(
        "hosts".into(),
        "printer=10.0.1.5,nas.example.com=10.0.1.6".into(),
    );
    let ctx = TemplateContext::new(&schema, &values, &nics(&recipe), "dns");
    let conf = recipe.templates[0].render(&ctx).unwrap();
    assert!(
        conf.contains("host-record=printer,printer.office.lan,10.0.1.5\n"),
        "{conf}"
    );
    assert!(
        conf.contains("host-record=nas.example.com,10.0.1.6\n"),
        "{conf}"
    );
}

/// The postgres appliance's accounts: every password reaches the SQL as one
/// quoted literal, never the file its check reads (whose messages reach the
/// console); the check refuses names that are not plain identifiers,
/// missing or short passwords and owners that are not users.
#[test]
fn postgres_accounts_quote_passwords_and_the_check_refuses_bad_names() {
    let recipe = catalog_recipe("postgres");
    let schema = recipe.schema();
    assert!(schema["users"].secret, "users holds passwords");
    let render = |users: &str, databases: &str| {
        let mut values = recipe.appliance().seed_config;
        values.insert("users".into(), users.into());
        values.insert("databases".into(), databases.into());
        let tmp = tempfile::tempdir().unwrap();
        let result = render_and_check(&recipe, &values, tmp.path());
        let read = |name: &str| {
            std::fs::read_to_string(tmp.path().join("run/postgres").join(name)).unwrap()
        };
        (result, read("accounts"), read("accounts.sql"))
    };

    let (result, accounts, sql) = render("app:it's-a-s3cret,report:x'); DROP:y", "app:app,shop");
    assert_eq!(result, Ok(()));
    assert!(
        sql.contains("PASSWORD %L', 'app', 'it''s-a-s3cret')"),
        "{sql}"
    );
    assert!(sql.contains("'x''); DROP:y'"), "{sql}");
    assert!(
        !accounts.contains("s3cret") && !accounts.contains("DROP"),
        "{accounts}"
    );
    assert!(sql.contains("ARRAY['app', 'report']::text[]"), "{sql}");

    // (users, databases, what the check says)
    let refused = [
        ("App:long-enough", "", "user \"App\": use lowercase letters"),
        ("1app:long-enough", "", "user \"1app\""),
        ("app x:long-enough", "", "cannot hold spaces"),
        ("postgres:long-enough", "", "user \"postgres\" is reserved"),
        ("pg_x:long-enough", "", "user \"pg_x\" is reserved"),
        ("app", "", "user \"app\" needs a password"),
        ("app:short", "", "user \"app\" needs a password"),
        ("", "template1", "database \"template1\" is reserved"),
        ("", "my-db", "database \"my-db\": use lowercase"),
        (
            "app:long-enough",
            "db:nobody",
            "owner \"nobody\" is not a configured user",
        ),
    ];
    for (users, databases, want) in refused {
        let (result, _, _) = render(users, databases);
        let err = result.expect_err(users);
        assert!(err.contains(want), "{users} {databases}: {err}");
        assert!(!err.contains("long-enough"), "no password in {err}");
    }
}
