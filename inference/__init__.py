"""transrec.inference: serving a trained model from its export, without the training stack.

It depends on :mod:`transrec.models` and :mod:`transrec.shards` only (torch, the encoders and the
export folder); nothing here imports DeepSpeed."""

from transrec._toplevel import bare_import

bare_import(__name__, __file__)  # a bare `import inference` gets an installed distribution, if any
