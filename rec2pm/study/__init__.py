"""The accuracy study: Rec2PM against full attention and the other memories, side by side,
with paired confidence intervals (``docs/results.md``).

* ``grid``: the runs (three groups, three seeds each) and the sizes of each scale;
* ``runner``: trains each run resumably and stores one JSON result per run;
* ``efficiency``: state bytes per user and request latency beside the accuracy;
* ``stats``: paired bootstrap intervals, minimum detectable effects, verdicts;
* ``report``: the tables, claims and figures, redrawn from the result files.

``python -m rec2pm study run`` runs what has no result yet; ``python -m rec2pm study report``
redraws ``docs/results.md``.
"""
