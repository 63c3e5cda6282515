"""PathGen-LLaVA: a PathGen-CLIP vision tower, a two-layer GELU projector and a causal language model, trained in
two stages (projector on caption pairs, then instruction tuning) with plain transformers and torch."""
