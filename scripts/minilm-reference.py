#!/usr/bin/env python3
"""Reference sentence vectors of all-MiniLM-L6-v2, computed in numpy.

An independent forward pass of sentence-transformers/all-MiniLM-L6-v2 (BERT:
embeddings, 6 encoder layers, mean pooling over the attention mask, L2
normalisation), written from the BERT definition rather than from the Rust
code it checks. It writes `workers/tests/golden/minilm.json`, the vectors of a
few golden sentences; `workers/tests/embedder.rs` checks that the Rust
embedder's vectors for them have cosine >= 0.999 with these.

Needs only numpy, safetensors and tokenizers (no torch). The model directory
holds config.json, model.safetensors, tokenizer.json and
sentence_bert_config.json; it defaults to ~/.cache/retro-fleet/models/all-MiniLM-L6-v2,
or $FLEET_MINILM_DIR, or --model-dir.

Usage: scripts/minilm-reference.py [--model-dir DIR] [--out FILE]
  FILE defaults to workers/tests/golden/minilm.json in the repository.
"""

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = "~/.cache/retro-fleet/models/all-MiniLM-L6-v2"

SENTENCES = [
    "Is NATS fast?",
    "Wait, what's the difference between a queue group and a stream, really?!",
    "The fleet schedules jobs across a handful of small machines, keeps a durable "
    "log of every request it has accepted, and retries the work on another node "
    "when one of them disappears in the middle of a long batch, so that nothing "
    "a client was promised is ever silently lost.",
    "The disk holds 512 GB and the link runs at 2.5 Gbit/s.",
    "A naïve café owner serves crème brûlée.",
    'fn main() { println!("hi"); }',
    "Hello",
]

erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    """BERT's "gelu": the exact form, x * Phi(x)."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class MiniLM:
    def __init__(self, model_dir):
        d = Path(model_dir).expanduser()
        self.cfg = json.loads((d / "config.json").read_text())
        max_len = json.loads((d / "sentence_bert_config.json").read_text())["max_seq_length"]
        raw = load_file(str(d / "model.safetensors"))
        # some exports name the tensors "bert.embeddings...", others "embeddings..."
        self.w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in raw.items()}
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tok.enable_truncation(max_length=max_len)  # the file says 128; ST uses 256
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest of a batch

    def linear(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def ln(self, x, name):
        return layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.cfg["layer_norm_eps"])

    def embed(self, texts):
        enc = self.tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc])
        types = np.array([e.type_ids for e in enc])
        mask = np.array([e.attention_mask for e in enc], dtype=np.float64)
        batch, seq = ids.shape
        heads = self.cfg["num_attention_heads"]
        hd = self.cfg["hidden_size"] // heads

        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = self.ln(x, "embeddings.LayerNorm")
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]  # (batch, 1, 1, keys)

        def split(t):  # (batch, seq, hidden) -> (batch, heads, seq, hd)
            return t.reshape(batch, seq, heads, hd).transpose(0, 2, 1, 3)

        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q = split(self.linear(x, p + "attention.self.query"))
            k = split(self.linear(x, p + "attention.self.key"))
            v = split(self.linear(x, p + "attention.self.value"))
            att = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(batch, seq, heads * hd)
            x = self.ln(x + self.linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = gelu(self.linear(x, p + "intermediate.dense"))
            x = self.ln(x + self.linear(h, p + "output.dense"), p + "output.LayerNorm")

        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=os.environ.get("FLEET_MINILM_DIR", DEFAULT_DIR))
    ap.add_argument("--out", default=str(REPO / "workers/tests/golden/minilm.json"))
    args = ap.parse_args()

    vectors = MiniLM(args.model_dir).embed(SENTENCES)
    sentences = [
        json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]}, ensure_ascii=False)
        for t, v in zip(SENTENCES, vectors)
    ]
    head = '{"model": "sentence-transformers/all-MiniLM-L6-v2",\n "generated_by": "scripts/minilm-reference.py",\n'
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + ' "sentences": [\n  ' + ",\n  ".join(sentences) + "\n]}\n")  # a sentence a line
    print(f"wrote {len(SENTENCES)} vectors of {vectors.shape[1]} to {out}")


if __name__ == "__main__":
    main()
