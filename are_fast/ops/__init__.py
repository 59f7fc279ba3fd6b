"""The op layer: input checks, the float64-checked reference, the op registry (backends.py), the chunk driver
and its epilogues, the online sweep for frozen heads (online.py), the torch.library custom ops with their
autograd (autograd.py), the native loader and the public functional ops. Nothing here imports the model,
training or encoding layers."""
