"""Small pieces every service shares: typed configuration, serving helpers."""
