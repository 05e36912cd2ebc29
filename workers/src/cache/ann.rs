//! An approximate nearest-neighbour graph (HNSW, from the `hnsw_rs` crate)
//! over one semantic bucket's prompts, used once the bucket is too large to
//! scan ([`ANN_FROM`]).

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use crate::embed::similarity;

/// Prompts in a bucket from which it is searched through a graph rather
/// than scanned: below it a scan is as fast (measured with
/// `semantic-eval --index-sizes`, docs/CACHE.md).
pub const ANN_FROM: usize = 4096;

/// Neighbours per node and layer.
const CONNECTIONS: usize = 16;
/// Candidates explored while inserting.
const EF_CONSTRUCTION: usize = 64;
/// Candidates explored while searching, at least: one per 512 prompts
/// beyond that, so large graphs keep finding the nearest (measured).
const EF_SEARCH: usize = 64;
/// Layers at most.
const LAYERS: usize = 16;

/// `1 − similarity` of unit vectors (rounding kept within 0..2; a vector
/// that is not a number is as far as can be, never NaN: the graph panics on NaN).
#[derive(Default, Clone, Copy)]
struct Dot;

impl Distance<f32> for Dot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        let d = 1.0 - similarity(a, b) as f32;
        if d.is_nan() {
            2.0
        } else {
            d.clamp(0.0, 2.0)
        }
    }
}

/// A graph over vectors, each under a slot number.
pub struct Ann(Hnsw<'static, f32, Dot>);

impl Ann {
    /// An empty graph expecting about `capacity` vectors.
    pub fn new(capacity: usize) -> Ann {
        Ann(Hnsw::new(CONNECTIONS, capacity.max(ANN_FROM), LAYERS, EF_CONSTRUCTION, Dot))
    }

    /// Adds `vector` under `slot`.
    pub fn insert(&self, vector: &[f32], slot: usize) {
        self.0.insert_slice((vector, slot));
    }

    /// The slots of up to `k` nearest vectors to `vector` that `keep` accepts.
    pub fn search(&self, vector: &[f32], k: usize, keep: &dyn Fn(usize) -> bool) -> Vec<usize> {
        let filter = |id: &usize| keep(*id);
        let ef = EF_SEARCH.max(self.0.get_nb_point() / 512).max(k);
        self.0.search_filter(vector, k, ef, Some(&filter)).into_iter().map(|n| n.d_id).collect()
    }
}
