"""Implicit decoder: shapes, fast path == plain path, chunking, UGS per image, parameter counts, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imedsam.decoders.coords import grid_coords, sample_features
from imedsam.decoders.grid_rows import GridFirstLayer
from imedsam.decoders.implicit import ImplicitDecoder, ImplicitDecoderConfig, ImplicitOutput, sample_training_points
from imedsam.decoders.implicit_fast import _FastGeometry, _folded_layers
from imedsam.sam.dense import linear as _linear
from imedsam.decoders.ugs import mc_variance, select_topk
from imedsam.errors import ImedsamError
from pydantic import ValidationError

TINY = dict(coarse_hidden=(24, 16), coarse_feature_dim=6, fine_hidden=(16, 12, 8))
DIMS = dict(feature_dim=8, prompt_dim=12)


def make(mode: str = "paper", **overrides) -> ImplicitDecoder:
    """A small decoder in eval mode with non-trivial BatchNorm statistics (so folding is exercised)."""
    torch.manual_seed(0)
    cfg = ImplicitDecoderConfig(**{**TINY, **overrides})
    model = ImplicitDecoder(cfg, mode=mode, **DIMS)  # type: ignore[arg-type]
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.normal_(0, 0.3)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.3)
    return model.eval()


def inputs(b: int = 2, pe_batch: int = 1, cf: int = 8, cp: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, cf, 10, 12, generator=g), torch.randn(pe_batch, cp, 3, 4, generator=g)


def assert_same(a: ImplicitOutput, b: ImplicitOutput, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a.coarse_logits, b.coarse_logits, atol=atol, rtol=1e-5)
    torch.testing.assert_close(a.fine_logits, b.fine_logits, atol=atol, rtol=1e-5)
    if a.uncertainty is None:
        assert b.uncertainty is None and a.selected is None and b.selected is None
    else:
        torch.testing.assert_close(a.uncertainty, b.uncertainty, atol=1e-6, rtol=1e-5)
        assert torch.equal(a.selected, b.selected)


# ---------------------------------------------------------------- parameter counts


def test_reference_parameter_counts_exact():
    model = ImplicitDecoder(ImplicitDecoderConfig(), mode="reference")
    groups = model.parameter_groups()
    assert groups["coarse_trunk"] == 888_320
    assert groups["fine_trunk"] == 222_464
    assert groups["coarse_head"] == 131_841
    assert groups["fine_head"] == 33_281
    # + FA 82,992 + LoRA 156,672 + prompt encoder 6,220 + output_upscaling 73,952 = 1,595,742 (systems.md A.5)
    assert groups["total"] + 82_992 + 156_672 + 6_220 + 73_952 == 1_595_742
    assert model.in_dim == 351 and model.fine_in_dim == 607
    multi = ImplicitDecoder(ImplicitDecoderConfig(num_classes=13), mode="reference").parameter_groups()
    assert multi["total"] + 319_836 == 3_577_206  # BCV with 13 heads (A.5)


def test_config_defaults_follow_mode():
    paper = ImplicitDecoder(ImplicitDecoderConfig())
    ref = ImplicitDecoder(ImplicitDecoderConfig(), mode="reference")
    assert (paper.encoding_name, paper.mc_samples) == ("paper", 8)
    assert (ref.encoding_name, ref.mc_samples) == ("reference", 2)
    assert paper.in_dim == 32 + 256 + 42
    with pytest.raises(ImedsamError):
        ImplicitDecoder(ImplicitDecoderConfig(), mode="fancy")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ImplicitDecoderConfig(dropout=1.0)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(17, 23), (1, 1), (5, 3)])
def test_grid_shapes(size):
    model = make()
    feats, pe = inputs()
    out = model(feats, pe, size=size)
    for t in (out.coarse_logits, out.fine_logits, out.uncertainty):
        assert t.shape == (2, 1, *size) and t.dtype == torch.float32
    assert out.selected.shape == (2, 1, *size) and out.selected.dtype == torch.bool
    k = int(size[0] * size[1] * 0.125)
    assert out.selected.reshape(2, -1).sum(1).tolist() == [k, k]  # 0 refined points for a 1x1 grid


def test_large_grid_2048_tiny_config():
    model = make(coarse_hidden=(8, 8), coarse_feature_dim=4, fine_hidden=(8, 8, 4), chunk_size=1 << 20)
    feats, pe = inputs(b=1)
    out = model(feats, pe, size=(2048, 2048))
    assert out.fine_logits.shape == (1, 1, 2048, 2048)
    assert int(out.selected.sum()) == 2048 * 2048 // 8
    assert torch.isfinite(out.fine_logits).all()


def test_multiclass_shapes_and_per_class_selection():
    model = make(num_classes=3)
    feats, pe = inputs()
    out = model(feats, pe, size=(9, 8))
    assert out.fine_logits.shape == (2, 3, 9, 8)
    assert out.selected.reshape(2, 3, -1).sum(-1).eq(9).all()
    assert_same(out, model(feats, pe, size=(9, 8), fast=False))


# ---------------------------------------------------------------- fast path == plain path


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("pe_batch", [1, 2])
@pytest.mark.parametrize("row_gemm", [True, False])
def test_fast_path_equals_plain_path_grid(mode, pe_batch, row_gemm):
    model = make(mode, row_gemm=row_gemm)
    feats, pe = inputs(pe_batch=pe_batch)
    assert_same(model(feats, pe, size=(17, 23)), model(feats, pe, size=(17, 23), fast=False))


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_fast_path_equals_plain_path_coords(mode):
    model = make(mode)
    feats, pe = inputs()
    pts = torch.rand(2, 150, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert_same(model(feats, pe, coords=pts), model(feats, pe, coords=pts, fast=False))


@pytest.mark.parametrize("row_gemm", [True, False])
def test_fast_path_corner_aligned_reference_encoding(row_gemm):
    model = make("reference", corner_aligned_encoding=True, row_gemm=row_gemm)
    feats, pe = inputs()
    assert_same(model(feats, pe, size=(11, 7)), model(feats, pe, size=(11, 7), fast=False))


@pytest.mark.parametrize("grid", [True, False])
def test_projected_first_layer_equals_naive_concat(grid):
    """Interpolated W1_PE PE (projected at low resolution) + W1_U U(p) + encoding == W1 [U(p) || PE(p) || gamma(p)]."""
    model = make()
    feats, pe = inputs(b=1)
    size = (13, 19)
    idx = torch.arange(size[0] * size[1])
    pts = grid_coords(*size)
    z = torch.cat((sample_features(feats, pts[None])[0], sample_features(pe, pts[None])[0], model.encoding(pts)), 1)
    layers = _folded_layers(model.coarse_trunk)
    w1, b1, _ = layers[0]
    naive = z @ w1.t() + b1
    cf, cp = model.feature_dim, model.prompt_dim
    tabs = model._separable_tables(*size, w1[:, cf + cp :], b1, feats.device) if grid else None
    layer = model._first_layer(pe[0], w1[:, :cf], w1[:, cf : cf + cp], w1[:, cf + cp :], b1, tabs)
    u_flat = feats[0].reshape(cf, -1).t()
    geo = _FastGeometry(size if grid else None, tuple(feats.shape[-2:]), tuple(pe.shape[-2:]),
                        pe.shape[-2] * pe.shape[-1], grid)
    fast = model._first_layer_fast(layer, u_flat, pts, idx, geo)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)


def test_mc_variance_is_the_population_variance_and_exactly_zero_when_passes_agree():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, 8, generator=g) * 4
    torch.testing.assert_close(mc_variance(logits), torch.sigmoid(logits).var(-1, unbiased=False),
                               atol=1e-6, rtol=0)
    same = torch.full((5, 1, 8), 0.3)  # e.g. dropout p = 0: every pass gives the same logit
    assert torch.equal(mc_variance(same), torch.zeros(5, 1))
    assert (mc_variance(logits) >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [True, False])
def test_fused_linear_equals_addmm(dtype, relu):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(33, 20, generator=g), torch.randn(7, 20, generator=g), torch.randn(7, generator=g)
    out = _linear(x.to(dtype), w.to(dtype), b.to(dtype), relu)  # weights in x's dtype, as the decoder casts them
    expected = torch.addmm(b.to(dtype), x.to(dtype), w.to(dtype).t())
    expected = expected.relu() if relu else expected
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def test_batchnorm_folding_matches_modules():
    model = make()
    x = torch.randn(50, model.in_dim)
    y = x
    for w, b, relu in _folded_layers(model.coarse_trunk):
        y = y @ w.t() + b
        y = y.relu() if relu else y
    torch.testing.assert_close(y, model.coarse_trunk(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- chunking and coordinates


@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("row_gemm", [True, False])
def test_chunked_equals_unchunked(mode, chunk, row_gemm):
    feats, pe = inputs()
    # one chunk: trunk cached for pass 2; many chunks (row blocks of 1 or 2 rows with row_gemm): recomputed
    whole = make(mode, chunk_size=10_000, row_gemm=row_gemm)(feats, pe, size=(17, 23))
    chunked = make(mode, chunk_size=chunk, row_gemm=row_gemm)(feats, pe, size=(17, 23))
    assert_same(whole, chunked, atol=1e-6)


def test_coords_at_pixel_centres_equal_grid():
    model = make()
    feats, pe = inputs()
    size = (17, 23)
    grid = model(feats, pe, size=size)
    pts = grid_coords(*size).unsqueeze(0).expand(2, -1, -1)
    pointwise = model(feats, pe, coords=pts)
    flat = ImplicitOutput(*(t.reshape(2, 1, -1) for t in (grid.coarse_logits, grid.fine_logits, grid.uncertainty,
                                                          grid.selected)))
    assert pointwise.fine_logits.shape == (2, 1, 17 * 23)
    assert_same(flat, pointwise)


# ---------------------------------------------------------------- uncertainty and selection


def test_uncertainty_nonzero_in_eval_and_seeded():
    model = make()
    feats, pe = inputs()
    a = model(feats, pe, size=(12, 12), seed=5)
    assert (a.uncertainty > 0).float().mean() > 0.9
    b = model(feats, pe, size=(12, 12), seed=5)
    assert torch.equal(a.uncertainty, b.uncertainty) and torch.equal(a.fine_logits, b.fine_logits)
    c = model(feats, pe, size=(12, 12), seed=6)
    assert not torch.equal(a.uncertainty, c.uncertainty)
    # the deterministic coarse pass does not depend on the MC seed
    assert torch.equal(a.coarse_logits, c.coarse_logits)
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(model(feats, pe, size=(12, 12), generator=gen).uncertainty, a.uncertainty)
    # default seed (config.mc_seed) is reproducible too
    assert torch.equal(model(feats, pe, size=(12, 12)).selected, model(feats, pe, size=(12, 12)).selected)


def test_zero_variance_selects_nothing():
    model = make(dropout=0.0)
    feats, pe = inputs()
    out = model(feats, pe, size=(9, 9))
    assert torch.equal(out.uncertainty, torch.zeros_like(out.uncertainty))
    assert not out.selected.any()
    assert torch.equal(out.fine_logits, out.coarse_logits)


@pytest.mark.parametrize("overrides", [dict(mc_samples=1), dict(topk_ratio=0.0)])
def test_refinement_disabled(overrides):
    model = make(**overrides)
    assert not model.refinement_enabled
    feats, pe = inputs()
    for fast in (True, False):
        out = model(feats, pe, size=(9, 9), fast=fast)
        assert out.uncertainty is None and out.selected is None
        assert torch.equal(out.fine_logits, out.coarse_logits)


def test_reference_eval_reproduces_zero_uncertainty():
    model = make("reference")
    feats, pe = inputs()
    out = model(feats, pe, size=(8, 8))
    assert torch.equal(out.uncertainty, torch.zeros_like(out.uncertainty))
    assert out.selected.reshape(2, -1).sum(1).tolist() == [8, 8]  # official: k points among ties


def test_select_topk_is_per_image():
    u = torch.zeros(2, 1, 100)
    u[0, 0] = torch.linspace(1.0, 2.0, 100)  # image 0 is far more uncertain
    u[1, 0] = torch.linspace(1e-4, 2e-4, 100)
    sel = select_topk(u, 10)
    assert sel.sum(-1).flatten().tolist() == [10, 10]
    assert sel[1, 0, 90:].all() and sel[0, 0, 90:].all()
    assert select_topk(u, 0).sum() == 0
    u[1, 0, :95] = 0.0
    assert select_topk(u, 10)[1].sum() == 5  # zero-uncertainty points are never refined
    assert select_topk(u, 10, skip_zero=False)[1].sum() == 10


def test_model_topk_per_image_with_unequal_uncertainty():
    model = make()
    with torch.no_grad():  # a bias-free coarse branch: the logit spread scales with the input features
        for mod in model.coarse_trunk:
            if isinstance(mod, nn.Linear):
                mod.bias.zero_()
            if isinstance(mod, nn.BatchNorm1d):
                mod.running_mean.zero_()
                mod.bias.zero_()
        model.coarse_trunk[0].weight[:, model.in_dim - model.encoding.out_dim :] = 0
        model.coarse_heads[0].bias.zero_()
    feats, pe = inputs(pe_batch=2)
    feats[1] *= 0.01  # image 1: tiny features, much lower (but non-zero) uncertainty
    pe[1] *= 0.01
    out = model(feats, pe, size=(16, 16))
    u = out.uncertainty.reshape(2, -1)
    assert u[0].mean() > 100 * u[1].mean() and (u[1] > 0).all()
    k = 16 * 16 // 8
    assert out.selected.reshape(2, -1).sum(1).tolist() == [k, k]
    pooled = torch.topk(u.flatten(), 2 * k).indices  # the official pooled top-k would starve image 1
    assert (pooled >= 256).sum() == 0


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("row_gemm", [None, False])  # None: the row GEMM, on by default in bf16
def test_bf16_autocast_runs_and_stays_close(row_gemm, monkeypatch):
    model = make(row_gemm=row_gemm)
    feats, pe = inputs()
    calls = []
    rows = GridFirstLayer.rows
    monkeypatch.setattr(GridFirstLayer, "rows", lambda self, r0, r1: calls.append(r0) or rows(self, r0, r1))
    ref = model(feats, pe, size=(17, 23))
    assert not calls  # fp32: per-pixel taps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(feats, pe, size=(17, 23))
    assert bool(calls) == (row_gemm is None)
    assert out.fine_logits.dtype == torch.float32 and out.uncertainty.dtype == torch.float32
    torch.testing.assert_close(out.coarse_logits, ref.coarse_logits, atol=0.15, rtol=0.05)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_training_forward_backward_on_sampled_points(mode):
    model = make(mode).train()
    feats, pe = inputs()
    feats.requires_grad_(True)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 10:25] = 1
    coords, targets = sample_training_points(mask, 200, generator=torch.Generator().manual_seed(0))
    before = model.coarse_trunk[1].running_mean.clone()
    out = model(feats, pe, coords=coords)
    assert out.fine_logits.shape == (2, 1, 200) and out.coarse_logits.shape == (2, 1, 200)
    assert (out.uncertainty > 0).any()
    assert out.selected.reshape(2, -1).sum(1).tolist() == [25, 25]
    loss = nn.functional.binary_cross_entropy_with_logits(out.fine_logits[:, 0], targets)
    loss = loss + nn.functional.binary_cross_entropy_with_logits(out.coarse_logits[:, 0], targets)
    loss.backward()
    for group in (model.coarse_trunk, model.coarse_heads, model.fine_trunk, model.fine_heads):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in group.parameters())
    assert feats.grad is not None
    assert not torch.equal(before, model.coarse_trunk[1].running_mean)


def test_training_is_reproducible_with_seed():
    feats, pe = inputs()
    coords = torch.rand(2, 64, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    outs = []
    for _ in range(2):
        model = make().train()
        torch.manual_seed(123)
        outs.append(model(feats, pe, coords=coords, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(outs[0].fine_logits, outs[1].fine_logits)
    assert torch.equal(outs[0].selected, outs[1].selected)


def test_sample_training_points():
    mask = torch.zeros(2, 1, 40, 30)
    mask[0, :, 10:25, 5:20] = 1  # image 1 is empty: uniform points only
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    coords, targets = sample_training_points(mask, 100, boundary_fraction=0.5, generator=gen())
    assert coords.shape == (2, 100, 2) and targets.shape == (2, 100)
    assert coords.abs().max() < 1
    # coords are pixel centres and targets are the mask values there
    i = ((coords[..., 0] + 1) * 40 - 1) / 2
    j = ((coords[..., 1] + 1) * 30 - 1) / 2
    torch.testing.assert_close(i, i.round(), atol=1e-4, rtol=0)
    torch.testing.assert_close(j, j.round(), atol=1e-4, rtol=0)
    expected = mask[torch.arange(2)[:, None], 0, i.round().long(), j.round().long()]
    assert torch.equal(targets, expected)
    # the first half of image 0's points lie on the boundary band (edge pixels inside or just outside)
    ii, jj = i[0, :50].round(), j[0, :50].round()
    near_rows = ((ii - 9.5).abs() <= 1) | ((ii - 24.5).abs() <= 1)
    near_cols = ((jj - 4.5).abs() <= 1) | ((jj - 19.5).abs() <= 1)
    assert (near_rows | near_cols).all()
    assert 0 < targets[0, :50].mean() < 1
    again, _ = sample_training_points(mask, 100, boundary_fraction=0.5, generator=gen())
    assert torch.equal(coords, again)
    with pytest.raises(ImedsamError):
        sample_training_points(mask[:, 0], 10)


# ---------------------------------------------------------------- user errors


def test_user_errors():
    model = make()
    feats, pe = inputs()
    with pytest.raises(ImedsamError):
        model(feats, pe)
    with pytest.raises(ImedsamError):
        model(feats, pe, size=(4, 4), coords=torch.zeros(2, 3, 2))
    with pytest.raises(ImedsamError):
        model(feats[:, :3], pe, size=(4, 4))
    with pytest.raises(ImedsamError):
        model(feats, pe.expand(3, -1, -1, -1), size=(4, 4))
    with pytest.raises(ImedsamError):
        model(feats, pe, coords=torch.zeros(2, 3))
    with pytest.raises(ImedsamError):
        model.train()(feats, pe, size=(4, 4), fast=True)


def test_sample_training_points_inside_the_box():
    mask = torch.zeros(2, 1, 40, 30)
    mask[0, :, 10:25, 5:20] = 1
    boxes = torch.tensor([[5.0, 10.0, 20.0, 25.0], [2.0, 30.0, 9.0, 37.0]])  # xyxy, half-open
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    coords, _ = sample_training_points(mask, 100, boundary_fraction=0.5, generator=gen(), boxes=boxes,
                                       box_fraction=0.3)
    i = (((coords[..., 0] + 1) * 40 - 1) / 2).round()
    j = (((coords[..., 1] + 1) * 30 - 1) / 2).round()
    for bi, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        inside = (i[bi] >= y0) & (i[bi] < y1) & (j[bi] >= x0) & (j[bi] < x1)
        assert inside[50:80].all()  # points 50..79 are the box share
        assert not inside.all()  # the uniform rest is not confined to the box
    # no box share: exactly the draws of a call without boxes
    plain, _ = sample_training_points(mask, 100, boundary_fraction=0.5, generator=gen())
    same, _ = sample_training_points(mask, 100, boundary_fraction=0.5, generator=gen(), boxes=boxes)
    assert torch.equal(plain, same)
    with pytest.raises(ImedsamError, match="box_fraction"):
        sample_training_points(mask, 10, box_fraction=0.2)
    with pytest.raises(ImedsamError, match="box_fraction"):
        sample_training_points(mask, 10, boundary_fraction=0.9, boxes=boxes, box_fraction=0.2)


def test_decode_chunk_fits_the_widest_trunk_output_in_the_last_level_cache() -> None:
    """The default chunk: the most points whose 1024-wide activation fits the cache (a chunk never changes the
    result, test above), an explicit chunk_size as given, 16384 on GPUs or when the cache is unknown."""
    from imedsam.decoders.implicit_config import ImplicitDecoderConfig, decode_chunk
    from imedsam.runtime import last_level_cache_bytes

    cfg, cpu = ImplicitDecoderConfig(), torch.device("cpu")
    mib = 1024 * 1024
    assert decode_chunk(cfg, torch.float32, cpu, cache_bytes=32 * mib) == 8192  # 8192 x 1024 x 4 B = 32 MiB
    assert decode_chunk(cfg, torch.bfloat16, cpu, cache_bytes=32 * mib) == 16384
    assert decode_chunk(cfg, torch.float32, cpu, cache_bytes=40 * mib) == 8192  # a power of two below
    assert decode_chunk(cfg, torch.float32, cpu, cache_bytes=105 * mib) == 16384  # at most 16384
    assert decode_chunk(cfg, torch.float32, cpu, cache_bytes=1 * mib) == 2048  # at least 2048
    assert decode_chunk(cfg, torch.float32, torch.device("cuda"), cache_bytes=1 * mib) == 16384
    assert decode_chunk(cfg.model_copy(update={"chunk_size": 300}), torch.float32, cpu, cache_bytes=mib) == 300
    assert decode_chunk(cfg, torch.float32, cpu, cache_bytes=0) == 16384  # unknown
    found = last_level_cache_bytes()
    assert found is None or found >= 64 * 1024
