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

/// Names each NIC after its role (`wan`, `lan`, ...), addresses it and adds
/// the default route; returns the NICs by role, as templates see them.
pub fn configure(nics: &[NicConfig]) -> Result<BTreeMap<String, TemplateNic>, String> {
    let sock = Socket::new().map_err(|e| format!("socket: {e}"))?;
    sock.set_up("lo").map_err(|e| format!("bring up lo: {e}"))?;
    let mut gateway = None;
    let mut by_role = BTreeMap::new();
    for nic in nics {
        let Some(mut ifname) = ifname_for_mac(&nic.mac) else {
            return Err(format!("no NIC with MAC {}", nic.mac));
        };
        if let Some(role) = nic.role.as_deref().filter(|r| *r != ifname) {
            sock.rename(&ifname, role)
                .map_err(|e| format!("rename {ifname} to {role}: {e}"))?;
            ifname = role.to_string();
        }
        let Some(address) = nic.address.as_deref() else {
            // An L2 port (a bridge's side, a capture sink): up, unaddressed.
            sock.set_up(&ifname)
                .map_err(|e| format!("bring up {ifname}: {e}"))?;
            log(&format!("{ifname} ({}) is an L2 port", nic.mac));
            if let Some(role) = &nic.role {
                by_role.insert(role.clone(), TemplateNic::l2(&ifname, &nic.mac));
            }
            continue;
        };
        let addr: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("bad address {address}"))?;
        let mask = prefix_to_mask(nic.prefix_len);
        sock.set_addr(&ifname, libc::SIOCSIFADDR, addr)
            .map_err(|e| format!("set address of {ifname}: {e}"))?;
        sock.set_addr(&ifname, libc::SIOCSIFNETMASK, mask)
            .map_err(|e| format!("set netmask of {ifname}: {e}"))?;
        sock.set_up(&ifname)
            .map_err(|e| format!("bring up {ifname}: {e}"))?;
        log(&format!(
            "{ifname} ({}) is {addr}/{}",
            nic.mac, nic.prefix_len
        ));
        // A router NIC may itself be its network's gateway.
        let nic_gateway = nic
            .gateway
            .as_deref()
            .and_then(|g| g.parse::<Ipv4Addr>().ok())
            .filter(|g| *g != addr);
        // The first NIC with a gateway carries the default route.
        gateway = gateway.or(nic_gateway);
        if let Some(role) = &nic.role {
            by_role.insert(
                role.clone(),
                TemplateNic::new(&ifname, addr, nic.prefix_len, nic_gateway, &nic.mac),
            );
        }
    }
    if let Some(gw) = gateway {
        sock.add_default_route(gw)
            .map_err(|e| format!("add default route via {gw}: {e}"))?;
    }
    announce(&by_role);
    Ok(by_role)
}

/// Gratuitous ARP on every NIC, now and once more a second later: a
/// recreated appliance keeps its addresses but not its MACs, and neighbours
/// (clients behind a firewall) should not wait for their caches to expire.
fn announce(nics: &BTreeMap<String, TemplateNic>) {
    let targets: Vec<(String, Ipv4Addr, [u8; 6])> = nics
        .values()
        .filter_map(|n| Some((n.dev.clone(), n.ip.parse().ok()?, parse_mac(&n.mac)?)))
        .collect();
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

    fn set_up(&self, ifname: &str) -> io::Result<()> {
        let mut req = ifreq(ifname)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain data; all-zero is its empty value.
        let mut rt: libc::rtentry = unsafe { mem::zeroed() };
        // SAFETY: sockaddr_in fits inside sockaddr.
        unsafe {
            *(&mut rt.rt_dst as *mut libc::sockaddr as *mut libc::sockaddr_in) =
                sockaddr_in(Ipv4Addr::UNSPECIFIED);
            *(&mut rt.rt_genmask as *mut libc::sockaddr as *mut libc::sockaddr_in) =
                sockaddr_in(Ipv4Addr::UNSPECIFIED);
            *(&mut rt.rt_gateway as *mut libc::sockaddr as *mut libc::sockaddr_in) =
                sockaddr_in(gateway);
        }
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        self.ioctl(libc::SIOCADDRT, &mut rt)
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
