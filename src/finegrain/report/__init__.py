"""Reports of finished runs.

- :mod:`finegrain.report.tables`: one comparison row per finished run, as Markdown
  (the seed documents' summary-table form) and as a self-contained HTML page;
- :mod:`finegrain.report.figures`: learning curves, per-class accuracy, confused
  class pairs with example images, a retrieval gallery (matplotlib, PNG);
- :mod:`finegrain.report.html`: ``<run>/report/index.html`` with the config, the
  metrics and the protocol that produced them, and every figure embedded, plus an
  index page across runs; assembled from :mod:`~finegrain.report.run_inputs` (what a
  run's report is drawn from), :mod:`~finegrain.report.run_sections` (its sections)
  and :mod:`~finegrain.report.page_parts` (embedded figures, and the Jinja2 templates of
  ``templates/`` that lay the pages out and escape every value).
"""
