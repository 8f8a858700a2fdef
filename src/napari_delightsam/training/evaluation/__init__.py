"""How a model is scored: metrics, validation during training, dataset evaluation."""
