"""Data sets for the tasks: loaders that take a directory (or ``$DNI_ASYNC_DATA``)."""

from .mnist import MNIST_FILES, load_mnist, resolve_data_dir

__all__ = ["MNIST_FILES", "load_mnist", "resolve_data_dir"]
