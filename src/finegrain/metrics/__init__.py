"""Evaluation metrics.

* :mod:`finegrain.metrics.classification` -- top-1/top-5 accuracy, mean cross-entropy,
  macro and weighted precision/recall/F1 (scikit-learn definitions), per-class table and
  the most confused class pairs.
* :mod:`finegrain.metrics.retrieval` -- Recall@K (retrieval papers' definition, the query
  itself excluded), Precision@1, R-Precision and MAP@R (Musgrave et al. 2020), and NMI of
  a k-means clustering of the embeddings.

Every function takes NumPy arrays and returns plain Python numbers.
"""
