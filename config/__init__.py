"""Config loading: the schema, ``--set`` / ``STREAMTRAIN__*`` overrides, secrets, and the generated reference.

``config/default.yaml`` beside this file is generated from the schema
(``python -m streamtrain.config.doc yaml``); a test keeps the two equal.
"""
