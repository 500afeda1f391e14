//! Switches and rollbacks asked of a running daemon through its console
//! (`SWITCH`, `ROLLBACK`): the console hands each request to the
//! daemon's run loop, which stops its stream, runs the journal with the
//! state store it holds, and streams again in the new direction, without
//! a restart; the console answers with the journal.

use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use super::journal::Kind;
use super::{Options, Summary};

/// One request, with where its answer goes.
#[derive(Debug)]
pub struct Request {
    /// Switch or rollback.
    pub kind: Kind,
    /// Dry run, verify now.
    pub options: Options,
    /// The journal, or why it failed.
    pub reply: oneshot::Sender<Result<Summary, String>>,
}

/// Where the console leaves requests for the run loop.
#[derive(Debug)]
pub struct Desk {
    requests: mpsc::UnboundedSender<Request>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
}

impl Default for Desk {
    fn default() -> Desk {
        let (requests, inbox) = mpsc::unbounded_channel();
        Desk {
            requests,
            inbox: Mutex::new(Some(inbox)),
        }
    }
}

impl Desk {
    /// Asks the run loop for a switch or rollback and waits for its end.
    pub async fn ask(&self, kind: Kind, options: Options) -> Result<Summary, String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                kind,
                options,
                reply,
            })
            .map_err(|_| "the daemon's run loop is not taking switches".to_owned())?;
        answer
            .await
            .map_err(|_| format!("the daemon stopped before the {} ended", kind.name()))?
    }

    /// The requests, for the one run loop that takes them.
    pub fn take(&self) -> Option<mpsc::UnboundedReceiver<Request>> {
        self.inbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}
