"""reid-export: export, verify and benchmark fast-reid-style person re-identification models."""

__version__ = "0.2.0"
