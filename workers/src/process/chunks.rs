//! Streamed text to a reply subject as [`StreamChunk`]s, paced.
//!
//! A message per token would cost about as much CPU as a small model's
//! token, so pieces generated close together travel in one chunk. The
//! pacing adapts to load: the worker's streams together send about
//! `stream_chunks_per_sec` chunks a second, so each stream's interval is its
//! share of that, at most `stream_interval_ms`. A lone stream thus sends
//! text as it comes (a chat UI sees it flow), while 64 streams send one
//! chunk each per 20 ms, as before. Text goes out at once until visible
//! text has (whitespace is not text to a reader).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use retro_fleet_schemas::{codec, headers, StreamChunk};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// How often a worker's streams may send chunks.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Longest interval between two chunks of one stream.
    max: Duration,
    /// Chunks a second the worker's streams send together, at most (0: each
    /// stream waits `max`).
    budget: u32,
    /// Streams running now.
    streams: Arc<AtomicUsize>,
}

impl Pace {
    /// At most one chunk per `max` per stream; the worker's streams share
    /// `chunks_per_sec`.
    pub fn new(max: Duration, chunks_per_sec: u32) -> Pace {
        Pace { max, budget: chunks_per_sec, streams: Default::default() }
    }

    /// Sends every piece at once (for an answer that is already whole).
    pub fn at_once() -> Pace {
        Pace::new(Duration::ZERO, 0)
    }

    /// The interval of each stream now.
    fn interval(&self) -> Duration {
        if self.budget == 0 {
            return self.max;
        }
        let share = Duration::from_secs_f64(self.streams.load(Ordering::Relaxed) as f64 / self.budget as f64);
        share.min(self.max)
    }
}

/// One stream counted in its pace while it runs.
struct Running<'a>(&'a Pace);

impl<'a> Running<'a> {
    fn start(pace: &'a Pace) -> Self {
        pace.streams.fetch_add(1, Ordering::Relaxed);
        Running(pace)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Publishes the pieces of text from `rx` to `reply` as chunks of request
/// `id`, paced by `pace`, then the `done` chunk once `rx` ends.
pub async fn forward(
    client: async_nats::Client,
    reply: String,
    id: String,
    pace: Pace,
    mut rx: UnboundedReceiver<String>,
) {
    let _running = Running::start(&pace);
    let (mut seq, mut offset) = (0, 0);
    let mut h = HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    h.insert(headers::KIND, headers::KIND_CHUNK);
    if let Some(t) = crate::trace::current_traceparent() {
        h.insert(headers::TRACEPARENT, t.as_str());
    }
    let mut send = |delta: String, done: bool| {
        let at = offset;
        offset += delta.len() as u64;
        let chunk =
            StreamChunk { v: retro_fleet_schemas::SCHEMA_VERSION, id: id.clone(), seq, offset: at, delta, done };
        seq += 1;
        let client = client.clone();
        let (reply, h) = (reply.clone(), h.clone());
        async move { client.publish_with_headers(reply, h, Bytes::from(codec::encode(&chunk))).await }
    };
    let mut pending = String::new();
    // the earliest time the next chunk may go: none until visible text went out
    let mut due: Option<Instant> = None;
    loop {
        // While a chunk waits for its time, the forwarder sleeps: pieces
        // queue without waking it (a wake-up per token costs more than
        // the chunks save).
        match due.filter(|_| !pending.is_empty()) {
            Some(at) => tokio::time::sleep_until(at).await,
            None => match rx.recv().await {
                Some(piece) => pending.push_str(&piece),
                None => break,
            },
        }
        let ended = loop {
            match rx.try_recv() {
                Ok(piece) => pending.push_str(&piece),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if ended {
            break;
        }
        let now = Instant::now();
        if pending.is_empty() || due.is_some_and(|at| now < at) {
            continue;
        }
        let visible = due.is_some() || pending.chars().any(|c| !c.is_whitespace());
        if send(std::mem::take(&mut pending), false).await.is_err() {
            return;
        }
        if visible {
            due = Some(now + pace.interval());
        }
    }
    if !pending.is_empty() && send(pending, false).await.is_err() {
        return;
    }
    let _ = send(String::new(), true).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// Forwards `pieces` (each followed by its pause) with `pace` and
    /// returns the chunks published, as (seq, offset, delta, done).
    async fn chunks_of(pieces: &[(&str, u64)], pace: Pace) -> Vec<(u64, u64, String, bool)> {
        let nats = retro_fleet_testkit::NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let mut sub = client.subscribe("reply.chunks").await.unwrap();
        client.flush().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let fwd = tokio::spawn(forward(client.clone(), "reply.chunks".into(), "r1".into(), pace, rx));
        for (piece, pause_ms) in pieces {
            tx.send(piece.to_string()).unwrap();
            tokio::time::sleep(Duration::from_millis(*pause_ms)).await;
        }
        drop(tx);
        fwd.await.unwrap();
        client.flush().await.unwrap();
        let mut chunks = Vec::new();
        while chunks.last().is_none_or(|c: &(u64, u64, String, bool)| !c.3) {
            let m = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
            let c: StreamChunk = codec::decode(Some(codec::ContentType::MSGPACK_MIME), &m.payload).unwrap();
            chunks.push((c.seq, c.offset, c.delta, c.done));
        }
        chunks
    }

    fn owned(v: Vec<(u64, u64, &str, bool)>) -> Vec<(u64, u64, String, bool)> {
        v.into_iter().map(|(s, o, d, done)| (s, o, d.to_string(), done)).collect()
    }

    #[tokio::test]
    async fn pieces_generated_within_the_interval_travel_in_one_chunk() {
        // one stream, a budget that gives it the whole 200 ms
        let got = chunks_of(&[("a", 20), ("b", 0), ("c", 0)], Pace::new(Duration::from_millis(200), 1)).await;
        // the first piece at once, the rest together, then `done`
        assert_eq!(got, owned(vec![(0, 0, "a", false), (1, 1, "bc", false), (2, 3, "", true)]));
    }

    #[tokio::test]
    async fn whitespace_goes_at_once_and_does_not_start_the_interval() {
        let got = chunks_of(&[(" ", 5), ("\n", 5), ("a", 5), ("b", 5)], Pace::new(Duration::from_millis(200), 1)).await;
        assert_eq!(
            got,
            owned(vec![
                (0, 0, " ", false),
                (1, 1, "\n", false),
                (2, 2, "a", false),
                (3, 3, "b", false),
                (4, 4, "", true)
            ])
        );
    }

    #[tokio::test]
    async fn a_lone_stream_sends_pieces_as_they_come() {
        // a budget of 1,000 chunks a second leaves one stream 1 ms
        let pieces = [("a", 10), ("b", 10), ("c", 10), ("d", 10)];
        let got = chunks_of(&pieces, Pace::new(Duration::from_millis(200), 1_000)).await;
        let deltas: Vec<&str> = got.iter().map(|c| c.2.as_str()).collect();
        assert_eq!(deltas, ["a", "b", "c", "d", ""]);
    }

    #[test]
    fn each_stream_gets_its_share_of_the_budget_up_to_the_longest_interval() {
        let pace = Pace::new(Duration::from_millis(20), 1_000);
        let held: Vec<Running> = (0..16).map(|_| Running::start(&pace)).collect();
        assert_eq!(pace.interval(), Duration::from_millis(16));
        let more: Vec<Running> = (0..48).map(|_| Running::start(&pace)).collect();
        assert_eq!(pace.interval(), Duration::from_millis(20));
        drop((held, more));
        assert_eq!(pace.interval(), Duration::ZERO);
        assert_eq!(Pace::new(Duration::from_millis(20), 0).interval(), Duration::from_millis(20));
    }
}
