"""Beyond one machine: embedding galleries on a Ray cluster (the ``cluster`` extra: ``ray[data]``).

:mod:`~finegrain.cluster.sources` reads what to embed (an image folder, a split, or a CSV/Parquet
listing of ``path[,label][,id]``); :mod:`~finegrain.cluster.shards` is the folder of vector shards
they become; :mod:`~finegrain.cluster.embed` runs the model over them in a Ray Data actor pool;
:mod:`~finegrain.cluster.gallery` builds a run's index from the shards.
"""
