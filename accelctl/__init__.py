"""`accelctl`, the operator CLI: inspect images, convert them, pull lazily, run the demo."""
