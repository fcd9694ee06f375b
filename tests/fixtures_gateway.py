"""Session fixtures for the gateway tier (real process over loopback)."""
