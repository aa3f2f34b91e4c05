"""Plain PyTorch building blocks (no Lightning import): towers, language models, connectors, fusion."""
