"""Runtime: the one preprocessing function and the Encoder interface over every backend."""

from .encoder import Encoder, open_encoder, register_backend
from .preprocess import expand_image_paths, preprocess, preprocess_image, read_image

__all__ = ["Encoder", "open_encoder", "register_backend", "expand_image_paths", "preprocess",
           "preprocess_image", "read_image"]
