"""transrec.inference: serving a trained model from its export, without the training stack.

It depends on :mod:`transrec.models`, :mod:`transrec.shards`, :mod:`transrec.config` and
:mod:`transrec.errors` only (torch, the encoders and the export folder); nothing here imports
DeepSpeed or :mod:`transrec.engine`, which builds on it (evaluation scores through the same pass).

- :mod:`~transrec.inference.recommender`: :class:`Recommender` (``transrec.Recommender``): the pool
  of candidate items, top-k recommendations, scores and target ranks for histories;
- :mod:`~transrec.inference.scoring`: catalogue encoding, user states and the one chunked scoring
  pass (top-k, history masking, rank intervals) that evaluation and serving share;
- :mod:`~transrec.inference.metrics`: full-ranking metrics from rank intervals (ties in a random order);
- :mod:`~transrec.inference.histories`: histories in, recommendations out (the files of
  ``transrec recommend``);
- :mod:`~transrec.inference.cli`: the ``transrec recommend`` subcommand.

A dataset's item content, as a model config needs it, opens through :mod:`transrec.models.content`,
which training shares."""

from transrec._toplevel import bare_import

bare_import(__name__, __file__)  # a bare `import inference` gets an installed distribution, if any
