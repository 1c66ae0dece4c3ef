//! The agent binary's command line (also makes `cargo test --workspace`
//! build the binary that the server's end-to-end tests run).

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aramaki-agent"))
}

#[test]
fn version_names_the_protocol() {
    let out = agent().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("agent protocol 2"), "{text}");
}

#[test]
fn running_unenrolled_says_how_to_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["run", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("aramaki-agent enroll"), "{err}");
}

#[test]
fn a_bad_token_is_refused_before_any_connection() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "enroll",
            "--server",
            "http://127.0.0.1:9",
            "--token",
            "nonsense",
            "--state-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an enrollment token"), "{err}");
}

#[test]
fn a_bad_config_file_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "queue_capacity = \"lots\"\n").unwrap();
    let out = agent()
        .args(["run", "--state-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml") && err.contains("queue_capacity"),
        "{err}"
    );
}
