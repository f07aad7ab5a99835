"""edgepipe: convert, deploy, measure and gate TFLite models on edge fleets."""

__version__ = "0.1.0"
