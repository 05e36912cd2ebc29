//! The Files API, as OpenAI defines it, stored in the Object Store
//! `fleet_files` (`topology apply` creates it, replicated like the
//! streams):
//!
//! - `POST /v1/files` (role `submit`): a multipart upload with `file` and
//!   `purpose` (`batch` or `user_data`), up to `ingress.max_file_bytes`
//!   (413 beyond).
//! - `GET /v1/files` (role `read`): the tenant's files, newest first,
//!   paginated with `after` and `limit`, optionally of one `purpose`.
//! - `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, and
//!   `DELETE /v1/files/{id}` (role `submit`).
//!
//! A file is the object `<tenant>/<file id>`; what OpenAI shows of it
//! (purpose, name, creation time) is the object's metadata. Another
//! tenant's file is a 404, like an unknown one. Batches read their input
//! here and write their output and error files here ([`put`], [`read`]).

use std::collections::HashMap;

use async_nats::jetstream::object_store::{ObjectInfo, ObjectMetadata, ObjectStore};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Extension, Multipart, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use super::auth::Principal;
use super::error::{ApiError, ApiPath, ApiQuery};
use super::state::AppState;

/// Purposes a caller may upload for.
const UPLOAD_PURPOSES: [&str; 2] = ["batch", "user_data"];
/// The purpose of the files a batch writes.
pub const BATCH_OUTPUT: &str = "batch_output";
/// The longest file name kept.
const MAX_FILENAME: usize = 256;

/// A stored file, as OpenAI's `file` object shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileObject {
    /// `file-<ULID>`.
    pub id: String,
    /// Size in bytes.
    pub bytes: usize,
    /// Unix seconds.
    pub created_at: u64,
    /// The name it was uploaded (or written) under.
    pub filename: String,
    /// `batch`, `batch_output` or `user_data`.
    pub purpose: String,
}

impl FileObject {
    /// OpenAI's `file` object.
    pub fn view(&self) -> Value {
        json!({
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "status_details": null, "expires_at": null,
        })
    }

    /// The file an object holds (`None`: not a file of the Files API).
    fn of(info: &ObjectInfo) -> Option<(String, FileObject)> {
        let (tenant, id) = info.name.split_once('/')?;
        let m = &info.metadata;
        Some((
            tenant.to_string(),
            FileObject {
                id: id.to_string(),
                bytes: info.size,
                created_at: m.get("created_at")?.parse().ok()?,
                filename: m.get("filename").cloned().unwrap_or_default(),
                purpose: m.get("purpose")?.clone(),
            },
        ))
    }
}

fn object_name(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

fn missing(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no file `{id}`")).param("file_id")
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("{what} failed: {e}"))
}

/// Stores `data` as a new file of `tenant`.
pub async fn put(
    store: &ObjectStore,
    tenant: &str,
    purpose: &str,
    filename: &str,
    data: &[u8],
) -> Result<FileObject, ApiError> {
    let file = FileObject {
        id: format!("file-{}", ulid::Ulid::new()),
        bytes: data.len(),
        created_at: retro_fleet_worker::unix_ms() / 1000,
        filename: filename.chars().take(MAX_FILENAME).collect(),
        purpose: purpose.to_string(),
    };
    let metadata = HashMap::from([
        ("purpose".to_string(), file.purpose.clone()),
        ("filename".to_string(), file.filename.clone()),
        ("created_at".to_string(), file.created_at.to_string()),
    ]);
    let meta = ObjectMetadata { name: object_name(tenant, &file.id), metadata, ..Default::default() };
    store.put(meta, &mut &data[..]).await.map_err(|e| {
        ApiError::new(ErrorCode::Overloaded, format!("storing the file failed ({e}): the file store may be full"))
    })?;
    Ok(file)
}

/// File `id` of `tenant` (404 when it is another tenant's or unknown).
pub async fn info(store: &ObjectStore, tenant: &str, id: &str) -> Result<FileObject, ApiError> {
    if !id.starts_with("file-") || !subjects::is_token(id) {
        return Err(missing(id));
    }
    match store.info(object_name(tenant, id)).await {
        Ok(i) if !i.deleted => FileObject::of(&i).map(|(_, f)| f).ok_or_else(|| missing(id)),
        Ok(_) => Err(missing(id)),
        Err(e) if e.kind() == async_nats::jetstream::object_store::InfoErrorKind::NotFound => Err(missing(id)),
        Err(e) => Err(internal("reading the file", e)),
    }
}

/// The content of file `id` of `tenant`.
pub async fn read(store: &ObjectStore, tenant: &str, id: &str) -> Result<Vec<u8>, ApiError> {
    let file = info(store, tenant, id).await?;
    let mut object = store.get(object_name(tenant, id)).await.map_err(|e| internal("reading the file", e))?;
    let mut data = Vec::with_capacity(file.bytes);
    object.read_to_end(&mut data).await.map_err(|e| internal("reading the file", e))?;
    Ok(data)
}

/// `POST /v1/files`.
pub async fn upload(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let bad = |m: String, p: &str| ApiError::new(ErrorCode::InvalidRequest, m).param(p);
    let mut form = form.map_err(|e| bad(format!("a file is uploaded as multipart/form-data: {e}"), "file"))?;
    let (mut purpose, mut upload) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(bad(format!("the multipart body is malformed: {e}"), "file")),
        };
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| bad(format!("`purpose` unreadable: {e}"), "purpose"))?)
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let data = field.bytes().await.map_err(|e| bad(format!("`file` unreadable: {e}"), "file"))?;
                upload = Some((name, data));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| bad("`purpose` is missing: `batch` or `user_data`".into(), "purpose"))?;
    if !UPLOAD_PURPOSES.contains(&purpose.as_str()) {
        let m = format!("`purpose` `{purpose}` is not one this fleet takes: `batch` or `user_data`");
        return Err(bad(m, "purpose"));
    }
    let (name, data): (String, Bytes) = upload.ok_or_else(|| bad("`file` is missing".into(), "file"))?;
    if data.is_empty() {
        return Err(bad("the file is empty".into(), "file"));
    }
    let file = put(&state.files, &who.tenant, &purpose, &name, &data).await?;
    tracing::info!(file = %file.id, tenant = %who.tenant, bytes = file.bytes, purpose = %file.purpose, "file stored");
    Ok(Json(file.view()))
}

/// `?after=&limit=&purpose=&order=` of `GET /v1/files`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The last id of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Files per page, 1-10000 (default 10000).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only files of this purpose.
    #[serde(default)]
    pub purpose: Option<String>,
    /// `desc` (newest first, the default) or `asc`.
    #[serde(default)]
    pub order: Option<Order>,
}

/// A listing's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// One page of `items` (sorted by id in `order`) after the id `after`:
/// OpenAI's `list` object, with `first_id`, `last_id` and `has_more`.
pub fn page(items: Vec<(String, Value)>, after: Option<&str>, limit: usize, order: Order) -> Value {
    let start = match after {
        Some(a) => items.iter().position(|(id, _)| id.as_str() == a).map_or_else(
            // an id no longer listed: continue where it would have been
            || items.iter().take_while(|(id, _)| (order == Order::Desc) == (id.as_str() > a)).count(),
            |i| i + 1,
        ),
        None => 0,
    };
    let rest = &items[start.min(items.len())..];
    let data: Vec<Value> = rest.iter().take(limit).map(|(_, v)| v.clone()).collect();
    let first = rest.first().filter(|_| !data.is_empty()).map(|(id, _)| id.clone());
    let last = rest.get(data.len().saturating_sub(1)).filter(|_| !data.is_empty()).map(|(id, _)| id.clone());
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": rest.len() > data.len()})
}

/// `GET /v1/files`.
pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`limit` is 1-10000").param("limit"));
    }
    let order = q.order.unwrap_or(Order::Desc);
    let mut objects = state.files.list().await.map_err(|e| internal("listing files", e))?;
    let mut files = Vec::new();
    while let Some(o) = objects.next().await {
        let o = o.map_err(|e| internal("listing files", e))?;
        match FileObject::of(&o) {
            Some((tenant, f)) if tenant == who.tenant && q.purpose.as_ref().is_none_or(|p| *p == f.purpose) => {
                files.push((f.id.clone(), f.view()))
            }
            _ => {}
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if order == Order::Desc {
        files.reverse();
    }
    Ok(Json(page(files, q.after.as_deref(), limit, order)))
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(info(&state.files, &who.tenant, &id).await?.view()))
}

/// `GET /v1/files/{id}/content`.
pub async fn content(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let data = read(&state.files, &who.tenant, &id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    info(&state.files, &who.tenant, &id).await?;
    state.files.delete(object_name(&who.tenant, &id)).await.map_err(|e| internal("deleting the file", e))?;
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(ids: &[&str]) -> Vec<(String, Value)> {
        ids.iter().map(|i| (i.to_string(), json!(i))).collect()
    }

    #[test]
    fn pages_follow_after_and_limit_and_say_whether_more_remain() {
        let all = items(&["f5", "f4", "f3", "f2", "f1"]);
        let p = page(all.clone(), None, 2, Order::Desc);
        assert_eq!(p["data"], json!(["f5", "f4"]));
        assert_eq!(
            (p["first_id"].as_str(), p["last_id"].as_str(), p["has_more"].as_bool()),
            (Some("f5"), Some("f4"), Some(true))
        );
        let p = page(all.clone(), Some("f4"), 2, Order::Desc);
        assert_eq!(p["data"], json!(["f3", "f2"]));
        let p = page(all.clone(), Some("f2"), 2, Order::Desc);
        assert_eq!((p["data"].clone(), p["has_more"].as_bool()), (json!(["f1"]), Some(false)));
        // an `after` deleted since: the page starts where it would have been
        let p = page(items(&["f5", "f3", "f1"]), Some("f4"), 10, Order::Desc);
        assert_eq!(p["data"], json!(["f3", "f1"]));
        let p = page(items(&["f1", "f3", "f5"]), Some("f2"), 10, Order::Asc);
        assert_eq!(p["data"], json!(["f3", "f5"]));
        let p = page(Vec::new(), None, 10, Order::Desc);
        assert_eq!(
            (p["data"].clone(), p["first_id"].clone(), p["has_more"].as_bool()),
            (json!([]), Value::Null, Some(false))
        );
    }
}
