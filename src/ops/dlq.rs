//! Dead letters: reading and replaying them, for `retro-fleet dlq` and the
//! admin API.
//!
//! A dead letter in `FLEET_DLQ` is the original request (payload and
//! headers) plus `Fleet-Error-Code`, `Fleet-Error-Message`,
//! `Fleet-Delivery-Count` and `Fleet-Original-Subject`. Replay publishes the
//! original payload and headers back to the original subject as a new
//! message, so it starts a fresh delivery history. It drops the error
//! headers and the old `Fleet-Deadline`. Its `Nats-Msg-Id` is
//! `<id>-replay-<dead letter sequence>`, so replaying one letter twice queues
//! it once. Before publishing, replay removes the stored error result of
//! that request id, so the new result can be stored; a stored success is
//! never removed, and such a letter is skipped. The letter is deleted once
//! the request streams hold the replay, unless `--keep` is given.

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, stream::Stream};
use async_nats::HeaderMap;
use retro_fleet_schemas::envelope::replay_headers;
use retro_fleet_schemas::stored::stored_message;
use retro_fleet_schemas::{codec, headers, subjects, InferRequest, InferResult, Priority, Status};

/// Which letters a command applies to: `key=value` pairs, all of which must
/// match. Keys: `model`, `priority`, `code`, `id`, `tenant`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pairs: Vec<(FilterKey, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FilterKey {
    Model,
    Priority,
    Code,
    Id,
    Tenant,
}

impl Filter {
    /// Parses `key=value` pairs.
    pub fn parse(pairs: &[String]) -> anyhow::Result<Filter> {
        let mut f = Filter::default();
        for p in pairs {
            let Some((k, v)) = p.split_once('=') else {
                bail!("filter `{p}` is not key=value (keys: model, priority, code, id, tenant)");
            };
            let key = match k.trim() {
                "model" => FilterKey::Model,
                "priority" => FilterKey::Priority,
                "code" => FilterKey::Code,
                "id" => FilterKey::Id,
                "tenant" => FilterKey::Tenant,
                other => bail!("unknown filter key `{other}` (keys: model, priority, code, id, tenant)"),
            };
            f.pairs.push((key, v.trim().to_string()));
        }
        Ok(f)
    }

    fn matches(&self, l: &Letter) -> bool {
        self.pairs.iter().all(|(k, v)| {
            let have = match k {
                FilterKey::Model => l.model.as_str(),
                FilterKey::Priority => l.priority.as_str(),
                FilterKey::Code => l.code.as_str(),
                FilterKey::Id => l.id.as_deref().unwrap_or(""),
                FilterKey::Tenant => l.tenant.as_str(),
            };
            have == v
        })
    }
}

/// One dead letter, as read back.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Sequence in `FLEET_DLQ`.
    pub seq: u64,
    /// When it was dead-lettered.
    pub time: String,
    /// Priority class (from the DLQ subject).
    pub priority: String,
    /// Model (from the DLQ subject).
    pub model: String,
    /// Request id, from the body or the `Nats-Msg-Id` header.
    pub id: Option<String>,
    /// Tenant (header, body, or the default).
    pub tenant: String,
    /// Error code.
    pub code: String,
    /// Error message.
    pub message: String,
    /// Deliveries before it was given up.
    pub deliveries: String,
    /// Subject the request was published to.
    pub original_subject: Option<String>,
    /// Original headers plus the error headers.
    pub headers: HeaderMap,
    /// Original payload.
    pub payload: bytes::Bytes,
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.as_str().to_string())
}

impl Letter {
    /// The letter for people and the admin API: everything but the payload,
    /// which is summarised by its size.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq, "time": self.time, "priority": self.priority, "model": self.model,
            "id": self.id, "tenant": self.tenant, "code": self.code, "message": self.message,
            "deliveries": self.deliveries, "original_subject": self.original_subject,
            "payload_bytes": self.payload.len(),
        })
    }

    /// The letter whole for the admin API: its summary, headers and payload.
    pub fn detail(&self) -> serde_json::Value {
        let mut v = self.summary();
        v["headers"] = serde_json::json!(self.header_list());
        v["payload"] = match self.payload_value() {
            Ok(p) => p,
            Err(text) => serde_json::Value::String(text),
        };
        v
    }

    /// Every header as (name, value), sorted.
    pub fn header_list(&self) -> Vec<(String, String)> {
        let mut names: Vec<(String, String)> =
            self.headers.iter().flat_map(|(k, vs)| vs.iter().map(move |v| (k.to_string(), v.to_string()))).collect();
        names.sort();
        names
    }

    /// The payload decoded as its content type says, or (undecodable) as
    /// escaped text.
    pub fn payload_value(&self) -> Result<serde_json::Value, String> {
        let ct = self.header(headers::CONTENT_TYPE);
        codec::decode::<serde_json::Value>(ct.as_deref(), &self.payload)
            .map_err(|_| self.payload.escape_ascii().to_string())
    }

    /// The letter's header `name`, when it has one.
    pub fn header(&self, name: &str) -> Option<String> {
        header(&self.headers, name)
    }

    fn from_message(m: jetstream::message::StreamMessage) -> Letter {
        let h = &m.headers;
        let mut parts = m.subject.as_str().splitn(4, '.').skip(2);
        let priority = parts.next().unwrap_or("").to_string();
        let model = parts.next().unwrap_or("").to_string();
        let body = codec::decode::<InferRequest>(header(h, headers::CONTENT_TYPE).as_deref(), &m.payload).ok();
        let id = body.as_ref().map(|b| b.id.clone()).or_else(|| {
            let msg_id = header(h, headers::MSG_ID)?;
            Some(subjects::id_of_msg_id(&msg_id, header(h, headers::TENANT).as_deref()).unwrap_or(&msg_id).to_string())
        });
        let tenant = header(h, headers::TENANT)
            .or_else(|| body.as_ref().and_then(|b| b.tenant.clone()))
            .unwrap_or_else(|| subjects::DEFAULT_TENANT.to_string());
        Letter {
            seq: m.sequence,
            time: m.time.to_string(),
            priority,
            model,
            id,
            tenant,
            code: header(h, headers::ERROR_CODE).unwrap_or_default(),
            message: header(h, headers::ERROR_MESSAGE).unwrap_or_default(),
            deliveries: header(h, headers::DELIVERY_COUNT).unwrap_or_default(),
            original_subject: header(h, headers::ORIGINAL_SUBJECT),
            headers: m.headers,
            payload: m.payload,
        }
    }
}

/// The DLQ stream.
pub async fn open(js: &jetstream::Context) -> anyhow::Result<Stream> {
    js.get_stream(subjects::DLQ_STREAM)
        .await
        .with_context(|| format!("no {} stream (run `retro-fleet topology apply`)", subjects::DLQ_STREAM))
}

/// The letter at sequence `seq`.
pub async fn get(stream: &Stream, seq: u64) -> anyhow::Result<Letter> {
    let m = stream.direct_get(seq).await.with_context(|| format!("no dead letter with sequence {seq}"))?;
    Ok(Letter::from_message(m))
}

/// Every letter matching `filter`, oldest first, at most `limit`.
pub async fn read(stream: &Stream, filter: &Filter, limit: usize) -> anyhow::Result<Vec<Letter>> {
    let state = stream.get_info().await?.state;
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if out.len() >= limit {
            break;
        }
        match stream.direct_get(seq).await {
            Ok(m) => {
                let l = Letter::from_message(m);
                if filter.matches(&l) {
                    out.push(l);
                }
            }
            Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("reading dead letter {seq}")),
        }
    }
    Ok(out)
}

/// What replay did with one letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Outcome {
    /// Sequence of the letter in `FLEET_DLQ`.
    pub seq: u64,
    /// Its request id, when known.
    pub id: Option<String>,
    /// `replayed`, `would_replay` (dry run) or `skipped`.
    pub action: &'static str,
    /// Where it went, or why it was skipped.
    pub detail: String,
}

/// What replay did with the letters it looked at.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Replayed {
    /// Re-published (or, in a dry run, would be).
    pub replayed: usize,
    /// Skipped (see each outcome's detail).
    pub skipped: usize,
    /// One entry per letter, oldest first.
    pub letters: Vec<Outcome>,
}

impl Replayed {
    fn skip(&mut self, l: &Letter, why: impl Into<String>) {
        self.skipped += 1;
        self.letters.push(Outcome { seq: l.seq, id: l.id.clone(), action: "skipped", detail: why.into() });
    }
}

/// Replays the letters matching `filter` (at most `limit`); see the module
/// documentation. Shared by `retro-fleet dlq replay` and the admin API.
pub async fn replay(
    js: &jetstream::Context,
    filter: &Filter,
    limit: usize,
    keep: bool,
    dry_run: bool,
) -> anyhow::Result<Replayed> {
    let stream = open(js).await?;
    let results = js.get_stream(subjects::RESULTS_STREAM).await.context("no results stream")?;
    let letters = read(&stream, filter, limit).await?;
    let mut done = Replayed::default();
    for l in letters {
        let label = format!("dead letter {} ({})", l.seq, l.id.as_deref().unwrap_or("no id"));
        let Some(subject) = l.original_subject.clone().filter(|s| subjects::parse_request(s).is_some()) else {
            done.skip(&l, "no original request subject");
            continue;
        };
        if subjects::parse_request(&subject).map(|(p, _, _)| p) != l.priority.parse::<Priority>().ok() {
            done.skip(&l, format!("original subject {subject} does not match its class"));
            continue;
        }
        // the stored result of this id: an error is removed so the replay's result can be stored
        if let Some(id) = l.id.as_deref().filter(|id| subjects::is_token(id) && subjects::is_token(&l.tenant)) {
            if let Ok(Some(m)) = stored_message(js, &l.tenant, id).await {
                let stored: Option<InferResult> = codec::decode(None, &m.payload).ok();
                if stored.as_ref().is_some_and(|r| r.status == Status::Ok) {
                    done.skip(&l, "a successful result is already stored");
                    continue;
                }
                if !dry_run {
                    results
                        .purge()
                        .filter(subjects::result(&l.tenant, id))
                        .await
                        .with_context(|| format!("removing the error result of {id}"))?;
                }
            }
        }
        let msg_id =
            format!("{}-replay-{}", l.id.as_deref().filter(|i| subjects::is_token(i)).unwrap_or("letter"), l.seq);
        let h = replay_headers(&l.headers, &msg_id);
        let action = if dry_run {
            "would_replay"
        } else {
            js.publish_with_headers(subject.clone(), h, l.payload.clone())
                .await?
                .await
                .with_context(|| format!("re-publishing {label} to {subject}"))?;
            if !keep {
                stream.delete_message(l.seq).await.with_context(|| format!("deleting {label} after its replay"))?;
            }
            "replayed"
        };
        done.replayed += 1;
        done.letters.push(Outcome { seq: l.seq, id: l.id.clone(), action, detail: subject });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_reject_unknown_keys() {
        let f = Filter::parse(&["model=echo".into(), "code = decode_error".into()]).unwrap();
        assert_eq!(f.pairs.len(), 2);
        assert!(Filter::parse(&["colour=red".into()]).unwrap_err().to_string().contains("colour"));
        assert!(Filter::parse(&["model".into()]).unwrap_err().to_string().contains("key=value"));
    }
}
