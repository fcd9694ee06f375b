"""The generator tier: one causal language model behind inference.v1.GenerationService, with
continuous batching and token streaming."""
