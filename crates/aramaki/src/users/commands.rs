//! `aramaki user …`: account administration on the data directory itself,
//! so that it works before any token exists and while the server runs.

use clap::Subcommand;
use serde_json::json;

use super::{
    create_token, generate_password, grant, hash_password, revoke, store, Role, UserError,
};
use crate::context::Context;
use crate::timeline::Actor;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints a one-time password and an API token once.
    Add {
        username: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Instance-wide role: none (grants only), viewer, operator or admin.
        #[arg(long, default_value = "none")]
        role: String,
    },
    /// List users with their roles, grants and tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Grant ROLE (viewer, operator, admin) on SYSTEM and everything it includes.
    Grant {
        username: String,
        system: String,
        role: String,
    },
    /// Take a user's grant on SYSTEM away.
    Revoke { username: String, system: String },
    /// Set a new one-time password (to be changed at the next login).
    Passwd { username: String },
    /// Lift a login lockout of a user (and forget their failed logins).
    Unlock { username: String },
    /// Issue a new API token for a user; printed once.
    Token {
        username: String,
        #[arg(long, default_value = "issued on the command line")]
        name: String,
    },
}

/// Who acts when an operator runs these commands on the server's host.
fn actor(ctx: &Context) -> Actor {
    Actor::instance(&ctx.identity.instance_id, "aramaki command line")
}

pub async fn run(ctx: &Context, command: UserCommand) -> Result<(), UserError> {
    match command {
        UserCommand::Add {
            username,
            display_name,
            role,
        } => {
            let role = Role::parse_instance(&role).map_err(UserError::BadRole)?;
            let password = generate_password()?;
            let display = display_name.unwrap_or_else(|| username.clone());
            let user = super::create_user(
                ctx,
                &actor(ctx),
                &username,
                &display,
                role,
                password.expose(),
                true,
            )
            .await?;
            let token = create_token(ctx, &actor(ctx), &user.id, "created with the user").await?;
            println!(
                "created {} (instance role: {})",
                user.username,
                Role::instance_str(role)
            );
            println!("  one-time password: {}", password.expose());
            println!("  API token:         {}", token.expose());
        }
        UserCommand::List { json } => {
            let users = store::overview(ctx.db.reader()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!(users)).unwrap_or_default()
                );
            } else {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|u| {
                        vec![
                            u.username.clone(),
                            u.display_name.clone(),
                            u.role.clone(),
                            u.grants.join(", "),
                            u.tokens.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    crate::cli::table(
                        &["user", "name", "instance role", "grants", "tokens"],
                        &rows
                    )
                );
            }
        }
        UserCommand::Grant {
            username,
            system,
            role,
        } => {
            let role = Role::parse(&role).ok_or_else(|| {
                UserError::BadRole(format!(
                    "unknown role '{role}', expected viewer, operator or admin"
                ))
            })?;
            grant(ctx, &actor(ctx), &username, &system, role).await?;
            println!("{username} is {role} on {system} and everything it includes");
        }
        UserCommand::Revoke { username, system } => {
            revoke(ctx, &actor(ctx), &username, &system).await?;
            println!("{username} no longer has a grant on {system}");
        }
        UserCommand::Passwd { username } => {
            let password = generate_password()?;
            let mut tx = ctx.db.begin().await?;
            let until = Some(super::one_time_until(ctx));
            if !store::set_password(
                &mut tx,
                &username,
                &hash_password(password.expose())?,
                until,
            )
            .await?
            {
                return Err(UserError::NoUser(username));
            }
            let data = json!({"user": username});
            super::audit(
                ctx,
                &mut tx,
                &actor(ctx),
                "user.password_reset",
                format!("Set a one-time password for {username}"),
                data,
            )
            .await?;
            ctx.commit(tx).await?;
            println!(
                "new one-time password for {username}: {}",
                password.expose()
            );
        }
        UserCommand::Unlock { username } => {
            let mut conn = ctx.db.reader().acquire().await?;
            store::by_username(&mut conn, &username)
                .await?
                .ok_or_else(|| UserError::NoUser(username.clone()))?;
            drop(conn);
            if super::throttle::unlock(ctx, &actor(ctx), &username).await? {
                println!("{username} may log in again");
            } else {
                println!("{username} was not locked out");
            }
        }
        UserCommand::Token { username, name } => {
            let mut conn = ctx.db.reader().acquire().await?;
            let user = store::by_username(&mut conn, &username)
                .await?
                .ok_or(UserError::NoUser(username))?;
            drop(conn);
            let token = create_token(ctx, &actor(ctx), &user.id, &name).await?;
            println!("API token for {}: {}", user.username, token.expose());
        }
    }
    Ok(())
}
