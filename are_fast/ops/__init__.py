"""The op layer: input checks, the float64-checked reference, the backend registry, the chunk driver and its
epilogues, the autograd Function, the native loader and the public functional ops. Nothing here imports the
model, training or encoding layers."""
