"""The embedder tier: sentence-transformers models behind inference.v1.EmbeddingService, with
dynamic batching across requests and a cache of loaded models."""
