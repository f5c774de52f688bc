"""Model specs, loaders and the torch model."""
