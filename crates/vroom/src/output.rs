//! Human-readable tables, and JSON for scripts.

use serde::Serialize;

/// Prints a listing as JSON, or as a table with one row per item.
pub fn list<T: Serialize>(
    json_output: bool,
    items: &[T],
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) {
    if json_output {
        json(&items);
    } else {
        table(header, &items.iter().map(row).collect::<Vec<_>>());
    }
}

/// A spinner for a long request on a terminal, unless the output is JSON
/// for scripts. Off a terminal (a script, a pipe) it draws nothing: stderr
/// stays free for the one-line error of a command that fails.
pub fn spinner(json_output: bool, message: String) -> Option<indicatif::ProgressBar> {
    (!json_output).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                .expect("invariant: valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar.set_message(message);
        bar
    })
}

/// Progress through named stages: a spinner on the current one and a line
/// with its duration for each one finished. Off a terminal (a background
/// build's log) each stage also gets a line when it starts, so a long one
/// is not silent.
pub struct Stages {
    bar: Option<indicatif::ProgressBar>,
    current: Option<(String, String, std::time::Instant)>,
}

impl Stages {
    pub fn new(json_output: bool, message: String) -> Self {
        let bar = spinner(json_output, message.clone());
        if bar.as_ref().is_some_and(|b| b.is_hidden()) {
            eprintln!("{message}...");
        }
        Stages { bar, current: None }
    }

    pub fn update(&mut self, stage: &str, detail: &str) {
        if self.current.as_ref().is_some_and(|(s, _, _)| s != stage) {
            self.close();
        }
        let started = match self.current.take() {
            Some((_, _, at)) => at,
            None => {
                if self.bar.as_ref().is_some_and(|b| b.is_hidden()) {
                    eprintln!("{stage:<9} {detail}...");
                }
                std::time::Instant::now()
            }
        };
        self.current = Some((stage.to_string(), detail.to_string(), started));
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{stage}: {detail}"));
        }
    }

    fn close(&mut self) {
        let (Some(bar), Some((stage, detail, at))) = (&self.bar, self.current.take()) else {
            return;
        };
        let line = format!("{stage:<9} {detail} ({:.1}s)", at.elapsed().as_secs_f64());
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }

    /// Prints the last stage's line (when it succeeded) and clears the spinner.
    pub fn finish(mut self, ok: bool) {
        if ok {
            self.close();
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub fn json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("invariant: API types serialize")
    );
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn ago(unix_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = now.saturating_sub(unix_secs);
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

pub fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", n as f64 / 1024.0)
    }
}

/// `1 change`, `2 changes`, `0 changes`.
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_agree_with_their_number() {
        for (n, want) in [(0, "0 changes"), (1, "1 change"), (2, "2 changes")] {
            assert_eq!(super::count(n, "change", "changes"), want);
        }
    }
}
