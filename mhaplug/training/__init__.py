"""The training wing: everything a run does around the model.

- :mod:`~mhaplug.training.lit`: :class:`~mhaplug.training.lit.LitDecoderLM`, the LightningModule (token-normalised
  loss across accumulation and ranks);
- :mod:`~mhaplug.training.audit`: :func:`~mhaplug.training.audit.audit`, the mask audit of any model on a real
  batch (how it calls a model and changes a batch: :mod:`~mhaplug.training.probing`);
- :mod:`~mhaplug.training.callbacks`: the step-0 audit, throughput and memory; :mod:`~mhaplug.training.lifecycle`:
  SIGTERM, divergence, resume; :mod:`~mhaplug.training.hparams`: settings and results for TensorBoard;
  :mod:`~mhaplug.training.progress`: the progress bar; :mod:`~mhaplug.training.quiet`: the messages a run hides;
- :mod:`~mhaplug.training.config`: the schema of ``configs/`` and the start-up checks;
  :mod:`~mhaplug.training.overrides`: the command line's overrides, checked before Hydra (train.py's and show's);
  :mod:`~mhaplug.training.run_dirs`: a folder per run.

Modules here may import the decoder and the attention and data wings, never the reporting code. This face imports
nothing, so that ``import mhaplug.training.config`` loads neither Lightning nor datasets.
"""
