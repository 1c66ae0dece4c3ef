//! The agents connected to this server process: where to send a message
//! for an agent, and how to close its session at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aramaki_protocol::agent::{Refusal, ServerMessage};
use tokio::sync::mpsc;

/// Something for a session to do.
#[derive(Debug, Clone)]
pub enum Push {
    Send(ServerMessage),
    /// Say why and hang up.
    Close(Refusal, String),
}

#[derive(Debug)]
struct Session {
    id: u64,
    tx: mpsc::UnboundedSender<Push>,
}

/// A chunk of a running action's output, for live viewers.
#[derive(Debug, Clone)]
pub struct LiveOutput {
    pub run_id: String,
    pub agent: String,
    pub chunk: String,
}

/// Fan-out of live action output (viewers that lag lose chunks; the
/// stored output is complete).
#[derive(Debug)]
pub struct Live(tokio::sync::broadcast::Sender<LiveOutput>);

impl Default for Live {
    fn default() -> Self {
        Live(tokio::sync::broadcast::channel(1024).0)
    }
}

/// Registry of open agent sessions.
#[derive(Debug, Default)]
pub struct AgentHub {
    sessions: Mutex<HashMap<String, Session>>,
    next: AtomicU64,
    live: Live,
}

impl AgentHub {
    /// Registers a session for `agent_id`; an older session of the same
    /// agent is closed (an agent has one socket).
    pub fn register(&self, agent_id: &str) -> (u64, mpsc::UnboundedReceiver<Push>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.sessions.lock() {
            if let Some(old) = map.insert(agent_id.to_owned(), Session { id, tx }) {
                let _ = old.tx.send(Push::Close(
                    Refusal::Malformed,
                    "replaced by a newer session of the same agent".to_owned(),
                ));
            }
        }
        (id, rx)
    }

    /// Forgets a session when it ends (unless a newer one replaced it).
    pub fn unregister(&self, agent_id: &str, session: u64) {
        if let Ok(mut map) = self.sessions.lock() {
            if map.get(agent_id).is_some_and(|s| s.id == session) {
                map.remove(agent_id);
            }
        }
    }

    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.sessions
            .lock()
            .map(|m| m.contains_key(agent_id))
            .unwrap_or(false)
    }

    pub fn connected(&self) -> Vec<String> {
        self.sessions
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Publishes a chunk of a run's output to live viewers.
    pub fn output(&self, run_id: &str, agent: &str, chunk: &str) {
        let _ = self.live.0.send(LiveOutput {
            run_id: run_id.to_owned(),
            agent: agent.to_owned(),
            chunk: chunk.to_owned(),
        });
    }

    pub fn watch_output(&self) -> tokio::sync::broadcast::Receiver<LiveOutput> {
        self.live.0.subscribe()
    }

    pub fn count(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Queues a message for the agent; false if it is not connected here.
    pub fn send(&self, agent_id: &str, message: ServerMessage) -> bool {
        self.push(agent_id, Push::Send(message))
    }

    /// Closes the agent's session with a refusal.
    pub fn close(&self, agent_id: &str, reason: Refusal, message: &str) -> bool {
        self.push(agent_id, Push::Close(reason, message.to_owned()))
    }

    fn push(&self, agent_id: &str, push: Push) -> bool {
        self.sessions
            .lock()
            .ok()
            .and_then(|m| m.get(agent_id).map(|s| s.tx.send(push).is_ok()))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_session_replaces_the_old() {
        let hub = AgentHub::default();
        let (first, mut rx1) = hub.register("a");
        let (second, mut rx2) = hub.register("a");
        assert!(matches!(rx1.try_recv(), Ok(Push::Close(..))));
        hub.unregister("a", first);
        assert!(
            hub.is_connected("a"),
            "the old session must not remove the new one"
        );
        assert!(hub.send("a", ServerMessage::Heartbeat));
        assert!(matches!(
            rx2.try_recv(),
            Ok(Push::Send(ServerMessage::Heartbeat))
        ));
        hub.unregister("a", second);
        assert!(!hub.is_connected("a"));
        assert!(!hub.send("a", ServerMessage::Heartbeat));
    }
}
