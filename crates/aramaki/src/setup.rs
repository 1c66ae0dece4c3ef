//! First start: the data directory, the commented configuration, the
//! identity key, the database and the first admin. `aramaki init` runs this
//! alone; `aramaki server` runs it before serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::Row;

use crate::config::{self, Config};
use crate::context::{Clock, Context, SystemClock};
use crate::db::{new_id, to_micros, Db};
use crate::federation::identity::{self, Identity};
use crate::metrics::Metrics;
use crate::systems::model::{CategoryName, Labels, Slug};
use crate::systems::{self, NewSystem, SystemError};
use crate::timeline::hub::TimelineHub;
use crate::users::{self, Role, Secret};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    User(#[from] users::UserError),
    #[error("setting up: {0}")]
    Data(String),
}

/// Secrets created on first start, to be shown once.
#[derive(Debug)]
pub struct FirstAdmin {
    pub username: String,
    pub password: Secret,
    pub token: Secret,
}

/// What `init` did and produced.
#[derive(Debug)]
pub struct Setup {
    pub context: Arc<Context>,
    pub wrote_config: bool,
    pub created_key: bool,
    pub first_admin: Option<FirstAdmin>,
}

/// Creates the data directory (mode 0700) if needed.
pub fn ensure_data_dir(dir: &Path) -> Result<(), SetupError> {
    let err = |source| SetupError::DataDir {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        }
    }
    Ok(())
}

/// Loads the configuration of `data_dir`, writing the commented default
/// first if there is none.
pub fn load_config(
    data_dir: &Path,
    env: &[(String, String)],
) -> Result<(Config, bool), SetupError> {
    ensure_data_dir(data_dir)?;
    let path = data_dir.join(config::CONFIG_FILE);
    let wrote = config::write_default_file(&path)?;
    Ok((Config::load(&path, env)?, wrote))
}

/// Builds a Context on `config`, creating whatever is missing.
pub async fn init(
    data_dir: &Path,
    config: Config,
    clock: Arc<dyn Clock>,
) -> Result<Setup, SetupError> {
    ensure_data_dir(data_dir)?;
    let db = Db::connect(
        &config.database_url(data_dir),
        config.database.max_connections,
    )
    .await?;
    if let Some(row) = sqlx::query("SELECT public_key FROM instance")
        .fetch_optional(db.reader())
        .await?
    {
        identity::settle_next_key(data_dir, &row.try_get::<String, _>(0)?)?;
    }
    let (key, created_key) = identity::load_or_create_key(data_dir)?;
    let instance_id =
        ensure_instance(&db, &config.instance.name, &key, to_micros(clock.now())).await?;
    let identity = Identity::new(instance_id, config.instance.name.clone(), key);
    let (rotations, retired) = crate::federation::rotation::history(&db).await?;
    identity.set_history(rotations, retired);
    let context = Arc::new(Context {
        config,
        data_dir: data_dir.to_owned(),
        db,
        clock,
        identity,
        timeline: TimelineHub::new(),
        appender: crate::timeline::batch::Appender::new(),
        agents: Default::default(),
        ingest: Default::default(),
        metrics: Metrics::default(),
        federation: Default::default(),
    });
    ensure_instance_system(&context).await?;
    let first_admin = ensure_admin(&context).await?;
    Ok(Setup {
        context,
        wrote_config: false,
        created_key,
        first_admin,
    })
}

/// Convenience for `main`: configuration, then [`init`] with the real clock.
pub async fn init_from_dir(data_dir: &Path, env: &[(String, String)]) -> Result<Setup, SetupError> {
    let (config, wrote) = load_config(data_dir, env)?;
    let mut setup = init(data_dir, config, Arc::new(SystemClock)).await?;
    setup.wrote_config = wrote;
    Ok(setup)
}

async fn ensure_instance(
    db: &Db,
    name: &str,
    key: &ed25519_dalek::SigningKey,
    now: i64,
) -> Result<String, SetupError> {
    let public = identity::hex(key.verifying_key().as_bytes());
    let row = sqlx::query("SELECT id FROM instance")
        .fetch_optional(db.reader())
        .await?;
    if let Some(row) = row {
        return Ok(row.try_get::<String, _>("id")?);
    }
    let id = new_id().to_string();
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO instance (id, name, public_key, created_at) VALUES ($1, $2, $3, $4)")
        .bind(id.as_str())
        .bind(name)
        .bind(public)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// Every instance is a system too: the one its own audit trail (accounts,
/// tokens, sessions) is recorded on. Created once, as `aramaki` (or
/// `aramaki-instance` if that slug is taken).
async fn ensure_instance_system(ctx: &Context) -> Result<(), SetupError> {
    let row = sqlx::query("SELECT system_id FROM instance")
        .fetch_one(ctx.db.reader())
        .await?;
    if let Some(id) = row.try_get::<Option<String>, _>("system_id")? {
        return revive_instance_system(ctx, &id).await;
    }
    let actor = crate::timeline::Actor::instance(&ctx.identity.instance_id, "first start");
    let category = CategoryName::try_from("service".to_owned()).map_err(SetupError::Data)?;
    let mut system = None;
    for slug in ["aramaki", "aramaki-instance"] {
        let mut new = NewSystem::new(
            Slug::try_from(slug).map_err(SetupError::Data)?,
            &format!("{} (this instance)", ctx.identity.name),
            category.clone(),
        );
        new.description = "This Aramaki instance. Its timeline holds the audit trail: users, API tokens, sessions.".into();
        new.labels = Labels::try_from(std::collections::BTreeMap::from([(
            "aramaki".to_owned(),
            "instance".to_owned(),
        )]))
        .map_err(SetupError::Data)?;
        match systems::create(ctx, &actor, new).await {
            Ok(s) => {
                system = Some(s);
                break;
            }
            Err(SystemError::SlugTaken(_)) => continue,
            Err(e) => return Err(SetupError::Data(e.to_string())),
        }
    }
    let system =
        system.ok_or_else(|| SetupError::Data("no free slug for the instance system".into()))?;
    let mut tx = ctx.db.begin().await?;
    sqlx::query("UPDATE instance SET system_id = $1")
        .bind(system.id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The instance's system cannot be deleted, but a database from before that
/// rule (or restored from such a backup) may hold it deleted: bring it back,
/// under its slug or, if another system took that, `<slug>-audit`, so the
/// audit trail is readable and written to a live system again.
pub async fn revive_instance_system(ctx: &Context, id: &str) -> Result<(), SetupError> {
    let row = sqlx::query("SELECT slug, deleted_at FROM systems WHERE id = $1")
        .bind(id)
        .fetch_optional(ctx.db.reader())
        .await?;
    let Some(row) = row else { return Ok(()) };
    if row.try_get::<Option<i64>, _>("deleted_at")?.is_none() {
        return Ok(());
    }
    let slug: String = row.try_get("slug")?;
    let mut tx = ctx.db.begin().await?;
    let taken = sqlx::query("SELECT 1 AS one FROM systems WHERE slug = $1 AND deleted_at IS NULL")
        .bind(slug.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    let slug = if taken { format!("{slug}-audit") } else { slug };
    sqlx::query("UPDATE systems SET deleted_at = NULL, slug = $1 WHERE id = $2")
        .bind(slug.as_str())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::warn!(%slug, "the instance's own system was deleted; it is back");
    Ok(())
}

/// On an empty user table, creates `admin` with a one-time password and a token.
async fn ensure_admin(ctx: &Context) -> Result<Option<FirstAdmin>, SetupError> {
    if users::count_users(ctx).await? > 0 {
        return Ok(None);
    }
    let password = users::generate_password()?;
    let actor = crate::timeline::Actor::instance(&ctx.identity.instance_id, "first start");
    let admin = users::create_user(
        ctx,
        &actor,
        "admin",
        "Administrator",
        Some(Role::Admin),
        password.expose(),
        true,
    )
    .await?;
    let token = users::create_token(ctx, &actor, &admin.id, "created at first start").await?;
    Ok(Some(FirstAdmin {
        username: admin.username,
        password,
        token,
    }))
}
