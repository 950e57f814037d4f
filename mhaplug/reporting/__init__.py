"""The reporting wing: what a person reads after training.

- :mod:`~mhaplug.reporting.runs`: runs read from their folders, and the equivalence check between them;
- :mod:`~mhaplug.reporting.tables`: the run table, its legend and notes, the summary lines;
- :mod:`~mhaplug.reporting.figures`: the plot of the runs; :mod:`~mhaplug.reporting.page`: the one-file HTML page;
- :mod:`~mhaplug.reporting.mask_panels`: what each strategy hands its kernel for a real batch, and
  :mod:`~mhaplug.reporting.mask_figure`: the picture of it.

``python -m mhaplug.compare`` and ``python -m mhaplug.show`` are the command lines over them. Modules here may import
the attention and data wings (the mask panels), never training code; the run reports import the standard library
and matplotlib only.
"""
