//! The BERT sentence embedder against an independent reference: the
//! vectors of a few golden sentences, computed from the same weights by
//! `scripts/minilm-reference.py` (a numpy forward pass), and committed.

#![cfg(feature = "mistralrs")]

use retro_fleet_testkit::{minilm_dir, package_dir};
use retro_fleet_worker::embed::{self, similarity, BertConfig, EmbedderConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    embedding: Vec<f32>,
}

fn golden() -> Golden {
    let path = package_dir().join("tests/golden/minilm.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn minilm_matches_the_reference_alone_and_in_a_batch() {
    let e = embed::load(&EmbedderConfig::Bert(BertConfig { path: minilm_dir() })).unwrap();
    assert_eq!(e.dim(), 384);
    let golden = golden();
    assert!(golden.sentences.len() >= 5);
    let texts: Vec<&str> = golden.sentences.iter().map(|s| s.text.as_str()).collect();
    // a batch pads every text to the longest: the padding must not change a vector
    let batch = e.embed(&texts).unwrap().vectors;
    for (s, batched) in golden.sentences.iter().zip(&batch) {
        let alone = e.embed(&[&s.text]).unwrap().vectors.remove(0);
        let (a, b) = (similarity(&alone, &s.embedding), similarity(batched, &s.embedding));
        println!("{:>7.5} alone {:>7.5} batched  {:?}", a, b, s.text);
        assert!(a >= 0.999 && b >= 0.999, "{:?}: cosine {a} alone, {b} in a batch", s.text);
        let norm = alone.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit length, not {norm}");
    }
}

#[test]
fn a_directory_without_a_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = embed::load(&EmbedderConfig::Bert(BertConfig { path: dir.path().into() })).err().unwrap();
    let msg = err.to_string();
    assert!(msg.contains("config.json") && msg.contains("semantic_embedder"), "{msg}");
}
