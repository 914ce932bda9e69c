"""refvit: golden bit-exact NumPy reference of DeiT (float and INT8 integer forms)."""
__version__ = "0.1.0"
