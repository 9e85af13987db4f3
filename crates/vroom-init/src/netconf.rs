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
        let addr: Ipv4Addr = nic
            .address
            .parse()
            .map_err(|_| format!("bad address {}", nic.address))?;
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
    Ok(by_role)
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
