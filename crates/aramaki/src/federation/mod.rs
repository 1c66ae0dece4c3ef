//! Federation between instances. So far the instance's identity and its
//! self-signed description at `/.well-known/aramaki`; peers, envelopes and
//! routing follow.

pub mod commands;
pub mod envelope;
pub mod http;
pub mod identity;
pub mod peers;
