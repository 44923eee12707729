"""advexplain's HTTP services: the black box and the explainer."""
