"""Session fixtures for the generator tier (real process over loopback)."""
