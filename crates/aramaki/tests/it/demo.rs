//! `--demo`: a believable estate through the domain code, once.

use crate::both;

both!(the_demo_estate_is_alive_and_seeded_once, |app| async move {
    // The week of events ends "now".
    app.clock.set(jiff::Timestamp::now());
    let seeded = aramaki::demo::seed(&app.ctx)
        .await
        .unwrap()
        .expect("an empty instance gets the demo");
    assert!(seeded.systems >= 25, "{seeded:?}");
    assert!(seeded.events >= 100, "{seeded:?}");
    assert!(
        aramaki::demo::seed(&app.ctx).await.unwrap().is_none(),
        "seeded once only"
    );

    let anchors = app.get("/api/v1/anchors").await;
    let categories: Vec<&str> = anchors["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["category"].as_str().unwrap())
        .collect();
    assert!(
        categories.contains(&"infrastructure") && categories.contains(&"project"),
        "{categories:?}"
    );

    // The 3am picture: the shop's production is affected by the mail relay below it.
    let status = app.get("/api/v1/systems/acme-production/status").await;
    assert_eq!(status["worst"], "critical");
    let handbook = app.get("/api/v1/systems/acme-production").await;
    assert!(handbook["handbook"]
        .as_str()
        .unwrap()
        .contains("Escalation"));
    assert!(handbook["contacts"].as_array().unwrap().len() >= 3);
    let flushes = app
        .titles("/api/v1/systems/acme-shop/timeline?q=flushed")
        .await;
    assert_eq!(
        flushes.len(),
        2,
        "someone already flushed the cache twice this week: {flushes:?}"
    );
    let all_prod = app.get("/api/v1/systems/all-production/subsystems").await;
    assert_eq!(all_prod["items"].as_array().unwrap().len(), 3);
    let week = app.get("/api/v1/systems/dc-fra/timeline?limit=200").await;
    assert!(week["items"].as_array().unwrap().len() > 20);
});
