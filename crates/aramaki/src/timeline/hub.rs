//! Wakes subscribers after a commit and fans committed events out to live
//! listeners (the server-sent-event streams).

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use super::Event;

#[derive(Debug)]
pub struct TimelineHub {
    commits: watch::Sender<u64>,
    live: broadcast::Sender<Arc<Event>>,
    closed: watch::Sender<bool>,
}

impl Default for TimelineHub {
    fn default() -> Self {
        TimelineHub::new()
    }
}

impl TimelineHub {
    pub fn new() -> TimelineHub {
        let (commits, _) = watch::channel(0);
        let (live, _) = broadcast::channel(4096);
        let (closed, _) = watch::channel(false);
        TimelineHub {
            commits,
            live,
            closed,
        }
    }

    /// Something was committed: subscribers should look for new events.
    pub fn wake(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever [`TimelineHub::wake`] is called.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Live events, in commit order, as the live-tail subscriber sees them.
    pub fn listen(&self) -> broadcast::Receiver<Arc<Event>> {
        self.live.subscribe()
    }

    /// The server is stopping: live streams end, so that a graceful
    /// shutdown does not wait for clients that never hang up.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Turns true when the server stops.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    pub(crate) fn publish(&self, event: Arc<Event>) {
        // No listener is not an error: nobody is watching right now.
        let _ = self.live.send(event);
    }
}
