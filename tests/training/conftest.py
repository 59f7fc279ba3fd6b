# The tiny model and the one-thread setting of the model tests serve the trainer tests too.
from model.conftest import one_thread, tiny_dir  # noqa: F401
