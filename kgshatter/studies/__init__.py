"""The paper's studies, built on the library below them (graph, models, training, editing).

- :mod:`~kgshatter.studies.sweep` (with its executors :mod:`~kgshatter.studies.distributed` and
  the crash-safe row log :mod:`~kgshatter.studies.rowlog`): edits at every distance and method,
  accuracy and R(D*) per edit, summaries;
- :mod:`~kgshatter.studies.reproduction` and :mod:`~kgshatter.studies.report`: ``kgshatter
  reproduce`` end to end (train or reuse a shipped run, :mod:`~kgshatter.studies.shipped`; sweep;
  figures and ``report.md``);
- :mod:`~kgshatter.studies.targets`: the paper's numbers and the fidelity targets, checked on a
  sweep (the one verdict the report, the terminal and the fidelity study give);
- :mod:`~kgshatter.studies.fidelity`: the fidelity study (variants against those targets);
- :mod:`~kgshatter.studies.months`: the naturalistic replication on a pretrained model.
"""
