"""posae: position-aware sparse autoencoders on transformer activations."""

__version__ = "0.1.0"
