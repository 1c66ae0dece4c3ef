//! Federation between instances. For now only the instance's identity; peers,
//! envelopes and routing arrive with the federation issue.

pub mod identity;
