"""The torch / geoopt adapter: :class:`IMuon`, a ``torch.optim`` optimizer, and LoRA helpers.

Example::

    import geoopt
    from imuon_manopt.optim import IMuon

    W = geoopt.ManifoldParameter(geoopt.Stiefel().random(64, 8), manifold=geoopt.Stiefel())
    opt = IMuon([W, *model.parameters()], lr=0.02)

LoRA::

    from imuon_manopt.optim import IMuon, full_rank_lora_model_init_, lora_pairs

    full_rank_lora_model_init_(model)  # PEFT starts with B = 0, which is not a rank-r point
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = IMuon(trainable, lr=1e-3, pairs=lora_pairs(model))
"""

from ._dispatch import register_manifold, supported_manifolds
from ._distributed import keep_manifolds, measure_comm
from ._lr import register_adjust_lr_fn
from .imuon import IMuon
from .lora import full_rank_lora_init_, full_rank_lora_model_init_, lora_pairs, prepare_lora_

__all__ = [
    "IMuon",
    "full_rank_lora_init_",
    "full_rank_lora_model_init_",
    "keep_manifolds",
    "lora_pairs",
    "measure_comm",
    "prepare_lora_",
    "register_adjust_lr_fn",
    "register_manifold",
    "supported_manifolds",
]
