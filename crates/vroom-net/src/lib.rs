//! Host networking for vroom: one Linux bridge per network, created and wired
//! over rtnetlink; taps (created by the VMM) enslaved to their bridge; NAT to
//! the host's uplink as one nftables table per network, through `nft`, the
//! standard tool for it.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoBridge, InfoData, InfoKind, LinkAttribute, LinkInfo};
use rtnetlink::Handle;
use vroom_core::net::{HostAddress, HostRoute, MirrorTarget, NetworkBackend, NetworkBackendError};
use vroom_types::{Network, Protocol};

pub struct NetlinkNetwork {
    handle: Handle,
    /// Matches all of this vroom's bridges (see [`vroom_core::ipam::bridge_glob`]).
    bridge_glob: String,
}

impl NetlinkNetwork {
    /// Opens a netlink connection; must be called inside a tokio runtime.
    pub fn new(bridge_glob: String) -> std::io::Result<Self> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(NetlinkNetwork {
            handle,
            bridge_glob,
        })
    }

    /// Every host interface's name by index.
    async fn link_names(
        &self,
    ) -> Result<std::collections::HashMap<u32, String>, NetworkBackendError> {
        let mut names = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(fail("list links"))? {
            for attr in link.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.insert(link.header.index, name);
                }
            }
        }
        Ok(names)
    }

    /// Pins a bridge's MAC address to the one it has. A Linux bridge whose
    /// address was never set takes the lowest MAC among its ports, so it
    /// changes when a tap leaves (a VM stops, a splice moves it): the guests'
    /// ARP entries for the gateway then point nowhere until they expire.
    /// Setting it, even to the same value, makes the kernel keep it.
    async fn pin_mac(&self, bridge: &str) -> Result<(), NetworkBackendError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(bridge.to_string())
            .execute();
        let link = links
            .try_next()
            .await
            .map_err(fail(format!("read bridge {bridge}")))?
            .ok_or_else(|| NetworkBackendError::Failed {
                action: format!("pin the address of {bridge}"),
                reason: "the bridge does not exist".into(),
            })?;
        let Some(mac) = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        }) else {
            return Ok(());
        };
        self.handle
            .link()
            .set(link.header.index)
            .address(mac)
            .execute()
            .await
            .map_err(fail(format!("pin the address of {bridge}")))
    }

    /// Creates a bridge with these options and returns its index.
    async fn add_bridge(
        &self,
        bridge: &str,
        options: Vec<InfoBridge>,
    ) -> Result<u32, NetworkBackendError> {
        let mut add = self.handle.link().add().name(bridge.to_string());
        add.message_mut()
            .attributes
            .push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Bridge),
                LinkInfo::Data(InfoData::Bridge(options)),
            ]));
        add.execute()
            .await
            .map_err(fail(format!("create bridge {bridge}")))?;
        self.link_index(bridge)
            .await
            .ok_or_else(|| NetworkBackendError::Failed {
                action: format!("create bridge {bridge}"),
                reason: "it vanished after creation".into(),
            })
    }

    async fn link_index(&self, name: &str) -> Option<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        links
            .try_next()
            .await
            .ok()
            .flatten()
            .map(|l| l.header.index)
    }
}

fn fail(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkBackendError {
    let action = action.into();
    move |e| NetworkBackendError::Failed {
        action,
        reason: e.to_string(),
    }
}

/// The nftables table that holds a network's firewall and NAT rules.
pub fn rules_table(network: &Network) -> String {
    format!("vroom_{}", network.bridge)
}

/// The families a network's table has had: `inet` today; `ip` for the NAT
/// tables of vroom before isolation, which are removed when met.
pub const TABLE_FAMILIES: &[&str] = &["inet", "ip"];

/// A network's whole firewall, one `inet` table (IPv4 and IPv6 alike):
///
/// - input: a guest reaches the host only with replies to connections the
///   host opened, and on the gateway's `allow_host` ports; everything else
///   it sends to any host address (the gateway, the uplink's, other
///   bridges' gateways, link-local IPv6) is dropped;
/// - forward: frames between two ports of the bridge itself pass (br_netfilter
///   shows them here with the bridge as both interfaces); nothing is routed
///   between this bridge and another vroom bridge; a NAT network's guests may
///   go out from their own IPv4 addresses (no spoofed sources, no IPv6) and
///   get replies, but nothing may open a connection into it; a network
///   without NAT is routed nowhere;
/// - postrouting (NAT only): masquerades what its guests send out of the
///   host: routed from its own bridge. Traffic that leaves through one of
///   vroom's own bridges is left alone, and so is traffic bridged inside
///   another bridge: packets a router appliance forwards between two vroom
///   networks cross this hook too (through br_netfilter), and must keep
///   their addresses, even when they fall in this network's subnet (another
///   data dir's vroomd, or another test's, may use the same subnet).
///
/// Drops decide: in nftables an `accept` only ends its own chain, so each
/// network's table can only narrow what the others allow.
pub fn ruleset(network: &Network, bridge_glob: &str) -> String {
    let bridge = &network.bridge;
    let mut input = vec![format!(
        "iifname \"{bridge}\" ct state established,related accept"
    )];
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let ports: Vec<String> = network
            .allow_host
            .iter()
            .filter(|p| p.protocol == protocol)
            .map(|p| p.port.to_string())
            .collect();
        if !ports.is_empty() {
            input.push(format!(
                "iifname \"{bridge}\" ip daddr {gateway} {proto} dport {{ {ports} }} accept",
                gateway = network.gateway,
                proto = protocol.as_str(),
                ports = ports.join(", "),
            ));
        }
    }
    input.push(format!("iifname \"{bridge}\" drop"));
    let mut forward = vec![
        format!("iifname \"{bridge}\" oifname \"{bridge}\" accept"),
        format!("iifname \"{bridge}\" oifname \"{bridge_glob}\" drop"),
        format!("iifname \"{bridge_glob}\" oifname \"{bridge}\" drop"),
    ];
    if network.nat {
        // Only the network's own IPv4 addresses go out (to be masqueraded):
        // not spoofed sources, not IPv6 the host would route unmasqueraded.
        forward.push(format!(
            "iifname \"{bridge}\" ip saddr {} accept",
            network.subnet
        ));
    }
    forward.push(format!("iifname \"{bridge}\" drop"));
    if network.nat {
        forward.push(format!(
            "oifname \"{bridge}\" ct state established,related accept"
        ));
    }
    forward.push(format!("oifname \"{bridge}\" drop"));
    let chain = |name: &str, hook: &str, rules: &[String]| {
        let mut out = format!(
            "  chain {name} {{\n    type filter hook {hook} priority filter; policy accept;\n"
        );
        for rule in rules {
            out.push_str(&format!("    {rule}\n"));
        }
        out.push_str("  }\n");
        out
    };
    let mut out = format!("table inet {} {{\n", rules_table(network));
    out.push_str(&chain("input", "input", &input));
    out.push_str(&chain("forward", "forward", &forward));
    if network.nat {
        out.push_str(&format!(
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    iifname \"{bridge}\" ip saddr {subnet} ip daddr != {subnet} oifname != \"{bridge_glob}\" masquerade\n  }}\n",
            subnet = network.subnet,
        ));
    }
    out.push_str("}\n");
    out
}

/// Removes a network's table in whichever family it exists, as one
/// transaction that succeeds when there is none (`add` makes an empty one
/// first).
fn delete_script(network: &Network) -> String {
    TABLE_FAMILIES
        .iter()
        .map(|family| {
            let table = rules_table(network);
            format!("add table {family} {table}\ndelete table {family} {table}\n")
        })
        .collect()
}

/// Replaces a network's table in one transaction: there is no moment
/// without rules, and a failure leaves the old ones.
pub fn replace_script(network: &Network, bridge_glob: &str) -> String {
    delete_script(network) + &ruleset(network, bridge_glob)
}

/// Runs `tc`, iproute2's traffic-control tool; the error is its first line.
async fn tc(args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new("tc")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run tc: {e}"))?;
    if !out.status.success() {
        return Err(vroom_base::failure_line(&out, "tc failed"));
    }
    Ok(())
}

/// Compiles a pcap-filter expression to classic BPF for Ethernet frames with
/// `tcpdump -ddd` (libpcap's compiler), in the form `tc`'s `bpf bytecode`
/// takes: the instruction count, then `code jt jf k` per instruction, all
/// comma-separated. cls_bpf runs it on the whole frame in both directions.
pub async fn compile_filter(expr: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("tcpdump")
        .args(["-y", "EN10MB", "-ddd", "--", expr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run tcpdump (install it with `vroom setup`): {e}"))?;
    if !out.status.success() {
        return Err(vroom_base::failure_line(&out, "tcpdump refused it"));
    }
    bytecode(&String::from_utf8_lossy(&out.stdout))
}

/// `tcpdump -ddd`'s output as one comma-separated line, checked.
fn bytecode(ddd: &str) -> Result<String, String> {
    let lines: Vec<&str> = ddd
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let count: usize = lines
        .first()
        .and_then(|l| l.parse().ok())
        .ok_or("tcpdump printed no program")?;
    if count == 0 || count != lines.len() - 1 || count > 4096 {
        return Err(format!(
            "tcpdump printed a malformed program ({count} instructions)"
        ));
    }
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 4 || fields.iter().any(|f| f.parse::<u64>().is_err()) {
            return Err(format!("tcpdump printed a malformed instruction {line:?}"));
        }
    }
    Ok(lines.join(","))
}

/// Runs an nft script, as a child process awaited without blocking the runtime.
/// VXLAN's IANA port.
const VXLAN_PORT: u16 = 4789;

/// The peers an overlay device floods to, from `bridge fdb show dev VX`.
fn flood_destinations(fdb: &str) -> Vec<Ipv4Addr> {
    fdb.lines()
        .filter(|l| l.starts_with("00:00:00:00:00:00 "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "dst")?;
            words.next()?.parse().ok()
        })
        .collect()
}

async fn bridge_fdb(op: &str, dev: &str, peer: Ipv4Addr) -> Result<(), String> {
    let out = tokio::process::Command::new("bridge")
        .args(["fdb", op, "00:00:00:00:00:00", "dev", dev, "dst"])
        .arg(peer.to_string())
        .output()
        .await
        .map_err(|e| format!("cannot run bridge: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "bridge fdb {op} {peer}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Keeps ARP for the gateway address on this host: every node's bridge has
/// it, so a guest must only ever learn its own node's, and a host must not
/// answer (or ask) for guests on other nodes. Guests reach each other across
/// the overlay; a host reaches the guests on it.
fn overlay_script(network: &Network, vxlan: &str, vni: u32) -> String {
    let gw = vroom_core::ipam::gateway(network.subnet);
    let mac = vroom_core::ipam::mac_text(vroom_core::ipam::gateway_mac(vni));
    let table = format!("vroomvx_{vxlan}");
    // Every node's bridge is the gateway, with one address and one MAC:
    // nothing of it may cross to another node (its ARP, its DHCP answers,
    // a frame that would teach the other bridges its own MAC as remote).
    format!(
        "table bridge {table}\ndelete table bridge {table}\ntable bridge {table} {{\n\
         \tchain arp_forward {{ type filter hook forward priority 0; policy accept;\n\
         \t\toifname \"{vxlan}\" arp daddr ip {gw} drop\n\
         \t\toifname \"{vxlan}\" arp saddr ip {gw} drop\n\
         \t\tiifname \"{vxlan}\" arp daddr ip {gw} drop\n\
         \t\tiifname \"{vxlan}\" arp saddr ip {gw} drop\n\
         \t\tiifname \"{vxlan}\" ether saddr {mac} drop\n\t}}\n\
         \tchain arp_input {{ type filter hook input priority 0; policy accept;\n\
         \t\tiifname \"{vxlan}\" arp daddr ip {gw} drop\n\
         \t\tiifname \"{vxlan}\" ether saddr {mac} drop\n\t}}\n\
         \tchain arp_output {{ type filter hook output priority 0; policy accept;\n\
         \t\toifname \"{vxlan}\" arp saddr ip {gw} drop\n\
         \t\toifname \"{vxlan}\" ether saddr {mac} drop\n\t}}\n}}\n"
    )
}

async fn nft(script: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    let mut stdin = child.stdin.take().expect("invariant: piped stdin");
    stdin
        .write_all(script.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(vroom_base::failure_line(&out, "nft failed"));
    }
    Ok(())
}

#[async_trait]
impl NetworkBackend for NetlinkNetwork {
    async fn create_network(&self, network: &Network) -> Result<(), NetworkBackendError> {
        let bridge = &network.bridge;
        if self.link_index(bridge).await.is_some() {
            return Err(NetworkBackendError::InterfaceExists {
                name: bridge.clone(),
            });
        }
        let mut options = vec![];
        if network.mirror {
            // No learning: every frame is flooded to every port, like a hub.
            options.push(InfoBridge::AgeingTime(0));
        }
        let index = self.add_bridge(bridge, options).await?;
        if !network.isolated {
            self.handle
                .address()
                .add(
                    index,
                    IpAddr::V4(network.gateway),
                    network.subnet.prefix_len(),
                )
                .execute()
                .await
                .map_err(fail(format!("add {} to {bridge}", network.gateway)))?;
        }
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(fail(format!("bring up {bridge}")))?;
        if network.nat {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| {
                NetworkBackendError::Failed {
                    action: "enable IPv4 forwarding".into(),
                    reason: e.to_string(),
                }
            })?;
        }
        self.apply_rules(network).await
    }

    async fn apply_rules(&self, network: &Network) -> Result<(), NetworkBackendError> {
        // Bridges of an older vroom had their address unpinned.
        if self.link_index(&network.bridge).await.is_some() {
            self.pin_mac(&network.bridge).await?;
        }
        nft(&replace_script(network, &self.bridge_glob))
            .await
            .map_err(|reason| NetworkBackendError::Failed {
                action: format!("install the firewall of network {}", network.name),
                reason,
            })
    }

    async fn delete_network(&self, network: &Network) -> Result<(), NetworkBackendError> {
        // The bridge goes even when nft fails, so that a failed create
        // rolls back; the failure is still reported.
        let rules =
            nft(&delete_script(network))
                .await
                .map_err(|reason| NetworkBackendError::Failed {
                    action: format!("remove the firewall of network {}", network.name),
                    reason,
                });
        let vxlan = vroom_core::ipam::vxlan_name(&network.bridge);
        if let Some(index) = self.link_index(&vxlan).await {
            let table = format!("vroomvx_{vxlan}");
            let _ = nft(&format!(
                "table bridge {table}\ndelete table bridge {table}\n"
            ))
            .await;
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(fail(format!("delete {vxlan}")))?;
        }
        if let Some(index) = self.link_index(&network.bridge).await {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(fail(format!("delete bridge {}", network.bridge)))?;
        }
        rules
    }

    async fn set_overlay(
        &self,
        network: &Network,
        vni: u32,
        local: Ipv4Addr,
        peers: &[Ipv4Addr],
    ) -> Result<(), NetworkBackendError> {
        let vxlan = vroom_core::ipam::vxlan_name(&network.bridge);
        let action = format!("join network {} to the other hosts", network.name);
        let failed = |reason: String| NetworkBackendError::Failed {
            action: action.clone(),
            reason,
        };
        let bridge = self
            .link_index(&network.bridge)
            .await
            .ok_or_else(|| failed(format!("bridge {} does not exist", network.bridge)))?;
        if self.link_index(&vxlan).await.is_none() {
            self.handle
                .link()
                .add()
                .vxlan(vxlan.clone(), vni)
                .local(local)
                .port(VXLAN_PORT)
                .learning(true)
                .execute()
                .await
                .map_err(fail(format!("create {vxlan}")))?;
        }
        let index = self
            .link_index(&vxlan)
            .await
            .ok_or_else(|| failed(format!("{vxlan} vanished")))?;
        // 1500 like the taps, so that the bridge keeps an MTU of 1500: the
        // underlay must carry 1550-byte frames (VXLAN adds 50 bytes).
        self.handle
            .link()
            .set(index)
            .controller(bridge)
            .mtu(1500)
            .up()
            .execute()
            .await
            .map_err(fail(format!("put {vxlan} on {}", network.bridge)))?;
        // Broadcast and unknown frames go to every peer (head-end
        // replication): one all-zero FDB entry per peer.
        let shown = tokio::process::Command::new("bridge")
            .args(["fdb", "show", "dev", &vxlan])
            .output()
            .await
            .map_err(|e| failed(format!("cannot run bridge: {e}")))?;
        let current = flood_destinations(&String::from_utf8_lossy(&shown.stdout));
        for peer in peers.iter().filter(|p| !current.contains(p)) {
            bridge_fdb("append", &vxlan, *peer).await.map_err(&failed)?;
        }
        for gone in current.iter().filter(|p| !peers.contains(p)) {
            bridge_fdb("del", &vxlan, *gone).await.map_err(&failed)?;
        }
        let mac = vroom_core::ipam::gateway_mac(vni).to_vec();
        self.handle
            .link()
            .set(bridge)
            .address(mac)
            .execute()
            .await
            .map_err(fail(format!("give {} the gateway's MAC", network.bridge)))?;
        nft(&overlay_script(network, &vxlan, vni))
            .await
            .map_err(failed)
    }

    async fn attach_tap(&self, tap: &str, bridge: &str) -> Result<(), NetworkBackendError> {
        let bridge_index =
            self.link_index(bridge)
                .await
                .ok_or_else(|| NetworkBackendError::Failed {
                    action: format!("attach {tap}"),
                    reason: format!(
                        "bridge {bridge} does not exist (was it deleted outside vroom?)"
                    ),
                })?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let tap_index = loop {
            if let Some(index) = self.link_index(tap).await {
                break index;
            }
            if Instant::now() > deadline {
                return Err(NetworkBackendError::Failed {
                    action: format!("attach {tap}"),
                    reason: "the tap does not exist".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.handle
            .link()
            .set(tap_index)
            .controller(bridge_index)
            .up()
            .execute()
            .await
            .map_err(fail(format!("attach {tap} to {bridge}")))
    }

    async fn move_tap(&self, tap: &str, bridge: Option<&str>) -> Result<(), NetworkBackendError> {
        let tap_index =
            self.link_index(tap)
                .await
                .ok_or_else(|| NetworkBackendError::NoSuchInterface {
                    name: tap.to_string(),
                })?;
        let bridge_index = match bridge {
            Some(bridge) => {
                self.link_index(bridge)
                    .await
                    .ok_or_else(|| NetworkBackendError::Failed {
                        action: format!("move {tap}"),
                        reason: format!("bridge {bridge} does not exist"),
                    })?
            }
            // Index 0 takes the link off its bridge.
            None => 0,
        };
        let action = match bridge {
            Some(bridge) => format!("move {tap} to {bridge}"),
            None => format!("take {tap} off its bridge"),
        };
        self.handle
            .link()
            .set(tap_index)
            .controller(bridge_index)
            .up()
            .execute()
            .await
            .map_err(|e| {
                // The VMM exited between the lookup and the move.
                if e.to_string().contains("No such device") {
                    NetworkBackendError::NoSuchInterface {
                        name: tap.to_string(),
                    }
                } else {
                    fail(action)(e)
                }
            })
    }

    async fn create_segment(&self, bridge: &str) -> Result<(), NetworkBackendError> {
        let index = match self.link_index(bridge).await {
            Some(index) => index,
            None => self.add_bridge(bridge, vec![]).await?,
        };
        // No address of the host's, and no IPv6 either: the host is not on
        // a segment, it only carries frames between its two ports.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"),
            "1",
        );
        self.handle
            .link()
            .set(index)
            .up()
            .execute()
            .await
            .map_err(fail(format!("bring up {bridge}")))
    }

    async fn delete_segment(&self, bridge: &str) -> Result<(), NetworkBackendError> {
        if let Some(index) = self.link_index(bridge).await {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(fail(format!("delete segment {bridge}")))?;
        }
        Ok(())
    }

    async fn set_mirrors(
        &self,
        tap: &str,
        targets: &[MirrorTarget],
    ) -> Result<(), NetworkBackendError> {
        let failed = |reason: String| NetworkBackendError::Failed {
            action: format!("mirror {tap}"),
            reason,
        };
        // Replace, don't patch: dropping the clsact qdisc drops its filters.
        let _ = tc(&["qdisc", "del", "dev", tap, "clsact"]).await;
        if targets.is_empty() {
            return Ok(());
        }
        tc(&["qdisc", "add", "dev", tap, "clsact"])
            .await
            .map_err(failed)?;
        for direction in ["ingress", "egress"] {
            for target in targets {
                let mut args = vec!["filter", "add", "dev", tap, direction];
                match &target.filter {
                    Some(code) => args.extend(["bpf", "bytecode", code.as_str()]),
                    None => args.push("matchall"),
                }
                args.extend(["action", "mirred", "egress", "mirror", "dev", &target.tap]);
                tc(&args).await.map_err(failed)?;
            }
        }
        Ok(())
    }

    async fn compile_filter(&self, expr: &str) -> Result<String, NetworkBackendError> {
        compile_filter(expr)
            .await
            .map_err(|reason| NetworkBackendError::Failed {
                action: "compile the filter".into(),
                reason,
            })
    }

    async fn host_addresses(&self) -> Result<Vec<HostAddress>, NetworkBackendError> {
        let names = self.link_names().await?;
        let mut out = Vec::new();
        let mut addresses = self.handle.address().get().execute();
        while let Some(msg) = addresses.try_next().await.map_err(fail("list addresses"))? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = addr {
                if let Ok(net) = Ipv4Net::new(ip, msg.header.prefix_len) {
                    let interface = names.get(&msg.header.index).cloned().unwrap_or_default();
                    out.push(HostAddress {
                        interface,
                        subnet: net.trunc(),
                    });
                }
            }
        }
        Ok(out)
    }

    async fn host_routes(&self) -> Result<Vec<HostRoute>, NetworkBackendError> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
        let names = self.link_names().await?;
        let mut out = Vec::new();
        let mut routes = self.handle.route().get(rtnetlink::IpVersion::V4).execute();
        while let Some(msg) = routes.try_next().await.map_err(fail("list routes"))? {
            let table = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(msg.header.table));
            let prefix = msg.header.destination_prefix_length;
            if table != u32::from(RouteHeader::RT_TABLE_MAIN)
                || prefix == 0
                || !matches!(
                    msg.header.kind,
                    RouteType::Unicast
                        | RouteType::BlackHole
                        | RouteType::Unreachable
                        | RouteType::Prohibit
                )
            {
                continue;
            }
            let mut destination = None;
            let mut gateway = None;
            let mut interface = String::new();
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = Some(*ip),
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                    RouteAttribute::Oif(index) => {
                        interface = names.get(index).cloned().unwrap_or_default()
                    }
                    _ => {}
                }
            }
            if let Some(net) = destination.and_then(|ip| Ipv4Net::new(ip, prefix).ok()) {
                out.push(HostRoute {
                    destination: net.trunc(),
                    gateway,
                    interface,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vroom_types::Name;

    fn network(nat: bool, isolated: bool, allow_host: &[&str]) -> Network {
        Network {
            name: Name::new("lan").unwrap(),
            subnet: "10.9.0.0/24".parse().unwrap(),
            nat,
            isolated,
            mirror: false,
            allow_host: allow_host.iter().map(|p| p.parse().unwrap()).collect(),
            bridge: "vrb12345678".into(),
            gateway: "10.9.0.1".parse().unwrap(),
            created_at: 0,
        }
    }

    /// The chains of a rendered table, each as its list of rules.
    fn chains(rules: &str) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut out = std::collections::BTreeMap::new();
        let mut current = None;
        for line in rules.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("chain ") {
                current = Some(name.trim_end_matches(" {").to_string());
                out.insert(current.clone().unwrap(), vec![]);
            } else if line == "}" {
                current = None;
            } else if let Some(chain) = &current {
                if !line.starts_with("type ") {
                    out.get_mut(chain).unwrap().push(line.to_string());
                }
            }
        }
        out
    }

    #[test]
    fn tcpdump_programs_become_tc_bytecode() {
        let ddd = "4\n40 0 0 12\n21 0 1 2048\n6 0 0 262144\n6 0 0 0\n";
        assert_eq!(
            bytecode(ddd).unwrap(),
            "4,40 0 0 12,21 0 1 2048,6 0 0 262144,6 0 0 0"
        );
        for bad in ["", "2\n6 0 0 0\n", "1\n6 0 0\n", "1\nx 0 0 0\n", "0\n"] {
            assert!(bytecode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rulesets_table() {
        let b = "\"vrb12345678\"";
        let g = "\"vrb*\"";
        let isolation = [
            format!("iifname {b} oifname {b} accept"),
            format!("iifname {b} oifname {g} drop"),
            format!("iifname {g} oifname {b} drop"),
        ];
        let from_host = format!("iifname {b} ct state established,related accept");
        let nat_forward = vec![
            format!("iifname {b} ip saddr 10.9.0.0/24 accept"),
            format!("iifname {b} drop"),
            format!("oifname {b} ct state established,related accept"),
            format!("oifname {b} drop"),
        ];
        let input_drop = format!("iifname {b} drop");
        let masquerade = format!(
            "iifname {b} ip saddr 10.9.0.0/24 ip daddr != 10.9.0.0/24 oifname != {g} masquerade"
        );
        struct Case {
            what: &'static str,
            network: Network,
            input: Vec<String>,
            forward_tail: Vec<String>,
            nat: bool,
        }
        let cases = [
            Case {
                what: "nat: out and back only, nothing to the host",
                network: network(true, false, &[]),
                input: vec![from_host.clone(), input_drop.clone()],
                forward_tail: nat_forward.clone(),
                nat: true,
            },
            Case {
                what: "nat with ports: the gateway's ports, per protocol",
                network: network(true, false, &["8080", "22", "53/udp", "67/udp"]),
                input: vec![
                    from_host.clone(),
                    format!("iifname {b} ip daddr 10.9.0.1 tcp dport {{ 8080, 22 }} accept"),
                    format!("iifname {b} ip daddr 10.9.0.1 udp dport {{ 53, 67 }} accept"),
                    input_drop.clone(),
                ],
                forward_tail: nat_forward.clone(),
                nat: true,
            },
            Case {
                what: "host: reachable from the host, routed nowhere",
                network: network(false, false, &["443"]),
                input: vec![
                    from_host.clone(),
                    format!("iifname {b} ip daddr 10.9.0.1 tcp dport {{ 443 }} accept"),
                    input_drop.clone(),
                ],
                forward_tail: vec![format!("iifname {b} drop"), format!("oifname {b} drop")],
                nat: false,
            },
            Case {
                what: "isolated: nothing to the host or through it",
                network: network(false, true, &[]),
                input: vec![from_host.clone(), input_drop.clone()],
                forward_tail: vec![format!("iifname {b} drop"), format!("oifname {b} drop")],
                nat: false,
            },
        ];
        for case in cases {
            let rules = ruleset(&case.network, "vrb*");
            assert!(
                rules.starts_with("table inet vroom_vrb12345678 {\n"),
                "{}: {rules}",
                case.what
            );
            let chains = chains(&rules);
            assert_eq!(chains["input"], case.input, "{}", case.what);
            let mut forward = isolation.to_vec();
            forward.extend(case.forward_tail);
            assert_eq!(chains["forward"], forward, "{}", case.what);
            assert_eq!(
                chains.get("postrouting"),
                case.nat.then(|| vec![masquerade.clone()]).as_ref(),
                "{}",
                case.what
            );
            for (chain, hook) in [("input", "input"), ("forward", "forward")] {
                assert!(
                    rules.contains(&format!(
                        "chain {chain} {{\n    type filter hook {hook} priority filter; policy accept;"
                    )),
                    "{}",
                    case.what
                );
            }
        }
    }

    /// Replacing removes today's table and the `ip` NAT table of older
    /// vroom before adding the new one, so it works whatever is there.
    #[test]
    fn replacing_clears_both_families_first() {
        let script = replace_script(&network(true, false, &[]), "vrb*");
        let head: Vec<&str> = script.lines().take(4).collect();
        assert_eq!(
            head,
            [
                "add table inet vroom_vrb12345678",
                "delete table inet vroom_vrb12345678",
                "add table ip vroom_vrb12345678",
                "delete table ip vroom_vrb12345678",
            ]
        );
        assert!(script.ends_with(&ruleset(&network(true, false, &[]), "vrb*")));
    }

    #[test]
    fn the_overlay_floods_to_the_peers_bridge_lists() {
        let fdb = "00:00:00:00:00:00 dst 10.1.2.12 self permanent\n\
                   00:00:00:00:00:00 dst 10.1.2.13 self permanent\n\
                   52:54:00:aa:bb:cc dst 10.1.2.12 self \n\
                   33:33:00:00:00:01 self permanent\n";
        assert_eq!(
            flood_destinations(fdb),
            vec![
                "10.1.2.12".parse::<Ipv4Addr>().unwrap(),
                "10.1.2.13".parse().unwrap()
            ]
        );
        let script = overlay_script(&network(true, false, &[]), "vrx12345678", 4096);
        assert!(script.contains("oifname \"vrx12345678\" arp saddr ip 10.9.0.1 drop"));
        assert!(script.contains("oifname \"vrx12345678\" ether saddr 02:76:72:00:10:00 drop"));
        assert_eq!(script.matches(" drop").count(), 9, "{script}");
    }

    /// nft itself accepts every rendered table (check mode: nothing is
    /// installed).
    #[test]
    fn nft_accepts_the_rendered_rules() {
        let scripts = [
            network(true, false, &["8080", "53/udp"]),
            network(false, false, &[]),
            network(false, true, &[]),
        ]
        .into_iter()
        .map(|n| replace_script(&n, "vrb*"))
        .chain([overlay_script(
            &network(true, false, &[]),
            "vrx12345678",
            4096,
        )]);
        for script in scripts {
            let mut child = std::process::Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nft is installed");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
