//! The documented range of every number a request carries.
//!
//! Each range is checked where input enters vroom: by [`RunRequest::validate`]
//! in the API, and by the CLI's value parsers (`parse_*` below), so that no
//! number reaches arithmetic that could overflow (a ready timeout of
//! `u64::MAX` seconds once panicked vroomd when added to an `Instant`). The
//! same constants feed the OpenAPI document's `minimum`/`maximum`.
//!
//! Limits that depend on the host (its memory and CPU count) or on the image
//! (its minimum memory) are checked again when an instance is created.

use crate::{InvalidInputError, RunRequest, MIN_MEM_MIB};

/// An inclusive range of a numeric field, named as in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub field: &'static str,
    pub min: u64,
    pub max: u64,
}

impl Bounds {
    /// The value itself when it lies in the range.
    pub fn check(self, value: u64) -> Result<u64, InvalidInputError> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(self.out_of_range(value.to_string()))
        }
    }

    /// Parses a decimal integer as typed on the command line and checks it.
    pub fn parse(self, raw: &str) -> Result<u64, InvalidInputError> {
        raw.trim()
            .parse::<u64>()
            .map_err(|_| self.out_of_range(raw.to_string()))
            .and_then(|v| self.check(v))
    }

    fn out_of_range(self, value: String) -> InvalidInputError {
        InvalidInputError::OutOfRange {
            field: self.field,
            value,
            min: self.min,
            max: self.max,
        }
    }
}

/// Seconds a guest has to report ready (`ready_timeout_secs`): up to an hour.
pub const READY_TIMEOUT_SECS: Bounds = Bounds {
    field: "ready_timeout_secs",
    min: 1,
    max: 3600,
};

/// Guest memory in MiB (`spec.mem_mib`). The upper bound (1 PiB) only keeps
/// byte counts far from overflow; the host's own memory is checked on create.
pub const MEM_MIB: Bounds = Bounds {
    field: "spec.mem_mib",
    min: MIN_MEM_MIB,
    max: 1 << 30,
};

/// Virtual CPUs (`spec.cpus`): QEMU's x86 limit without an IOMMU; the host's
/// CPU count is checked on create.
pub const CPUS: Bounds = Bounds {
    field: "spec.cpus",
    min: 1,
    max: 255,
};

/// The largest JSON body a route reads (a spec, an action, a recipe path).
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// The largest body of the routes that carry config values: the CLI's
/// `config import` reads at most 1 MiB, and values are re-encoded as JSON.
pub const MAX_CONFIG_BODY: usize = 2 << 20;
/// The largest room file: the CLI reads at most this much TOML and sends it
/// only when its JSON fits too, which is the body limit of `PUT
/// /v1/rooms/{name}`, so a file the CLI accepts is never refused for size.
pub const MAX_ROOM_BODY: usize = 256 * 1024;

/// Size of the config volume in KiB (`spec.config_volume_kib`).
pub const CONFIG_VOLUME_KIB: Bounds = Bounds {
    field: "spec.config_volume_kib",
    min: 64,
    max: 64 * 1024,
};

/// A byte offset into an instance's console log (`offset`): any integer a
/// JSON number holds exactly.
pub const LOG_OFFSET: Bounds = Bounds {
    field: "offset",
    min: 0,
    max: (1 << 53) - 1,
};

/// Seconds a `GET /v1/instances/{name}` waits for the instance to leave
/// `starting` (`wait_secs`): a long poll stays under proxies' idle limits.
pub const WAIT_SECS: Bounds = Bounds {
    field: "wait_secs",
    min: 0,
    max: 60,
};

impl RunRequest {
    /// Checks every number of the request against its documented range.
    pub fn validate(&self) -> Result<(), InvalidInputError> {
        if let Some(timeout) = self.ready_timeout_secs {
            READY_TIMEOUT_SECS.check(timeout)?;
        }
        if let Some(mem_mib) = self.spec.mem_mib {
            check_mem_mib(mem_mib)?;
        }
        check_cpus(self.spec.cpus)?;
        if let Some(kib) = self.spec.config_volume_kib {
            check_config_volume_kib(kib)?;
        }
        Ok(())
    }
}

fn check_cpus(cpus: u32) -> Result<u32, InvalidInputError> {
    match CPUS.check(u64::from(cpus)) {
        Ok(_) => Ok(cpus),
        Err(_) => Err(InvalidInputError::Cpus {
            cpus,
            max: CPUS.max as u32,
        }),
    }
}

fn check_config_volume_kib(kib: u32) -> Result<u32, InvalidInputError> {
    match CONFIG_VOLUME_KIB.check(u64::from(kib)) {
        Ok(_) => Ok(kib),
        Err(_) => Err(InvalidInputError::ConfigVolumeSize {
            kib,
            min: CONFIG_VOLUME_KIB.min,
            max: CONFIG_VOLUME_KIB.max,
        }),
    }
}

/// Memory below what the guest kernel boots in gets its own explanation.
pub(crate) fn check_mem_mib(mem_mib: u64) -> Result<u64, InvalidInputError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(InvalidInputError::MemTooSmall {
            mem_mib,
            min_mib: MIN_MEM_MIB,
        });
    }
    MEM_MIB.check(mem_mib)
}

/// `--timeout` of `vroom run`.
pub fn parse_ready_timeout_secs(raw: &str) -> Result<u64, InvalidInputError> {
    READY_TIMEOUT_SECS.parse(raw)
}

/// `--cpus` of `vroom run`.
pub fn parse_cpus(raw: &str) -> Result<u32, InvalidInputError> {
    match raw.trim().parse::<u32>() {
        Ok(cpus) => check_cpus(cpus),
        Err(_) => Err(CPUS.out_of_range(raw.to_string())),
    }
}

/// `--config-size` of `vroom run`.
pub fn parse_config_volume_kib(raw: &str) -> Result<u32, InvalidInputError> {
    match raw.trim().parse::<u32>() {
        Ok(kib) => check_config_volume_kib(kib),
        Err(_) => Err(CONFIG_VOLUME_KIB.out_of_range(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AccelChoice, InstanceSpec, Name};

    fn request(edit: impl FnOnce(&mut RunRequest)) -> RunRequest {
        let mut req = RunRequest {
            spec: InstanceSpec {
                name: Name::new("a").unwrap(),
                image: "hello".into(),
                mem_mib: None,
                cpus: 1,
                nics: vec![],
                accel: AccelChoice::Auto,
                config_volume_kib: None,
                ephemeral: false,
                volumes: Vec::new(),
            },
            ready_timeout_secs: None,
            from_snapshot: None,
            cold: false,
            placement: Default::default(),
            env: Default::default(),
        };
        edit(&mut req);
        req
    }

    #[test]
    fn run_requests_table() {
        let cases: Vec<(RunRequest, Option<&str>)> = vec![
            (request(|_| {}), None),
            (request(|r| r.ready_timeout_secs = Some(1)), None),
            (request(|r| r.ready_timeout_secs = Some(3600)), None),
            (
                request(|r| r.ready_timeout_secs = Some(u64::MAX)),
                Some("ready_timeout_secs must be an integer between 1 and 3600, got 18446744073709551615"),
            ),
            (
                request(|r| r.ready_timeout_secs = Some(0)),
                Some("ready_timeout_secs must be an integer between 1 and 3600, got 0"),
            ),
            (request(|r| r.spec.mem_mib = Some(64)), None),
            (
                request(|r| r.spec.mem_mib = Some(32)),
                Some("memory 32 MiB is below the 64 MiB the guest kernel needs"),
            ),
            (
                request(|r| r.spec.mem_mib = Some(u64::MAX)),
                Some("spec.mem_mib must be an integer between 64 and 1073741824, got 18446744073709551615"),
            ),
            (request(|r| r.spec.cpus = 255), None),
            (
                request(|r| r.spec.cpus = 0),
                Some("invalid cpu count 0: must be between 1 and 255"),
            ),
            (
                request(|r| r.spec.cpus = u32::MAX),
                Some("invalid cpu count 4294967295: must be between 1 and 255"),
            ),
            (request(|r| r.spec.config_volume_kib = Some(64)), None),
            (request(|r| r.spec.config_volume_kib = Some(65536)), None),
            (
                request(|r| r.spec.config_volume_kib = Some(63)),
                Some("config volume size 63 KiB is outside 64..=65536 KiB"),
            ),
        ];
        for (req, want) in cases {
            let got = req.validate().err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), want, "{req:?}");
        }
    }

    #[test]
    fn cli_parsers_table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("1", Some(1)),
            ("3600", Some(3600)),
            (" 30 ", Some(30)),
            ("0", None),
            ("3601", None),
            ("18446744073709551615", None),
            ("18446744073709551616", None),
            ("-1", None),
            ("", None),
            ("1e3", None),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_ready_timeout_secs(raw).ok(), *want, "timeout {raw:?}");
        }
        assert_eq!(parse_cpus("2").ok(), Some(2));
        assert!(parse_cpus("256").is_err());
        assert!(parse_cpus("4294967296").is_err());
        assert_eq!(parse_config_volume_kib("1440").ok(), Some(1440));
        assert!(parse_config_volume_kib("1").is_err());
        let err = parse_ready_timeout_secs("abc").unwrap_err().to_string();
        assert_eq!(
            err,
            "ready_timeout_secs must be an integer between 1 and 3600, got abc"
        );
    }
}
