"""The stack's services: generator, embedder and gateway, and what they share in common/."""
