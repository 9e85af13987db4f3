use crate::InvalidInputError;

/// The least memory any guest kernel vroom has boots in: vroom's own (see
/// [`crate::KernelFlavor::min_mem_mib`]; an image says what it needs).
pub const MIN_MEM_MIB: u64 = 64;

/// Parses a memory size such as `128M`, `1G`, `512MiB` or `256` (MiB) into
/// MiB, within [`crate::limits::MEM_MIB`].
pub fn parse_mem_mib(raw: &str) -> Result<u64, InvalidInputError> {
    let invalid = || InvalidInputError::MemSize {
        raw: raw.to_string(),
    };
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    let factor_mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        _ => return Err(invalid()),
    };
    let mem_mib = value
        .checked_mul(factor_mib)
        .filter(|v| *v > 0)
        .ok_or_else(invalid)?;
    crate::limits::check_mem_mib(mem_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("128M", Some(128)),
            ("128", Some(128)),
            ("1G", Some(1024)),
            ("2GiB", Some(2048)),
            ("512mb", Some(512)),
            ("0", None),
            ("64M", Some(64)),
            ("63", None),
            ("32M", None),
            ("1048576G", Some(1 << 30)),
            ("1048577G", None),
            ("", None),
            ("12X", None),
            ("M", None),
            ("-5M", None),
            ("99999999999999999999G", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_mem_mib(input).ok(), *want, "size {input:?}");
        }
    }
}
