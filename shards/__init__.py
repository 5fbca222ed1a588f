"""transrec.shards: dataset folders (WebDataset shards), synthetic worlds, loaders, item caches."""

from transrec._toplevel import bare_import

bare_import(__name__, __file__)  # a bare `import shards` gets the installed distribution
