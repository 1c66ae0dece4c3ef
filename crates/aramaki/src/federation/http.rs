//! `GET /.well-known/aramaki`: the instance's self-signed description, so
//! that a peer can compare the fingerprint a person read out to it.

use aramaki_protocol::federation::{
    document_transcript, InstanceDocument, SignedDocument, FEDERATION_VERSION, WELL_KNOWN_PATH,
};
use aramaki_protocol::keys::hex;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::context::Context;
use crate::db::to_micros;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route(WELL_KNOWN_PATH, get(well_known))
}

/// The URL peers reach this instance at.
pub fn public_url(ctx: &Context) -> String {
    ctx.config
        .instance
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", ctx.config.server.listen))
}

/// The signed instance document.
pub fn document(ctx: &Context) -> SignedDocument {
    let document = InstanceDocument {
        version: FEDERATION_VERSION,
        instance_id: ctx.identity.instance_id.clone(),
        name: ctx.identity.name.clone(),
        url: public_url(ctx),
        public_key: ctx.identity.public_key_hex(),
        fingerprint: ctx.identity.fingerprint(),
        // Key rotation arrives with peering; no key was retired yet.
        retired_keys: Vec::new(),
        issued_at: to_micros(ctx.now()),
    };
    let signature = hex(&ctx
        .identity
        .sign(&document_transcript(&document))
        .to_bytes());
    SignedDocument {
        document,
        signature,
    }
}

/// Role: public (it is what peers read before they trust anything).
async fn well_known(State(ctx): State<AppState>) -> Json<SignedDocument> {
    Json(document(&ctx))
}
