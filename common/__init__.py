"""Small pieces every part of acceld shares (logging, digests, process helpers)."""
