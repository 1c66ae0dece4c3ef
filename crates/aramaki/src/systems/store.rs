//! SQL for systems, labels, inclusions and categories.

use std::collections::{BTreeMap, HashMap};

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::graph::{Graph, Node};
use super::model::{CategoryName, LabelSelector, Labels, Slug, Term};
use super::{Category, System};
use crate::db::{from_micros, like_escape, to_micros, Sql};

const COLUMNS: &str =
    "s.id, s.slug, s.title, s.category, s.description, s.handbook, s.links, s.contacts, \
    s.selector, s.instance_id, s.version, s.created_at, s.updated_at";

fn decode_err(col: &str, msg: impl ToString) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: msg.to_string().into(),
    }
}

fn system_from_row(row: &AnyRow, labels: Labels) -> Result<System, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let slug: String = row.try_get("slug")?;
    let category: String = row.try_get("category")?;
    let links: String = row.try_get("links")?;
    let contacts: String = row.try_get("contacts")?;
    let selector: Option<String> = row.try_get("selector")?;
    Ok(System {
        id: uuid::Uuid::parse_str(&id).map_err(|e| decode_err("id", e))?,
        slug: Slug::try_from(slug).map_err(|e| decode_err("slug", e))?,
        title: row.try_get("title")?,
        category: CategoryName::try_from(category).map_err(|e| decode_err("category", e))?,
        description: row.try_get("description")?,
        handbook: row.try_get("handbook")?,
        labels,
        links: serde_json::from_str(&links).map_err(|e| decode_err("links", e))?,
        contacts: serde_json::from_str(&contacts).map_err(|e| decode_err("contacts", e))?,
        selector: selector
            .map(LabelSelector::try_from)
            .transpose()
            .map_err(|e| decode_err("selector", e))?,
        instance: row.try_get("instance_id")?,
        version: row.try_get("version")?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

async fn labels_of(
    conn: &mut AnyConnection,
    ids: &[String],
) -> Result<HashMap<String, Labels>, sqlx::Error> {
    let mut maps: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for chunk in ids.chunks(500) {
        let mut sql =
            Sql::new("SELECT system_id, key, value FROM system_labels WHERE system_id IN ");
        sql.bind_list(chunk.iter());
        for row in sql.query().fetch_all(&mut *conn).await? {
            maps.entry(row.try_get("system_id")?)
                .or_default()
                .insert(row.try_get("key")?, row.try_get("value")?);
        }
    }
    Ok(maps
        .into_iter()
        .map(|(k, v)| (k, Labels::from_trusted(v)))
        .collect())
}

async fn with_labels(
    conn: &mut AnyConnection,
    rows: Vec<AnyRow>,
) -> Result<Vec<System>, sqlx::Error> {
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
    let mut labels = labels_of(conn, &ids).await?;
    rows.iter()
        .zip(ids)
        .map(|(row, id)| system_from_row(row, labels.remove(&id).unwrap_or_default()))
        .collect()
}

pub async fn by_slug(conn: &mut AnyConnection, slug: &str) -> Result<Option<System>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM systems s WHERE s.slug = $1 AND s.deleted_at IS NULL");
    let rows: Vec<AnyRow> = sqlx::query(&sql).bind(slug).fetch_all(&mut *conn).await?;
    Ok(with_labels(conn, rows).await?.into_iter().next())
}

/// Ids of the live systems with these slugs, by slug.
pub async fn ids_by_slugs(
    conn: &mut AnyConnection,
    slugs: &[String],
) -> Result<HashMap<String, String>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in slugs.chunks(500) {
        let mut sql =
            Sql::new("SELECT id, slug FROM systems WHERE deleted_at IS NULL AND slug IN ");
        sql.bind_list(chunk.iter());
        for row in sql.query().fetch_all(&mut *conn).await? {
            out.insert(row.try_get("slug")?, row.try_get("id")?);
        }
    }
    Ok(out)
}

pub async fn by_ids(conn: &mut AnyConnection, ids: &[String]) -> Result<Vec<System>, sqlx::Error> {
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let mut sql = Sql::new(&format!(
            "SELECT {COLUMNS} FROM systems s WHERE s.deleted_at IS NULL AND s.id IN "
        ));
        sql.bind_list(chunk.iter());
        let rows = sql.query().fetch_all(&mut *conn).await?;
        out.extend(with_labels(conn, rows).await?);
    }
    Ok(out)
}

/// Filters of the system list.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub category: Option<String>,
    pub labels: Option<LabelSelector>,
    pub text: Option<String>,
    pub after_slug: Option<String>,
    /// Only these systems (the ones a caller may see), if set.
    pub only_ids: Option<Vec<String>>,
}

pub async fn list(
    conn: &mut AnyConnection,
    f: &ListFilter,
    limit: i64,
) -> Result<Vec<System>, sqlx::Error> {
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM systems s WHERE s.deleted_at IS NULL"
    ));
    if let Some(c) = &f.category {
        sql.push(" AND s.category = ").bind(c.as_str());
    }
    if let Some(after) = &f.after_slug {
        sql.push(" AND s.slug > ").bind(after.as_str());
    }
    if let Some(ids) = &f.only_ids {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sql.push(" AND s.id IN ").bind_list(ids.iter());
    }
    if let Some(sel) = &f.labels {
        for term in sel.terms() {
            let (negate, key, value) = match term {
                Term::Equals(k, v) => (false, k, Some(v)),
                Term::NotEquals(k, v) => (true, k, Some(v)),
                Term::Exists(k) => (false, k, None),
                Term::Absent(k) => (true, k, None),
            };
            sql.push(if negate {
                " AND NOT EXISTS"
            } else {
                " AND EXISTS"
            });
            sql.push(" (SELECT 1 FROM system_labels l WHERE l.system_id = s.id AND l.key = ")
                .bind(key.as_str());
            if let Some(v) = value {
                sql.push(" AND l.value = ").bind(v.as_str());
            }
            sql.push(")");
        }
    }
    if let Some(text) = &f.text {
        let p = format!("%{}%", like_escape(&text.to_lowercase()));
        sql.push(" AND (lower(s.slug) LIKE ")
            .bind(p.clone())
            .push(" ESCAPE '\\'");
        sql.push(" OR lower(s.title) LIKE ")
            .bind(p.clone())
            .push(" ESCAPE '\\'");
        sql.push(" OR lower(s.description) LIKE ")
            .bind(p.clone())
            .push(" ESCAPE '\\'");
        sql.push(" OR EXISTS (SELECT 1 FROM system_labels l WHERE l.system_id = s.id AND (lower(l.key) LIKE ")
            .bind(p.clone())
            .push(" ESCAPE '\\' OR lower(l.value) LIKE ")
            .bind(p)
            .push(" ESCAPE '\\')))");
    }
    sql.push(" ORDER BY s.slug LIMIT ").bind(limit);
    let rows = sql.query().fetch_all(&mut *conn).await?;
    with_labels(conn, rows).await
}

pub async fn insert(conn: &mut AnyConnection, s: &System) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO systems (id, slug, title, category, description, handbook, links, contacts, selector, \
         instance_id, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(s.id.to_string())
    .bind(s.slug.as_str())
    .bind(s.title.as_str())
    .bind(s.category.as_str())
    .bind(s.description.as_str())
    .bind(s.handbook.as_str())
    .bind(json(&s.links))
    .bind(json(&s.contacts))
    .bind(s.selector.as_ref().map(|x| x.to_string()))
    .bind(s.instance.as_str())
    .bind(s.version)
    .bind(to_micros(s.created_at))
    .bind(to_micros(s.updated_at))
    .execute(&mut *conn)
    .await?;
    replace_labels(conn, &s.id.to_string(), &s.labels).await
}

pub async fn update(conn: &mut AnyConnection, s: &System) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE systems SET slug = $1, title = $2, category = $3, description = $4, handbook = $5, links = $6, \
         contacts = $7, selector = $8, version = $9, updated_at = $10 WHERE id = $11",
    )
    .bind(s.slug.as_str())
    .bind(s.title.as_str())
    .bind(s.category.as_str())
    .bind(s.description.as_str())
    .bind(s.handbook.as_str())
    .bind(json(&s.links))
    .bind(json(&s.contacts))
    .bind(s.selector.as_ref().map(|x| x.to_string()))
    .bind(s.version)
    .bind(to_micros(s.updated_at))
    .bind(s.id.to_string())
    .execute(&mut *conn)
    .await?;
    replace_labels(conn, &s.id.to_string(), &s.labels).await
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".to_owned())
}

async fn replace_labels(
    conn: &mut AnyConnection,
    id: &str,
    labels: &Labels,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM system_labels WHERE system_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    for (k, v) in labels.iter() {
        sqlx::query("INSERT INTO system_labels (system_id, key, value) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(k.as_str())
            .bind(v.as_str())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

pub async fn mark_deleted(conn: &mut AnyConnection, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM inclusions WHERE parent_id = $1 OR child_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE systems SET deleted_at = $1, updated_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub async fn include(
    conn: &mut AnyConnection,
    parent: &str,
    child: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO inclusions (parent_id, child_id, created_at) VALUES ($1, $2, $3)")
        .bind(parent)
        .bind(child)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub async fn exclude(
    conn: &mut AnyConnection,
    parent: &str,
    child: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM inclusions WHERE parent_id = $1 AND child_id = $2")
        .bind(parent)
        .bind(child)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The whole current structure: live systems, their labels and selectors,
/// and the explicit inclusions between them.
pub async fn load_graph(conn: &mut AnyConnection) -> Result<Graph, sqlx::Error> {
    let mut graph = Graph::new();
    let rows = sqlx::query("SELECT id, slug, selector FROM systems WHERE deleted_at IS NULL")
        .fetch_all(&mut *conn)
        .await?;
    let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for row in sqlx::query(
        "SELECT l.system_id, l.key, l.value FROM system_labels l JOIN systems s ON s.id = l.system_id \
         WHERE s.deleted_at IS NULL",
    )
    .fetch_all(&mut *conn)
    .await?
    {
        labels
            .entry(row.try_get("system_id")?)
            .or_default()
            .insert(row.try_get("key")?, row.try_get("value")?);
    }
    for row in rows {
        let id: String = row.try_get("id")?;
        let selector: Option<String> = row.try_get("selector")?;
        let node = Node {
            slug: row.try_get("slug")?,
            labels: Labels::from_trusted(labels.remove(&id).unwrap_or_default()),
            selector: selector.and_then(|s| LabelSelector::try_from(s).ok()),
        };
        graph.add_node(id, node);
    }
    for row in sqlx::query("SELECT parent_id, child_id FROM inclusions")
        .fetch_all(&mut *conn)
        .await?
    {
        let parent: String = row.try_get("parent_id")?;
        let child: String = row.try_get("child_id")?;
        graph.add_edge(&parent, &child);
    }
    Ok(graph)
}

pub async fn categories(conn: &mut AnyConnection) -> Result<Vec<Category>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.name, c.title, c.description, c.builtin, \
         (SELECT COUNT(*) FROM systems s WHERE s.category = c.name AND s.deleted_at IS NULL) AS systems \
         FROM categories c ORDER BY c.name",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let name: String = r.try_get("name")?;
            Ok(Category {
                name: CategoryName::try_from(name).map_err(|e| decode_err("name", e))?,
                title: r.try_get("title")?,
                description: r.try_get("description")?,
                builtin: r.try_get::<i64, _>("builtin")? != 0,
                systems: r.try_get("systems")?,
            })
        })
        .collect()
}

pub async fn category_exists(conn: &mut AnyConnection, name: &str) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("SELECT 1 FROM categories WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

pub async fn insert_category(
    conn: &mut AnyConnection,
    c: &Category,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO categories (name, title, description, builtin, created_at) VALUES ($1, $2, $3, 0, $4)")
        .bind(c.name.as_str())
        .bind(c.title.as_str())
        .bind(c.description.as_str())
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records that a user looks at a system now; returns when they last did.
pub async fn visit(
    ctx: &crate::context::Context,
    user_id: &str,
    system_id: &str,
) -> Result<Option<i64>, sqlx::Error> {
    let previous = sqlx::query("SELECT seen_at FROM visits WHERE user_id = $1 AND system_id = $2")
        .bind(user_id)
        .bind(system_id)
        .fetch_optional(ctx.db.reader())
        .await?
        .map(|r| r.try_get::<i64, _>("seen_at"))
        .transpose()?;
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO visits (user_id, system_id, seen_at) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id, system_id) DO UPDATE SET seen_at = excluded.seen_at",
    )
    .bind(user_id)
    .bind(system_id)
    .bind(to_micros(ctx.now()))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(previous)
}
