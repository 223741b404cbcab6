"""still.methods."""
