"""still.integrations."""
