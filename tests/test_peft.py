"""End to end with Hugging Face PEFT and transformers: IMuon on the LoRA adapters of a small GPT-2.

The model is built from a ``GPT2Config`` (no download), with dropouts 0; GPT-2's ``Conv1D`` layers store the base
weight as ``(in, out)`` (PEFT's ``fan_in_fan_out=True``). Training data: the bytes of a stdlib source file (vocabulary
256). The module is skipped when the ``peft`` extra is not installed.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

# Nothing here may reach the model hub (models come from configs); set before huggingface_hub reads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from imuon_manopt.optim import (  # noqa: E402
    IMuon,
    full_rank_lora_model_init_,
    lora_pairs,
    prepare_lora_,
)

R = 4
TARGETS = ["c_attn", "c_proj", "c_fc"]
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _config() -> GPT2Config:
    return GPT2Config(
        vocab_size=256,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        initializer_range=0.1,  # larger than GPT-2's 0.02: the random base's layers carry enough signal for LoRA
    )


def _base(dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(_config()).to(dtype).eval()


def _peft(base: GPT2LMHeadModel, r: int = R) -> PeftModel:
    """PEFT's default LoRA (B = 0) on every attention and MLP projection; alpha = 2 r (scaling 2)."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True)
    return get_peft_model(base, cfg).eval()


def _tokens(batch: int = 4, length: int = 32) -> torch.Tensor:
    """``batch`` windows of ``length`` bytes of ``json/__init__.py`` (real text, vocabulary 256)."""
    with open(json.__file__, "rb") as handle:
        data = torch.tensor(list(handle.read()), dtype=torch.long)
    starts = torch.linspace(0, len(data) - length - 1, batch).long()
    return torch.stack([data[s : s + length] for s in starts])


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    """Next-byte cross entropy in the model's dtype (transformers' own loss upcasts float64 logits only to float32)."""
    logits = model(input_ids=x).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def _peft_layers(model) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def _train(model, opt, x: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_pairs_finds_every_peft_adapter_in_its_layout():
    model = _peft(_base(torch.float64))
    layers = _peft_layers(model)
    assert len(layers) == 4 * 2  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    pairs = lora_pairs(model)
    assert len(pairs) == len(layers)
    for (b, a), layer in zip(pairs, layers):
        assert b is layer.lora_B["default"].weight and a is layer.lora_A["default"].weight
    # the layout, checked on the layer's own forward: out - base(x) = scaling * x A^T B^T, B (out, r), A (r, in)
    torch.manual_seed(1)
    for (b, a), layer in zip(pairs, layers):
        with torch.no_grad():
            b.copy_(torch.randn_like(b))
        w = layer.base_layer.weight  # Conv1D: (in, out)
        assert b.shape == (w.shape[1], R) and a.shape == (R, w.shape[0])
        x = torch.randn(3, w.shape[0], dtype=torch.float64)
        with torch.no_grad():
            delta = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta, layer.scaling["default"] * x @ a.T @ b.T)


def test_peft_zero_start_raises_and_names_the_one_call_fix():
    """PEFT's B = 0 is not a rank-r point: the first step raises a ValueError naming the helpers, writes nothing."""
    model = _peft(_base())
    pairs = lora_pairs(model)
    assert all(bool((b == 0).all()) for b, _ in pairs)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = IMuon(params, lr=0.02, pairs=pairs)
    _loss(model, _tokens()).backward()
    with pytest.raises(ValueError, match=r"pairs\[0\].*rank-deficient.*full_rank_lora_model_init_\(model\)"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    assert not any(opt.state[p] for p in params)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_init_keeps_the_gpt2_function(dtype):
    """Conv1D stores W as (in, out): the absorbed product must be transposed, or c_proj (square) and the others break.

    ``init_scale=0.5`` makes the absorbed ``scaling * B0 A0`` large, so a wrong layout could not hide in rounding.
    """
    base = _base(dtype)
    model = _peft(base)
    x = _tokens()
    before = _logits(model, x)
    w_before = [layer.base_layer.weight.detach().clone() for layer in _peft_layers(model)]
    visited = full_rank_lora_model_init_(model, init_scale=0.5, generator=torch.Generator().manual_seed(3))
    assert visited == len(w_before) == 8
    after = _logits(model, x)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(after, before, atol=tol * before.abs().max().item(), rtol=0)
    for layer, w0 in zip(_peft_layers(model), w_before):
        assert (layer.base_layer.weight.detach() - w0).abs().max() > 0.05  # the base did absorb B0 A0
    for b, a in lora_pairs(model):
        assert b.dtype == a.dtype == dtype
        for f in (b, a):
            s = torch.linalg.svdvals(f.detach().double())
            assert len(s) == R and s[-1] > 1e-3 * s[0]  # full rank r, well conditioned
    # a second call keeps full-rank factors: nothing to absorb, nothing changes
    snapshot = [t.detach().clone() for t in model.parameters()]
    full_rank_lora_model_init_(model)
    assert all(torch.equal(t.detach(), s) for t, s in zip(model.parameters(), snapshot))


def test_prepare_lora_one_call_then_imuon_trains():
    model = _peft(_base())
    x = _tokens()
    before = _logits(model, x)
    params, pairs = prepare_lora_(model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(model, x), before, atol=1e-5, rtol=0)
    assert len(pairs) == len(_peft_layers(model))
    assert [id(p) for p in params] == [id(p) for p in model.parameters() if p.requires_grad]
    assert {id(t) for pair in pairs for t in pair} == {id(p) for p in params}  # LoRA only: all params are factors
    base = [p.detach().clone() for p in model.parameters() if not p.requires_grad]
    losses = _train(model, IMuon(params, lr=0.01, pairs=pairs), x, 30)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.85 * losses[0], losses  # 5.56 -> 4.29 when written
    assert all(torch.equal(p.detach(), q) for p, q in zip((p for p in model.parameters() if not p.requires_grad), base))
    for b, a in pairs:  # still rank r
        assert torch.linalg.matrix_rank(b.detach()) == R and torch.linalg.matrix_rank(a.detach()) == R


def test_prepare_lora_errors():
    with pytest.raises(ValueError, match="no trainable LoRA adapter.*get_peft_model"):
        prepare_lora_(_base())
    model = _peft(_base())
    layer = _peft_layers(model)[0]
    layer.lora_B["default"].weight.requires_grad_(False)  # one factor frozen: A alone is not a pair
    with pytest.raises(ValueError, match=r"c_attn\.lora_A\.default\.weight.*outside every \(B, A\) pair"):
        prepare_lora_(model)


def _gauge_run(make_opt, gauge: torch.Tensor | None, steps: int = 30) -> list[float]:
    """Loss trajectory (float64) from the same full-rank start, every adapter rescaled to (B M, M^-1 A) first."""
    model = _peft(_base(torch.float64))
    full_rank_lora_model_init_(model, init_scale=0.1, generator=torch.Generator().manual_seed(1))
    pairs = lora_pairs(model)
    if gauge is not None:
        with torch.no_grad():
            for b, a in pairs:
                b.copy_(b @ gauge)
                a.copy_(torch.linalg.solve(gauge, a))
    params = [p for p in model.parameters() if p.requires_grad]
    return _train(model, make_opt(params, pairs), _tokens(), steps)


def test_gauge_invariance_end_to_end():
    """(B M, M^-1 A) is the same model; iMuon's loss trajectory does not see M, AdamW's does.

    ``M = Q diag(geomspace(1, 100, r))`` (condition number 100). With exact polar factors the two float64 runs agree to
    rounding (2e-16 relative over 30 steps when written; 1e-9 leaves room for other BLAS builds); AdamW's differ by
    percents.
    """
    torch.manual_seed(2)
    q = torch.linalg.qr(torch.randn(R, R, dtype=torch.float64))[0]
    gauge = q @ torch.diag(torch.logspace(0, 2, R, dtype=torch.float64))

    def imuon(params, pairs):
        return IMuon(params, lr=0.01, polar="svd", pairs=pairs)

    def adamw(params, pairs):
        return torch.optim.AdamW(params, lr=0.003)

    ref, moved = _gauge_run(imuon, None), _gauge_run(imuon, gauge)
    assert ref[-1] < 0.85 * ref[0]  # it trains
    assert abs(moved[0] - ref[0]) <= 1e-12 * ref[0]  # the same model at the start
    imuon_gap = max(abs(u - v) / abs(u) for u, v in zip(ref, moved))
    assert imuon_gap <= 1e-9, imuon_gap

    ref, moved = _gauge_run(adamw, None, steps=10), _gauge_run(adamw, gauge, steps=10)  # apart within 10 steps
    adamw_gap = max(abs(u - v) / abs(u) for u, v in zip(ref, moved))
    assert adamw_gap > 1e-3 and adamw_gap > 1e5 * max(imuon_gap, 1e-15), (adamw_gap, imuon_gap)


def test_save_and_reload_the_trained_adapter(tmp_path):
    """The full-rank start moved ``scaling * B0 A0`` into the frozen base, which ``save_pretrained`` does not store.

    A plain save loaded onto the original base misses that offset; PEFT's conversion against the saved start (the
    PiSSA / OLoRA route) writes a rank-2r adapter that reproduces the trained model on the original base, and so does
    the merged model.
    """
    x = _tokens()
    original = _base(torch.float64)
    model = _peft(copy.deepcopy(original))
    params, pairs = prepare_lora_(model, generator=torch.Generator().manual_seed(4))
    model.save_pretrained(tmp_path / "init")
    _train(model, IMuon(params, lr=0.01, polar="svd", pairs=pairs), x, 10)
    trained = _logits(model, x)
    scale = trained.abs().max().item()

    model.save_pretrained(tmp_path / "plain")
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "plain").eval()
    assert (_logits(plain, x) - trained).abs().max() > 1e-7 * scale  # the pitfall: the base offset is lost

    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    with open(tmp_path / "lora" / "adapter_config.json") as handle:
        saved = json.load(handle)
    assert saved["r"] == 2 * R and saved["lora_alpha"] == 2 * 2 * R  # rank 2r, same scaling
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(loaded, x), trained, atol=1e-12 * scale, rtol=0)
    for (b, a), (b2, a2) in zip(pairs, lora_pairs(loaded, trainable_only=False)):  # ([B, -B0], [A; A0])
        assert torch.equal(b2[:, :R], b.detach()) and torch.equal(a2[:R], a.detach())

    merged_dir = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged_dir)
    merged = GPT2LMHeadModel.from_pretrained(merged_dir, dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(merged, x), trained, atol=1e-12 * scale, rtol=0)


def _trainer(model, params, pairs, out, max_steps: int, total_steps: int, save_steps: int | None = None):
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    opt = IMuon(params, lr=0.01, pairs=pairs)
    scheduler = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=total_steps)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no" if save_steps is None else "steps",
        save_steps=save_steps or 500,
        disable_tqdm=True,
        log_level="error",
        dataloader_num_workers=0,
        seed=0,
    )
    dataset = [{"input_ids": w, "labels": w} for w in _tokens(batch=16)]
    return Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, scheduler)), opt


def test_transformers_trainer_with_imuon(tmp_path):
    """``Trainer(model, args, optimizers=(IMuon(...), scheduler))``: the pairs train, the base stays, the schedule
    drives IMuon's lr."""
    windows = _tokens(batch=16)
    model = _peft(_base())
    params, pairs = prepare_lora_(model, generator=torch.Generator().manual_seed(5))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        loss_before = _loss(model, windows).item()

    steps = 12
    trainer, opt = _trainer(model, params, pairs, tmp_path, steps, steps)
    result = trainer.train()

    assert result.global_step == steps
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == steps and all(map(torch.isfinite, map(torch.tensor, logged)))
    model.eval()
    with torch.no_grad():
        loss_after = _loss(model, windows).item()
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)
    for p, p0 in zip(params, start):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), p0)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule drove IMuon's lr
    for b, a in pairs:
        assert torch.linalg.matrix_rank(b.detach()) == R and torch.linalg.matrix_rank(a.detach()) == R


def test_trainer_checkpoint_resume_is_exact(tmp_path):
    """Stopped at step 6 with a checkpoint (adapter, IMuon's state_dict, scheduler), resumed to 12: the same factors
    as 12 steps at once. The checkpoint holds only the adapter, so the resumed model rebuilds the same full-rank start
    (same generator seed) before loading it."""
    steps, seed = 12, 6

    def fresh():
        model = _peft(_base())
        return (model, *prepare_lora_(model, generator=torch.Generator().manual_seed(seed)))

    model, params, pairs = fresh()
    _trainer(model, params, pairs, tmp_path / "full", steps, steps)[0].train()
    model, half, pairs = fresh()
    _trainer(model, half, pairs, tmp_path / "stopped", 6, steps, save_steps=6)[0].train()
    model, resumed, pairs = fresh()
    trainer, opt = _trainer(model, resumed, pairs, tmp_path / "resumed", steps, steps)
    trainer.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-6"))
    assert max((p - q).abs().max().item() for p, q in zip(params, half)) > 1e-3  # 6 steps are not 12
    for p, q in zip(params, resumed):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=0)


def test_readme_peft_example_runs(tmp_path, monkeypatch):
    """The README's PEFT block (fenced ``py``, so the core README test does not need the extra) runs as written."""
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("#### With PEFT and transformers") :]
    code = re.search(r"```py\n(.*?)```", section, flags=re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_peft_block"}
    exec(compile(code, "README.md[PEFT block]", "exec"), namespace)  # noqa: S102
    with open(tmp_path / "lora-out" / "adapter_config.json") as handle:
        assert json.load(handle)["r"] == 2 * 8
    assert all(torch.isfinite(p).all() for p in namespace["params"])


def test_full_rank_init_leaves_frozen_adapters_alone():
    """A second, inactive adapter is frozen: only the trained one is started, and the active function is unchanged."""
    model = _peft(_base(torch.float64))
    cfg = LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=TARGETS, fan_in_fan_out=True)
    model.add_adapter("other", cfg)
    layer = _peft_layers(model)[0]
    assert not layer.lora_B["other"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    x = _tokens()
    before = _logits(model, x)
    params, pairs = prepare_lora_(model)
    torch.testing.assert_close(_logits(model, x), before, atol=1e-12 * before.abs().max().item(), rtol=0)
    assert len(pairs) == 8 and all(b.shape[1] == R for b, _ in pairs)
    assert all(bool((m.lora_B["other"].weight == 0).all()) for m in _peft_layers(model))
    assert full_rank_lora_model_init_(model, trainable_only=False) == 16  # on request, the frozen ones too
    assert not any(bool((m.lora_B["other"].weight == 0).all()) for m in _peft_layers(model))


def test_embedding_adapter_is_a_pair_too(tmp_path):
    """PEFT's embedding LoRA (here on GPT-2's position table ``wpe``): ``W + scaling * (B A)^T`` with ``B =
    lora_embedding_B`` (dim, r) and ``A = lora_embedding_A`` (r, num_embeddings), started with ``A = 0``."""
    x = _tokens()
    original = _base(torch.float64)
    cfg = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=[*TARGETS, "wpe"], fan_in_fan_out=True)
    model = get_peft_model(copy.deepcopy(original), cfg).eval()
    emb = model.base_model.model.transformer.wpe
    b, a = emb.lora_embedding_B["default"], emb.lora_embedding_A["default"]
    assert bool((a == 0).all())
    pairs = lora_pairs(model)
    assert len(pairs) == 9 and any(p[0] is b and p[1] is a for p in pairs)

    before = _logits(model, x)
    params, pairs = prepare_lora_(model, init_scale=0.5, generator=torch.Generator().manual_seed(7))
    scale = before.abs().max().item()
    torch.testing.assert_close(_logits(model, x), before, atol=1e-12 * scale, rtol=0)
    assert torch.linalg.matrix_rank(a.detach()) == R
    positions = torch.arange(32)
    with torch.no_grad():  # the layout, on the layer's own forward
        delta = emb(positions) - emb.base_layer(positions)
    torch.testing.assert_close(delta, emb.scaling["default"] * (b @ a).T[positions])

    losses = _train(model, IMuon(params, lr=0.01, polar="svd", pairs=pairs), x, 10)
    assert losses[-1] < losses[0] and not torch.equal(a.detach(), a.detach().new_zeros(a.shape))
    trained = _logits(model, x)
    # PEFT 0.21's conversion (path_initial_model_for_weight_conversion) handles only lora_A/lora_B names, so a model
    # with embedding adapters is saved merged
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(merged, x), trained, atol=1e-12 * scale, rtol=0)
