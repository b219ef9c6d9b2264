//! The console's HTML: escaping, the page frame, tables and the two SVG
//! charts. Only presentation: every number drawn here comes from a service
//! answer, already summed.

use sandboxer_credits::parse_credits;
use std::fmt::Write;

/// Text made safe for element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

/// A query-string component.
pub fn url_part(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `—` for nothing.
pub fn or_dash(value: Option<&str>) -> String {
    value.map_or_else(|| "—".to_string(), esc)
}

/// The navigation entries: (path, label).
const NAV: [(&str, &str); 5] = [
    ("/ui/sandboxes", "Sandboxes"),
    ("/ui/tenants", "Tenants"),
    ("/ui/extensions", "Extensions"),
    ("/ui/routing", "Routing"),
    ("/ui/events", "Events"),
];

/// A whole page. `csrf` is the session's token (for the logout form); none
/// on the login page, which has no navigation.
pub fn page(title: &str, active: &str, csrf: Option<&str>, body: &str) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · sandboxer console</title>\
         <link rel=\"stylesheet\" href=\"/ui/assets/console.css\">\
         <script src=\"/ui/assets/console.js\" defer></script></head><body>",
        esc(title)
    );
    html.push_str("<header class=\"top\"><span class=\"brand\">sandboxer console</span>");
    if let Some(csrf) = csrf {
        html.push_str("<nav aria-label=\"Console pages\"><ul>");
        for (path, label) in NAV {
            let current = if path == active {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(html, "<li><a href=\"{path}\"{current}>{label}</a></li>");
        }
        let _ = write!(
            html,
            "</ul></nav><form method=\"post\" action=\"/ui/logout\" class=\"logout\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\">Log out</button></form>",
            esc(csrf)
        );
    }
    let _ = write!(
        html,
        "</header><main id=\"main\"><h1>{}</h1>{body}</main></body></html>",
        esc(title)
    );
    html
}

/// A message box: `error` ones are announced to screen readers at once.
pub fn notice(kind: &str, text: &str) -> String {
    let role = if kind == "error" { "alert" } else { "status" };
    format!(
        "<p class=\"notice {kind}\" role=\"{role}\" id=\"notice\">{}</p>",
        esc(text)
    )
}

/// A table: a caption, column headers, and rows of ready-made cells
/// (already escaped). Each row's first cell is a row header.
pub fn table(id: &str, caption: &str, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut html = format!(
        "<div class=\"scroll\"><table id=\"{id}\"><caption>{}</caption><thead><tr>",
        esc(caption)
    );
    for header in headers {
        let _ = write!(html, "<th scope=\"col\">{}</th>", esc(header));
    }
    html.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(
            html,
            "<tr><td colspan=\"{}\" class=\"empty\">None.</td></tr>",
            headers.len()
        );
    }
    for row in rows {
        html.push_str("<tr>");
        for (index, cell) in row.iter().enumerate() {
            if index == 0 {
                let _ = write!(html, "<th scope=\"row\">{cell}</th>");
            } else {
                let _ = write!(html, "<td>{cell}</td>");
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table></div>");
    html
}

/// A definition list of (term, escaped value).
pub fn facts(pairs: &[(&str, String)]) -> String {
    let mut html = String::from("<dl class=\"facts\">");
    for (term, value) in pairs {
        let _ = write!(html, "<div><dt>{}</dt><dd>{value}</dd></div>", esc(term));
    }
    html.push_str("</dl>");
    html
}

/// Micro-credits of a decimal-credit string from a service answer (they
/// always parse; a zero stands in if one ever did not).
fn micros(amount: &str) -> u64 {
    if amount.trim_start_matches(['0', '.']).is_empty() {
        return 0;
    }
    parse_credits(amount).unwrap_or(0)
}

const CHART_WIDTH: u64 = 640;
const CHART_HEIGHT: u64 = 200;
const BASELINE: u64 = 180;
const BAR_AREA: u64 = 150;

/// Height in pixels of `value` on a scale whose top is `max` (integers
/// only: money is never a float, not even on its way to a pixel).
fn bar_height(value: u64, max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let scaled = u128::from(value) * u128::from(BAR_AREA) / u128::from(max);
    u64::try_from(scaled)
        .unwrap_or(BAR_AREA)
        .max(u64::from(value > 0))
}

/// One bar per bucket: (start, amount, charges). Each bar carries its bucket
/// and amount as data attributes and a `<title>` tooltip.
pub fn spend_chart(label: &str, buckets: &[(String, String, u64)]) -> String {
    let max = buckets.iter().map(|(_, amount, _)| micros(amount)).max();
    let max = max.unwrap_or(0);
    let count = buckets.len().max(1) as u64;
    let slot = (CHART_WIDTH - 40) / count;
    let width = slot.saturating_sub(slot / 4).clamp(1, 60);
    let mut svg = format!(
        "<svg id=\"spend-chart\" class=\"chart\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\" \
         role=\"img\" aria-labelledby=\"spend-chart-title\"><title id=\"spend-chart-title\">{}</title>\
         <line x1=\"30\" y1=\"{BASELINE}\" x2=\"{CHART_WIDTH}\" y2=\"{BASELINE}\" class=\"axis\"/>",
        esc(label)
    );
    for (index, (start, amount, charges)) in buckets.iter().enumerate() {
        let height = bar_height(micros(amount), max);
        let x = 36 + index as u64 * slot;
        let _ = write!(
            svg,
            "<rect class=\"bar\" x=\"{x}\" y=\"{}\" width=\"{width}\" height=\"{height}\" \
             data-start=\"{}\" data-charged=\"{}\" data-charges=\"{charges}\">\
             <title>{}: {} credits in {charges} charges</title></rect>",
            BASELINE - height,
            esc(start),
            esc(amount),
            esc(start),
            esc(amount),
        );
    }
    let _ = write!(
        svg,
        "<text x=\"30\" y=\"14\" class=\"scale\">max {}</text></svg>",
        esc(&sandboxer_credits::format_credits(max))
    );
    svg
}

/// Two bars per billed sandbox, estimate and actual: (sandbox, estimate,
/// actual).
pub fn drift_chart(label: &str, points: &[(String, String, String)]) -> String {
    let max = points
        .iter()
        .flat_map(|(_, estimate, actual)| [micros(estimate), micros(actual)])
        .max()
        .unwrap_or(0);
    let count = points.len().max(1) as u64;
    let slot = (CHART_WIDTH - 40) / count;
    let width = (slot / 3).clamp(1, 24);
    let mut svg = format!(
        "<svg id=\"drift-chart\" class=\"chart\" viewBox=\"0 0 {CHART_WIDTH} {CHART_HEIGHT}\" \
         role=\"img\" aria-labelledby=\"drift-chart-title\"><title id=\"drift-chart-title\">{}</title>\
         <line x1=\"30\" y1=\"{BASELINE}\" x2=\"{CHART_WIDTH}\" y2=\"{BASELINE}\" class=\"axis\"/>",
        esc(label)
    );
    for (index, (sandbox, estimate, actual)) in points.iter().enumerate() {
        let x = 36 + index as u64 * slot;
        for (offset, class, amount) in [(0, "estimate", estimate), (width, "actual", actual)] {
            let height = bar_height(micros(amount), max);
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{}\" y=\"{}\" width=\"{width}\" height=\"{height}\" \
                 data-sandbox=\"{}\" data-{class}=\"{}\"><title>{}: {class} {}</title></rect>",
                x + offset,
                BASELINE - height,
                esc(sandbox),
                esc(amount),
                esc(sandbox),
                esc(amount),
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"30\" y=\"14\" class=\"scale\">max {}</text>\
         <g class=\"legend\"><rect class=\"estimate\" x=\"440\" y=\"4\" width=\"12\" height=\"12\"/>\
         <text x=\"456\" y=\"14\">estimate</text>\
         <rect class=\"actual\" x=\"530\" y=\"4\" width=\"12\" height=\"12\"/>\
         <text x=\"546\" y=\"14\">actual</text></g></svg>",
        esc(&sandboxer_credits::format_credits(max))
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_names_is_shown_as_text() {
        assert_eq!(
            esc("<script>\"x\"&'y'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
        assert_eq!(url_part("a b&c"), "a%20b%26c");
    }

    #[test]
    fn the_tallest_bar_fills_the_chart_and_a_tiny_one_still_shows() {
        assert_eq!(bar_height(5, 5), BAR_AREA);
        assert_eq!(bar_height(1, 1_000_000_000), 1);
        assert_eq!(bar_height(0, 10), 0);
        let chart = spend_chart("spend", &[("t0".into(), "1.500000".into(), 2)]);
        assert!(chart.contains("data-charged=\"1.500000\""), "{chart}");
        assert!(chart.contains(&format!("height=\"{BAR_AREA}\"")), "{chart}");
    }
}
