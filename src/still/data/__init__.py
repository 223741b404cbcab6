"""still.data."""
