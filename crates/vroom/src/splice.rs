//! `vroom splice | unsplice | splices | mirror | unmirror`.

use anyhow::{bail, Result};
use vroom_client::Client;
use vroom_types::{FailMode, MirrorRequest, Name, NicRef, Splice, SpliceRequest};

use crate::output;

pub async fn splice(
    client: &Client,
    appliance: &str,
    in_front_of: &NicRef,
    fail: Option<FailMode>,
    name: Option<Name>,
    timeout: Option<u64>,
    json: bool,
) -> Result<()> {
    // An image of the catalog not built yet is built first, as `run` does.
    if client.get(appliance).await.is_err() {
        crate::session::build_from_catalog_if_missing(client, appliance, json).await?;
    }
    let started = std::time::Instant::now();
    let spinner = output::spinner(
        json,
        format!(
            "splicing {appliance} in front of {} (booting it, then switching the path)",
            in_front_of.instance
        ),
    );
    let spliced = client
        .splice(&SpliceRequest {
            appliance: appliance.to_string(),
            vm: in_front_of.instance.clone(),
            nic: in_front_of.nic.clone(),
            fail,
            name,
            ready_timeout_secs: timeout,
        })
        .await;
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let splice = spliced?;
    if json {
        output::json(&splice);
    } else {
        println!(
            "{} is spliced in front of {}:{} (segment {}, fails {}) in {:.1}s",
            splice.appliance,
            splice.vm,
            splice.nic,
            splice.segment,
            splice.fail,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub async fn list(client: &Client, json: bool) -> Result<()> {
    let mut splices = client.splices().await?;
    splices.sort_by_key(|s| (s.vm.clone(), s.nic, s.seq));
    if json {
        output::json(&splices);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = splices
        .iter()
        .map(|s| {
            vec![
                s.appliance.to_string(),
                format!("{}:{}", s.vm, s.nic),
                s.network.to_string(),
                s.state.to_string(),
                s.fail.to_string(),
                last_event(s),
            ]
        })
        .collect();
    output::table(
        &[
            "APPLIANCE",
            "IN FRONT OF",
            "NETWORK",
            "STATE",
            "FAILS",
            "LAST EVENT",
        ],
        &rows,
    );
    Ok(())
}

fn last_event(s: &Splice) -> String {
    s.events
        .last()
        .map(|e| e.message.clone())
        .unwrap_or_default()
}

pub async fn mirror(
    client: &Client,
    source: &NicRef,
    to: &NicRef,
    filter: Option<String>,
    json: bool,
) -> Result<()> {
    let mirror = client
        .mirror(&MirrorRequest {
            vm: source.instance.clone(),
            nic: source.nic.clone(),
            to: to.instance.clone(),
            to_nic: to.nic.clone(),
            filter,
        })
        .await?;
    if json {
        output::json(&mirror);
    } else {
        println!(
            "{}:{} is mirrored to {}:{}{}",
            mirror.vm,
            mirror.nic,
            mirror.to,
            mirror.to_nic,
            mirror
                .filter
                .as_deref()
                .map(|f| format!(" (filter: {f})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Removes the mirrors of `VM[:NIC]` (to `--to` only, when given).
pub async fn unmirror(client: &Client, source: &NicRef, to: Option<&Name>) -> Result<()> {
    let vm = client.get(source.instance.as_str()).await?;
    let nic = match source.nic.as_deref() {
        None => None,
        Some(raw) => Some(
            vm.nics
                .iter()
                .position(|n| n.role.as_deref() == Some(raw))
                .or_else(|| raw.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{} has no NIC {raw:?}", vm.spec.name))?,
        ),
    };
    let doomed: Vec<_> = client
        .mirrors()
        .await?
        .into_iter()
        .filter(|m| m.vm == source.instance)
        .filter(|m| nic.is_none_or(|n| m.nic == n))
        .filter(|m| to.is_none_or(|t| &m.to == t))
        .collect();
    if doomed.is_empty() {
        bail!(
            "{} is not mirrored{}",
            source.instance,
            to.map(|t| format!(" to {t}")).unwrap_or_default()
        );
    }
    for mirror in doomed {
        client.unmirror(&mirror.id).await?;
    }
    Ok(())
}
