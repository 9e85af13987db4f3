//! `vroom capture NAME`: a live pcap stream from a capture appliance, for
//! `| tshark -r -` or `| wireshark -k -i -`, built on the streamed exec.

use std::io::IsTerminal;

use anyhow::{bail, Result};
use vroom_client::Client;
use vroom_types::{ExecRequest, INSIDE_ROLE, MIRROR_ROLE, OUTSIDE_ROLE};

pub async fn capture(
    client: &Client,
    name: &str,
    filter: Option<&str>,
    count: Option<u64>,
) -> Result<i32> {
    if std::io::stdout().is_terminal() {
        bail!("the capture is a pcap stream: pipe it, e.g. `vroom capture {name} | tshark -r -`");
    }
    let instance = client.get(name).await?;
    let has = |role: &str| {
        instance
            .nics
            .iter()
            .any(|n| n.role.as_deref() == Some(role))
    };
    // Inline, the sniffer's bridge sees both ways; otherwise its sink.
    let dev = if has(OUTSIDE_ROLE) && has(INSIDE_ROLE) {
        "br0"
    } else if has(MIRROR_ROLE) {
        MIRROR_ROLE
    } else {
        bail!("{name} has no capture NIC (mirror-sink) and is not a bump in the wire: capture from a sniffer");
    };
    let mut argv: Vec<String> = [
        "/usr/bin/tcpdump",
        "-i",
        dev,
        "-n",
        "-U",
        "-Z",
        "root",
        "-s",
        "262144",
        "-w",
        "-",
    ]
    .map(String::from)
    .to_vec();
    if let Some(count) = count {
        argv.extend(["-c".to_string(), count.to_string()]);
    }
    if let Some(filter) = filter.filter(|f| !f.trim().is_empty()) {
        argv.push(filter.to_string());
    }
    let req = ExecRequest {
        argv,
        timeout_secs: Some(vroom_types::MAX_EXEC_TIMEOUT_SECS),
        stdin: false,
    };
    crate::guest::exec(client, name, &req, false).await
}
