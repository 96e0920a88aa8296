"""The benchmark suite behind ``recourse bench``: every method on the same people.

- :mod:`solver.bench.run`: the stages (exact labels per scheme, reference methods, the
  amortizer), resumable through the label pipeline, and the per-person table;
- :mod:`solver.bench.measures`: one row per person and method: validity through the true
  causal model, the person's hard constraints, cost, plausibility;
- :mod:`solver.bench.stats`: summaries, bootstrap confidence intervals, group gaps;
- :mod:`solver.bench.report`: the Markdown report, its figures and its findings.
"""
