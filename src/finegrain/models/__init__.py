"""Models: backbones (torchvision, timm, EfficientNet-Lite0 offline, the seeds' CNNs),
the CUBS gates of seed 001, the heads (classifier / embedding / both) and freeze policies.

- :func:`finegrain.models.model.build_model` → :class:`~finegrain.models.model.FinegrainModel`
- :func:`finegrain.models.backbones.build_backbone`, :func:`~finegrain.models.backbones.list_backbones`
- :class:`finegrain.models.cubs.CUBS1`, :class:`~finegrain.models.cubs.CUBS2`, :class:`~finegrain.models.cubs.CUBSBlock`
- :func:`finegrain.models.freezing.apply_freeze`
"""
