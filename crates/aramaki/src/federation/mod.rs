//! Federation between instances: identity and the self-signed document at
//! `/.well-known/aramaki`, peering, signed envelopes over one WebSocket per
//! peer pair with a durable outbox, and use relations through which an
//! instance mirrors another's systems and receives exactly the activity
//! about them.

pub mod commands;
pub mod envelope;
pub mod http;
pub mod identity;
pub mod inbox;
pub mod link;
pub mod outbox;
pub mod pages;
pub mod peers;
pub mod rotation;
pub mod tls;
pub mod uses;
