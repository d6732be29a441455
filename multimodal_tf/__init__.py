"""multimodal-tf: multimodal (image + text + audio) models from data to TF Serving."""

__version__ = "0.1.0"
