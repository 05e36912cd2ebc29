//! `retro-fleet batch`: submit a JSONL batch to an ingress (uploaded with
//! the Files API, then created from it as the OpenAI SDKs do), follow its
//! progress, cancel it, fetch its results. Talks HTTP, so the ingress's
//! authentication and tenants apply (`--api-key` or `FLEET_API_KEY`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use super::{BatchAction, IngressArgs};
use crate::config::Config;

/// An ingress to talk to.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// `base` like `http://127.0.0.1:8080`.
    pub fn new(base: &str, key: Option<String>) -> Client {
        Client { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_string(), key }
    }

    fn req(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn answer(r: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let body: Value = r.json().await.unwrap_or_default();
        let msg = body["error"]["message"].as_str().unwrap_or("no error message");
        let param = body["error"]["param"].as_str().map(|p| format!(" ({p})")).unwrap_or_default();
        anyhow::bail!("the ingress answered {status}: {msg}{param}")
    }

    /// The batch object of `id`.
    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        let r = self.req(self.http.get(format!("{}/v1/batches/{id}", self.base))).send().await?;
        Ok(Self::answer(r).await?.json().await?)
    }

    /// Uploads the JSONL file (`purpose=batch`) and creates a batch of it
    /// for the endpoint of its first line; returns the batch object.
    pub async fn submit(&self, file: &Path, priority: Option<&str>, window: &str) -> anyhow::Result<Value> {
        let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let first = body.split(|b| *b == b'\n').find(|l| !l.trim_ascii().is_empty()).unwrap_or_default();
        let endpoint = serde_json::from_slice::<Value>(first).ok().and_then(|l| l["url"].as_str().map(str::to_string));
        let endpoint = endpoint.with_context(|| format!("{}: the first line has no `url`", file.display()))?;
        let name = file.file_name().map_or("batch.jsonl".into(), |n| n.to_string_lossy().into_owned());
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part("file", reqwest::multipart::Part::bytes(body).file_name(name));
        let r = self.req(self.http.post(format!("{}/v1/files", self.base)).multipart(form)).send().await?;
        let uploaded: Value = Self::answer(r).await?.json().await?;
        let input = uploaded["id"].as_str().context("the ingress answered the upload without a file id")?;
        let mut url = format!("{}/v1/batches", self.base);
        if let Some(p) = priority {
            url.push_str(&format!("?priority={p}"));
        }
        let create = serde_json::json!({"input_file_id": input, "endpoint": endpoint, "completion_window": window});
        let r = self.req(self.http.post(url).json(&create)).send().await?;
        Ok(Self::answer(r).await?.json().await?)
    }

    /// Asks for batch `id` to be cancelled; returns the batch object.
    pub async fn cancel(&self, id: &str) -> anyhow::Result<Value> {
        let r = self.req(self.http.post(format!("{}/v1/batches/{id}/cancel", self.base))).send().await?;
        Ok(Self::answer(r).await?.json().await?)
    }

    /// The results file of `id` (JSONL).
    pub async fn results(&self, id: &str) -> anyhow::Result<String> {
        let r = self.req(self.http.get(format!("{}/v1/batches/{id}/results", self.base))).send().await?;
        Ok(Self::answer(r).await?.text().await?)
    }

    /// Polls `id` until it ends (completed, failed, expired or cancelled),
    /// drawing a progress bar.
    pub async fn wait(&self, id: &str) -> anyhow::Result<Value> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(id.to_string());
        loop {
            let v = self.status(id).await?;
            let counts = &v["request_counts"];
            let n = |k: &str| counts[k].as_u64().unwrap_or(0);
            bar.set_length(n("total"));
            bar.set_position(n("completed") + n("failed"));
            let status = v["status"].as_str().unwrap_or("unknown");
            bar.set_message(format!("{id} {status}"));
            if ["completed", "failed", "expired", "cancelled"].contains(&status) {
                bar.finish();
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// `retro-fleet batch ...`.
pub async fn batch(config: &Config, action: BatchAction) -> anyhow::Result<()> {
    let client = |to: &IngressArgs| {
        let base = to.url.clone().unwrap_or_else(|| format!("http://{}", config.ingress.listen));
        Client::new(&base, to.api_key.clone())
    };
    match action {
        BatchAction::Submit { file, priority, window, wait, to } => {
            let c = client(&to);
            let batch = c.submit(&file, priority.map(|p| p.as_str()), &window).await?;
            let id = batch["id"].as_str().context("the ingress answered without a batch id")?.to_string();
            let batch = if wait { c.wait(&id).await? } else { batch };
            println!("{}", serde_json::to_string_pretty(&batch)?);
        }
        BatchAction::Status { id, wait, to } => {
            let c = client(&to);
            let batch = if wait { c.wait(&id).await? } else { c.status(&id).await? };
            println!("{}", serde_json::to_string_pretty(&batch)?)
        }
        BatchAction::Cancel { id, to } => {
            println!("{}", serde_json::to_string_pretty(&client(&to).cancel(&id).await?)?)
        }
        BatchAction::Results { id, to } => print!("{}", client(&to).results(&id).await?),
    }
    Ok(())
}
