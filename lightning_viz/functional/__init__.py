"""Pure tensor functions, usable on a plain ``nn.Module`` without a Trainer or a logger."""
