//! A TCP proxy the tests control, for network faults: every connection
//! through it can be cut at once, as a network failure would, while the
//! servers behind it keep running.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards `127.0.0.1:<port>` to a server on `127.0.0.1:<upstream>`.
/// Stops (and closes every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: JoinHandle<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Starts forwarding to `upstream` on a free loopback port. The proxy
    /// runs on a thread and runtime of its own, so that a test blocking its
    /// own runtime (waiting for a process to exit, say) does not stall the
    /// connections through it.
    pub fn start(upstream: u16) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let open = Arc::clone(&connections);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the proxy's runtime");
        let accept = runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((mut client, _)) = listener.accept().await {
                let forward = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    // As network proxies do (and PostgreSQL and its
                    // clients): no Nagle delay on small writes.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                open.lock()
                    .expect("proxy lock")
                    .push(forward.abort_handle());
            }
        });
        Proxy {
            port,
            connections,
            accept,
            runtime: Some(runtime),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection open through the proxy, both ways; new
    /// connections are accepted again at once.
    pub fn cut(&self) -> usize {
        let open: Vec<AbortHandle> = std::mem::take(&mut *self.connections.lock().expect("lock"));
        let live = open.iter().filter(|c| !c.is_finished()).count();
        for connection in open {
            connection.abort();
        }
        live
    }

    /// How many connections are open through the proxy now.
    pub fn open(&self) -> usize {
        self.connections
            .lock()
            .expect("lock")
            .iter()
            .filter(|c| !c.is_finished())
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
