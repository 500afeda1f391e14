//! The daemon's listeners: `/metrics` and `/health` over HTTP, and the
//! admin console. Their bound addresses go to `<state.dir>/listen.json` so
//! that `cutover status` (and tests, with port 0) can find them.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Config, ConsoleAuth};
use crate::live::Status;
use crate::store::Store;

/// Where the running daemon listens.
pub const LISTEN_FILE: &str = "listen.json";

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot listen on {addr}: {source} (is another process using it? change {key})")]
pub struct ListenError {
    key: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the listeners and serves them in the background.
pub async fn start(
    config: &Config,
    store: &Store,
    status: &Arc<Status>,
) -> Result<(), ListenError> {
    let http = bind("http.listen", config.http_listen).await?;
    let http_addr = http.local_addr().unwrap_or(config.http_listen);
    let status_http = Arc::clone(status);
    let store_http = store.clone();
    let max_lag = config.max_lag;
    let max_divergent_ratio = config.verify.max_divergent_ratio;
    tokio::spawn(async move {
        if let Err(err) =
            crate::http::serve(http, status_http, store_http, max_lag, max_divergent_ratio).await
        {
            tracing::error!(error = %err, "the HTTP server stopped");
        }
    });
    tracing::info!(addr = %http_addr, "http listening (the status page at /, /metrics, /health, /ready)");
    let mut record = serde_json::json!({
        "http": http_addr.to_string(),
        "pid": std::process::id(),
    });
    match &config.console_auth {
        ConsoleAuth::Disabled => tracing::warn!(
            "the admin console is off: set console.password (or console.password_file) to use it and `cutover status` while the daemon runs"
        ),
        auth => {
            let console = bind("console.listen", config.console_listen).await?;
            let console_addr = console.local_addr().unwrap_or(config.console_listen);
            let open = matches!(auth, ConsoleAuth::Open);
            tokio::spawn(crate::console::serve(
                console,
                Arc::clone(status),
                store.clone(),
                auth.clone(),
                config
                    .console_tls
                    .as_ref()
                    .map(|tls| Arc::clone(&tls.identity.config)),
            ));
            let over = match &config.console_tls {
                Some(tls) => format!("TLS only, certificate {}", tls.cert.display()),
                None => "no TLS".to_owned(),
            };
            if open {
                tracing::warn!(addr = %console_addr, %over, "admin console listening WITHOUT a password (console.allow_no_password = true)");
            } else {
                tracing::info!(addr = %console_addr, %over, "admin console listening (psql, SCRAM password)");
            }
            record["console"] = serde_json::Value::String(console_addr.to_string());
        }
    }
    let path = store.dir().join(LISTEN_FILE);
    if let Err(err) = std::fs::write(&path, record.to_string()) {
        tracing::warn!(file = %path.display(), error = %err, "could not record the listen addresses");
    }
    Ok(())
}

/// Removes the listen record when the daemon stops.
pub fn stopped(store: &Store) {
    let _ = std::fs::remove_file(store.dir().join(LISTEN_FILE));
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, ListenError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { key, addr, source })
}
