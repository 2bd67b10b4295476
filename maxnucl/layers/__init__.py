"""Building blocks: normalisation, embeddings + RoPE, attention, gated FFN."""
