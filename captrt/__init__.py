"""captrt: an optimized inference runtime for Show, Attend and Tell image captioning.

Importing this package is cheap and torch-free; heavy modules load on use.
"""

__version__ = "0.1.0"
