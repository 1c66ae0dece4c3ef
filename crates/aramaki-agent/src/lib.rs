//! The Aramaki agent: enrolls with a server, runs checks and probes on the
//! schedule the server hands it, keeps every result on disk until the server
//! acknowledges it, and runs locally allow-listed actions on request.

pub mod actions;
pub mod config;
pub mod exec;
pub mod nagios;
pub mod policy;
pub mod probes;
pub mod push;
pub mod queue;
pub mod runtime;
pub mod schedule;
pub mod session;
pub mod state;
