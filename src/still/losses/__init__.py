"""Loss functions, written once as plain functions of tensors and registered by name."""
