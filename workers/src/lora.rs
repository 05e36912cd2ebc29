//! LoRA adapters (PEFT format): merged into a copy of the base weights.
//!
//! mistral.rs 0.8.1 merges LoRA weights into the base at load time anyway
//! (`W += alpha/r · B·A`, no per-request switching), but resolves adapter
//! ids only through the Hugging Face hub cache. Merging here instead keeps
//! adapters plain local directories, works offline, and gives each adapter
//! its own model instance: a request naming an adapter runs on it.
//!
//! An adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
//! `target_modules` as a list; `use_rslora` honoured) and
//! `adapter_model.safetensors` with `<prefix>.lora_A.weight` `[r, in]` and
//! `<prefix>.lora_B.weight` `[out, r]` (prefix with or without PEFT's
//! `base_model.model.`). Base weights may be F32, F16 or BF16.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

#[derive(Debug, Deserialize)]
struct AdapterConfig {
    r: usize,
    lora_alpha: f64,
    target_modules: Vec<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
}

/// One adapted layer: `scale · B·A` to add to its weight.
struct Delta {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    rows: usize,
    cols: usize,
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> std::io::Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        other => return Err(bad(format!("weights of type {other:?} cannot take a LoRA adapter (F32, F16, BF16 can)"))),
    })
}

fn from_f32(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// A tensor read from safetensors: its shape and its values as f32.
type Tensor = (Vec<usize>, Vec<f32>);

fn read_adapter(dir: &Path) -> std::io::Result<(AdapterConfig, BTreeMap<String, Delta>)> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg: AdapterConfig = serde_json::from_slice(&std::fs::read(&cfg_path)?)
        .map_err(|e| bad(format!("{}: {e} (target_modules must be a list)", cfg_path.display())))?;
    if cfg.use_dora || cfg.fan_in_fan_out {
        return Err(bad(format!("{}: DoRA and fan_in_fan_out adapters are not supported", cfg_path.display())));
    }
    if cfg.r == 0 {
        return Err(bad(format!("{}: r must be at least 1", cfg_path.display())));
    }
    let bytes = std::fs::read(dir.join("adapter_model.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("adapter_model.safetensors: {e}")))?;
    let mut halves: BTreeMap<String, [Option<Tensor>; 2]> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let name = name.strip_prefix("base_model.model.").unwrap_or(&name).to_string();
        let (prefix, which) = if let Some(p) = name.strip_suffix(".lora_A.weight") {
            (p, 0)
        } else if let Some(p) = name.strip_suffix(".lora_B.weight") {
            (p, 1)
        } else {
            continue;
        };
        halves.entry(prefix.to_string()).or_default()[which] =
            Some((view.shape().to_vec(), to_f32(view.dtype(), view.data())?));
    }
    let mut deltas = BTreeMap::new();
    for (prefix, [a, b]) in halves {
        let (Some((sa, a)), Some((sb, b))) = (a, b) else {
            return Err(bad(format!("adapter layer {prefix} needs both lora_A and lora_B")));
        };
        if sa.len() != 2 || sb.len() != 2 || sa[0] != cfg.r || sb[1] != cfg.r {
            return Err(bad(format!("adapter layer {prefix}: shapes A {sa:?} B {sb:?} do not fit r = {}", cfg.r)));
        }
        if !cfg.target_modules.iter().any(|m| prefix.ends_with(&format!(".{m}")) || prefix == *m) {
            return Err(bad(format!("adapter layer {prefix} is not in target_modules {:?}", cfg.target_modules)));
        }
        deltas.insert(prefix, Delta { a, b, r: cfg.r, rows: sb[0], cols: sa[1] });
    }
    if deltas.is_empty() {
        return Err(bad(format!("{}: no lora_A/lora_B tensors", dir.display())));
    }
    Ok((cfg, deltas))
}

/// `w += scale · B·A` (row-major `[rows, cols]`).
fn apply(w: &mut [f32], d: &Delta, scale: f32) {
    for o in 0..d.rows {
        let row = &mut w[o * d.cols..(o + 1) * d.cols];
        for k in 0..d.r {
            let bk = d.b[o * d.r + k] * scale;
            if bk == 0.0 {
                continue;
            }
            let a_row = &d.a[k * d.cols..(k + 1) * d.cols];
            for (x, a) in row.iter_mut().zip(a_row) {
                *x += bk * a;
            }
        }
    }
}

/// Writes `base` with `adapter` merged into `out` (weights merged, every
/// other file copied). Every adapter layer must meet a base weight of its
/// shape, or nothing is written.
pub fn merge(base: &Path, adapter: &Path, out: &Path) -> std::io::Result<()> {
    let (cfg, deltas) = read_adapter(adapter)?;
    let scale = if cfg.use_rslora { cfg.lora_alpha / (cfg.r as f64).sqrt() } else { cfg.lora_alpha / cfg.r as f64 };
    let tmp = out.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut applied = 0usize;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(base)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries.into_iter().filter(|p| p.is_file()) {
        let name = path.file_name().expect("a file has a name");
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            std::fs::copy(&path, tmp.join(name))?;
            continue;
        }
        let file = std::fs::File::open(&path)?;
        // SAFETY: the base model files are not modified while the merge reads them.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let mut merged: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (tname, view) in st.tensors() {
            let Some(d) = tname.strip_suffix(".weight").and_then(|p| deltas.get(p)) else { continue };
            if view.shape() != [d.rows, d.cols] {
                return Err(bad(format!("{tname}: base shape {:?}, adapter [{}, {}]", view.shape(), d.rows, d.cols)));
            }
            let mut w = to_f32(view.dtype(), view.data())?;
            apply(&mut w, d, scale as f32);
            merged.insert(tname.clone(), from_f32(view.dtype(), &w));
            applied += 1;
        }
        let views = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let data = merged.get(&n).map(Vec::as_slice).unwrap_or(v.data());
                safetensors::tensor::TensorView::new(v.dtype(), v.shape().to_vec(), data).map(|t| (n, t))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        safetensors::serialize_to_file(views, None, &tmp.join(name)).map_err(|e| bad(e.to_string()))?;
    }
    if applied != deltas.len() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(bad(format!(
            "only {applied} of the adapter's {} layers matched weights of {}",
            deltas.len(),
            base.display()
        )));
    }
    if out.exists() {
        // another process merged the same adapter meanwhile
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }
    std::fs::rename(&tmp, out)
}

/// Writes a small random PEFT adapter for the tiny model (tests and demos):
/// rank `r` on every layer's `q_proj` and `v_proj`, weights from `seed`.
pub fn write_tiny_adapter(dir: &Path, t: &crate::tiny_model::Tiny, r: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = serde_json::json!({"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
        "peft_type": "LORA", "base_model_name_or_path": "tiny"});
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * 0.5).to_le_bytes()
            })
            .collect()
    };
    let hd = t.hidden / t.heads;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..t.layers {
        for (m, out) in [("q_proj", t.heads * hd), ("v_proj", t.kv_heads * hd)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{m}");
            tensors.push((format!("{p}.lora_A.weight"), vec![r, t.hidden], rnd(r * t.hidden)));
            tensors.push((format!("{p}.lora_B.weight"), vec![out, r], rnd(out * r)));
        }
    }
    let views = tensors
        .iter()
        .map(|(n, s, b)| safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>, Dtype)]) {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> =
            tensors.iter().map(|(n, s, v, d)| (n.to_string(), s.clone(), from_f32(*d, v), *d)).collect();
        let views: Vec<_> = bytes
            .iter()
            .map(|(n, s, b, d)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn merge_adds_scaled_b_times_a_and_copies_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter, out) = (dir.path().join("base"), dir.path().join("lora"), dir.path().join("out"));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&adapter).unwrap();
        std::fs::write(base.join("config.json"), "{}").unwrap();
        // W [2, 3] of ones (bf16), another tensor untouched
        write_st(
            &base.join("model.safetensors"),
            &[
                ("m.q_proj.weight", vec![2, 3], vec![1.0; 6], Dtype::BF16),
                ("m.norm.weight", vec![3], vec![0.5; 3], Dtype::F32),
            ],
        );
        std::fs::write(
            adapter.join("adapter_config.json"),
            r#"{"r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}"#,
        )
        .unwrap();
        // A [1, 3] = (1, 2, 3), B [2, 1] = (1, -1): B·A = [[1,2,3],[-1,-2,-3]], scale 2
        write_st(
            &adapter.join("adapter_model.safetensors"),
            &[
                ("base_model.model.m.q_proj.lora_A.weight", vec![1, 3], vec![1.0, 2.0, 3.0], Dtype::F32),
                ("base_model.model.m.q_proj.lora_B.weight", vec![2, 1], vec![1.0, -1.0], Dtype::F32),
            ],
        );
        merge(&base, &adapter, &out).unwrap();
        assert!(out.join("config.json").exists());
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let w = st.tensor("m.q_proj.weight").unwrap();
        assert_eq!(w.dtype(), Dtype::BF16);
        assert_eq!(to_f32(w.dtype(), w.data()).unwrap(), vec![3.0, 5.0, 7.0, -1.0, -3.0, -5.0]);
        assert_eq!(st.tensor("m.norm.weight").unwrap().data(), f32_bytes(&[0.5; 3]).as_slice());
    }

    #[test]
    fn an_adapter_that_does_not_fit_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (base, adapter, out) = (dir.path().join("base"), dir.path().join("lora"), dir.path().join("out"));
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(&adapter).unwrap();
        write_st(&base.join("model.safetensors"), &[("m.k_proj.weight", vec![2, 3], vec![1.0; 6], Dtype::F32)]);
        std::fs::write(
            adapter.join("adapter_config.json"),
            r#"{"r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}"#,
        )
        .unwrap();
        write_st(
            &adapter.join("adapter_model.safetensors"),
            &[
                ("m.q_proj.lora_A.weight", vec![1, 3], vec![1.0; 3], Dtype::F32),
                ("m.q_proj.lora_B.weight", vec![2, 1], vec![1.0; 2], Dtype::F32),
            ],
        );
        let err = merge(&base, &adapter, &out).unwrap_err();
        assert!(err.to_string().contains("only 0 of the adapter's 1 layers"), "{err}");
        assert!(!out.exists());
        std::fs::write(
            adapter.join("adapter_config.json"),
            r#"{"r": 1, "lora_alpha": 1, "target_modules": "all-linear"}"#,
        )
        .unwrap();
        assert!(merge(&base, &adapter, &out).unwrap_err().to_string().contains("must be a list"));
    }
}
