//! Accelerator choice. `auto` picks KVM only where the CPU advertises
//! hardware virtualisation (vmx or svm) and /dev/kvm opens: a /dev/kvm backed
//! by a nested, pagetable-based hypervisor (PVM) runs stock guests too slowly
//! to boot, so its mere presence is not enough.

use std::fs::OpenOptions;

use vroom_core::driver::LaunchVmError;
use vroom_types::{Accel, AccelChoice};

pub fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Whether KVM is usable here, or why not.
pub fn kvm_status() -> Result<(), String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| format!("cannot read /proc/cpuinfo: {e}"))?;
    if !cpu_has_virt(&cpuinfo) {
        return Err("the CPU advertises neither vmx nor svm".into());
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    Ok(())
}

pub fn resolve(choice: AccelChoice, kvm: Result<(), String>) -> Result<Accel, LaunchVmError> {
    match (choice, kvm) {
        (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
        (AccelChoice::Auto, Ok(())) | (AccelChoice::Kvm, Ok(())) => Ok(Accel::Kvm),
        (AccelChoice::Auto, Err(_)) => Ok(Accel::Tcg),
        (AccelChoice::Kvm, Err(reason)) => Err(LaunchVmError::KvmUnavailable { reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_table() {
        let cases = [
            ("flags\t\t: fpu vme de pse vmx sse", true),
            ("flags\t\t: fpu svm", true),
            ("flags\t\t: fpu vme de pse sse", false),
            ("model name: vmx-like cpu\nflags : fpu", false),
            ("", false),
        ];
        for (cpuinfo, want) in cases {
            assert_eq!(cpu_has_virt(cpuinfo), want, "{cpuinfo:?}");
        }
    }

    #[test]
    fn resolution_table() {
        let no = || Err("no vmx".to_string());
        assert_eq!(resolve(AccelChoice::Auto, Ok(())).unwrap(), Accel::Kvm);
        assert_eq!(resolve(AccelChoice::Auto, no()).unwrap(), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Tcg, Ok(())).unwrap(), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Kvm, Ok(())).unwrap(), Accel::Kvm);
        assert!(matches!(
            resolve(AccelChoice::Kvm, no()),
            Err(LaunchVmError::KvmUnavailable { .. })
        ));
    }
}
