"""Data preparation: separate photos -> composites (compose) -> captions (caption)."""
