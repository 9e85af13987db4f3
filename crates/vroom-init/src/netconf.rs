//! NIC configuration through the classic socket ioctls: small enough that
//! PID 1 needs neither netlink nor an `ip` binary in the image.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::mem;
use std::net::Ipv4Addr;

use vroom_agent_proto::volume::NicConfig;
use vroom_types::template::TemplateNic;

use crate::log;

/// A NIC as the guest configured it: its interface name and what the
/// config volume said about it. A restored guest finds its NICs by these
/// names, since a clone's MACs differ from the ones the kernel saw at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub dev: String,
    pub config: NicConfig,
}

/// Names each NIC after its role (`wan`, `lan`, ...), addresses it and adds
/// the default route; returns the NICs in the volume's order.
pub fn configure(nics: &[NicConfig]) -> Result<Vec<Nic>, String> {
    let sock = Socket::new().map_err(|e| format!("socket: {e}"))?;
    sock.set_up("lo").map_err(|e| format!("bring up lo: {e}"))?;
    let mut configured = Vec::with_capacity(nics.len());
    for nic in nics {
        let Some(mut ifname) = ifname_for_mac(&nic.mac) else {
            return Err(format!("no NIC with MAC {}", nic.mac));
        };
        if let Some(role) = nic.role.as_deref().filter(|r| *r != ifname) {
            sock.rename(&ifname, role)
                .map_err(|e| format!("rename {ifname} to {role}: {e}"))?;
            ifname = role.to_string();
        }
        if let Some((addr, prefix_len)) = nic_address(nic)? {
            sock.set_address(&ifname, addr, prefix_len)?;
            log(&format!("{ifname} ({}) is {addr}/{prefix_len}", nic.mac));
        } else {
            // An L2 port (a bridge's side, a capture sink): up, unaddressed.
            log(&format!("{ifname} ({}) is an L2 port", nic.mac));
        }
        sock.set_up(&ifname)
            .map_err(|e| format!("bring up {ifname}: {e}"))?;
        configured.push(Nic {
            dev: ifname,
            config: nic.clone(),
        });
    }
    if let Some(gw) = default_gateway(nics) {
        sock.add_default_route(gw)
            .map_err(|e| format!("add default route via {gw}: {e}"))?;
    }
    announce(&configured);
    Ok(configured)
}

/// The NICs by role, as templates see them.
pub fn by_role(nics: &[Nic]) -> BTreeMap<String, TemplateNic> {
    nics.iter()
        .filter_map(|nic| {
            let role = nic.config.role.clone()?;
            let template = match nic_address(&nic.config).ok().flatten() {
                Some((addr, prefix_len)) => TemplateNic::new(
                    &nic.dev,
                    addr,
                    prefix_len,
                    nic_gateway(&nic.config),
                    &nic.config.mac,
                ),
                None => TemplateNic::l2(&nic.dev, &nic.config.mac),
            };
            Some((role, template))
        })
        .collect()
}

/// The NIC's address and prefix; `None` for an L2 port.
fn nic_address(nic: &NicConfig) -> Result<Option<(Ipv4Addr, u8)>, String> {
    nic.address
        .as_deref()
        .map(|a| {
            let addr = a.parse().map_err(|_| format!("bad address {a}"))?;
            Ok((addr, nic.prefix_len))
        })
        .transpose()
}

/// The NIC's gateway, unless the NIC is itself its network's gateway (a router).
fn nic_gateway(nic: &NicConfig) -> Option<Ipv4Addr> {
    let own = nic.address.as_deref().and_then(|a| a.parse().ok());
    nic.gateway
        .as_deref()
        .and_then(|g| g.parse::<Ipv4Addr>().ok())
        .filter(|g| Some(*g) != own)
}

/// The first addressed NIC with a gateway carries the default route.
fn default_gateway(nics: &[NicConfig]) -> Option<Ipv4Addr> {
    nics.iter()
        .filter(|n| n.address.is_some())
        .find_map(nic_gateway)
}

/// What must change on one NIC to give it a reloaded volume's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicChange {
    /// Its interface name now.
    pub dev: String,
    /// Its name afterwards (its new role).
    pub new_dev: String,
    pub mac: Option<[u8; 6]>,
    /// `Some(None)` removes the address (the NIC became an L2 port).
    pub address: Option<Option<(Ipv4Addr, u8)>>,
}

/// Everything [`reconfigure`] does, worked out before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconfiguration {
    pub changes: Vec<NicChange>,
    /// Replace the default route (with this gateway, or none): a NIC that
    /// went down or was readdressed lost the routes through it.
    pub route: Option<Option<Ipv4Addr>>,
    pub nics: Vec<Nic>,
}

/// Pairs the i-th NIC of the new volume with the i-th NIC the guest
/// configured, and works out what differs.
pub fn plan(old: &[Nic], new: &[NicConfig]) -> Result<Reconfiguration, String> {
    if old.len() != new.len() {
        return Err(format!(
            "the config volume names {} NICs but the guest has {}",
            new.len(),
            old.len()
        ));
    }
    let mut changes = vec![];
    let mut nics = Vec::with_capacity(new.len());
    for (before, after) in old.iter().zip(new) {
        let new_dev = after.role.clone().unwrap_or_else(|| before.dev.clone());
        if new_dev.len() >= libc::IFNAMSIZ {
            return Err(format!("interface name {new_dev} is too long"));
        }
        let mac = if before.config.mac.eq_ignore_ascii_case(&after.mac) {
            None
        } else {
            Some(parse_mac(&after.mac).ok_or_else(|| format!("bad MAC {}", after.mac))?)
        };
        let address = nic_address(after)?;
        let readdress = address != nic_address(&before.config).ok().flatten();
        let change = NicChange {
            dev: before.dev.clone(),
            new_dev: new_dev.clone(),
            mac,
            address: readdress.then_some(address),
        };
        if change.mac.is_some() || change.address.is_some() || change.dev != change.new_dev {
            changes.push(change);
        }
        nics.push(Nic {
            dev: new_dev,
            config: after.clone(),
        });
    }
    let old_configs: Vec<NicConfig> = old.iter().map(|n| n.config.clone()).collect();
    let gateway = default_gateway(new);
    let route =
        (!changes.is_empty() || gateway != default_gateway(&old_configs)).then_some(gateway);
    Ok(Reconfiguration {
        changes,
        route,
        nics,
    })
}

/// Applies a [`plan`]: each changed NIC goes down, takes its new MAC (the
/// virtio-net driver passes it on to the device), name and address, and
/// comes up again; then the default route is replaced and every NIC
/// announces itself.
pub fn reconfigure(plan: &Reconfiguration) -> Result<(), String> {
    let sock = Socket::new().map_err(|e| format!("socket: {e}"))?;
    // Renames go through temporary names so that two NICs may swap roles.
    let temporary = |i: usize| format!("vroomtmp{i}");
    for (i, change) in plan.changes.iter().enumerate() {
        let dev = &change.dev;
        sock.set_down(dev)
            .map_err(|e| format!("bring down {dev}: {e}"))?;
        if let Some(mac) = change.mac {
            sock.set_mac(dev, mac)
                .map_err(|e| format!("set the MAC of {dev}: {e}"))?;
        }
        if change.new_dev != *dev {
            sock.rename(dev, &temporary(i))
                .map_err(|e| format!("rename {dev}: {e}"))?;
        }
    }
    for (i, change) in plan.changes.iter().enumerate() {
        let dev = &change.new_dev;
        if change.new_dev != change.dev {
            sock.rename(&temporary(i), dev)
                .map_err(|e| format!("rename {} to {dev}: {e}", change.dev))?;
        }
        match change.address {
            Some(Some((addr, prefix_len))) => sock.set_address(dev, addr, prefix_len)?,
            Some(None) => sock
                .set_addr(dev, libc::SIOCSIFADDR, Ipv4Addr::UNSPECIFIED)
                .map_err(|e| format!("remove the address of {dev}: {e}"))?,
            None => {}
        }
        sock.set_up(dev)
            .map_err(|e| format!("bring up {dev}: {e}"))?;
        log(&format!("{dev} reconfigured: {change:?}"));
    }
    if let Some(gateway) = plan.route {
        sock.delete_default_routes()
            .map_err(|e| format!("delete the default route: {e}"))?;
        if let Some(gw) = gateway {
            sock.add_default_route(gw)
                .map_err(|e| format!("add default route via {gw}: {e}"))?;
        }
    }
    announce(&plan.nics);
    Ok(())
}

/// Gratuitous ARP on every addressed NIC, now and once more a second
/// later: a recreated appliance keeps its addresses but not its MACs, and a
/// new instance may take an address another had, so neighbours (clients
/// behind a firewall) should not wait for their caches to expire.
fn announce(nics: &[Nic]) {
    let targets = announcements(nics);
    let send_all = move || {
        for (dev, ip, mac) in &targets {
            if let Err(err) = gratuitous_arp(dev, *ip, *mac) {
                log(&format!("gratuitous ARP on {dev}: {err}"));
            }
        }
    };
    send_all();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        send_all();
    });
}

/// What [`announce`] says, per NIC: its device, address and MAC. Every NIC
/// with an address, whether or not the image names its role (an imported
/// OCI image names none); an L2 port has nothing to announce.
fn announcements(nics: &[Nic]) -> Vec<(String, Ipv4Addr, [u8; 6])> {
    nics.iter()
        .filter_map(|n| {
            let (ip, _) = nic_address(&n.config).ok().flatten()?;
            Some((n.dev.clone(), ip, parse_mac(&n.config.mac)?))
        })
        .collect()
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// An ARP request for our own address, broadcast: "who has IP? tell IP".
pub fn arp_announcement(ip: Ipv4Addr, mac: [u8; 6]) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&ip.octets());
    frame[38..42].copy_from_slice(&ip.octets());
    frame
}

fn gratuitous_arp(dev: &str, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
    let name = std::ffi::CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: plain syscalls on a socket we own and close below.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let proto = (libc::ETH_P_ARP as u16).to_be();
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.into(),
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let frame = arp_announcement(ip, mac);
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        let result = if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        libc::close(fd);
        result
    }
}

pub fn prefix_to_mask(prefix_len: u8) -> Ipv4Addr {
    let bits = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    };
    Ipv4Addr::from(bits)
}

fn ifname_for_mac(mac: &str) -> Option<String> {
    fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let addr = fs::read_to_string(entry.path().join("address")).ok()?;
            addr.trim()
                .eq_ignore_ascii_case(mac)
                .then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

struct Socket(libc::c_int);

impl Socket {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: arg points to a properly sized, initialised structure for request.
        if unsafe { libc::ioctl(self.0, request as _, arg as *mut T) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_addr(&self, ifname: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
        let mut req = ifreq(ifname)?;
        // SAFETY: ifr_ifru is a union; sockaddr_in fits inside sockaddr.
        unsafe {
            let sin = &mut req.ifr_ifru.ifru_addr as *mut libc::sockaddr as *mut libc::sockaddr_in;
            *sin = sockaddr_in(addr);
        }
        self.ioctl(request, &mut req)
    }

    fn rename(&self, ifname: &str, new_name: &str) -> io::Result<()> {
        let mut req = ifreq(ifname)?;
        let new = ifreq(new_name)?;
        // SIOCSIFNAME reads the new name from the ifru_newname union member.
        req.ifr_ifru.ifru_newname = new.ifr_name;
        self.ioctl(libc::SIOCSIFNAME, &mut req)
    }

    /// Sets the address and the netmask.
    fn set_address(&self, ifname: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<(), String> {
        self.set_addr(ifname, libc::SIOCSIFADDR, addr)
            .map_err(|e| format!("set address of {ifname}: {e}"))?;
        self.set_addr(ifname, libc::SIOCSIFNETMASK, prefix_to_mask(prefix_len))
            .map_err(|e| format!("set netmask of {ifname}: {e}"))
    }

    fn set_mac(&self, ifname: &str, mac: [u8; 6]) -> io::Result<()> {
        let mut req = ifreq(ifname)?;
        // SAFETY: ifr_ifru is a union of plain data; the hardware address is
        // the sockaddr member, whose sa_data holds more than six bytes.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (dst, src) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                *dst = src as libc::c_char;
            }
        }
        self.ioctl(libc::SIOCSIFHWADDR, &mut req)
    }

    fn set_up(&self, ifname: &str) -> io::Result<()> {
        self.set_flags(ifname, true)
    }

    fn set_down(&self, ifname: &str) -> io::Result<()> {
        self.set_flags(ifname, false)
    }

    fn set_flags(&self, ifname: &str, up: bool) -> io::Result<()> {
        let mut req = ifreq(ifname)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        let flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            if up {
                req.ifr_ifru.ifru_flags |= flags;
            } else {
                req.ifr_ifru.ifru_flags &= !flags;
            }
        }
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut rt = default_route(Some(gateway));
        self.ioctl(libc::SIOCADDRT, &mut rt)
    }

    /// Deletes every IPv4 default route; none left is success.
    fn delete_default_routes(&self) -> io::Result<()> {
        loop {
            let mut rt = default_route(None);
            match self.ioctl(libc::SIOCDELRT, &mut rt) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// The route to 0.0.0.0/0, via `gateway` when given.
fn default_route(gateway: Option<Ipv4Addr>) -> libc::rtentry {
    // SAFETY: rtentry is plain data; all-zero is its empty value.
    let mut rt: libc::rtentry = unsafe { mem::zeroed() };
    // SAFETY: sockaddr_in fits inside sockaddr.
    unsafe {
        *(&mut rt.rt_dst as *mut libc::sockaddr as *mut libc::sockaddr_in) =
            sockaddr_in(Ipv4Addr::UNSPECIFIED);
        *(&mut rt.rt_genmask as *mut libc::sockaddr as *mut libc::sockaddr_in) =
            sockaddr_in(Ipv4Addr::UNSPECIFIED);
    }
    rt.rt_flags = libc::RTF_UP;
    if let Some(gateway) = gateway {
        // SAFETY: sockaddr_in fits inside sockaddr.
        unsafe {
            *(&mut rt.rt_gateway as *mut libc::sockaddr as *mut libc::sockaddr_in) =
                sockaddr_in(gateway);
        }
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    rt
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_announcement_asks_for_its_own_address() {
        let mac = parse_mac("52:54:00:0a:0b:0c").unwrap();
        let frame = arp_announcement(Ipv4Addr::new(10, 0, 1, 1), mac);
        assert_eq!(&frame[0..6], &[0xff; 6]);
        assert_eq!(&frame[12..14], &[0x08, 0x06]);
        assert_eq!(&frame[22..28], &mac);
        assert_eq!(&frame[28..32], &[10, 0, 1, 1]);
        assert_eq!(&frame[32..38], &[0; 6]);
        assert_eq!(&frame[38..42], &[10, 0, 1, 1]);
        assert_eq!(parse_mac("52:54:00:0a:0b"), None);
    }

    /// Every addressed NIC is announced, with a role or without one (an
    /// imported image's NIC has none: it announced nothing, and a client
    /// that had talked to the address's previous holder kept sending
    /// there); an L2 port is not.
    #[test]
    fn every_addressed_nic_is_announced_with_or_without_a_role() {
        let nic = |dev: &str, mac: &str, role: Option<&str>, address: Option<&str>| Nic {
            dev: dev.into(),
            config: config(mac, role, address, None),
        };
        let nics = [
            nic("lan", "52:54:00:00:00:01", Some("lan"), Some("10.0.0.2")),
            nic("eth1", "52:54:00:00:00:02", None, Some("10.0.1.3")),
            nic("inside", "52:54:00:00:00:03", Some("inside"), None),
        ];
        assert_eq!(
            announcements(&nics),
            vec![
                (
                    "lan".to_string(),
                    Ipv4Addr::new(10, 0, 0, 2),
                    [0x52, 0x54, 0, 0, 0, 1]
                ),
                (
                    "eth1".to_string(),
                    Ipv4Addr::new(10, 0, 1, 3),
                    [0x52, 0x54, 0, 0, 0, 2]
                ),
            ]
        );
    }

    fn config(
        mac: &str,
        role: Option<&str>,
        address: Option<&str>,
        gateway: Option<&str>,
    ) -> NicConfig {
        NicConfig {
            mac: mac.into(),
            role: role.map(Into::into),
            address: address.map(Into::into),
            prefix_len: 24,
            gateway: gateway.map(Into::into),
        }
    }

    fn booted(nics: &[NicConfig]) -> Vec<Nic> {
        nics.iter()
            .enumerate()
            .map(|(i, c)| Nic {
                dev: c.role.clone().unwrap_or(format!("eth{i}")),
                config: c.clone(),
            })
            .collect()
    }

    #[test]
    fn plan_pairs_nics_by_position() {
        const A: &str = "52:54:00:00:00:0a";
        const B: &str = "52:54:00:00:00:0b";
        let gw = Some("10.0.0.1");
        let ip = |a: &str| Some((a.parse::<Ipv4Addr>().unwrap(), 24));
        let old = booted(&[
            config(A, Some("wan"), Some("10.0.0.5"), gw),
            config(B, None, None, None),
        ]);
        let unchanged: Vec<NicConfig> = old.iter().map(|n| n.config.clone()).collect();
        let same = plan(&old, &unchanged).unwrap();
        assert_eq!(same.changes, vec![], "nothing to do");
        assert_eq!(same.route, None, "the default route stays");
        assert_eq!(same.nics, old);

        // A clone: new MACs and address; the unnamed NIC keeps its name.
        let clone = [
            config("52:54:00:00:01:0a", Some("wan"), Some("10.0.0.6"), gw),
            config("52:54:00:00:01:0B", None, None, None),
        ];
        let cloned = plan(&old, &clone).unwrap();
        assert_eq!(
            cloned.changes,
            vec![
                NicChange {
                    dev: "wan".into(),
                    new_dev: "wan".into(),
                    mac: Some([0x52, 0x54, 0, 0, 1, 0x0a]),
                    address: Some(ip("10.0.0.6")),
                },
                NicChange {
                    dev: "eth1".into(),
                    new_dev: "eth1".into(),
                    mac: Some([0x52, 0x54, 0, 0, 1, 0x0b]),
                    address: None,
                },
            ]
        );
        assert_eq!(
            cloned.route,
            Some("10.0.0.1".parse().ok()),
            "re-added after the NIC went down"
        );
        assert_eq!(cloned.nics[1].dev, "eth1");
        assert_eq!(cloned.nics[1].config, clone[1]);

        // Only the gateway moves: the route is replaced, no NIC is touched.
        let moved = [
            config(A, Some("wan"), Some("10.0.0.5"), Some("10.0.0.254")),
            config(B, None, None, None),
        ];
        let regated = plan(&old, &moved).unwrap();
        assert_eq!(regated.changes, vec![]);
        assert_eq!(regated.route, Some("10.0.0.254".parse().ok()));

        // A new role renames; an address dropped makes an L2 port.
        let renamed = [
            config(A, Some("lan"), None, None),
            config(B, None, None, None),
        ];
        let renamed = plan(&old, &renamed).unwrap();
        assert_eq!(
            renamed.changes,
            vec![NicChange {
                dev: "wan".into(),
                new_dev: "lan".into(),
                mac: None,
                address: Some(None),
            }]
        );
        assert_eq!(renamed.route, Some(None), "no default route any more");

        for (bad, why) in [
            (
                vec![config(A, Some("wan"), None, None)],
                "names 1 NICs but the guest has 2",
            ),
            (
                vec![
                    config("nope", Some("wan"), None, None),
                    config(B, None, None, None),
                ],
                "bad MAC nope",
            ),
            (
                vec![
                    config(A, Some("wan"), Some("10.0.0"), gw),
                    config(B, None, None, None),
                ],
                "bad address 10.0.0",
            ),
            (
                vec![
                    config(A, Some("averyveryverylongname"), None, None),
                    config(B, None, None, None),
                ],
                "too long",
            ),
        ] {
            let err = plan(&old, &bad).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn templates_see_nics_by_role() {
        let nics = booted(&[
            config(
                "52:54:00:00:00:0a",
                Some("wan"),
                Some("10.0.0.5"),
                Some("10.0.0.1"),
            ),
            config(
                "52:54:00:00:00:0b",
                Some("lan"),
                Some("10.0.1.1"),
                Some("10.0.1.1"),
            ),
            config("52:54:00:00:00:0c", Some("tap"), None, None),
            config("52:54:00:00:00:0d", None, Some("10.0.2.1"), None),
        ]);
        let roles = by_role(&nics);
        assert_eq!(roles.keys().collect::<Vec<_>>(), ["lan", "tap", "wan"]);
        assert_eq!(roles["wan"].gateway, "10.0.0.1");
        assert_eq!(
            roles["lan"].gateway, "",
            "a router is its network's gateway"
        );
        assert_eq!(roles["tap"].ip, "");
        let configs: Vec<NicConfig> = nics.iter().map(|n| n.config.clone()).collect();
        assert_eq!(default_gateway(&configs), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(default_gateway(&configs[1..]), None);
    }

    #[test]
    fn masks_table() {
        for (prefix, mask) in [
            (0, "0.0.0.0"),
            (8, "255.0.0.0"),
            (24, "255.255.255.0"),
            (29, "255.255.255.248"),
            (32, "255.255.255.255"),
        ] {
            assert_eq!(prefix_to_mask(prefix).to_string(), mask);
        }
    }
}
