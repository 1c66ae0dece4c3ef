//! What an instance publishes about itself.

use aramaki_protocol::federation::{document_transcript, SignedDocument};
use aramaki_protocol::keys::{fingerprint, unhex_array};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use crate::support::{Backend, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_document_is_public_and_self_signed() {
    let app = TestApp::start_tweaked(Backend::Sqlite, |c| {
        c.instance.name = "hosting-berlin".into();
        c.instance.url = Some("https://aramaki.hosting.example".into());
    })
    .await;
    // No token: peers read it before they trust anything.
    let resp = app
        .http
        .get(app.url("/.well-known/aramaki"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let signed: SignedDocument = resp.json().await.unwrap();
    let d = &signed.document;
    assert_eq!(d.name, "hosting-berlin");
    assert_eq!(d.url, "https://aramaki.hosting.example");
    assert_eq!(d.public_key, app.ctx.identity.public_key_hex());
    let key = VerifyingKey::from_bytes(&unhex_array::<32>(&d.public_key).unwrap()).unwrap();
    assert_eq!(
        d.fingerprint,
        fingerprint(key.as_bytes()),
        "the fingerprint people compare"
    );
    let sig = Signature::from_bytes(&unhex_array::<64>(&signed.signature).unwrap());
    key.verify(&document_transcript(d), &sig)
        .expect("signed by its own key");
    let mut forged = d.clone();
    forged.url = "https://evil.example".into();
    assert!(
        key.verify(&document_transcript(&forged), &sig).is_err(),
        "a changed document does not verify"
    );
}
