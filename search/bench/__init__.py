"""The benchmarks of `python -m search.bench`, each printing its figures (and, with --json, a line of
them):

- speed (the default): how fast a trial trains, against the tutorial pipeline and the machine;
- strategies (--search): which search strategy picks the best config at equal compute;
- final (--final): which pipeline, from sweep to final model, gives the best model at equal compute.

audit holds what the last two share: the split held out of every sweep, and the kept results.
"""
