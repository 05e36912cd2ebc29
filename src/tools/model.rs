//! `retro-fleet model tiny | tiny-lora`: writes the small random-weights
//! model (and a LoRA adapter for it) used by the demo and the tests.

use anyhow::Context as _;

/// `retro-fleet model tiny-lora`.
pub fn tiny_lora(out: &std::path::Path, rank: usize, seed: u64) -> anyhow::Result<()> {
    if rank == 0 {
        anyhow::bail!("--rank must be at least 1");
    }
    retro_fleet_worker::lora::write_tiny_adapter(out, &Default::default(), rank, seed)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote a rank-{rank} LoRA adapter for the tiny model to {}", out.display());
    Ok(())
}

/// `retro-fleet model tiny`.
pub fn tiny(out: &std::path::Path, layers: usize, hidden: usize) -> anyhow::Result<()> {
    if hidden == 0 || hidden % 8 != 0 || layers == 0 {
        anyhow::bail!("--hidden must be a positive multiple of 8 and --layers at least 1");
    }
    let sizes = retro_fleet_worker::tiny_model::Tiny { hidden, inter: hidden * 2, layers, ..Default::default() };
    retro_fleet_worker::tiny_model::write(out, &sizes).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote a tiny Llama model to {} ({layers} layers, hidden {hidden})", out.display());
    Ok(())
}
