"""Registry-side acceleration: full mode (eStargz image) and index-only mode (artifact)."""
