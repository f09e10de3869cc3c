"""The batched simulation engine: users are rows of tensors."""
