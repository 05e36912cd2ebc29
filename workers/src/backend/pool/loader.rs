//! How a pool loads its instances, and on which runtime.

use std::sync::{Arc, OnceLock};

use futures::future::BoxFuture;
use retro_fleet_schemas::ErrorCode;

use crate::backend::{Backend, BackendError};

/// Loads one instance.
pub type Loader = Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Backend>, BackendError>> + Send + Sync>;

/// Where a pool runs the loading of its instances.
#[derive(Clone, Debug, Default)]
pub enum LoadOn {
    /// In the task that needs the instance, on the caller's runtime.
    #[default]
    Caller,
    /// On a runtime of its own, for a process whose runtime has one thread
    /// (`retro-fleet worker`), where reading and converting weights
    /// (seconds to minutes) would otherwise hold up its messages,
    /// heartbeats and in-progress acks.
    Loader(Arc<LoaderRuntime>),
}

impl LoadOn {
    /// [`LoadOn::Loader`] when the current runtime runs everything on one
    /// thread, else [`LoadOn::Caller`].
    pub fn for_current_runtime() -> LoadOn {
        match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => LoadOn::Loader(Arc::default()),
            _ => LoadOn::Caller,
        }
    }

    /// Runs a model load here.
    pub(super) async fn run(
        &self,
        load: BoxFuture<'static, Result<Arc<dyn Backend>, BackendError>>,
    ) -> Result<Arc<dyn Backend>, BackendError> {
        let LoadOn::Loader(loader) = self else { return load.await };
        loader.runtime().spawn(load).await.unwrap_or_else(|e| {
            Err(BackendError {
                code: ErrorCode::Internal,
                message: format!("loading the model failed: {e}"),
                retryable: true,
            })
        })
    }
}

/// The "model-loader" runtime (one thread), started at the first load.
#[derive(Default)]
pub struct LoaderRuntime(OnceLock<tokio::runtime::Runtime>);

impl LoaderRuntime {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.0.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("model-loader")
                .enable_all()
                .build()
                .expect("the model loader runtime")
        })
    }
}

impl std::fmt::Debug for LoaderRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoaderRuntime")
    }
}

impl Drop for LoaderRuntime {
    /// Dropped with the last pool, maybe inside another runtime, where a
    /// runtime must not block to shut down.
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
