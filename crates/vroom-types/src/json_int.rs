//! Integers as JSON Schema sees them: `5` and `5.0` are the same integer
//! (JSON has only numbers), while serde_json takes `5.0` for a float. Request
//! fields typed `integer` in the API document deserialize through these, so
//! that every client that honours the document is understood.

use serde::de::Error;
use serde::{Deserialize, Deserializer};

/// The largest integer a JSON number (an IEEE double) holds exactly.
const MAX_EXACT: f64 = 9_007_199_254_740_991.0;

fn integer<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    number: serde_json::Number,
) -> Result<T, D::Error> {
    let value = match number.as_u64() {
        Some(v) => v,
        None => number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=MAX_EXACT).contains(f))
            .map(|f| f as u64)
            .ok_or_else(|| D::Error::custom(format!("{number} is not a non-negative integer")))?,
    };
    T::try_from(value).map_err(|_| D::Error::custom(format!("{value} is too large")))
}

/// A required integer field.
pub(crate) fn required<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    integer::<D, T>(serde_json::Number::deserialize(d)?)
}

/// An optional integer field (`null` or absent is `None`; needs `#[serde(default)]`).
pub(crate) fn optional<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?
        .map(integer::<D, T>)
        .transpose()
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Probe {
        #[serde(deserialize_with = "super::required")]
        n: u32,
        #[serde(default, deserialize_with = "super::optional")]
        m: Option<u64>,
    }

    /// What a probe parses into: `(n, m)`, or `None` when refused.
    type Parsed = Option<(u32, Option<u64>)>;

    #[test]
    fn integers_table() {
        let cases: &[(&str, Parsed)] = &[
            (r#"{"n":5}"#, Some((5, None))),
            (r#"{"n":5.0,"m":null}"#, Some((5, None))),
            (
                r#"{"n":0,"m":18446744073709551615}"#,
                Some((0, Some(u64::MAX))),
            ),
            (r#"{"n":1,"m":3600.0}"#, Some((1, Some(3600)))),
            (r#"{"n":5.5}"#, None),
            (r#"{"n":-1}"#, None),
            (r#"{"n":-0.5}"#, None),
            (r#"{"n":4294967296}"#, None),
            (r#"{"n":1e300}"#, None),
            (r#"{"n":"5"}"#, None),
            (r#"{"m":5}"#, None),
        ];
        for (json, want) in cases {
            let got = serde_json::from_str::<Probe>(json).ok().map(|p| (p.n, p.m));
            assert_eq!(got, *want, "{json}");
        }
    }
}
