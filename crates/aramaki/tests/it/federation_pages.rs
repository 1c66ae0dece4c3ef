//! The federation page over HTTP with cookie sessions and CSRF tokens:
//! who may use it, peering with a fingerprint check, use requests decided
//! from the page, policies, and remote systems marked with their origin.

use std::sync::Arc;

use aramaki::federation::link::MemoryNet;
use aramaki::users::Role;
use reqwest::header::{COOKIE, LOCATION};
use reqwest::StatusCode;
use serde_json::json;

use crate::agent_e2e::eventually;
use crate::federation_links::{instance, linked, timeline, uses, wait_use};
use crate::monitoring_pages::{get, logged_in, post};
use crate::pages::{browser, csrf_of};
use crate::support::{backends, TestApp};

/// An admin's cookie and CSRF token on `app`.
async fn admin(app: &TestApp, name: &str) -> (String, String) {
    let cookie = logged_in(app, name, Some(Role::Admin)).await;
    let (status, html) = get(app, "/federation", &cookie).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    (cookie.clone(), csrf_of(&html))
}

/// Posts a form as a signed-in user; returns status and body.
async fn submit(
    app: &TestApp,
    path: &str,
    (cookie, csrf): &(String, String),
    fields: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut form = fields.to_vec();
    form.push(("csrf", csrf.as_str()));
    let resp = post(app, path, cookie, &form).await;
    let status = resp.status();
    if status == StatusCode::SEE_OTHER {
        assert_eq!(resp.headers()[LOCATION], "/federation", "{path}");
    }
    (status, resp.text().await.unwrap())
}

/// Text between `start` (its end) and the next `<`.
fn text_after<'a>(html: &'a str, start: &str) -> &'a str {
    let from = html
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in {html}"))
        + start.len();
    let rest = &html[from..];
    &rest[..rest.find('<').unwrap_or(rest.len())]
}

fn unescape(s: &str) -> String {
    s.replace("&#x2f;", "/")
        .replace("&#47;", "/")
        .replace("&#35;", "#")
        .replace("&amp;", "&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_federation_page_route_is_for_instance_admins() {
    for backend in backends() {
        let app = TestApp::start(backend).await;
        app.system("shop", "project", json!({})).await;
        let mut sessions = vec![("anonymous", String::new(), String::new())];
        for (name, role) in [
            ("v", Role::Viewer),
            ("o", Role::Operator),
            ("a", Role::Admin),
        ] {
            let cookie = logged_in(&app, name, Some(role)).await;
            let (_, html) = get(&app, "/account/password", &cookie).await;
            sessions.push((name, cookie, csrf_of(&html)));
        }
        type Row = (
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
            [u16; 4],
            &'static str,
        );
        // (method, path, fields, status for anonymous, viewer, operator,
        // admin, what the admin's page says)
        let rows: Vec<Row> = vec![
            (
                "GET",
                "/federation",
                &[],
                [303, 403, 403, 200],
                "This instance",
            ),
            (
                "POST",
                "/federation/invite",
                &[("ttl", "2h")],
                [303, 403, 403, 200],
                "New invite",
            ),
            (
                "POST",
                "/federation/invite",
                &[("ttl", "forever")],
                [303, 403, 403, 422],
                "Invite lifetime",
            ),
            (
                "POST",
                "/federation/join",
                &[("invite", "not an invite")],
                [303, 403, 403, 403],
                "not a peering invite",
            ),
            (
                "POST",
                "/federation/peers/nobody/suspend",
                &[],
                [303, 403, 403, 404],
                "nobody",
            ),
            (
                "POST",
                "/federation/uses",
                &[("peer", "nobody"), ("system", "storage")],
                [303, 403, 403, 404],
                "no peer",
            ),
            (
                "POST",
                "/federation/uses",
                &[
                    ("peer", "nobody"),
                    ("system", "storage"),
                    ("level", "everything"),
                ],
                [303, 403, 403, 409],
                "use status or timeline",
            ),
            (
                "POST",
                "/federation/uses/nope/accept",
                &[],
                [303, 403, 403, 404],
                "no use",
            ),
            (
                "POST",
                "/federation/uses/nope/undo",
                &[],
                [303, 403, 403, 404],
                "no use",
            ),
            (
                "POST",
                "/federation/policies",
                &[("peer", "nobody"), ("system", "shop")],
                [303, 403, 403, 404],
                "no peer",
            ),
            (
                "POST",
                "/federation/policies/withdraw",
                &[("peer", "nobody"), ("system", "shop")],
                [303, 403, 403, 404],
                "no peer",
            ),
            (
                "POST",
                "/federation/rotate-key",
                &[],
                [303, 403, 403, 200],
                "The instance key is rotated",
            ),
        ];
        for (method, path, fields, expected, says) in rows {
            for ((who, cookie, csrf), want) in sessions.iter().zip(expected) {
                let resp = if method == "GET" {
                    browser()
                        .get(app.url(path))
                        .header(COOKIE, cookie.as_str())
                        .send()
                        .await
                        .unwrap()
                } else {
                    let mut form = fields.to_vec();
                    form.push(("csrf", csrf.as_str()));
                    post(&app, path, cookie, &form).await
                };
                assert_eq!(
                    resp.status().as_u16(),
                    want,
                    "{method} {path} as {who} ({backend:?})"
                );
                let body = resp.text().await.unwrap();
                if *who == "a" {
                    assert!(body.contains(says), "{method} {path}: {body}");
                }
            }
        }
        // A form without its CSRF token changes nothing.
        let (_, cookie, _) = &sessions[3];
        let before = app.ctx.identity.fingerprint();
        let resp = post(&app, "/federation/rotate-key", cookie, &[]).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(app.ctx.identity.fingerprint(), before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_peer_and_decide_uses_from_the_page() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    let host_admin = admin(&hosting, "hana").await;
    let cust_admin = admin(&customer, "carl").await;

    // The invite is shown once, with our fingerprint to tell by phone.
    let (status, html) = submit(
        &hosting,
        "/federation/invite",
        &host_admin,
        &[("ttl", "2h")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let invite = unescape(text_after(&html, "id=\"issued-invite\">"));
    assert!(invite.contains("#aip_"), "{invite}");
    let (_, again) = get(&hosting, "/federation", &host_admin.0).await;
    assert!(!again.contains(&invite), "an invite is shown only once");

    // A tampered invite is refused before anything is pinned.
    let mut tampered = invite.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let (status, html) = submit(
        &customer,
        "/federation/join",
        &cust_admin,
        &[("invite", &tampered)],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{html}");
    assert!(html.contains("not the one in the invite"), "{html}");

    // Joining first shows whom the invite leads to; only confirming joins.
    let (status, html) = submit(
        &customer,
        "/federation/join",
        &cust_admin,
        &[("invite", &invite)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert_eq!(
        text_after(&html, "id=\"join-fingerprint\">"),
        hosting.ctx.identity.fingerprint()
    );
    assert_eq!(text_after(&html, "id=\"join-name\">"), "hosting");
    assert_eq!(customer.get("/api/v1/peers").await["items"], json!([]));
    let (status, html) = submit(
        &customer,
        "/federation/join",
        &cust_admin,
        &[("invite", &invite), ("confirm", "yes")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("Peered with hosting"), "{html}");

    // The inviter sees the joiner pending, with its fingerprint, and approves.
    let (_, html) = get(&hosting, "/federation", &host_admin.0).await;
    let at = html.find("<tr id=\"peer-customer\">").unwrap();
    let row = &html[at..at + html[at..].find("</tr>").unwrap()];
    assert!(
        row.contains("pending") && row.contains(&customer.ctx.identity.fingerprint()),
        "{row}"
    );
    let customer_id = customer.ctx.identity.instance_id.clone();
    let (status, _) = submit(
        &hosting,
        &format!("/federation/peers/{customer_id}/approve"),
        &host_admin,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    linked(&hosting, &customer).await;

    // The customer asks to use storage from the page; the hosting admin
    // accepts it with the status and timeline, but not the handbook.
    hosting
        .call(
            reqwest::Method::POST,
            "/api/v1/systems",
            Some(json!({"slug": "storage", "title": "Storage", "category": "infrastructure", "handbook": "the secret runbook"})),
        )
        .await;
    let (status, html) = submit(
        &customer,
        "/federation/uses",
        &cust_admin,
        &[
            ("peer", "hosting"),
            ("system", "storage"),
            ("level", "timeline"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{html}");
    let asked = uses(&customer).await;
    let use_id = asked[0]["id"].as_str().unwrap().to_owned();
    wait_use(&hosting, &use_id, "pending").await;
    let (_, html) = get(&hosting, "/federation", &host_admin.0).await;
    assert!(html.contains(&format!("id=\"use-{use_id}\"")), "{html}");
    assert!(
        html.contains("<strong>customer</strong> asks to use"),
        "{html}"
    );
    let (status, _) = submit(
        &hosting,
        &format!("/federation/uses/{use_id}/accept"),
        &host_admin,
        &[("level", "timeline"), ("subsystems", "on")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let accepted = wait_use(&customer, &use_id, "accepted").await;
    assert_eq!(
        accepted["exposure"],
        json!({"level": "timeline", "subsystems": true, "handbook": false, "contacts": false})
    );

    // On the customer, storage is marked with its origin and read-only.
    let (_, html) = eventually("the mirror's page", || async {
        let (status, html) = get(&customer, "/systems/storage", &cust_admin.0).await;
        (status == StatusCode::OK).then_some(((), html))
    })
    .await;
    assert!(
        html.contains("id=\"origin\"")
            && html.contains("Remote system from <strong>hosting</strong>"),
        "{html}"
    );
    assert!(!html.contains("id=\"edit-system\""), "no editing a mirror");
    assert!(
        !html.contains("action=\"/systems/storage/notes\""),
        "no notes on a mirror"
    );
    assert!(
        !html.contains("the secret runbook"),
        "the handbook was not shared"
    );
    // Nor does a change to it travel in the change event's before and after.
    let (status, v) = hosting
        .call(
            reqwest::Method::PATCH,
            "/api/v1/systems/storage",
            Some(json!({"handbook": "the new secret runbook", "title": "Storage (EU)"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let changed = eventually("the change on the customer", || async {
        timeline(&customer, "storage")
            .await
            .into_iter()
            .find(|e| e["kind"] == "system.updated")
    })
    .await;
    assert!(!changed.to_string().contains("secret"), "{changed}");
    assert_eq!(
        changed["data"]["after"]["title"], "Storage (EU)",
        "{changed}"
    );
    // Work cannot be attached to a mirror: it belongs to the primary.
    for (path, body) in [
        (
            "/api/v1/checks",
            json!({"name": "disk", "command": ["/usr/lib/nagios/plugins/check_dummy", "0"], "system": "storage", "subscriptions": ["linux"], "interval": 60}),
        ),
        (
            "/api/v1/systems/storage/actions",
            json!({"name": "restart", "title": "Restart"}),
        ),
        ("/api/v1/agents/tokens", json!({"system": "storage"})),
    ] {
        let (status, v) = customer.post(path, body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {v}");
        assert_eq!(v["code"], "remote_system", "{path}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("primary instance"),
            "{v}"
        );
    }
    let resp = post(
        &customer,
        "/systems/storage/notes",
        &cust_admin.0,
        &[("title", "forged"), ("csrf", &cust_admin.1)],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(resp.text().await.unwrap().contains("remote system"));

    // Its events arrive, shown with where they come from; ours are not marked.
    hosting
        .event("storage", "deploy", "storage 2.0 rolled out", json!({}))
        .await;
    customer.system("shop", "project", json!({})).await;
    customer.include("shop", "storage").await;
    customer
        .event("shop", "deploy", "shop 7 rolled out", json!({}))
        .await;
    let html = eventually("the remote event on the customer's project", || async {
        let (_, html) = get(&customer, "/systems/shop", &cust_admin.0).await;
        html.contains("storage 2.0 rolled out").then_some(html)
    })
    .await;
    let remote = &html[html
        .find("storage 2.0 rolled out")
        .unwrap()
        .saturating_sub(400)..];
    assert!(remote.contains("from hosting"), "{remote}");
    let own_at = html.find("shop 7 rolled out").unwrap();
    let own = &html[own_at.saturating_sub(250)..own_at];
    assert!(!own.contains("from hosting"), "{own}");
    let (_, dashboard) = get(&customer, "/", &cust_admin.0).await;
    assert!(dashboard.contains("from hosting"), "{dashboard}");
    let (_, html) = get(&customer, "/federation", &cust_admin.0).await;
    assert!(html.contains("href=\"/systems/storage\""), "{html}");

    // A rejection with its reason, and a standing policy that accepts at once.
    hosting.system("billing", "service", json!({})).await;
    submit(
        &customer,
        "/federation/uses",
        &cust_admin,
        &[("peer", "hosting"), ("system", "billing")],
    )
    .await;
    let billing = uses(&customer)
        .await
        .into_iter()
        .find(|u| u["system"] == "billing")
        .unwrap();
    let billing_id = billing["id"].as_str().unwrap().to_owned();
    wait_use(&hosting, &billing_id, "pending").await;
    let (status, _) = submit(
        &hosting,
        &format!("/federation/uses/{billing_id}/reject"),
        &host_admin,
        &[("reason", "not for sale")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    wait_use(&customer, &billing_id, "rejected").await;
    let (_, html) = get(&customer, "/federation", &cust_admin.0).await;
    assert!(html.contains("Ended and rejected"), "{html}");

    let (status, html) = submit(
        &hosting,
        "/federation/policies",
        &host_admin,
        &[
            ("peer", "customer"),
            ("system", "billing"),
            ("level", "status"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{html}");
    let (_, html) = get(&hosting, "/federation", &host_admin.0).await;
    assert!(
        html.contains("Withdraw the policy for customer on billing"),
        "{html}"
    );
    submit(
        &customer,
        "/federation/uses",
        &cust_admin,
        &[
            ("peer", "hosting"),
            ("system", "billing"),
            ("level", "status"),
        ],
    )
    .await;
    let again = uses(&customer)
        .await
        .into_iter()
        .find(|u| u["system"] == "billing" && u["state"] == "requested")
        .unwrap();
    let again_id = again["id"].as_str().unwrap().to_owned();
    wait_use(&customer, &again_id, "accepted").await;
    let (status, _) = submit(
        &hosting,
        "/federation/policies/withdraw",
        &host_admin,
        &[("peer", customer_id.as_str()), ("system", "billing")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, html) = get(&hosting, "/federation", &host_admin.0).await;
    assert!(html.contains("No standing policy"), "{html}");

    // A used system deleted on its instance ends its uses: the mirror goes.
    let (status, v) = hosting
        .call(reqwest::Method::DELETE, "/api/v1/systems/billing", None)
        .await;
    assert!(status.is_success(), "{v}");
    wait_use(&hosting, &again_id, "ended").await;
    wait_use(&customer, &again_id, "ended").await;
    let (status, _) = customer
        .call(reqwest::Method::GET, "/api/v1/systems/billing", None)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the mirror of billing is gone"
    );

    // Undo from the customer's side ends it on both.
    let (status, _) = submit(
        &customer,
        &format!("/federation/uses/{use_id}/undo"),
        &cust_admin,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    wait_use(&hosting, &use_id, "ended").await;

    // Suspending from the page closes the link at once.
    let (status, _) = submit(
        &hosting,
        &format!("/federation/peers/{customer_id}/suspend"),
        &host_admin,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(!hosting.ctx.federation.connected(&customer_id));
    let (_, html) = get(&hosting, "/federation", &host_admin.0).await;
    assert!(html.contains("Resume customer"), "{html}");
}
