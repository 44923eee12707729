"""advexplain's library: data, the paper's CNNs, checkpoints, training and the explanation engine.

Both services and the CLI import it; nothing in here serves HTTP.
"""
