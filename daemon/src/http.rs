//! The status page (`/`), `/metrics`, `/health` and `/ready` on `[http]
//! listen`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::live::{DaemonState, Status};
use crate::store::Store;

#[derive(Clone)]
struct App {
    status: Arc<Status>,
    store: Store,
    max_lag: Duration,
    max_divergent_ratio: f64,
}

/// Serves until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<Status>,
    store: Store,
    max_lag: Duration,
    max_divergent_ratio: f64,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/live", get(live))
        .with_state(App {
            status,
            store,
            max_lag,
            max_divergent_ratio,
        });
    axum::serve(listener, app).await
}

/// The status page ([`crate::page`]). What the store cannot give (it is
/// being written) is left off the page rather than failing it.
async fn page(State(app): State<App>) -> Response {
    let view = app.status.view();
    let store = app.store.clone();
    let direction = view.direction;
    // The store's reads are disk reads: off the runtime's thread.
    let (history, copies, (conflicts, newest)) = tokio::task::spawn_blocking(move || {
        (
            store
                .lag_history(direction, crate::page::CHART_SAMPLES)
                .unwrap_or_default(),
            store.table_copies().unwrap_or_default(),
            store
                .newest_conflicts(crate::page::CONFLICTS_LISTED)
                .unwrap_or_default(),
        )
    })
    .await
    .unwrap_or_default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let html = crate::page::render(&crate::page::Page {
        view: &view,
        history: &history,
        copies: &copies,
        conflicts: (conflicts, &newest),
        max_lag: app.max_lag,
        now_ms,
    });
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    // Lag in seconds grows while nothing arrives: compute it at scrape time.
    app.status
        .metrics
        .lag_seconds
        .with_label_values(&[app.status.direction().as_str()])
        .set(app.status.lag_seconds());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.status.metrics.render(),
    )
        .into_response()
}

/// 200 while streaming within the lag threshold, 503 otherwise, with the
/// reason in `problems`.
async fn health(State(app): State<App>) -> Response {
    let view = app.status.view();
    let mut problems = Vec::new();
    if view.state != DaemonState::Streaming {
        problems.push(format!(
            "the daemon is {}, not streaming",
            view.state.name()
        ));
    }
    if view.state == DaemonState::Failed
        && let Some(error) = &view.last_error
    {
        problems.push(error.message.clone());
    }
    if let Some(switch) = view.switch.as_ref().filter(|s| s.neither_writable) {
        problems.push(format!(
            "neither server takes writes: the {} is fenced and the {} is not open yet (step {}); run `cutover {}` to finish it",
            if switch.kind == "switch" { "source" } else { "target" },
            if switch.kind == "switch" { "target" } else { "source" },
            switch.next_step.unwrap_or("?"),
            switch.kind
        ));
    }
    if view.lag.seconds > app.max_lag.as_secs_f64() {
        problems.push(format!(
            "lag {:.1} s exceeds http.max_lag_seconds = {}",
            view.lag.seconds,
            app.max_lag.as_secs()
        ));
    }
    for (table, rows) in view.unstreamed_rows.iter().filter(|(_, rows)| **rows > 0) {
        problems.push(format!(
            "{table}: {rows} rows changed on the source that the stream does not carry (the target differs for them; run cutover verify)"
        ));
    }
    if let Some(ratio) = app.status.divergent_ratio()
        && ratio > app.max_divergent_ratio
    {
        let tables: Vec<String> = view
            .divergence
            .iter()
            .filter(|(_, d)| d.divergent_rows > 0)
            .map(|(t, d)| format!("{t} ({} of {})", d.divergent_rows, d.rows_checked))
            .collect();
        problems.push(format!(
            "{:.4}% of the rows checked differ between source and target, over verify.max_divergent_ratio = {}: {} (roll back, or repair with cutover verify --repair)",
            ratio * 100.0,
            app.max_divergent_ratio,
            tables.join(", ")
        ));
    }
    let code = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = serde_json::to_value(&view).unwrap_or_default();
    body["healthy"] = serde_json::Value::Bool(problems.is_empty());
    body["problems"] = serde_json::json!(problems);
    (code, axum::Json(body)).into_response()
}

/// 200 once the copy is done and changes stream (paused counts: the
/// daemon is up and holds its position).
/// 200 while the daemon runs: for an orchestrator's liveness check, which
/// must not restart a daemon that is copying, paused, or lagging (`/health`
/// fails then, and `/ready` while copying).
async fn live() -> Response {
    (StatusCode::OK, "alive\n").into_response()
}

async fn ready(State(app): State<App>) -> Response {
    match app.status.state() {
        DaemonState::Streaming | DaemonState::Paused => (StatusCode::OK, "ready\n").into_response(),
        other => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", other.name()),
        )
            .into_response(),
    }
}
