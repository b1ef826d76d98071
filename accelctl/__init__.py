"""accelctl."""
