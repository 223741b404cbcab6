"""still.engine."""
