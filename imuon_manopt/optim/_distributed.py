"""Whole-matrix computations on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

An iMuon step needs whole matrices (the LMO's polar factor, the whitening, a manifold's retraction),
while FSDP2 stores each parameter as a ``DTensor`` whose rank holds one slice (``Shard(d)``, by
default ``Shard(0)``: a block of rows). :func:`apply_full` runs a pure function over the full tensors
of a group of parameters and hands each rank the slices of the results that it owns, in one of two
modes:

``owner=True`` (large plain matrices, manifold parameters)
    Each parameter gets one owner rank (greedy by cost, so owners stay balanced over the whole
    step). One ``all_to_all`` sends every rank's slices to the owners, each owner runs the function
    once, batched, on its share, and a second ``all_to_all`` sends the result slices back (preceded
    by a tiny ``all_to_all`` of byte counts, since only the owner knows the results' shapes and
    dtypes). Every matrix is orthogonalized once in the world, as in the distributed Muon designs
    (Dion; Moonlight's distributed Muon), instead of once per rank.
``owner=False`` (small inputs, e.g. LoRA factors)
    One ``all_gather`` gives every rank the full inputs and every rank computes all results; no
    scatter.

Both modes pack all tensors of one call (any dtypes) into one byte buffer, so a call costs a fixed
number of collectives however many parameters the group holds. Every collective used (``all_to_all``
with uneven splits, ``all_gather_into_tensor``, ``all_reduce``) works with the gloo (CPU) and NCCL
backends.

Layouts handled directly: a ``DTensor`` whose placements hold one ``Shard(d)`` and otherwise
``Replicate()`` (FSDP2 on a 1-D mesh; HSDP, where each replica group computes the same results).
A ``DTensor`` without ``Shard`` placements is whole on every rank and needs no communication. Other
layouts (several ``Shard`` mesh dimensions, e.g. FSDP2 with tensor parallelism, or strided shards)
fall back to ``DTensor.full_tensor()`` on every rank, whatever ``owner`` says.

Parameters that are not ``DTensor`` s (single process, DDP) cost nothing: ``apply_full`` is then
exactly ``fn(inputs)``.

Communicated bytes are recorded per process: :data:`comm_stats` (running total) and
:func:`measure_comm` (a context manager that records what happens inside it, e.g. one ``step()``).

``fully_shard`` replaces every parameter by a new ``nn.Parameter`` wrapping a ``DTensor``: a
geoopt ``ManifoldParameter`` loses its class and its ``.manifold``. :func:`keep_manifolds` records
the manifolds before sharding and attaches them, as a ``.manifold`` attribute, to the sharded
parameters of the same names, which is where :class:`~imuon_manopt.optim.IMuon` looks for them.

All ranks commit or reject a step together: :func:`agree` and-s the step's finiteness flag over
the shard groups (one small ``all_reduce``), since each rank only sees its shards.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
import torch.distributed as dist

from ..lmo import gaussian_sketch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor, Shard

# ``torch.distributed.tensor`` costs ~0.4 s to import, so this module never imports it at load time: a single-process
# user never pays for it. A ``DTensor`` cannot exist before its module has been imported (by ``fully_shard``, or by
# whoever made it), so looking the module up in ``sys.modules`` decides "is this a DTensor?" exactly, for free. The
# functions that build DTensors (``like``, the general layouts) import it when they hold one.
_DTENSOR_MODULE = "torch.distributed.tensor"

__all__ = [
    "CommStats",
    "agree",
    "agree_structure",
    "apply_full",
    "comm_stats",
    "full",
    "is_dtensor_loaded",
    "is_sharded",
    "keep_manifolds",
    "like",
    "local",
    "measure_comm",
]

Inputs = Sequence[Sequence[torch.Tensor]]
Outputs = Sequence[Sequence[torch.Tensor]]
FullFn = Callable[[list[tuple[torch.Tensor, ...]]], Sequence[Sequence[torch.Tensor]]]

#: Every segment of a packed byte buffer starts at a multiple of this (the largest element size),
#: so received segments can be viewed as their dtype without a copy.
_ALIGN = 16
#: dtypes a packed scatter header can name (index = code).
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex128,
    torch.complex64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
#: Size codes an owner sends instead of a payload size when its share of ``fn`` raised.
_FAILED_LINALG, _FAILED_OTHER = -1, -2


# ---------------------------------------------------------------------------------------- helpers


def is_dtensor_loaded() -> bool:
    """Has anyone imported ``torch.distributed.tensor`` (else no ``DTensor`` can exist)?"""
    return _DTENSOR_MODULE in sys.modules


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Is ``t`` a ``DTensor``? Never imports ``torch.distributed.tensor`` (False while nobody has imported it)."""
    module = sys.modules.get(_DTENSOR_MODULE)
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's part of ``t``: ``t.to_local()`` for a ``DTensor``, else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t.full_tensor()`` for a ``DTensor`` (a collective: every rank of its mesh must call it,
    in the same order), else ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def is_sharded(p: torch.Tensor) -> bool:
    """Is ``p`` a ``DTensor`` split over ranks (any ``Shard`` placement on a mesh dim of size > 1)?"""
    if not is_dtensor(p):
        return False
    mesh = p.device_mesh
    return any(pl.is_shard() and mesh.size(i) > 1 for i, pl in enumerate(p.placements))


def like(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t``, the rank's part of a tensor shaped like ``p``, as a tensor laid out like ``p``.

    For a ``DTensor`` ``p`` this is a ``DTensor`` with ``p``'s mesh, placements, shape and stride
    (how torch's optimizers store the state of FSDP2 parameters, so that ``state_dict()`` and
    ``torch.distributed.checkpoint`` see sharded state); for a plain ``p`` it is ``t``.
    """
    if not is_dtensor(p):
        return t
    if is_dtensor(t):
        return t
    from torch.distributed.tensor import DTensor  # loaded: p is one

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


@contextmanager
def keep_manifolds(module: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Keep the geoopt manifolds of ``module``'s parameters through ``fully_shard``.

    ``fully_shard`` turns every parameter into a plain ``nn.Parameter`` around a ``DTensor``, which
    drops ``ManifoldParameter.manifold``; so does ``to_empty`` (it swaps in new tensors, attributes
    included). Inside this context, shard (and materialize) as usual; on exit every parameter whose
    name carried a manifold on entry gets it back as a ``.manifold`` attribute (where
    :class:`~imuon_manopt.optim.IMuon` reads it)::

        with torch.device("meta"):
            model = Model()
        with keep_manifolds(model):
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to_empty(device="cuda")
        model.init_weights()  # on each rank's shards, e.g. DTensor.to_local().copy_(...)
        opt = IMuon(model.parameters(), lr=0.02)

    Yields the recorded ``{parameter name: manifold}`` mapping. Parameters must be contiguous for
    ``fully_shard`` (``geoopt.Stiefel().random`` returns a transposed QR factor: pass
    ``.contiguous()``).
    """
    manifolds = {
        name: cast(Any, p).manifold  # geoopt's attribute (ManifoldParameter or set by hand)
        for name, p in module.named_parameters(remove_duplicate=False)
        if getattr(p, "manifold", None) is not None
    }
    yield manifolds
    found = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if name in manifolds:
            found.add(name)
            if getattr(p, "manifold", None) is None:
                cast(Any, p).manifold = manifolds[name]
    missing = sorted(set(manifolds) - found)
    if missing:
        raise ValueError(
            f"keep_manifolds: parameters {missing} carried a manifold before sharding and no parameter of that "
            "name exists afterwards; set `param.manifold = manifold` on the sharded parameters by hand"
        )


# ---------------------------------------------------------------------------------------- stats


@dataclass
class CommStats:
    """Bytes this process put on and took off the wire for :func:`apply_full` and :func:`agree`.

    ``bytes_sent`` and ``bytes_received`` count payload between distinct ranks (what stays on the
    rank is not counted; buffer padding is). Summed over ranks, ``bytes_sent`` is the traffic of the
    world. ``collectives`` counts collective calls, ``gathered`` the parameters whose full inputs
    were assembled on an owner (``owner=True``) and ``replicated`` those assembled on every rank;
    ``by_mode`` splits ``bytes_sent`` by mode (``owner``, ``gather``, ``general``, ``agree``).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    gathered: int = 0
    replicated: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.collectives = self.gathered = self.replicated = 0
        self.by_mode = {}

    def _add(self, mode: str, sent: int, received: int, collectives: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.collectives += collectives
        self.by_mode[mode] = self.by_mode.get(mode, 0) + sent


#: Running totals of this process.
comm_stats = CommStats()
_sinks: list[CommStats] = [comm_stats]


@contextmanager
def measure_comm() -> Iterator[CommStats]:
    """Record the optimizer's traffic (:func:`apply_full`, :func:`agree`) inside the block, on this process::

    with measure_comm() as s:
        opt.step()
    print(s.bytes_sent, s.bytes_received, s.collectives)
    """
    s = CommStats()
    _sinks.append(s)
    try:
        yield s
    finally:
        _sinks.remove(s)


def _record(mode: str, sent: int, received: int, collectives: int, gathered: int = 0, replicated: int = 0) -> None:
    for s in _sinks:
        s._add(mode, sent, received, collectives)
        s.gathered += gathered
        s.replicated += replicated


# ---------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """A tensor of global ``shape`` split along ``dim`` over ``group`` (torch.chunk spans)."""

    shape: tuple[int, ...]
    dim: int
    group: Any
    world: int
    rank: int

    def span(self, r: int) -> tuple[int, int]:
        n = self.shape[self.dim]
        chunk = -(-n // self.world)
        start = min(r * chunk, n)
        return start, max(0, min(chunk, n - start))

    def shard_shape(self, r: int) -> tuple[int, ...]:
        s = list(self.shape)
        s[self.dim] = self.span(r)[1]
        return tuple(s)

    def shard(self, full: torch.Tensor, r: int) -> torch.Tensor:
        start, length = self.span(r)
        return full.narrow(self.dim, start, length)


class _General:
    """A ``DTensor`` layout outside :class:`_Layout` (handled through ``DTensor`` redistribution)."""

    def __init__(self, p: DTensor) -> None:
        self.p = p
        self.shape = tuple(p.shape)


_REPLICATED = None


def _layout(p: torch.Tensor | None) -> _Layout | _General | None:
    if p is None or not is_dtensor(p):
        return _REPLICATED
    mesh, placements = p.device_mesh, p.placements
    if any(pl.is_partial() for pl in placements):
        raise ValueError(
            f"apply_full: a DTensor of shape {tuple(p.shape)} has a Partial placement {placements}; parameters and "
            "their gradients must be Shard or Replicate (reduce the partial sums first)"
        )
    shards = [(i, pl) for i, pl in enumerate(placements) if pl.is_shard() and mesh.size(i) > 1]
    if not shards:
        return _REPLICATED
    from torch.distributed.tensor import Shard  # loaded: p is a DTensor

    if len(shards) == 1 and type(shards[0][1]) is Shard:
        i, pl = shards[0]
        dim = cast("Shard", pl).dim % p.ndim
        return _Layout(tuple(p.shape), dim, mesh.get_group(i), mesh.size(i), mesh.get_local_rank(i))
    return _General(p)


def _specs(params: Sequence[Any], inputs: Inputs) -> list[tuple[Any, ...]]:
    specs = []
    for i, (p, xs) in enumerate(zip(params, inputs)):
        if isinstance(p, torch.Tensor):
            specs.append((_layout(p),) * len(xs))
            continue
        ps = tuple(p)
        if len(ps) != len(xs):
            raise ValueError(
                f"apply_full: params[{i}] names {len(ps)} layouts for {len(xs)} inputs; pass one parameter (all "
                "inputs shaped like it) or one parameter (or None for an unsharded input) per input"
            )
        specs.append(tuple(_layout(q) for q in ps))
    return specs


def _check_local(x: torch.Tensor, lay: _Layout, i: int, j: int) -> None:
    want = lay.shard_shape(lay.rank)
    if tuple(x.shape) != want:
        raise ValueError(
            f"apply_full: inputs[{i}][{j}] has local shape {tuple(x.shape)}, but the shard of rank {lay.rank} of a "
            f"tensor of global shape {lay.shape} split along dim {lay.dim} over {lay.world} ranks is {want}; pass "
            "the local shard (to_local()) of a tensor shaped like the parameter"
        )


def _out_layout(spec: tuple[Any, ...], k: int, out: torch.Tensor) -> _Layout | _General | None:
    """Layout of output ``k``: input ``k``'s if the shapes agree, else the first input's of that shape,
    else none (the output is replicated: every rank gets all of it)."""
    shape = tuple(out.shape)
    if k < len(spec) and spec[k] is not None and spec[k].shape == shape:
        return spec[k]
    for lay in spec:
        if lay is not None and lay.shape == shape:
            return lay
    return _REPLICATED


def _group_key(spec: tuple[Any, ...]) -> Any:
    """The process group an item's inputs are split over; ``None`` (whole on every rank) or
    ``"general"``."""
    groups = {(id(lay.group), lay.world) for lay in spec if isinstance(lay, _Layout)}
    if any(isinstance(lay, _General) for lay in spec) or len(groups) > 1:
        return "general"
    if not groups:
        return None
    return next(iter(groups))


# ---------------------------------------------------------------------------------------- packing


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _pack(parts: list[torch.Tensor], device: torch.device, total: int | None = None) -> torch.Tensor:
    """Concatenate the bytes of ``parts`` (each at an aligned offset) into one uint8 buffer of
    ``total`` bytes (default: just enough); padding bytes are left uninitialized."""
    sizes = [_aligned(t.numel() * t.element_size()) for t in parts]
    n = sum(sizes) if total is None else total
    buf = torch.empty(n, dtype=torch.uint8, device=device)
    off = 0
    for t, size in zip(parts, sizes):
        nb = t.numel() * t.element_size()
        if nb:
            buf[off : off + nb].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        off += size
    return buf


def _unpack(buf: torch.Tensor, off: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    nb = _nbytes(shape, dtype)
    t = buf[off : off + nb].view(dtype).view(shape)
    return t, off + _aligned(nb)


def _assemble(
    local: tuple[torch.Tensor, ...],
    specs: tuple[Any, ...],
    recv: torch.Tensor,
    offsets: list[int],
    me: int,
    world: int,
    *,
    own_in_buffer: bool,
) -> tuple[torch.Tensor, ...]:
    """The full tensors of one item: this rank's shards ``local`` and the other ranks' shards read from
    ``recv`` at ``offsets`` (one read position per source rank, advanced in place). ``own_in_buffer``: the
    buffer also holds this rank's own shards (all-gather), whose bytes are skipped."""
    fulls = []
    for x, lay in zip(local, specs):
        if not isinstance(lay, _Layout):
            fulls.append(x)
            continue
        pieces = []
        for s in range(world):
            if s == me:
                pieces.append(x)
                if own_in_buffer:
                    offsets[s] += _aligned(x.numel() * x.element_size())
            else:
                piece, offsets[s] = _unpack(recv, offsets[s], lay.shard_shape(s), x.dtype)
                pieces.append(piece)
        fulls.append(torch.cat(pieces, dim=lay.dim))
    return tuple(fulls)


# ---------------------------------------------------------------------------------------- owners


#: Cumulative owner cost per process group (identical on every rank: all ranks make the same calls).
_loads: dict[Any, list[float]] = {}


def _cost(spec: tuple[Any, ...]) -> float:
    """Work estimate of one item: ``batch * m * n * min(m, n)`` of its largest sharded input."""
    best = 0.0
    for lay in spec:
        if isinstance(lay, _Layout):
            shape = lay.shape
            c = float(math.prod(shape)) * (min(shape[-2:]) if len(shape) >= 2 else 1)
            best = max(best, c)
    return best


def _owners(key: Any, world: int, specs: list[tuple[Any, ...]]) -> list[int]:
    """Greedy balance: largest items first, each to the least-loaded rank (ties: lowest rank)."""
    loads = _loads.setdefault(key, [0.0] * world)
    costs = [_cost(s) for s in specs]
    owners = [0] * len(specs)
    for i in sorted(range(len(specs)), key=lambda i: -costs[i]):
        r = min(range(world), key=lambda r: loads[r])
        owners[i] = r
        loads[r] += costs[i]
    low = min(loads)
    loads[:] = [v - low for v in loads]
    return owners


# ---------------------------------------------------------------------------------------- modes


def _all_to_all(recv_sizes: list[int], send: torch.Tensor, send_sizes: list[int], group: Any) -> torch.Tensor:
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    return recv


def _owner_mode(
    key: Any, items: list[int], specs: list[tuple[Any, ...]], inputs: list[tuple[torch.Tensor, ...]], fn: FullFn
) -> dict[int, tuple[torch.Tensor, ...]]:
    lay0 = next(lay for lay in specs[items[0]] if isinstance(lay, _Layout))
    group, world, me = lay0.group, lay0.world, lay0.rank
    owners = dict(zip(items, _owners(key, world, [specs[i] for i in items])))

    # --- gather: my slices to each owner; the slices of my items from every rank
    send_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    recv_sizes = [0] * world
    for i in items:
        o = owners[i]
        for j, lay in enumerate(specs[i]):
            if not isinstance(lay, _Layout):
                continue
            x = inputs[i][j]
            if o != me:
                send_parts[o].append(x)
            else:
                for s in range(world):
                    if s != me:
                        recv_sizes[s] += _aligned(_nbytes(lay.shard_shape(s), x.dtype))
    send_sizes = [sum(_aligned(t.numel() * t.element_size()) for t in parts) for parts in send_parts]
    device = inputs[items[0]][0].device
    send = _pack([t for parts in send_parts for t in parts], device)
    recv = _all_to_all(recv_sizes, send, send_sizes, group)
    offsets = [sum(recv_sizes[:s]) for s in range(world)]
    mine = [i for i in items if owners[i] == me]
    full_inputs = [_assemble(inputs[i], specs[i], recv, offsets, me, world, own_in_buffer=False) for i in mine]
    sent, received = sum(send_sizes), sum(recv_sizes)

    # --- compute my share (once in the world per item). A failure (e.g. a factorization meeting non-finite
    # values) must not leave the other ranks waiting in the scatter: it is announced in the size exchange and
    # raised on every rank of the group once the exchange is over.
    failure: Exception | None = None
    try:
        outs = _call(fn, full_inputs, mine) if mine else []
        for y in (y for out in outs for y in out):
            if y.dtype not in _DTYPE_CODE:
                raise TypeError(f"apply_full: fn returned a tensor of unsupported dtype {y.dtype}")
    except Exception as err:  # re-raised below, after the collectives
        failure, outs = err, []

    # --- scatter: for each other rank, a header and the slices of my results it holds
    parts_to: list[list[torch.Tensor]] = [[] for _ in range(world)]
    headers: list[list[int]] = [[] for _ in range(world)]
    results: dict[int, tuple[torch.Tensor, ...]] = {}
    for i, out in zip(mine, outs):
        local_out = []
        for d in range(world):
            if d != me:
                headers[d].append(len(out))
        for k, y in enumerate(out):
            lay = _out_layout(specs[i], k, y)
            code = _DTYPE_CODE[y.dtype]
            shard_lay = lay if isinstance(lay, _Layout) else None
            local_out.append(shard_lay.shard(y, me) if shard_lay is not None else y)
            for d in range(world):
                if d == me:
                    continue
                piece = shard_lay.shard(y, d) if shard_lay is not None else y
                headers[d].extend((code, piece.ndim, *piece.shape))
                parts_to[d].append(piece)
        results[i] = tuple(local_out)
    payload_to: list[torch.Tensor] = []
    for d in range(world):
        if d == me or not headers[d]:
            payload_to.append(torch.empty(0, dtype=torch.uint8, device=device))
            continue
        head = torch.tensor([len(headers[d]), *headers[d]], dtype=torch.int64, device=device)
        payload_to.append(_pack([head, *parts_to[d]], device))
    sizes = torch.tensor([p.numel() for p in payload_to], dtype=torch.int64, device=device)
    if failure is not None:
        code = _FAILED_LINALG if isinstance(failure, torch.linalg.LinAlgError) else _FAILED_OTHER
        sizes = torch.tensor([0 if d == me else code for d in range(world)], dtype=torch.int64, device=device)
    got = torch.empty_like(sizes)
    dist.all_to_all_single(got, sizes, group=group)
    announced = [int(v) for v in got.tolist()]
    back_sizes = [max(0, v) for v in announced]
    sizes = sizes.clamp(min=0)
    back = _all_to_all(back_sizes, torch.cat(payload_to), [p.numel() for p in payload_to], group)
    sent += int(sizes.sum()) + 8 * (world - 1)
    received += sum(back_sizes) + 8 * (world - 1)
    if failure is not None:
        _record("owner", sent, received, 3)
        raise failure
    failed = [s for s, v in enumerate(announced) if v < 0]
    if failed:
        _record("owner", sent, received, 3)
        what = f"apply_full: the group function failed on rank(s) {failed} of the process group (owners of some items)"
        if any(announced[s] == _FAILED_LINALG for s in failed):
            raise torch.linalg.LinAlgError(what + ": a factorization met non-finite values or did not converge")
        raise RuntimeError(what + "; see that rank's error")

    off = 0
    for s in range(world):
        end = off + back_sizes[s]
        if s == me or back_sizes[s] == 0:
            off = end
            continue
        n_head = int(back[off : off + 8].view(torch.int64)[0])
        header: list[int] = back[off : off + 8 * (n_head + 1)].view(torch.int64)[1:].tolist()
        pos = off + _aligned(8 * (n_head + 1))
        h = 0
        for i in (i for i in items if owners[i] == s):
            n_out = header[h]
            h += 1
            got_out = []
            for _ in range(n_out):
                code, ndim = header[h], header[h + 1]
                shape = tuple(header[h + 2 : h + 2 + ndim])
                h += 2 + ndim
                y, pos = _unpack(back, pos, shape, _DTYPES[code])
                got_out.append(y)  # a view of its own bytes only: its _base is a typed view of that segment
            results[i] = tuple(got_out)
        off = end
    _record("owner", sent, received, 3, gathered=len(mine))
    return results


def _gather_mode(
    items: list[int], specs: list[tuple[Any, ...]], inputs: list[tuple[torch.Tensor, ...]], fn: FullFn
) -> dict[int, tuple[torch.Tensor, ...]]:
    lay0 = next(lay for lay in specs[items[0]] if isinstance(lay, _Layout))
    group, world, me = lay0.group, lay0.world, lay0.rank
    sizes = [0] * world
    mine = []
    for i in items:
        for j, lay in enumerate(specs[i]):
            if isinstance(lay, _Layout):
                x = inputs[i][j]
                mine.append(x)
                for s in range(world):
                    sizes[s] += _aligned(_nbytes(lay.shard_shape(s), x.dtype))
    width = max(sizes)
    device = inputs[items[0]][0].device
    send = _pack(mine, device, total=width)
    recv = torch.empty(width * world, dtype=torch.uint8, device=device)
    dist.all_gather_into_tensor(recv, send, group=group)
    offsets = [s * width for s in range(world)]
    full_inputs = [_assemble(inputs[i], specs[i], recv, offsets, me, world, own_in_buffer=True) for i in items]
    outs = _call(fn, full_inputs, items)
    results = {}
    for i, out in zip(items, outs):
        results[i] = tuple(
            lay.shard(y, me) if isinstance(lay := _out_layout(specs[i], k, y), _Layout) else y
            for k, y in enumerate(out)
        )
    _record("gather", width * (world - 1), width * (world - 1), 1, replicated=len(items))
    return results


def _general_mode(
    items: list[int], params: Sequence[Any], inputs: list[tuple[torch.Tensor, ...]], fn: FullFn
) -> dict[int, tuple[torch.Tensor, ...]]:
    """Layouts outside :class:`_Layout`: ``full_tensor()`` of every split input on every rank, and
    the outputs cut back by ``DTensor`` redistribution (Replicate -> the parameter's placements is a
    local slice)."""
    from torch.distributed.tensor import DTensor, Replicate  # loaded: only DTensor layouts come here

    moved = 0
    full_inputs = []
    owners_of: list[tuple[Any, ...]] = []
    for i in items:
        qs = _params_of(params[i], len(inputs[i]))
        owners_of.append(qs)
        fulls = []
        for x, q in zip(inputs[i], qs):
            if not is_dtensor(q):
                fulls.append(x)
                continue
            d = DTensor.from_local(x, q.device_mesh, q.placements, run_check=False, shape=q.shape, stride=q.stride())
            full = d.full_tensor()
            moved += full.numel() * full.element_size() - x.numel() * x.element_size()
            fulls.append(full)
        full_inputs.append(tuple(fulls))
    outs = _call(fn, full_inputs, items)
    results = {}
    for i, qs, out in zip(items, owners_of, outs):
        locs = []
        for k, y in enumerate(out):
            shaped = [q for q in qs if is_dtensor(q) and tuple(q.shape) == tuple(y.shape)]
            if k < len(qs) and is_dtensor(qs[k]) and tuple(qs[k].shape) == tuple(y.shape):
                shaped.insert(0, qs[k])
            if not shaped:
                locs.append(y)
                continue
            q = shaped[0]

            rep = DTensor.from_local(y, q.device_mesh, [Replicate()] * q.device_mesh.ndim, run_check=False)
            locs.append(rep.redistribute(q.device_mesh, q.placements).to_local())
        results[i] = tuple(locs)
    _record("general", moved, moved, sum(is_dtensor(q) for qs in owners_of for q in qs), replicated=len(items))
    return results


def agree(flag: torch.Tensor, params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``flag`` (a 0-d bool tensor, e.g. "the step is finite") and-ed over every rank holding a shard of one of
    ``params``, so that all ranks commit or reject a step together (each rank only sees its shards).

    One ``all_reduce`` per process group the sharded parameters are split over (none without sharding: then
    ``flag`` is returned as is). Every rank must call it with the same parameters.
    """
    groups = _shard_groups(params)
    if not groups:
        return flag
    v = flag.reshape(1).to(torch.int32)
    for g in groups.values():
        dist.all_reduce(v, op=dist.ReduceOp.MIN, group=g)
        n = dist.get_world_size(g)
        _record("agree", 4 * (n - 1), 4 * (n - 1), 1)
    return v[0].to(torch.bool)


def _shard_groups(params: Iterable[torch.Tensor]) -> dict[int, Any]:
    """The process groups (by ``id``) of every mesh dimension over which one of ``params`` is sharded in more than
    one piece (empty without sharding)."""
    groups: dict[int, Any] = {}
    for p in params:
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        for i, pl in enumerate(p.placements):
            if pl.is_shard() and mesh.size(i) > 1:
                g = mesh.get_group(i)
                groups.setdefault(id(g), g)
    return groups


def agree_structure(
    codes: Sequence[tuple[int, ...]], params: Sequence[torch.Tensor], describe: Callable[[int], str]
) -> None:
    """Check that every rank holding a shard of ``params`` steps the same sharded parameters, before any collective
    of the step: a rank whose optimizer lacks a parameter, or has no gradient where the others have one, would
    otherwise pair mismatched shards (a misleading error) or abort the process group.

    ``codes``: per sharded parameter of this rank's optimizer (``params``), in order, a tuple of ints (param group,
    index, global shape, has a gradient) compared across ranks; ``describe(i)`` names parameter ``i`` in an error. One
    ``all_reduce`` of two ``int64`` per process group the parameters are split over; on a mismatch, every rank raises
    the same ``ValueError`` (after one ``all_gather_object`` that finds the first difference).
    """
    groups = _shard_groups(params)
    if not groups:
        return
    flat = [len(codes)] + [v for code in codes for v in (len(code), *code)]
    digest = zlib.crc32(struct.pack(f"<{len(flat)}q", *flat))
    v = torch.tensor([digest, -digest], dtype=torch.int64, device=local(params[0]).device)
    for g in groups.values():
        dist.all_reduce(v, op=dist.ReduceOp.MIN, group=g)
        n = dist.get_world_size(g)
        _record("agree", 16 * (n - 1), 16 * (n - 1), 1)
    if int(v[0]) == -int(v[1]):
        return
    # the ranks differ (all of them saw it): gather every rank's list over every group, then name the first difference
    gathered_all = []
    for g in groups.values():
        gathered: list[Any] = [None] * dist.get_world_size(g)
        dist.all_gather_object(gathered, [(c, describe(i)) for i, c in enumerate(codes)], group=g)
        gathered_all.append((dist.get_process_group_ranks(g), gathered))
    for ranks, gathered in gathered_all:
        seen = [[c for c, _ in lst] for lst in gathered]
        for j in range(1, len(gathered)):
            if seen[j] == seen[0]:
                continue
            k = next((i for i, (a, b) in enumerate(zip(seen[0], seen[j])) if a != b), min(len(seen[0]), len(seen[j])))
            none = "no parameter there (its optimizer holds fewer sharded parameters)"
            first = gathered[0][k][1] if k < len(gathered[0]) else none
            other = gathered[j][k][1] if k < len(gathered[j]) else none
            raise ValueError(
                f"IMuon: the ranks do not step the same sharded parameters: at sharded parameter {k}, rank {ranks[0]} "
                f"has {first} and rank {ranks[j]} has {other}. Under FSDP2 every rank must build the optimizer over "
                "the same parameters, in the same order, and have a gradient for a parameter on every rank or on "
                "none (call backward on every rank; set grads to None on all ranks or on none)"
            )
    raise ValueError("IMuon: the ranks do not step the same sharded parameters")


def _call(fn: FullFn, full_inputs: list[tuple[torch.Tensor, ...]], items: list[int]) -> list[tuple[torch.Tensor, ...]]:
    outs = [tuple(o) for o in fn(full_inputs)]
    if len(outs) != len(items):
        raise ValueError(
            f"apply_full: fn returned {len(outs)} results for {len(items)} inputs; it must return one "
            "tuple per input tuple"
        )
    return outs


# ---------------------------------------------------------------------------------------- entry point


def apply_full(params: Sequence[Any], inputs: Inputs, fn: FullFn, *, owner: bool) -> Outputs:
    """Run ``fn`` on the full tensors of sharded parameters; return each rank's shards of the results.

    Args:
        params: one entry per item of the group: a parameter (every input of the item is shaped and
            split like it), or a tuple with one parameter (or ``None``: the input is whole and equal
            on every rank, and is not sent) per input, e.g. ``(b, a, b, a)`` for a LoRA pair's
            ``(B, A, E_B, E_A)``. A ``DTensor`` parameter gives the layout; anything else means
            "not split".
        inputs: one tuple per item of the rank's LOCAL tensors (``to_local()`` of a ``DTensor``
            parameter's shard, else the whole tensor), shaped like the matching parameter's shard.
        fn: pure function (no collectives, no state) from a list of full-input tuples to a list of
            full-output tuples, one per item, in order; batched inside as it likes. It runs on one
            owner per item (``owner=True``) or on every rank (``owner=False``). Outputs keep their
            dtype.
        owner: ``True``: gather each item to one owner rank, compute once, scatter back (an
            ``all_to_all`` of the inputs, a small one of byte counts, one of the results). ``False``:
            one ``all_gather`` and every rank computes every item (for small inputs such as LoRA
            factors, where the scatter's latency would cost more than the compute).

    Returns:
        One tuple per item: each output of ``fn``, cut to this rank's shard when its shape is the
        full shape of one of the item's parameters (output ``k`` prefers input ``k``'s parameter),
        else whole (the same on every rank).

    For items without ``DTensor`` parameters the result is exactly ``fn(inputs)`` (no copy). Every
    rank of a process group must call ``apply_full`` with the same parameters in the same order.
    If ``fn`` raises on an owner, every rank of the group raises after the exchange (the owner its
    error, the others ``torch.linalg.LinAlgError`` or ``RuntimeError``), so that no rank is left
    waiting in a collective.
    """
    if len(params) != len(inputs):
        raise ValueError(f"apply_full: {len(params)} params but {len(inputs)} input tuples; pass one per item")
    if not any(is_dtensor(p) or (not isinstance(p, torch.Tensor) and any(is_dtensor(q) for q in p)) for p in params):
        return fn(cast("list[tuple[torch.Tensor, ...]]", inputs))  # the very objects, no copy (callers pass lists)
    local_inputs = [tuple(local(x) for x in xs) for xs in inputs]
    specs = _specs(params, local_inputs)
    buckets: dict[Any, list[int]] = {}
    for i, spec in enumerate(specs):
        for j, lay in enumerate(spec):
            if isinstance(lay, _Layout):
                _check_local(local_inputs[i][j], lay, i, j)
        buckets.setdefault(_group_key(spec), []).append(i)
    results: dict[int, tuple[torch.Tensor, ...]] = {}
    for key, items in buckets.items():
        if key is None:
            results.update(zip(items, _call(fn, [local_inputs[i] for i in items], items)))
        elif key == "general":
            results.update(_general_mode(items, params, local_inputs, fn))
        elif owner:
            results.update(_owner_mode(key, items, specs, local_inputs, fn))
        else:
            results.update(_gather_mode(items, specs, local_inputs, fn))
    return [results[i] for i in range(len(params))]


def _params_of(p: Any, n: int) -> tuple[Any, ...]:
    return (p,) * n if isinstance(p, torch.Tensor) else tuple(p)


# ---------------------------------------------------------------------------------------- low-rank sketch mode


def row_shards(params: Sequence[torch.Tensor]) -> _Layout | None:
    """The common layout of ``params`` if every one is a 2-D ``DTensor`` of one shape split by rows (``Shard(0)``)
    over the same process group, else ``None``."""
    lays = [_layout(p) for p in params]
    if not lays or not all(isinstance(lay, _Layout) and lay.dim == 0 and len(lay.shape) == 2 for lay in lays):
        return None
    first = lays[0]
    if any(lay.group is not first.group or lay.shape != first.shape for lay in lays):  # type: ignore[union-attr]
        return None
    return first  # type: ignore[return-value]


def _sketch_all_reduce(t: torch.Tensor, group: Any, op: Any = None) -> torch.Tensor:
    """``all_reduce`` (sum, or ``op``) of ``t`` in place over ``group``, recorded as ``sketch`` traffic (each rank
    sends its ``t`` to the ``world - 1`` others, the convention of :func:`agree`)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    n = dist.get_world_size(group)
    size = t.numel() * t.element_size() * (n - 1)
    _record("sketch", size, size, 1)
    return t


def _tsqr(y: torch.Tensor, group: Any, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a row-sharded stack ``Y`` (..., M, l), each rank holding a block of rows ``y`` (..., m_r, l), by
    TSQR: a local QR, one ``all_gather`` of the l x l triangles, the QR of their stack (on every rank alike).
    Returns the rank's rows of ``Q`` (..., m_r, l) and ``R`` (..., l, l) (replicated). ``Q`` spans the column
    space of ``Y`` whatever the rows per rank (a rank with fewer than l rows, or none, pads with zeros)."""
    lead, mr, ell = y.shape[:-2], y.shape[-2], y.shape[-1]
    qa, ra = torch.linalg.qr(y)  # (..., m_r, c), (..., c, l), c = min(m_r, l)
    c = ra.shape[-2]
    if c < ell:
        ra = torch.cat([ra, ra.new_zeros(*lead, ell - c, ell)], dim=-2)
        qa = torch.cat([qa, qa.new_zeros(*lead, mr, ell - c)], dim=-1)
    ra = ra.contiguous()
    gathered = ra.new_empty(world * ra.numel())
    dist.all_gather_into_tensor(gathered, ra.reshape(-1), group=group)
    size = ra.numel() * ra.element_size() * (world - 1)
    _record("sketch", size, size, 1)
    stacked = gathered.reshape(world, *ra.shape).movedim(0, -3).reshape(*lead, world * ell, ell)
    q2, r = torch.linalg.qr(stacked)  # (..., world * l, l), (..., l, l)
    return qa @ q2[..., rank * ell : (rank + 1) * ell, :], r


def sketch_kyfan_lmo(
    h: torch.Tensor,
    rows: int,
    start: int,
    k: int,
    oversample: int,
    power_iters: int,
    *,
    group: Any,
    rank: int,
    world: int,
    mm_dtype: torch.dtype | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """The randomized Ky Fan LMO (:func:`imuon_manopt.lmo.lmo` with ``method="randomized"``) of matrices whose rows
    are split over ``group``, communicating only sketches, never the matrices.

    ``h`` (B, m_r, n) holds rows ``start .. start + m_r`` of ``B`` matrices ``H`` (``rows`` x n) on this rank (rank
    ``rank`` of ``world``). The result is this rank's rows of ``Z = Q U_k V_k^T`` (Q a range finder with ``l = k +
    oversample`` columns and ``power_iters`` power iterations on the short side of ``H``, ``Q^T H = U S V^T``
    truncated to ``k``), the single-process solver's output: the same Gaussian test matrix
    (:func:`imuon_manopt.lmo.gaussian_sketch`), the same subspaces, equal up to rounding (the bases of ``Q`` differ,
    ``Z`` does not depend on them).

    Rows sharded, so ``H Omega`` is row-local and ``H^T W`` is a sum over ranks:

    - ``rows <= n`` (the short side is split): ``Y = H Omega`` local, ``Q`` by TSQR; each power iteration reduces
      ``H^T Q`` (n x l) and takes a TSQR; ``B = Q^T H`` (l x n) is reduced and its SVD taken on every rank;
    - ``rows > n`` (the long side is split): ``Y = H^T Omega_rows`` (n x l) is reduced, its QR taken on every
      rank; each power iteration takes a TSQR of ``H Q`` and reduces ``H^T W``; ``B^T = H Q`` (rows local) goes
      through TSQR, ``B^T = Q_c R`` and the SVD of the l x l ``R``.

    Traffic per call: ``power_iters + 1`` reductions of an ``n x l`` block (either orientation), the l x l
    triangles of the TSQRs and two numbers per matrix (the scale and a finiteness flag); the full-matrix mode moves
    every ``H`` to its owner and the update back. A non-finite entry on any rank gives NaN rows on every rank (the
    optimizer's ``nonfinite`` policy then applies), as the core's solver does. Requires ``k + oversample <
    min(rows, n)`` (else the core takes its exact path, which needs the whole matrix).
    """
    mr, n = h.shape[-2:]
    short = min(rows, n)
    ell = k + oversample
    if k < 1 or ell >= short:
        raise ValueError(f"sketch_kyfan_lmo: needs 1 <= k and k + oversample < min(m, n), got k={k}, l={ell}, {short}")
    dtype = h.dtype
    mm = dtype if mm_dtype is None else mm_dtype
    # per matrix: the max |entry| over all rows (the scale) and whether any rank holds a non-finite entry
    amax = h.abs().amax(dim=(-2, -1)) if mr else h.new_zeros(h.shape[:-2])
    finite = torch.isfinite(amax)
    both = torch.stack([torch.where(finite, amax, torch.zeros_like(amax)), (~finite).to(dtype)], dim=-1)
    both = _sketch_all_reduce(both.contiguous(), group, dist.ReduceOp.MAX)
    if bool(both[..., 1].any()):  # as the core: a non-finite matrix gives NaN, never a solver error (on every rank)
        return torch.full_like(h, math.nan)
    scale = both[..., 0, None, None].clamp_min(torch.finfo(dtype).tiny)
    y = (h / scale).to(mm)
    kk = min(k, ell)
    tol_rel = torch.finfo(dtype).eps * max(rows, n)
    tol_rel = tol_rel if eps is None else max(tol_rel, float(eps))
    if rows <= n:
        omega = gaussian_sketch(n, ell, dtype=dtype, device=h.device).to(mm)
        q, _ = _tsqr((y @ omega).to(dtype), group, rank, world)
        for _ in range(power_iters):
            w = torch.linalg.qr(_sketch_all_reduce((y.mT @ q.to(mm)).to(dtype).contiguous(), group)).Q
            q, _ = _tsqr((y @ w.to(mm)).to(dtype), group, rank, world)
        b = _sketch_all_reduce((q.mT.to(mm) @ y).to(dtype).contiguous(), group)  # (B, l, n)
        u, sv, vh = torch.linalg.svd(b, full_matrices=False)
        keep = sv[..., :kk] > tol_rel * sv[..., :1]
        return (q @ (u[..., :kk] * keep.unsqueeze(-2).to(u.dtype))) @ vh[..., :kk, :]
    omega = gaussian_sketch(rows, ell, dtype=dtype, device=h.device)[start : start + mr].to(mm)
    q = torch.linalg.qr(_sketch_all_reduce((y.mT @ omega).to(dtype).contiguous(), group)).Q  # (B, n, l)
    for _ in range(power_iters):
        w, _ = _tsqr((y @ q.to(mm)).to(dtype), group, rank, world)  # rows of H Q
        q = torch.linalg.qr(_sketch_all_reduce((y.mT @ w.to(mm)).to(dtype).contiguous(), group)).Q
    qc, rc = _tsqr((y @ q.to(mm)).to(dtype), group, rank, world)  # B^T = H Q = Q_c R
    u2, sv, v2h = torch.linalg.svd(rc)  # B = V' S (Q_c U')^T: left vectors V', right Q_c U'
    keep = sv[..., :kk] > tol_rel * sv[..., :1]
    return (qc @ (u2[..., :kk] * keep.unsqueeze(-2).to(u2.dtype))) @ (v2h[..., :kk, :] @ q.mT)
