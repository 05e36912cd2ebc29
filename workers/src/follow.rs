//! Following a KV bucket: its current entries, then every change, for as
//! long as the task runs. The one loop behind the buckets workers and
//! ingresses keep in memory (cache generations, tenants' settings).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

/// Calls `on` with every entry of `bucket` and then every change, until the
/// task is dropped or `on` returns false. Without the bucket (topology not
/// applied) it says once what that means (`missing`) and looks again every
/// few seconds; a watch that fails or ends is started again.
pub async fn bucket(js: &jetstream::Context, bucket: &str, missing: &str, mut on: impl FnMut(kv::Entry) -> bool) {
    let mut warned = false;
    let store = loop {
        match js.get_key_value(bucket).await {
            Ok(s) => break s,
            Err(e) => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(bucket, error = %e, "no KV bucket {bucket}: {missing} (run `retro-fleet topology apply`)");
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    loop {
        match store.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(e) => {
                            if !on(e) {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(bucket, error = %e, "KV watch error"),
                    }
                }
            }
            Err(e) => tracing::warn!(bucket, error = %e, "watching the bucket failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
