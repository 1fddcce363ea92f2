"""MiniVLM: a smaller and faster vision-language model (Wang et al., 2020), runnable from raw images."""

__version__ = "0.1.0"
