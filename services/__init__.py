"""advexplain's HTTP services (black box, explainer) and its command line."""
