//! `vroom kernel`: vroom's own guest kernel, built from Debian's kernel
//! source with the checked-in fragment, and the kernels in the cache.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;
use vroom_image::{Fragment, KernelCache, FRAGMENT};

use crate::args::KernelOp;
use crate::{output, paths};

pub fn run(op: &KernelOp, json: bool) -> Result<i32> {
    let cache = KernelCache::new(&paths::cache_dir());
    match op {
        KernelOp::Build { jobs, config } => build(&cache, *jobs, config.as_ref(), json),
        KernelOp::Ls => {
            list(&cache, json);
            Ok(0)
        }
    }
}

fn build(
    cache: &KernelCache,
    jobs: Option<usize>,
    config: Option<&PathBuf>,
    json: bool,
) -> Result<i32> {
    let text = match config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => FRAGMENT.to_string(),
    };
    let fragment = Fragment::parse(&text)?;
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut stages = output::Stages::new(json, "kernel".into());
    let built = cache.build_own(&fragment, jobs, &mut |stage, detail| {
        stages.update(stage, detail)
    });
    stages.finish(built.is_ok());
    let kernel = built?;
    let lacking = catalog_lacks(&kernel);
    if !lacking.is_empty() {
        let what = format!(
            "kernel {} lacks what images need: {}",
            kernel.id,
            lacking.join("; ")
        );
        // vroom's own fragment must serve the whole catalog; another one
        // may be for the user's own images.
        if config.is_none() {
            anyhow::bail!(what);
        }
        eprintln!("warning: {what}");
    }
    let row = Row::own(&kernel);
    if json {
        output::json(&row);
    } else {
        println!(
            "kernel {} ({} {}, {}): {}",
            row.id,
            row.source,
            row.version,
            row.release,
            kernel.vmlinux.display()
        );
    }
    Ok(0)
}

/// What the catalog's images need that `kernel` has not built in, per image
/// (`base` for the modules every image loads).
fn catalog_lacks(kernel: &vroom_image::OwnKernel) -> Vec<String> {
    let base: Vec<String> = vroom_image::pack::BASE_MODULES
        .iter()
        .map(|m| m.to_string())
        .collect();
    std::iter::once(("base", base))
        .chain(vroom_image::builtin::catalog_modules())
        .filter_map(|(image, modules)| {
            let names: Vec<&str> = modules.iter().map(String::as_str).collect();
            let lacks = kernel.lacks(&names);
            (!lacks.is_empty()).then(|| format!("{image}: {}", lacks.join(", ")))
        })
        .collect()
}

/// One kernel of `vroom kernel ls`.
#[derive(Serialize)]
struct Row {
    id: String,
    /// `vroom` (built here from `source`) or `debian` (a packaged kernel).
    kind: &'static str,
    source: String,
    version: String,
    release: String,
    size: u64,
    /// The kernel a build without `--kernel` is for: vroom's own once it
    /// is built, Debian's until then.
    current: bool,
    path: PathBuf,
}

impl Row {
    fn own(kernel: &vroom_image::OwnKernel) -> Row {
        Row {
            id: kernel.id.clone(),
            kind: "vroom",
            source: kernel.reference.package.clone(),
            version: kernel.reference.version.clone(),
            release: kernel.reference.release.clone(),
            size: std::fs::metadata(&kernel.vmlinux).map_or(0, |m| m.len()),
            current: false,
            path: kernel.vmlinux.clone(),
        }
    }
}

fn list(cache: &KernelCache, json: bool) {
    let mut rows: Vec<Row> = vec![];
    let vroom = cache.vroom_kernel().map(|k| k.id);
    if let Some(debian) = cache.current() {
        rows.push(Row {
            id: "debian".into(),
            kind: "debian",
            source: debian.reference.package.clone(),
            version: debian.reference.version.clone(),
            release: debian.reference.release.clone(),
            size: std::fs::metadata(&debian.vmlinuz).map_or(0, |m| m.len()),
            current: vroom.is_none(),
            path: debian.vmlinuz.clone(),
        });
    }
    rows.extend(cache.own().iter().map(|k| Row {
        current: vroom.as_ref() == Some(&k.id),
        ..Row::own(k)
    }));
    output::list(
        json,
        &rows,
        &[
            "ID",
            "KIND",
            "SOURCE",
            "RELEASE",
            "SIZE",
            "NEW BUILDS USE IT",
        ],
        |r| {
            vec![
                r.id.clone(),
                r.kind.into(),
                format!("{} {}", r.source, r.version),
                r.release.clone(),
                output::bytes(r.size),
                if r.current { "yes" } else { "" }.into(),
            ]
        },
    );
}
