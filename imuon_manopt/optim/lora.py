"""LoRA helpers: find ``(B, A)`` factor pairs in PEFT-style models and start them at full rank.

Layout (Hugging Face PEFT, ``nn.Linear`` adapters): ``lora_A[adapter]`` is ``nn.Linear(in, r)``, so
``lora_A[adapter].weight`` is ``A`` of shape ``(r, in)``; ``lora_B[adapter]`` is
``nn.Linear(r, out)``, so ``lora_B[adapter].weight`` is ``B`` of shape ``(out, r)``; the layer
computes ``W x + scaling * B A x``. The pair ``(B, A)`` is a fixed-rank point ``X = B A`` for
:class:`~imuon_manopt.optim.IMuon` (``pairs=[(B, A), ...]``). Embedding adapters: ``B =
lora_embedding_B[adapter]`` (embedding_dim, r), ``A = lora_embedding_A[adapter]`` (r, num_embeddings),
and the layer's weight is ``W + scaling * (B A)^T``.

PEFT's default initialization sets ``B = 0`` (``A = 0`` for embeddings), which is not a rank-r
point: the invariant fixed-rank step needs both factors of full rank (IMuon raises a ``ValueError``
on its first step otherwise).
:func:`full_rank_lora_init_` draws a full-rank ``B`` (and ``A`` if needed) and moves the product
into the frozen base weight, so the model computes the same function. For a PEFT model, one call
does it all: ``params, pairs = prepare_lora_(model)``, then ``IMuon(params, lr, pairs=pairs)``.

Saving. The full-rank start changes the frozen base weight: ``W_res = W - scaling * B0 A0``, and the
trained model is ``W_res + scaling * B A``. ``model.save_pretrained(dir)`` stores only ``(B, A)``,
so loading that adapter onto the original base gives ``W + scaling * B A``: off by
``scaling * B0 A0``. This is PEFT's PiSSA / OLoRA situation, and PEFT's conversion handles it:

1. right after the full-rank start (before training), ``model.save_pretrained(init_dir)``;
2. after training, ``model.save_pretrained(out_dir,
   path_initial_model_for_weight_conversion=init_dir)`` writes the rank-``2r`` LoRA adapter
   ``([B, -B0], [A; A0])`` (``lora_alpha`` doubled, so the scaling is unchanged), whose product is
   the whole change ``scaling * (B A - B0 A0)`` of the original weight;
3. ``PeftModel.from_pretrained(original_base, out_dir)`` reproduces the trained model.

The converted adapter is small and works with every PEFT loader. The alternative is the whole
merged model: ``model.merge_and_unload().save_pretrained(dir)``; it is the only one for embedding
adapters, which PEFT's conversion (0.21) does not cover (it converts ``lora_A`` / ``lora_B`` only
and writes a wrong adapter otherwise).

Resuming from a checkpoint that holds only the adapter (``transformers.Trainer``'s): rebuild the
same start first, from the original base with the same generator (``prepare_lora_(model,
generator=torch.Generator().manual_seed(seed))``), then load the adapter and optimizer state.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["full_rank_lora_init_", "full_rank_lora_model_init_", "lora_pairs", "prepare_lora_"]


def _chains(b: torch.Tensor, a: torch.Tensor) -> bool:
    return b.ndim == 2 and a.ndim == 2 and b.shape[1] == a.shape[0]


#: (A attribute, B attribute, stored transposed?) of PEFT's LoRA layers: linear adapters (``None``: the
#: layer's ``fan_in_fan_out`` flag says) and embedding adapters (``lora_embedding_B @ lora_embedding_A``
#: is ``(embedding_dim, num_embeddings)``, the transpose of the base ``nn.Embedding`` weight).
_KINDS: tuple[tuple[str, str, bool | None], ...] = (
    ("lora_A", "lora_B", None),
    ("lora_embedding_A", "lora_embedding_B", True),
)


def _factor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    w = getattr(obj, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _is_lora_layer(module: nn.Module) -> bool:
    return any(hasattr(module, a) and hasattr(module, b) for a, b, _ in _KINDS)


def _layer_adapters(
    module: nn.Module, adapter: str | None
) -> list[tuple[str | None, torch.Tensor, torch.Tensor, bool]]:
    """``(name, B, A, transposed)`` of every adapter of a LoRA layer (dicts of adapters, or single ones);
    ``transposed``: the base weight is stored as ``(in, out)``."""
    found = []
    for a_attr, b_attr, transposed in _KINDS:
        lora_a, lora_b = getattr(module, a_attr, None), getattr(module, b_attr, None)
        if lora_a is None or lora_b is None:
            continue
        dicts = (nn.ModuleDict, nn.ParameterDict, dict)
        if isinstance(lora_a, dicts) and isinstance(lora_b, dicts):
            keys = [k for k in lora_a.keys() if k in lora_b and (adapter is None or k == adapter)]
            items = [(k, _factor(lora_b[k]), _factor(lora_a[k])) for k in keys]
        else:
            items = [(None, _factor(lora_b), _factor(lora_a))]
        flag = bool(getattr(module, "fan_in_fan_out", False)) if transposed is None else transposed
        found += [(k, b, a, flag) for k, b, a in items if b is not None and a is not None]
    return found


def lora_pairs(
    model: nn.Module, *, adapter: str | None = None, trainable_only: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(B, A)`` factor pairs of the LoRA adapters in ``model``.

    Two discovery rules, in this order (duplicates are dropped):

    1. modules with attributes ``lora_A`` and ``lora_B`` — PEFT's ``nn.ModuleDict`` of ``nn.Linear``
       per adapter, a single ``nn.Linear`` each, or parameters / ``nn.ParameterDict`` s — and PEFT's
       embedding adapters, ``B = lora_embedding_B[adapter]`` (embedding_dim, r) and
       ``A = lora_embedding_A[adapter]`` (r, num_embeddings);
    2. parameter names: every ``...lora_A.<rest>`` whose ``...lora_B.<rest>`` also exists.

    Only 2-D pairs whose shapes chain (``B`` (out, r), ``A`` (r, in)) are kept; PEFT's convolution
    adapters (4-D weights) are not collected.

    Args:
        model: the module to search.
        adapter: keep only this adapter name (e.g. ``"default"``); all adapters by default.
        trainable_only: keep only pairs whose two factors both require grad (default).

    Returns:
        A list of ``(B, A)`` tuples, in module order, ready for ``IMuon(...,
        pairs=lora_pairs(model))``.
    """
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()

    def add(b: torch.Tensor, a: torch.Tensor) -> None:
        if id(b) in seen or id(a) in seen or not _chains(b, a):
            return
        if trainable_only and not (b.requires_grad and a.requires_grad):
            return
        seen.update((id(b), id(a)))
        found.append((b, a))

    for module in model.modules():
        if _is_lora_layer(module):
            for _, b, a, _ in _layer_adapters(module, adapter):
                add(b, a)

    named = dict(model.named_parameters())
    for name, a in named.items():
        dotted = "." + name
        if ".lora_A." not in dotted:
            continue
        head, _, rest = dotted.rpartition(".lora_A.")
        if adapter is not None and rest.split(".")[0] != adapter:
            continue
        partner = named.get((head + ".lora_B." + rest)[1:])
        if partner is not None:
            add(partner, a)
    return found


def _full_rank(f: torch.Tensor) -> bool:
    """True when the tall matrix ``f`` (k, r) has numerically full column rank."""
    if f.shape[-2] < f.shape[-1] or not bool(torch.isfinite(f).all()):
        return False
    s = torch.linalg.svdvals(f.to(torch.float64))
    return bool(s[-1] > s[0] * max(f.shape) * torch.finfo(f.dtype).eps * 10)


def _orthonormal(k: int, r: int, *, generator: torch.Generator | None) -> torch.Tensor:
    """A random ``(k, r)`` float64 matrix with orthonormal columns."""
    g = torch.randn(k, r, dtype=torch.float64, generator=generator)
    q, rr = torch.linalg.qr(g)
    d = torch.diagonal(rr)
    return q * torch.where(d >= 0, 1.0, -1.0).to(q.dtype)


@torch.no_grad()
def full_rank_lora_init_(
    base_weight: torch.Tensor,
    B: torch.Tensor,  # noqa: N803 - the spec's names
    A: torch.Tensor,  # noqa: N803
    scaling: float = 1.0,
    *,
    init_scale: float = 1e-3,
    fan_in_fan_out: bool = False,
    generator: torch.Generator | None = None,
) -> None:
    """Make both LoRA factors full rank without changing the layer's function (in place).

    The layer computes ``W + scaling * B @ A`` (or its transpose when ``fan_in_fan_out``). A factor
    that is not of full rank ``r`` (PEFT's ``B = 0`` start) is replaced: ``B`` by ``init_scale``
    times a random matrix with orthonormal columns, ``A`` by a random matrix with orthonormal rows;
    a full-rank factor is kept. The change of the product is subtracted from the frozen
    ``base_weight``, so ``W_new + scaling * B_new @ A_new == W + scaling * B @ A`` up to rounding in
    ``base_weight``'s dtype.

    Args:
        base_weight: the frozen base weight ``W``, shape ``(out, in)`` (``(in, out)`` if
            ``fan_in_fan_out``).
        B: the ``lora_B`` weight, shape ``(out, r)``.
        A: the ``lora_A`` weight, shape ``(r, in)``.
        scaling: the adapter's scaling (PEFT: ``lora_alpha / r``).
        init_scale: spectral norm of a replaced ``B`` (small: the product starts near zero).
        fan_in_fan_out: ``base_weight`` is stored transposed (GPT-2 ``Conv1D``).
        generator: random generator for the new factors.
    """
    if not (_chains(B, A)):
        raise ValueError(
            f"B must have shape (out, r) and A shape (r, in); got B {tuple(B.shape)} and A {tuple(A.shape)}"
        )
    m, r = B.shape
    n = A.shape[1]
    expected = (n, m) if fan_in_fan_out else (m, n)
    if tuple(base_weight.shape) != expected:
        raise ValueError(
            f"base_weight has shape {tuple(base_weight.shape)}, expected {expected} for B "
            f"{tuple(B.shape)} and "
            f"A {tuple(A.shape)} (fan_in_fan_out={fan_in_fan_out})"
        )
    if r > min(m, n):
        raise ValueError(f"rank r = {r} exceeds min(out, in) = {min(m, n)}: no full-rank factors exist")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    b_old, a_old = B.detach().to(torch.float64), A.detach().to(torch.float64)
    b_new = b_old if _full_rank(B.detach()) else init_scale * _orthonormal(m, r, generator=generator)
    a_new = a_old if _full_rank(A.detach().mT) else _orthonormal(n, r, generator=generator).mT
    if b_new is b_old and a_new is a_old:
        return
    b_new = b_new.to(device=B.device)
    a_new = a_new.to(device=A.device)
    delta = scaling * (b_new @ a_new - b_old.to(B.device) @ a_old.to(A.device))
    if fan_in_fan_out:
        delta = delta.mT
    w = base_weight.detach()
    w.copy_(w.to(torch.float64) - delta.to(w.device))
    B.detach().copy_(b_new)
    A.detach().copy_(a_new)


def _base_weight(module: nn.Module) -> torch.Tensor | None:
    base = getattr(module, "base_layer", None)
    w = getattr(base, "weight", None) if base is not None else getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


@torch.no_grad()
def full_rank_lora_model_init_(
    model: nn.Module,
    *,
    adapter: str | None = None,
    init_scale: float = 1e-3,
    trainable_only: bool = True,
    generator: torch.Generator | None = None,
) -> int:
    """Apply :func:`full_rank_lora_init_` to every PEFT-style LoRA linear layer of ``model`` (in
    place): both factors full rank, the model's function unchanged.

    A layer is a module with ``lora_A`` / ``lora_B`` (``nn.ModuleDict`` per adapter, or single
    ``nn.Linear``) or PEFT's embedding adapters ``lora_embedding_A`` / ``lora_embedding_B`` (whose
    base weight is ``(num_embeddings, embedding_dim)``, the transpose of ``B A``), a base weight at
    ``base_layer.weight`` (PEFT) or ``weight``, an optional ``scaling`` (a dict per adapter or a
    number; default 1) and an optional ``fan_in_fan_out`` flag (GPT-2's ``Conv1D`` stores the base
    weight as ``(in, out)``). PEFT starts embedding adapters with ``A = 0`` (and a random ``B``): the
    zero factor is the one replaced.

    The frozen base weight changes (``W - scaling * B0 A0``): see the module docstring for what to
    save. Several adapters on one layer share its base weight, so starting one of them changes the
    function the others compute; only the adapters being trained should be started (the default
    ``trainable_only``: inference-only adapters, whose factors are frozen, are left alone).

    Args:
        model: the model, e.g. a ``peft.PeftModel``.
        adapter: start only this adapter (e.g. ``"default"``); all by default.
        init_scale: spectral norm of a replaced ``B`` (see :func:`full_rank_lora_init_`).
        trainable_only: skip adapters whose ``A`` and ``B`` weights do not both require grad.
        generator: random generator for the new factors.

    Returns:
        The number of adapters visited (started, or kept because already of full rank).
    """
    count = 0
    for module in model.modules():
        if not _is_lora_layer(module):
            continue
        adapters = _layer_adapters(module, adapter)
        if trainable_only:
            adapters = [x for x in adapters if x[1].requires_grad and x[2].requires_grad]
        if not adapters:
            continue
        weight = _base_weight(module)
        if weight is None:
            raise ValueError(
                f"{type(module).__name__} has LoRA factors but no base weight (base_layer.weight or weight)"
            )
        for key, b, a, transposed in adapters:
            scaling = getattr(module, "scaling", 1.0)
            if isinstance(scaling, dict):
                scaling = scaling.get(key, 1.0)
            full_rank_lora_init_(
                weight,
                b,
                a,
                float(scaling),
                init_scale=init_scale,
                fan_in_fan_out=transposed,
                generator=generator,
            )
            count += 1
    return count


def _is_lora_factor(name: str, adapter: str | None) -> bool:
    dotted = "." + name
    for tag in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B."):
        if tag in dotted:
            return adapter is None or dotted.rpartition(tag)[2].split(".")[0] == adapter
    return False


def prepare_lora_(
    model: nn.Module,
    *,
    adapter: str | None = None,
    init_scale: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[list[nn.Parameter], list[tuple[torch.Tensor, torch.Tensor]]]:
    """From a PEFT LoRA model to :class:`~imuon_manopt.optim.IMuon`'s arguments, in one call.

    Starts every trainable adapter at full rank (:func:`full_rank_lora_model_init_`: PEFT's
    ``B = 0`` is not a rank-r point; the model's function is unchanged, the frozen base weights
    absorb ``scaling * B0 A0``), then collects the trainable parameters and the ``(B, A)`` pairs
    (:func:`lora_pairs`)::

        params, pairs = prepare_lora_(model)
        model.save_pretrained(init_dir)  # the start, needed to save a usable adapter later
        opt = IMuon(params, lr=1e-2, pairs=pairs)

    Each pair ``(B, A)`` (``B`` (out, r), ``A`` (r, in)) gets the GL(r)-invariant fixed-rank step;
    other trainable tensors (biases, a ``modules_to_save`` head) get IMuon's usual updates. Saving:
    see the module docstring (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

    Args:
        model: a ``peft.PeftModel`` (or any model with PEFT-style ``lora_A`` / ``lora_B`` layers).
        adapter: only this adapter's pairs (e.g. ``"default"``); all trainable ones by default.
        init_scale: spectral norm of the new ``B`` factors (small: the adapter starts near zero).
        generator: random generator for the new factors.

    Returns:
        ``(params, pairs)``: the parameters that require grad, in ``model.parameters()`` order, and
        the list of ``(B, A)`` pairs.

    Raises:
        ValueError: the model has no trainable LoRA linear adapter, or a trainable ``lora_A`` /
            ``lora_B`` weight is not part of a pair (one factor frozen, or a convolution adapter,
            which the pairs do not cover).
    """
    full_rank_lora_model_init_(model, adapter=adapter, init_scale=init_scale, generator=generator)
    pairs = lora_pairs(model, adapter=adapter)
    if not pairs:
        raise ValueError(
            f"no trainable LoRA adapter{'' if adapter is None else f' named {adapter!r}'} found in "
            f"{type(model).__name__}: wrap the model with peft.get_peft_model(model, LoraConfig(...)) "
            "(or load the adapter with is_trainable=True) first"
        )
    paired = {id(t) for pair in pairs for t in pair}
    params: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in paired and _is_lora_factor(name, adapter):
            raise ValueError(
                f"{name} (shape {tuple(p.shape)}) is a trainable LoRA factor outside every (B, A) "
                "pair: IMuon would update it as a plain matrix, which is not invariant to the "
                "factors' gauge. Train both factors of a linear adapter, or freeze this one "
                "(p.requires_grad_(False))"
            )
        params.append(p)
    return params, pairs
