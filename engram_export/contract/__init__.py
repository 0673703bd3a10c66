"""The contract of an exported layer: what a file says about itself (``model_info``: config, layer,
precision, quantization, and the fingerprints of the data it reads) and the inputs it accepts
(``inputs``: the checks every call makes before anything runs). Above ``models/`` (configs), below
everything that writes or runs a file."""
