# The tiny model and the one-thread setting of the model tests serve the trainer tests too.
from model.conftest import model_tests_on_one_thread, tiny_dir  # noqa: F401
