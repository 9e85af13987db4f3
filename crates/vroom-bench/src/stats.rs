//! The figures every bench reports: medians and 90th percentiles.

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}
pub(crate) fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    s[s.len() / 2]
}
pub(crate) fn p90(v: &[f64]) -> f64 {
    let s = sorted(v);
    s[((s.len() as f64 * 0.9).ceil() as usize)
        .saturating_sub(1)
        .min(s.len() - 1)]
}
