//! The pages, rendered on the server as plain HTML with every value escaped.
//! No JavaScript: the page reloads itself with `<meta http-equiv=refresh>`,
//! filters are a GET form, bars are CSS widths.

use std::{fmt::Write, time::Duration};

use crate::{
    fleet::{DeviceView, LAG_BUCKETS, Summary, UserView},
    status::Status,
};

use super::DeviceFilter;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Percent-encodes a path segment or query value.
fn url_component(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(byte as char);
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .4em}\
table{border-collapse:collapse}td,th{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}\
.cards{display:flex;gap:1.5em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em}\
.bar{display:inline-block;height:.8em;background:#5b8def;vertical-align:middle}\
.st{font-weight:600;padding:.1em .45em;border-radius:4px;font-size:.85em}\
.st-OK{background:#d8f5dd;color:#135b22}.st-CATCHING_UP{background:#dcebff;color:#123f7a}\
.st-LAGGING{background:#fff1c9;color:#6b4d00}.st-STALLED{background:#ffd9b3;color:#7a3a00}\
.st-OFFLINE{background:#e6e6e6;color:#333}.st-RESYNC_NEEDED{background:#ffc9c9;color:#7a0000}\
.st-AT_RISK{background:#f5c6f0;color:#5e0a55}.st-REVOKED{background:#eee;color:#888;text-decoration:line-through}\
.log{position:relative;width:16em;height:.9em;background:#eee;display:inline-block;vertical-align:middle}\
.log .acked{position:absolute;left:0;top:0;bottom:0;background:#5b8def}\
.muted{color:#777}form{margin:.6em 0}code{font-size:.9em}";

fn head(title: &str, refresh: Duration) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{}\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>{STYLE}</style></head><body>",
        refresh.as_secs().max(1),
        escape(title)
    )
}

fn status_badge(status: Status) -> String {
    let name = status.as_str();
    format!("<span class=\"st st-{name}\">{name}</span>")
}

/// "3.2 s", "4 min", "2 h", "5 d" ago-style durations.
fn human_seconds(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3600.0 {
        format!("{:.0} min", seconds / 60.0)
    } else if seconds < 86_400.0 {
        format!("{:.1} h", seconds / 3600.0)
    } else {
        format!("{:.1} d", seconds / 86_400.0)
    }
}

fn ago(now_ms: i64, at_ms: Option<i64>) -> String {
    match at_ms {
        Some(at) => format!("{} ago", human_seconds((now_ms - at).max(0) as f64 / 1000.0)),
        None => "never".into(),
    }
}

fn lag_time(view: &DeviceView) -> String {
    match view.lag_seconds {
        Some(seconds) => human_seconds(seconds),
        None if view.lag_changes == 0 => "0".into(),
        None => "?".into(),
    }
}

fn connected(view: &DeviceView) -> String {
    if view.connected { format!("yes ({})", escape(&view.nodes.join(", "))) } else { "no".into() }
}

fn wakeup(view: &DeviceView, now_ms: i64) -> String {
    match &view.last_wakeup {
        Some(wake) => format!(
            "{} {} (log end {}){}",
            wake.outcome,
            ago(now_ms, Some(wake.at_ms)),
            wake.log_end,
            if wake.http_status > 0 { format!(" HTTP {}", wake.http_status) } else { String::new() }
        ),
        None => "—".into(),
    }
}

fn summary_section(page: &mut String, summary: &Summary) {
    let _ = write!(
        page,
        "<section id=\"summary\"><div class=\"cards\"><div class=\"card\"><h2>Devices per status</h2><table id=\"by-status\">"
    );
    for (status, count) in &summary.by_status {
        let name = status.as_str();
        let _ = write!(
            page,
            "<tr data-status=\"{name}\"><td><a href=\"/?status={name}\">{}</a></td><td class=\"n\">{count}</td></tr>",
            status_badge(*status)
        );
    }
    let _ = write!(
        page,
        "<tr><th>all</th><th class=\"n\">{}</th></tr></table><p class=\"muted\">{} users</p></div>",
        summary.devices, summary.users
    );
    let largest = summary.lag_distribution.iter().map(|(_, count)| *count).max().unwrap_or(0).max(1);
    let _ = write!(page, "<div class=\"card\"><h2>Lag (changes behind)</h2><table id=\"lag-distribution\">");
    for (index, (bound, count)) in summary.lag_distribution.iter().enumerate() {
        let label = match (index, bound) {
            (0, _) => "0".to_string(),
            (_, Some(bound)) => format!("{}–{bound}", LAG_BUCKETS[index - 1] + 1),
            (_, None) => format!("&gt; {}", LAG_BUCKETS[LAG_BUCKETS.len() - 1]),
        };
        let width = 12.0 * *count as f64 / largest as f64;
        let _ = write!(
            page,
            "<tr><td>{label}</td><td class=\"n\">{count}</td><td><span class=\"bar\" style=\"width:{width:.2}em\"></span></td></tr>"
        );
    }
    let _ = write!(
        page,
        "</table></div><div class=\"card\"><h2>Traffic (last minute)</h2><table id=\"rates\">\
         <tr><td>changes appended / s</td><td class=\"n\">{:.2}</td></tr>\
         <tr><td>changes acked (delivered) / s</td><td class=\"n\">{:.2}</td></tr>\
         <tr><td>wake-ups / s</td><td class=\"n\">{:.2}</td></tr>\
         <tr><td>events read</td><td class=\"n\">{}</td></tr></table></div>",
        summary.appended_per_sec, summary.acked_per_sec, summary.wakeups_per_sec, summary.events_applied
    );
    let _ = write!(
        page,
        "<div class=\"card\"><h2>Nodes</h2><table id=\"nodes\"><tr><th>node</th><th>streams</th><th>last event</th></tr>"
    );
    for node in &summary.nodes {
        let _ = write!(
            page,
            "<tr><td><code>{}</code></td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&node.node_id),
            node.connections,
            ago(summary.now_ms, Some(node.last_seen_ms))
        );
    }
    page.push_str("</table></div></div></section>");
}

fn filter_form(page: &mut String, filter: &DeviceFilter) {
    let current = filter.status.as_deref().unwrap_or("");
    page.push_str("<form method=\"get\" action=\"/\" id=\"filters\"><label>status <select name=\"status\"><option value=\"\">any</option>");
    for status in Status::ALL {
        let name = status.as_str();
        let selected = if current.eq_ignore_ascii_case(name) { " selected" } else { "" };
        let _ = write!(page, "<option value=\"{name}\"{selected}>{name}</option>");
    }
    let _ = write!(
        page,
        "</select></label> <label>user <input name=\"user\" size=\"38\" value=\"{}\"></label> \
         <button type=\"submit\">filter</button> <a href=\"/\">clear</a></form>",
        escape(filter.user.as_deref().unwrap_or(""))
    );
}

fn device_row(page: &mut String, view: &DeviceView, now_ms: i64) {
    let _ = write!(
        page,
        "<tr data-device=\"{device}\" data-user=\"{user}\" data-status=\"{status}\">\
         <td class=\"status\">{badge}</td><td><a href=\"/users/{user_url}\"><code>{user}</code></a></td>\
         <td><code>{device}</code></td><td class=\"n\">{lag}</td><td class=\"n\">{lag_time}</td>\
         <td class=\"n\">{committed}</td><td class=\"n\">{start}–{end}</td><td>{last_ack}</td><td>{connected}</td>\
         <td>{wakeup}</td></tr>",
        device = escape(&view.device_id),
        user = escape(&view.user_id),
        user_url = url_component(&view.user_id),
        status = view.status.as_str(),
        badge = status_badge(view.status),
        lag = view.lag_changes,
        lag_time = lag_time(view),
        committed = view.committed.map_or("—".to_string(), |c| c.to_string()),
        start = view.log_start,
        end = view.log_end,
        last_ack = ago(now_ms, view.last_ack_at_ms),
        connected = connected(view),
        wakeup = wakeup(view, now_ms),
    );
}

/// The fleet page: summary, filters, the worst-first device table.
pub fn fleet_page(
    summary: &Summary,
    devices: &[DeviceView],
    limit: usize,
    filter: &DeviceFilter,
    refresh: Duration,
) -> String {
    let mut page = head("Lockstep — device freshness", refresh);
    page.reserve(devices.len().min(limit) * 700);
    page.push_str(
        "<h1>Lockstep — device freshness</h1><p class=\"muted\">Pseudonymous ids only. The page reloads itself every ",
    );
    let _ = write!(page, "{} s.</p>", refresh.as_secs().max(1));
    summary_section(&mut page, summary);
    page.push_str("<h2>Devices, worst first</h2>");
    filter_form(&mut page, filter);
    page.push_str(
        "<table id=\"devices\"><thead><tr><th>status</th><th>user</th><th>device</th><th>lag (changes)</th>\
         <th>lag (time)</th><th>committed</th><th>log</th><th>last ack</th><th>connected</th><th>last wake-up</th>\
         </tr></thead><tbody>",
    );
    for view in devices.iter().take(limit) {
        device_row(&mut page, view, summary.now_ms);
    }
    page.push_str("</tbody></table>");
    if devices.len() > limit {
        let _ = write!(
            page,
            "<p class=\"muted\" id=\"more\">{} more devices not shown (filter, or <code>?limit=</code>).</p>",
            devices.len() - limit
        );
    }
    page.push_str("<p class=\"muted\">JSON: <a href=\"/api/v1/devices\">/api/v1/devices</a> · <a href=\"/metrics\">/metrics</a></p></body></html>");
    page
}

/// One user's devices side by side, their offsets against the log, and the
/// timeline of appends and acks.
pub fn user_page(user: &UserView, now_ms: i64, refresh: Duration) -> String {
    let mut page = head(&format!("Lockstep — user {}", user.user_id), refresh);
    let _ = write!(
        page,
        "<p><a href=\"/\">← fleet</a></p><h1>User <code>{}</code></h1>\
         <p>log <span id=\"log-bounds\">{}–{}</span> (generation {}), {} devices</p>",
        escape(&user.user_id),
        user.log_start,
        user.log_end,
        user.log_generation,
        user.devices.len()
    );
    page.push_str("<table id=\"user-devices\"><tr><th></th>");
    for device in &user.devices {
        let _ = write!(page, "<th data-device=\"{0}\"><code>{0}</code></th>", escape(&device.device_id));
    }
    page.push_str("</tr>");
    type Cell = fn(&DeviceView, i64) -> String;
    let rows: [(&str, Cell); 9] = [
        ("status", |d, _| format!("<span data-status=\"{}\">{}</span>", d.status.as_str(), status_badge(d.status))),
        ("committed", |d, _| d.committed.map_or("—".into(), |c| c.to_string())),
        ("position in log", |d, _| {
            let span = (d.log_end - d.log_start).max(1) as f64;
            let position = d.committed.unwrap_or(d.log_start).clamp(d.log_start, d.log_end.max(d.log_start));
            let percent = 100.0 * (position - d.log_start) as f64 / span;
            format!("<span class=\"log\"><span class=\"acked\" style=\"width:{percent:.1}%\"></span></span>")
        }),
        ("lag (changes)", |d, _| d.lag_changes.to_string()),
        ("lag (time)", |d, _| lag_time(d)),
        ("last ack", |d, now| ago(now, d.last_ack_at_ms)),
        ("connected", |d, _| connected(d)),
        ("last wake-up", wakeup),
        ("push target", |d, _| if d.push_target { "set".into() } else { "none".into() }),
    ];
    for (label, cell) in rows {
        let _ = write!(page, "<tr><th>{label}</th>");
        for device in &user.devices {
            let _ = write!(page, "<td>{}</td>", cell(device, now_ms));
        }
        page.push_str("</tr>");
    }
    page.push_str(
        "</table><h2>Timeline: appends vs acks (newest first)</h2><table id=\"timeline\">\
         <tr><th>when</th><th>what</th><th>device</th><th>offset</th><th>changes</th></tr>",
    );
    for entry in &user.timeline {
        let what = if entry.kind == "appended" { "appended → log end" } else { "acked → committed" };
        let _ = write!(
            page,
            "<tr class=\"{}\"><td>{}</td><td>{what}</td><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            entry.kind,
            ago(now_ms, Some(entry.at_ms)),
            escape(&entry.device_id),
            entry.offset,
            entry.count
        );
    }
    page.push_str("</table></body></html>");
    page
}

/// The sign-in form: the admin token goes in a POST body, never in the URL.
pub fn login_page(error: Option<&str>) -> String {
    let error =
        error.map(|error| format!("<p class=\"st st-RESYNC_NEEDED\">{}</p>", escape(error))).unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>sign in: lockstep dashboard</title>\
         <style>{STYLE}</style></head><body><h1>Lockstep dashboard</h1>{error}\
         <form method=\"post\" action=\"/login\"><label>Admin token \
         <input type=\"password\" name=\"token\" autocomplete=\"current-password\" required autofocus></label> \
         <button type=\"submit\">Sign in</button></form></body></html>"
    )
}

pub fn not_found(user_id: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>unknown user</title></head>\
         <body><p>No user <code>{}</code> in the events seen so far. <a href=\"/\">fleet</a></p></body></html>",
        escape(user_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        assert_eq!(escape("<a href=\"x\">&'</a>"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;");
        assert_eq!(url_component("a b/c"), "a%20b%2Fc");
        assert!(not_found("<script>").contains("&lt;script&gt;"));
    }
}
