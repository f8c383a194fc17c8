"""Data sets for the tasks: loaders that take a directory, ``$DNI_ASYNC_DATA``, the user cache or a download."""

from .download import MnistDownloadError, download_files, mnist_cache_dir
from .mnist import (
    MNIST_FILES,
    SOURCE_MNIST,
    SOURCE_SUBSET,
    MnistData,
    check_mnist_dir,
    load_mnist,
    load_mnist_with_source,
    local_split_size,
    resolve_data_dir,
)

__all__ = ["MNIST_FILES", "SOURCE_MNIST", "SOURCE_SUBSET", "MnistData", "MnistDownloadError", "check_mnist_dir",
           "download_files", "load_mnist", "load_mnist_with_source", "local_split_size", "mnist_cache_dir",
           "resolve_data_dir"]
