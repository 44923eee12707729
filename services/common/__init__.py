"""What every advexplain HTTP service shares: the error body and handler map, upload limits, image decoding, metrics."""
