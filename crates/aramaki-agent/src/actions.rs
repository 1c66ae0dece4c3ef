//! Actions the server may ask for by name. Only names in the local
//! configuration's allow-list run, with the command line written there; the
//! server never sends a command.

use std::collections::BTreeMap;

use aramaki_protocol::agent::{
    ActionRequest, ActionState, ActionUpdate, CheckDefinition, Runner, Schedule,
};

use crate::config::AgentConfig;

/// Runs an allow-listed action to the end and says how it went.
pub async fn run(config: &AgentConfig, request: &ActionRequest) -> ActionUpdate {
    let Some(action) = config.actions.get(&request.action) else {
        tracing::warn!(action = %request.action, "refused an action that is not allow-listed");
        return ActionUpdate {
            run_id: request.run_id.clone(),
            state: ActionState::NotAllowed,
            exit_code: None,
            output: format!(
                "action '{}' is not in this agent's allow-list",
                request.action
            ),
        };
    };
    tracing::info!(action = %request.action, run = %request.run_id, "running an allow-listed action");
    let def = CheckDefinition {
        name: request.action.clone(),
        run: Runner::Command {
            argv: action.argv.clone(),
            env: BTreeMap::new(),
            cwd: None,
        },
        schedule: Schedule::Interval {
            secs: 1,
            splay: false,
        },
        timeout_secs: action.timeout_secs,
        ttl_secs: None,
        system: None,
        labels: BTreeMap::new(),
        output_limit: aramaki_protocol::agent::default_output_limit(),
    };
    let result = crate::exec::run(&def).await;
    ActionUpdate {
        run_id: request.run_id.clone(),
        state: if result.status == 0 {
            ActionState::Succeeded
        } else {
            ActionState::Failed
        },
        exit_code: Some(result.status),
        output: result.output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_allow_listed_actions_run() {
        let mut config = AgentConfig::default();
        config.actions.insert(
            "hello".into(),
            crate::config::ActionConfig {
                argv: vec!["/bin/echo".into(), "hi".into()],
                timeout_secs: 5,
            },
        );
        let ask = |name: &str| ActionRequest {
            run_id: "r1".into(),
            action: name.into(),
            params: BTreeMap::new(),
        };
        let done = run(&config, &ask("hello")).await;
        assert_eq!(done.state, ActionState::Succeeded);
        assert_eq!(done.output.trim(), "hi");
        let refused = run(&config, &ask("rm -rf /")).await;
        assert_eq!(refused.state, ActionState::NotAllowed);
    }
}
