"""Runtime: the one preprocessing function and the Encoder interface over every backend."""

from .encoder import BorrowedEncoder, EncodedFiles, Encoder, model_name, open_encoder, register_backend
from ..preprocess import (UnreadableImage, expand_image_paths, preprocess, preprocess_image, read_image, read_images,
                         skipped_summary)

__all__ = ["BorrowedEncoder", "EncodedFiles", "Encoder", "model_name", "UnreadableImage", "open_encoder", "register_backend", "expand_image_paths",
           "preprocess", "preprocess_image", "read_image", "read_images", "skipped_summary"]
