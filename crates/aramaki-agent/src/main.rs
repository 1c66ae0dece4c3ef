//! The Aramaki agent.
//!
//! Not implemented yet: enrollment, the agent protocol, checks and actions
//! arrive with the issue "The agent and monitoring". Until then this binary
//! refuses every command instead of pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("-V") => {
            println!(
                "aramaki-agent {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                aramaki_protocol::PROTOCOL_VERSION
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("aramaki-agent: not implemented yet; this build can only print --version");
            ExitCode::from(2)
        }
    }
}
