//! The status page at `/` on `http.listen`: what an operator looks at
//! during a migration. Server-rendered HTML with inline SVG charts,
//! reloaded by the browser every few seconds: no script, no build chain,
//! nothing fetched from elsewhere, readable on a phone.
//!
//! It shows what `cutover status` shows, and the lag as a picture: the
//! stored lag samples of the direction streaming (a week is kept; the
//! chart shows the newest [`CHART_SAMPLES`]).

use std::fmt::Write as _;
use std::time::Duration;

use crate::check::report::human_bytes;
use crate::live::{DaemonState, StatusView};
use crate::store::{ConflictRecord, LagSample, TableCopy, TableCopyState};

/// Lag samples the chart shows (an hour at the default 10 s interval).
pub const CHART_SAMPLES: usize = 360;

/// Conflicts listed (the newest).
pub const CONFLICTS_LISTED: usize = 10;

/// Seconds between the browser's reloads.
const REFRESH_SECONDS: u32 = 5;

/// What the page shows.
#[derive(Debug)]
pub struct Page<'a> {
    /// The daemon's status.
    pub view: &'a StatusView,
    /// Lag samples of the direction streaming, oldest first.
    pub history: &'a [LagSample],
    /// The copy's tables.
    pub copies: &'a [TableCopy],
    /// Conflicts recorded in all, and the newest of them.
    pub conflicts: (usize, &'a [ConflictRecord]),
    /// `max_lag`: above it, `/health` fails.
    pub max_lag: Duration,
    /// Now, unix milliseconds.
    pub now_ms: u64,
}

/// `text` made safe inside HTML text and attribute values. Written here:
/// five replacements are all one page needs, not a template engine.
fn esc(text: &str) -> String {
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

/// The badge colour of a state: green streaming, amber while something
/// waits on an operator or a switch, red failed.
fn tone(state: DaemonState) -> &'static str {
    match state {
        DaemonState::Streaming => "ok",
        DaemonState::Failed => "bad",
        DaemonState::Starting | DaemonState::Copying => "busy",
        _ => "warn",
    }
}

/// `seconds` as `1h 02m`, `3m 05s` or `4.2 s`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s >= 3600.0 {
        format!("{}h {:02}m", (s / 3600.0) as u64, (s as u64 % 3600) / 60)
    } else if s >= 60.0 {
        format!("{}m {:02}s", (s / 60.0) as u64, s as u64 % 60)
    } else {
        format!("{s:.1} s")
    }
}

/// The page.
pub fn render(page: &Page<'_>) -> String {
    let view = page.view;
    let mut html = String::with_capacity(16 * 1024);
    let state = view.state.name();
    let _ = writeln!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>cutover: {state}</title>
<style>{STYLE}</style></head><body>
<header><h1>cutover</h1><span class="badge {tone}" id="state">{state}</span></header>"#,
        tone = tone(view.state),
    );
    let (from, to) = match view.direction.as_str() {
        "reverse" => ("target", "source"),
        _ => ("source", "target"),
    };
    let uptime = (page.now_ms / 1000).saturating_sub(view.started_at) as f64;
    let _ = writeln!(
        html,
        r#"<section><dl class="facts">
<dt>Direction</dt><dd id="direction">{direction}: {from} → {to}</dd>
<dt>Primary (takes writes)</dt><dd id="primary">{primary}</dd>
<dt>Slot</dt><dd>{slot}</dd>
<dt>Applied up to</dt><dd>{applied}</dd>
<dt>Transactions applied</dt><dd>{transactions}</dd>
<dt>Up for</dt><dd>{uptime} (pid {pid})</dd>"#,
        direction = view.direction.as_str(),
        primary = esc(view.primary),
        slot = esc(&view.slot),
        applied = esc(view.applied_lsn.as_deref().unwrap_or("nothing yet")),
        transactions = view.transactions_applied,
        uptime = duration(uptime),
        pid = view.pid,
    );
    if let Some(kafka) = &view.kafka_committed_lsn {
        let _ = writeln!(html, "<dt>Kafka holds up to</dt><dd>{}</dd>", esc(kafka));
    }
    if !view.moved_groups.is_empty() {
        let _ = writeln!(
            html,
            "<dt>Groups moved</dt><dd>{}</dd>",
            esc(&view.moved_groups.join(", "))
        );
    }
    html.push_str("</dl></section>\n");
    if let Some(error) = &view.last_error {
        let _ = writeln!(
            html,
            r#"<section class="error" id="last-error"><h2>Last error</h2><p>{}</p></section>"#,
            esc(&error.message)
        );
    }
    lag(&mut html, page);
    copy(&mut html, page.copies);
    applied(&mut html, view);
    divergence(&mut html, view);
    conflicts(&mut html, page.conflicts);
    switch(&mut html, view);
    html.push_str("<footer>Reloads every 5 s. The same figures: <a href=\"/health\">/health</a>, <a href=\"/metrics\">/metrics</a>, <code>cutover status</code>.</footer>\n</body></html>\n");
    html
}

/// Lag now, and its charts over the stored history.
fn lag(html: &mut String, page: &Page<'_>) {
    let lag = &page.view.lag;
    let over = lag.seconds > page.max_lag.as_secs_f64();
    let _ = writeln!(
        html,
        r#"<section id="lag"><h2>Lag</h2>
<p class="big"><span class="{tone}" id="lag-seconds">{seconds}</span> behind, <span id="lag-bytes">{bytes}</span> of WAL to apply <small>(max_lag {max})</small></p>"#,
        tone = if over { "bad" } else { "ok" },
        seconds = duration(lag.seconds),
        bytes = lag.bytes.map_or("unknown".into(), |b| human_bytes(
            i64::try_from(b).unwrap_or(i64::MAX)
        )),
        max = duration(page.max_lag.as_secs_f64()),
    );
    if let Some(retained) = lag.slot_retained_bytes {
        let _ = writeln!(
            html,
            "<p>The slot holds {} of WAL on the primary{}.</p>",
            human_bytes(i64::try_from(retained).unwrap_or(i64::MAX)),
            lag.wal_status
                .as_deref()
                .map_or(String::new(), |s| format!(" (wal_status {})", esc(s)))
        );
    }
    let history = page.history;
    if history.len() < 2 {
        html.push_str(
            "<p class=\"muted\">The chart appears after two lag samples.</p></section>\n",
        );
        return;
    }
    let span = (history[history.len() - 1].at_ms - history[0].at_ms) as f64 / 1000.0;
    let _ = writeln!(
        html,
        "<p class=\"muted\">The last {} over {} samples.</p>",
        duration(span),
        history.len()
    );
    let seconds: Vec<(u64, f64)> = history.iter().map(|s| (s.at_ms, s.seconds)).collect();
    chart(html, "chart-seconds", "seconds behind", &seconds, |v| {
        duration(v)
    });
    let bytes: Vec<(u64, f64)> = history
        .iter()
        .filter_map(|s| s.bytes.map(|b| (s.at_ms, b as f64)))
        .collect();
    if bytes.len() >= 2 {
        chart(html, "chart-bytes", "WAL to apply", &bytes, |v| {
            human_bytes(v as i64)
        });
    }
    html.push_str("</section>\n");
}

/// One line chart of `points` (time, value) as inline SVG.
fn chart(
    html: &mut String,
    id: &str,
    title: &str,
    points: &[(u64, f64)],
    label: impl Fn(f64) -> String,
) {
    const W: f64 = 600.0;
    const H: f64 = 120.0;
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let width = (t1.saturating_sub(t0)).max(1) as f64;
    let top = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let scale = if top > 0.0 { top } else { 1.0 };
    let mut line = String::with_capacity(points.len() * 12);
    for (t, v) in points {
        let x = (t - t0) as f64 / width * W;
        let y = H - (v / scale) * (H - 4.0);
        let _ = write!(line, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        html,
        r#"<figure><figcaption>{title} <small>(top {top})</small></figcaption>
<svg id="{id}" viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img" aria-label="{title} over time">
<line x1="0" y1="{H}" x2="{W}" y2="{H}" class="axis"/>
<polyline points="{line}" class="series"/>
</svg></figure>"#,
        top = esc(&label(top)),
        line = line.trim_end(),
    );
}

/// The copy's tables, with their progress.
fn copy(html: &mut String, copies: &[TableCopy]) {
    if copies.is_empty() {
        return;
    }
    let done = copies
        .iter()
        .filter(|c| c.state == TableCopyState::Copied)
        .count();
    let _ = writeln!(
        html,
        r#"<section id="copy"><h2>Copy <small>{done} of {} tables copied</small></h2>
<table><thead><tr><th>Table</th><th>State</th><th>Progress</th><th>Rows</th><th>Data</th></tr></thead><tbody>"#,
        copies.len()
    );
    for table in copies {
        let (state, share) = match table.state {
            TableCopyState::Pending => ("pending", 0.0),
            TableCopyState::Copying if table.chunks_total > 0 => (
                "copying",
                table.chunks_done as f64 / table.chunks_total as f64,
            ),
            TableCopyState::Copying => ("copying", 0.0),
            TableCopyState::Copied => ("copied", 1.0),
        };
        let rows = match table.source_count {
            Some(count) => format!("{} of {count}", table.rows_copied),
            None => table.rows_copied.to_string(),
        };
        let _ = writeln!(
            html,
            r#"<tr><td>{name}</td><td>{state}</td><td><meter min="0" max="1" value="{share:.3}"></meter> {percent:.0}%</td><td>{rows}</td><td>{data}</td></tr>"#,
            name = esc(&table.name.to_string()),
            percent = share * 100.0,
            data = human_bytes(i64::try_from(table.bytes_copied).unwrap_or(i64::MAX)),
        );
    }
    html.push_str("</tbody></table></section>\n");
}

/// Changes applied per table since the daemon started.
fn applied(html: &mut String, view: &StatusView) {
    let _ = writeln!(
        html,
        r#"<section id="applied"><h2>Applied since start</h2>"#
    );
    if view.tables.is_empty() {
        html.push_str("<p class=\"muted\">No change applied yet.</p></section>\n");
        return;
    }
    html.push_str("<table><thead><tr><th>Table</th><th>Inserts</th><th>Updates</th><th>Deletes</th><th>Truncates</th></tr></thead><tbody>\n");
    for (table, counts) in &view.tables {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(table),
            counts.inserts,
            counts.updates,
            counts.deletes,
            counts.truncates
        );
    }
    html.push_str("</tbody></table></section>\n");
}

/// The background verifier's last pass per table, and rows the stream
/// cannot carry.
fn divergence(html: &mut String, view: &StatusView) {
    if view.divergence.is_empty() && view.unstreamed_rows.is_empty() {
        return;
    }
    html.push_str("<section id=\"divergence\"><h2>Divergence</h2>\n");
    if !view.divergence.is_empty() {
        html.push_str("<table><thead><tr><th>Table</th><th>Rows checked</th><th>Divergent</th><th>Examples</th></tr></thead><tbody>\n");
        for (table, found) in &view.divergence {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                esc(table),
                found.rows_checked,
                if found.divergent_rows > 0 {
                    "bad"
                } else {
                    "ok"
                },
                found.divergent_rows,
                esc(&found.samples.join("; "))
            );
        }
        html.push_str("</tbody></table>\n");
    }
    for (table, rows) in &view.unstreamed_rows {
        let _ = writeln!(
            html,
            "<p class=\"warn\">{} has {rows} rows the stream cannot carry (no key and no REPLICA IDENTITY FULL).</p>",
            esc(table)
        );
    }
    html.push_str("</section>\n");
}

/// Conflicts recorded (phased and parallel runs).
fn conflicts(html: &mut String, (total, newest): (usize, &[ConflictRecord])) {
    if total == 0 {
        return;
    }
    let _ = writeln!(
        html,
        r#"<section id="conflicts"><h2>Conflicts <small>{total} recorded</small></h2>
<table><thead><tr><th>#</th><th>Table</th><th>Change</th><th>Key</th><th>Side</th><th>Resolution</th></tr></thead><tbody>"#
    );
    for record in newest {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            record.id,
            esc(&record.table),
            esc(&record.op),
            esc(&record.key),
            esc(&record.side),
            esc(&record.kind)
        );
    }
    html.push_str("</tbody></table><p class=\"muted\">All of them: <code>cutover conflicts</code>.</p></section>\n");
}

/// The switch or rollback under way, or the last one, with its journal.
fn switch(html: &mut String, view: &StatusView) {
    let Some(switch) = &view.switch else {
        html.push_str("<section id=\"switch\"><h2>Switch</h2><p class=\"muted\">No switch yet: <code>cutover switch --dry-run</code> says what it would do.</p></section>\n");
        return;
    };
    let _ = writeln!(
        html,
        r#"<section id="switch"><h2>{kind} #{id} <span class="badge {tone}">{state}</span></h2>"#,
        kind = switch.kind,
        id = switch.id,
        state = switch.state,
        tone = match switch.state {
            "done" => "ok",
            "in_progress" => "warn",
            _ => "busy",
        },
    );
    if let Some(step) = switch.next_step {
        let _ = writeln!(html, "<p>Next step: <b>{step}</b></p>");
    }
    if switch.neither_writable {
        html.push_str("<p class=\"bad\">Neither server takes writes now: the switch stopped between its fence and its open. <code>cutover switch</code> goes on; <code>cutover rollback</code> goes back.</p>\n");
    }
    if let Some(window) = switch.window_seconds {
        let _ = writeln!(
            html,
            "<p>Writes were unavailable for <b id=\"window\">{window:.3} s</b>.</p>"
        );
    }
    html.push_str("<ol class=\"journal\">\n");
    for line in &switch.journal {
        let _ = writeln!(html, "<li>{}</li>", esc(line.trim()));
    }
    html.push_str("</ol></section>\n");
}

const STYLE: &str = "
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:980px;padding:12px;color:#1d2329;background:#f7f8fa}
header{display:flex;align-items:center;gap:12px}h1{font-size:22px;margin:4px 0}
h2{font-size:17px;margin:0 0 8px}h2 small,small{color:#66707a;font-weight:normal}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:12px 14px;margin:10px 0}
.badge{border-radius:12px;padding:2px 10px;font-weight:600;font-size:13px;color:#fff;background:#66707a}
.badge.ok{background:#1a7f37}.badge.warn{background:#bf8700}.badge.bad{background:#cf222e}.badge.busy{background:#0969da}
span.ok,td.ok{color:#1a7f37}span.bad,td.bad,p.bad{color:#cf222e}p.warn{color:#9a6700}
span.badge{color:#fff}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}.facts dt{color:#66707a}.facts dd{margin:0;font-family:ui-monospace,monospace}
.big{font-size:18px}.muted{color:#66707a}.error{border-color:#cf222e}
table{border-collapse:collapse;width:100%;font-size:14px}th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eef0f2}
td:not(:first-child),th:not(:first-child){text-align:right}
figure{margin:6px 0}figcaption{font-size:13px;color:#66707a}svg{width:100%;height:120px;background:#fbfcfd;border:1px solid #eef0f2}
.series{fill:none;stroke:#0969da;stroke-width:1.5;vector-effect:non-scaling-stroke}.axis{stroke:#d0d7de;vector-effect:non-scaling-stroke}
meter{width:90px}.journal{margin:0;padding-left:22px;font-family:ui-monospace,monospace;font-size:13px}
footer{color:#66707a;font-size:13px;margin:12px 0}
@media (max-width:600px){td:nth-child(5),th:nth-child(5){display:none}.facts{grid-template-columns:1fr}}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::Status;

    fn sample(at_ms: u64, seconds: f64, bytes: u64) -> LagSample {
        LagSample {
            at_ms,
            bytes: Some(bytes),
            seconds,
            retained_bytes: None,
            wal_status: None,
        }
    }

    #[test]
    fn the_page_escapes_what_it_shows_and_charts_the_lag() {
        let status = Status::new("cutover_app", crate::direction::Direction::Forward);
        status.error(
            crate::live::ErrorKind::TargetTransient,
            "table \"<script>alert(1)</script>\" & more",
        );
        let view = status.view();
        let history = [
            sample(1000, 0.5, 100),
            sample(11_000, 4.0, 8192),
            sample(21_000, 1.0, 0),
        ];
        let html = render(&Page {
            view: &view,
            history: &history,
            copies: &[],
            conflicts: (0, &[]),
            max_lag: Duration::from_secs(30),
            now_ms: 30_000,
        });
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains(r#"id="chart-seconds""#) && html.contains(r#"id="chart-bytes""#));
        // The highest sample touches the top of the chart; the first is at
        // the left edge, the last at the right.
        assert!(html.contains("0.0,105.5 300.0,4.0 600.0,91.0"), "{html}");
        assert!(html.contains("The last 20.0 s over 3 samples"));
    }
}
