//! The small pieces the dashboard's pages are written with: escaping
//! (every value from a record goes through [`esc`]), badges, tables and
//! readable sizes and ages. Pure functions of their arguments.

use std::fmt::Write;

/// `text` safe inside an element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as one path segment of a dashboard link (names are path-safe
/// already; anything else is percent-encoded all the same).
pub fn seg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A state as a coloured word: its class is the state's own word, so the
/// style sheet colours `running`, `failed`, `bypassed`... alike everywhere.
pub fn badge(state: &str) -> String {
    let class: String = state
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!(
        "<span class=\"badge s-{}\">{}</span>",
        esc(&class),
        esc(state)
    )
}

/// A table with `headers` and pre-rendered `<tr>` rows, or `empty` (a
/// sentence) when there are none. `id` makes the body live: the page script
/// swaps it for the server's newer rendering.
pub fn table(id: &str, headers: &[&str], rows: &[String], empty: &str) -> String {
    let mut out = format!("<div class=\"table\" id=\"{}\" data-live>", esc(id));
    if rows.is_empty() {
        let _ = write!(out, "<p class=\"empty\">{}</p>", esc(empty));
    } else {
        out.push_str("<table><thead><tr>");
        for h in headers {
            let _ = write!(out, "<th>{}</th>", esc(h));
        }
        out.push_str("</tr></thead><tbody>");
        for row in rows {
            out.push_str(row);
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</div>");
    out
}

/// A size in bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// How long before `now` a moment was (both Unix seconds): `12 s ago`,
/// `5 min ago`, `3 h ago`, `2 d ago`.
pub fn age(now: u64, then: u64) -> String {
    let secs = now.saturating_sub(then);
    match secs {
        0..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86400 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86400),
    }
}

/// A button that changes something: the page script asks `confirm`
/// first, then calls the JSON API.
pub fn action(action: &str, name: &str, label: &str, enabled: bool, confirm: &str) -> String {
    format!(
        "<button type=\"button\" data-action=\"{}\" data-name=\"{}\" data-confirm=\"{}\"{}>{}</button>",
        esc(action),
        esc(name),
        esc(confirm),
        if enabled { "" } else { " disabled" },
        esc(label)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_table() {
        for (input, want) in [
            ("web", "web"),
            ("<script>", "&lt;script&gt;"),
            ("a\"b'c&d", "a&quot;b&#39;c&amp;d"),
            ("", ""),
        ] {
            assert_eq!(esc(input), want, "{input}");
        }
        for (input, want) in [("web-1", "web-1"), ("a b/c", "a%20b%2Fc"), ("é", "%C3%A9")] {
            assert_eq!(seg(input), want, "{input}");
        }
    }

    #[test]
    fn sizes_and_ages_table() {
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1536, "1.5 KiB"),
            (5 << 30, "5.0 GiB"),
        ] {
            assert_eq!(bytes(n), want);
        }
        for (secs, want) in [
            (0, "0 s ago"),
            (59, "59 s ago"),
            (60, "1 min ago"),
            (7200, "2 h ago"),
            (3 * 86400, "3 d ago"),
        ] {
            assert_eq!(age(1_000_000, 1_000_000 - secs), want);
        }
        // A clock that went back says 0, not a panic.
        assert_eq!(age(5, 10), "0 s ago");
    }

    #[test]
    fn badges_and_buttons_escape_what_they_carry() {
        assert_eq!(
            badge("up_to_date"),
            "<span class=\"badge s-up-to-date\">up_to_date</span>"
        );
        let b = action("stop", "w\"1", "Stop", false, "Stop w\"1?");
        assert!(b.contains("data-name=\"w&quot;1\""), "{b}");
        assert!(b.contains(" disabled>"), "{b}");
    }
}
