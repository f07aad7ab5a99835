"""devices stage."""
