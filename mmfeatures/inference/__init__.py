"""The stage that embeds one modality, in the order records flow through it:

``prepare`` (fetch, decode and preprocess in a pool of threads) -> ``batching`` (batches weighed by
cost, one length bucket at a time) -> ``handler`` (Beam's ModelHandler: loads the encoder once per
worker and runs each batch through the ``embedder``, on a ``runtime``). ``embed.EmbedModality`` is
the composite that wires them.
"""
