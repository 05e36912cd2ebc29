//! Replies for synchronous callers: one wildcard inbox subscription per
//! ingress process, demultiplexed by request id.
//!
//! Reply subjects are `<inbox>.<tenant>.<id>`: ids are per tenant, so two
//! tenants using one id never see each other's replies.
//!
//! A caller registers its request id before publishing and gets a receiver
//! of chunks and the final result; the registration is removed when the
//! [`Waiter`] is dropped (result received, timeout or caller gone), and late
//! or duplicate replies for ids nobody waits on are dropped and counted.
//! Several callers may wait on one id (a retry with the same request id
//! while the first call still waits): each gets every reply.
//! A waiter dropped before its result arrived (the HTTP caller disconnected
//! or timed out) publishes a cancel on `fleet.ctl.cancel.<tenant>.<id>`, so the
//! worker stops generating and stores the result `cancelled`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use retro_fleet_schemas::{codec, headers, subjects, InferResult, Splice, StreamChunk};
use tokio::sync::mpsc;

/// A message on a request's reply subject.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A streamed delta.
    Chunk(StreamChunk),
    /// The final result, and the worker's cache key and expiry when it is a
    /// cacheable answer.
    Result(Box<InferResult>, Option<Cacheable>),
}

/// The text one caller has been streamed, and what each chunk adds to it.
/// Every streaming path (native and OpenAI SSE) reads chunks through this,
/// so a caller never sees text twice, nor two generations spliced, when a
/// worker dies and another takes the request over.
#[derive(Debug, Default)]
pub struct Streamed {
    /// The text forwarded so far.
    pub text: String,
    /// Chunks forwarded so far.
    seq: u64,
    done: bool,
}

/// What to do with a chunk.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Forward this chunk (renumbered; only its new text).
    Forward(StreamChunk),
    /// Nothing new in it.
    Skip,
    /// It continues another generation than the one streamed: the stream
    /// cannot go on (the stored result is the one to read).
    Diverged,
}

impl Streamed {
    /// Reads chunk `c`.
    pub fn read(&mut self, c: StreamChunk) -> Next {
        let delta = match c.extend(&self.text) {
            Ok(new) => new.to_string(),
            // a chunk lost on the way: the result carries the whole text
            Err(Splice::Gap) => return Next::Skip,
            Err(Splice::Diverged) => return Next::Diverged,
        };
        // the first chunk goes out even when empty: it opens the stream
        if (delta.is_empty() && self.seq > 0 && !c.done) || self.done {
            return Next::Skip;
        }
        let chunk = StreamChunk { seq: self.seq, offset: self.text.len() as u64, delta, ..c };
        self.seq += 1;
        self.done = chunk.done;
        self.text.push_str(&chunk.delta);
        Next::Forward(chunk)
    }
}

/// A cacheable answer's `Fleet-Cache-Key` and `Fleet-Cache-Expires`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cacheable {
    /// The worker's exact cache key.
    pub key: u128,
    /// Unix ms after which it must not be served.
    pub expires_ms: u64,
}

impl Cacheable {
    fn from_headers(h: &async_nats::HeaderMap) -> Option<Cacheable> {
        let key = u128::from_str_radix(h.get(headers::CACHE_KEY)?.as_str(), 16).ok()?;
        let expires_ms = h.get(headers::CACHE_EXPIRES)?.as_str().parse().ok()?;
        Some(Cacheable { key, expires_ms })
    }
}

type Sender = mpsc::UnboundedSender<Reply>;
type Table = Arc<Mutex<HashMap<String, Vec<(u64, Sender)>>>>;

/// The inbox of this ingress process.
#[derive(Clone)]
pub struct Replies {
    prefix: String,
    table: Table,
    client: async_nats::Client,
    next_key: Arc<std::sync::atomic::AtomicU64>,
    /// Set on shutdown: callers cut short are not callers gone.
    keep_requests: Arc<std::sync::atomic::AtomicBool>,
}

impl Replies {
    /// Subscribes to `<inbox>.*` and starts demultiplexing; after each
    /// reconnection, looks for the results of the calls still waiting in
    /// `FLEET_RESULTS` over `js` ([`recover_lost_replies`]).
    pub async fn start(
        client: &async_nats::Client,
        js: &async_nats::jetstream::Context,
        unclaimed: prometheus::IntCounter,
    ) -> anyhow::Result<Replies> {
        let prefix = client.new_inbox();
        let mut sub = client.subscribe(format!("{prefix}.*.*")).await?;
        let table: Table = Default::default();
        let replies = Replies {
            prefix,
            table: table.clone(),
            client: client.clone(),
            next_key: Default::default(),
            keep_requests: Default::default(),
        };
        tokio::spawn(recover_lost_replies(client.clone(), js.clone(), Arc::downgrade(&table)));
        // the table key `<tenant>.<id>` is the subject's tail
        let tail_at = replies.prefix.len() + 1;
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(key) = msg.subject.get(tail_at..) else { continue };
                let hdrs = msg.headers.as_ref();
                let ct = hdrs.and_then(|h| h.get(headers::CONTENT_TYPE)).map(|v| v.as_str());
                let is_chunk =
                    hdrs.and_then(|h| h.get(headers::KIND)).is_some_and(|k| k.as_str() == headers::KIND_CHUNK);
                let reply = if is_chunk {
                    codec::decode::<StreamChunk>(ct, &msg.payload).map(Reply::Chunk)
                } else {
                    let cacheable = hdrs.and_then(Cacheable::from_headers);
                    codec::decode::<InferResult>(ct, &msg.payload).map(|r| Reply::Result(Box::new(r), cacheable))
                };
                let reply = match reply {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, subject = %msg.subject, "undecodable reply dropped");
                        continue;
                    }
                };
                // most replies have one waiter: it gets the reply itself
                let (first, more): (Option<Sender>, Vec<Sender>) =
                    match table.lock().expect("reply table lock").get(key) {
                        Some(v) => {
                            (v.first().map(|(_, tx)| tx.clone()), v.iter().skip(1).map(|(_, tx)| tx.clone()).collect())
                        }
                        None => (None, Vec::new()),
                    };
                let mut delivered = false;
                for tx in more {
                    delivered |= tx.send(reply.clone()).is_ok();
                }
                if let Some(tx) = first {
                    delivered |= tx.send(reply).is_ok();
                }
                if !delivered {
                    unclaimed.inc();
                }
            }
        });
        Ok(replies)
    }

    /// From now on a waiter dropped before its result does not cancel its
    /// request (the ingress is shutting down: the caller may retry).
    pub fn stop_cancelling(&self) {
        self.keep_requests.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Registers request `id` of `tenant`; returns its reply subject and a waiter.
    pub fn register(&self, tenant: &str, id: &str) -> (String, Waiter) {
        let key = format!("{tenant}.{id}");
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = self.next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.table.lock().expect("reply table lock").entry(key.clone()).or_default().push((slot, tx.clone()));
        let reply = format!("{}.{key}", self.prefix);
        let waiter = Waiter {
            id: key,
            id_at: tenant.len() + 1,
            key: slot,
            tx,
            rx,
            table: self.table.clone(),
            client: self.client.clone(),
            armed: true,
            keep_requests: self.keep_requests.clone(),
        };
        (reply, waiter)
    }
}

/// Replies are core NATS, at most once: one published while this
/// process's connection is moving to another server (a node restarted or
/// lost) is gone. A worker stores each result before it replies, so after
/// every reconnection each call still waiting looks its result up in
/// `FLEET_RESULTS`: at once, and again a moment later (until the server's
/// interest in this inbox has reached the others, a reply can still miss).
async fn recover_lost_replies(
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    table: std::sync::Weak<Mutex<HashMap<String, Vec<(u64, Sender)>>>>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = client.statistics();
    let mut seen = stats.connects.load(Relaxed);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut recheck_at: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(table) = table.upgrade() else { return };
        let now = stats.connects.load(Relaxed);
        let recheck = recheck_at.is_some_and(|at| tokio::time::Instant::now() >= at);
        if now == seen && !recheck {
            continue;
        }
        recheck_at = (now != seen).then(|| tokio::time::Instant::now() + std::time::Duration::from_secs(2));
        seen = now;
        let waiting: Vec<(String, Vec<mpsc::UnboundedSender<Reply>>)> = {
            let t = table.lock().expect("reply table lock");
            t.iter().map(|(k, v)| (k.clone(), v.iter().map(|(_, tx)| tx.clone()).collect())).collect()
        };
        drop(table);
        tracing::debug!(calls = waiting.len(), "reconnected to NATS: looking up results of waiting calls");
        for (key, txs) in waiting {
            let Some((tenant, id)) = key.split_once('.') else { continue };
            if let Ok(Some(r)) = retro_fleet_schemas::stored::stored_result(&js, tenant, id).await {
                for tx in txs {
                    let _ = tx.send(Reply::Result(Box::new(r.clone()), None));
                }
            }
        }
    }
}

/// Receives the replies of one request; unregisters on drop.
pub struct Waiter {
    /// `<tenant>.<id>`: the table key.
    id: String,
    /// Where `<id>` starts in `id`.
    id_at: usize,
    key: u64,
    tx: mpsc::UnboundedSender<Reply>,
    rx: mpsc::UnboundedReceiver<Reply>,
    table: Table,
    client: async_nats::Client,
    /// Cancel the request when dropped before its result.
    armed: bool,
    /// Never cancel (the ingress is shutting down).
    keep_requests: Arc<std::sync::atomic::AtomicBool>,
}

impl Waiter {
    /// The next chunk or the result.
    pub async fn next(&mut self) -> Option<Reply> {
        let r = self.rx.recv().await;
        if matches!(r, Some(Reply::Result(..))) {
            self.armed = false;
        }
        r
    }

    /// Waits for the final result, skipping chunks.
    pub async fn result(&mut self) -> Option<InferResult> {
        self.result_and_cacheable().await.map(|(r, _)| r)
    }

    /// The final result and whether it is a cacheable answer, skipping chunks.
    pub async fn result_and_cacheable(&mut self) -> Option<(InferResult, Option<Cacheable>)> {
        while let Some(r) = self.rx.recv().await {
            if let Reply::Result(r, cacheable) = r {
                self.armed = false;
                return Some((*r, cacheable));
            }
        }
        None
    }

    /// Whether a reply (a chunk or the result) is waiting to be read.
    pub fn pending(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Never cancel: the request was not queued, or belongs to someone else now.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// A handle that feeds this waiter as a reply would (a result read back
    /// from `FLEET_RESULTS`). Sending fails once the waiter is gone.
    pub fn feeder(&self) -> mpsc::UnboundedSender<Reply> {
        self.tx.clone()
    }
}

/// The replies of several waiters (a request's choices) as they come, each
/// with its waiter's index; a waiter's replies end with its result.
pub fn merge(waiters: Vec<Waiter>) -> impl futures::Stream<Item = (usize, Reply)> + Send + Unpin {
    futures::stream::select_all(waiters.into_iter().enumerate().map(|(i, w)| {
        Box::pin(futures::stream::unfold(Some(w), move |w| async move {
            let mut w = w?;
            let reply = w.next().await?;
            let more = !matches!(reply, Reply::Result(..));
            Some(((i, reply), more.then_some(w)))
        }))
    }))
}

impl Drop for Waiter {
    fn drop(&mut self) {
        {
            let mut table = self.table.lock().expect("reply table lock");
            if let Some(v) = table.get_mut(&self.id) {
                v.retain(|(k, _)| *k != self.key);
                if v.is_empty() {
                    table.remove(&self.id);
                }
            }
        }
        if self.armed && !self.keep_requests.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (tenant, id) = (&self.id[..self.id_at - 1], &self.id[self.id_at..]);
                let (client, subject) = (self.client.clone(), subjects::cancel(tenant, id));
                tracing::debug!(id = %self.id, "caller gone before its result; cancelling");
                rt.spawn(async move {
                    if let Err(e) = client.publish(subject, bytes::Bytes::new()).await {
                        tracing::warn!(error = %e, "publishing a cancel failed");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, offset: u64, delta: &str, done: bool) -> StreamChunk {
        StreamChunk { v: 1, id: "r".into(), seq, offset, delta: delta.into(), done }
    }

    #[test]
    fn a_takeover_repeating_the_start_shows_each_byte_once() {
        let mut s = Streamed::default();
        let mut out = Vec::new();
        // the first worker streams "Hello wo" and dies; the second starts
        // again at offset 0 with what was checkpointed, then goes on
        for c in [
            chunk(0, 0, "Hello", false),
            chunk(1, 5, " wo", false),
            chunk(0, 0, "Hello w", false),
            chunk(1, 7, "orld", false),
            chunk(2, 11, "", true),
        ] {
            if let Next::Forward(c) = s.read(c) {
                out.push((c.seq, c.offset, c.delta, c.done));
            }
        }
        let want = [(0, 0, "Hello", false), (1, 5, " wo", false), (2, 8, "rld", false), (3, 11, "", true)];
        assert_eq!(out, want.map(|(a, b, c, d)| (a, b, c.to_string(), d)));
        assert_eq!(s.text, "Hello world");
        assert_eq!(s.read(chunk(0, 0, "Help", false)), Next::Diverged);
    }
}
