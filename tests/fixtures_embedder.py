"""Session fixtures for the embedder tier (real process over loopback)."""
