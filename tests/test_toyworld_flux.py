"""ToyWorld-Flux: the MMDiT against ComfyUI's own Flux model, the rectified-flow sampler against the exact flow of
a Gaussian, the build's resumption, and the shipped model: detected, sampled, erased by UCE (judged)."""

from __future__ import annotations

import pytest
import torch

from comfy_host import import_comfy, release_comfy_path
from concept_eraser.toyworld import build_flux, flow
from concept_eraser.toyworld.mmdit import FluxConfig, ToyFlux

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = FluxConfig(hidden=48, heads=2, depth=2, depth_single=1, mlp_ratio=2.0, context_dim=20, vec_dim=12,
                  axes_dim=(4, 10, 10))


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter non-zero (the modulations and the output layer start at zero, which would hide them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim < 2 else p.shape[-1] ** -0.5))
    return model


def test_mmdit_is_comfyui_flux_with_black_forest_labs_names():
    """The state dict loads strictly into ComfyUI's `comfy.ldm.flux.model.Flux` (BFL key names and shapes) and both
    predict the same velocity (odd batch, 3 text tokens), while a wrong RoPE or patch order would not."""
    import_comfy()
    try:
        import comfy.ldm.flux.model
        import comfy.ops

        ours = randomized(ToyFlux(TINY), 0).eval()
        theirs = comfy.ldm.flux.model.Flux(
            in_channels=3, out_channels=3, vec_in_dim=TINY.vec_dim, context_in_dim=TINY.context_dim,
            hidden_size=TINY.hidden, mlp_ratio=TINY.mlp_ratio, num_heads=TINY.heads, depth=TINY.depth,
            depth_single_blocks=TINY.depth_single, axes_dim=list(TINY.axes_dim), theta=TINY.theta, patch_size=2,
            qkv_bias=True, guidance_embed=False, operations=comfy.ops.disable_weight_init)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        gen = torch.Generator().manual_seed(1)
        x, t = torch.randn(3, 3, 8, 12, generator=gen), torch.rand(3, generator=gen)
        context = torch.randn(3, 3, TINY.context_dim, generator=gen)
        pooled = torch.randn(3, TINY.vec_dim, generator=gen)
        with torch.no_grad():
            expected = theirs(x, t, context, y=pooled)
            got = ours(x, t, context, pooled)
            no_rope = ours.rotations
            ours.rotations = lambda *a: torch.stack([torch.ones(no_rope(*a).shape[:2]),
                                                     torch.zeros(no_rope(*a).shape[:2])], dim=-1)
            unrotated = ours(x, t, context, pooled)
    finally:
        release_comfy_path()
    assert got.shape == x.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (unrotated - expected).abs().max() > 1e-2 * expected.abs().max()


def test_euler_sampler_follows_the_exact_flow_of_a_gaussian():
    """For data x₀ ~ N(μ, σ²) the rectified-flow velocity is affine in x and known in closed form: v = a(t) x + b(t).
    Euler sampling with it must end at the data's mean and spread (many steps), at exactly the scalar Euler
    recursion's mean and spread (20 steps), and apply guidance between two such fields linearly."""
    sigma = 0.2  # with the means below, guidance 3 ends at 0.5 ± 0.2: the sampler's clamp to [-1, 1] stays idle

    def coefficients(mu, t):
        var = (1 - t) ** 2 * sigma**2 + t**2
        a = (t - (1 - t) * sigma**2) / var  # from E[ε | x] − E[x₀ | x]
        return a, -a * (1 - t) * mu - mu

    def field(x, t, context, pooled):  # rows 0..n−1 conditional (μ 0.1), n..2n−1 unconditional (μ −0.1)
        mu = torch.where(torch.arange(len(x)) < len(x) // 2, 0.1, -0.1)[:, None, None, None]
        a, b = coefficients(mu, t[:, None, None, None])
        return a * x + b

    def euler_recursion(mu_c, mu_u, guidance, steps):
        mean, std = 0.0, 1.0
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        for t, t_next in zip(times[:-1], times[1:]):
            (a, b_c), (_, b_u) = coefficients(mu_c, t), coefficients(mu_u, t)
            mean, std = mean + (t_next - t) * (a * mean + b_u + guidance * (b_c - b_u)), std * (1 + (t_next - t) * a)
        return (mean + 1) / 2, std / 2

    context, pooled = torch.zeros(64, 2, 4), torch.zeros(64, 4)

    def sample(guidance, steps):
        images = flow.euler_sample(field, context, pooled, context[:1], pooled[:1], torch.Generator().manual_seed(0),
                                   steps=steps, guidance=guidance)
        return images.mean().item(), images.std().item()

    mean, std = sample(1.0, 400)
    assert mean == pytest.approx((0.1 + 1) / 2, abs=0.01) and std == pytest.approx(sigma / 2, rel=0.03)
    mean, std = sample(0.0, 400)
    assert mean == pytest.approx((-0.1 + 1) / 2, abs=0.01) and std == pytest.approx(sigma / 2, rel=0.03)
    for guidance in (1.0, 3.0):
        mean, std = sample(guidance, 20)
        expected_mean, expected_std = euler_recursion(0.1, -0.1, guidance, 20)
        assert mean == pytest.approx(expected_mean, abs=0.01) and std == pytest.approx(expected_std, rel=0.03)


def test_build_resumes_identically(tmp_path, monkeypatch):
    """Two steps, stop, two more: the same model, EMA and optimiser state as four uninterrupted steps (batches seeded
    by the step; a tiny model and batch, the shipped text encoder)."""
    from concept_eraser.toyworld import build

    monkeypatch.setattr(build, "BATCH", 4)
    encoder = build_flux.frozen_text_encoder()
    tiny = FluxConfig(hidden=24, heads=1, depth=1, depth_single=1, mlp_ratio=2.0, axes_dim=(8, 8, 8))
    log = lambda message: None  # noqa: E731
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = build_flux.stage_flux(tmp_path / "a", 3, 4, 2, encoder, log, tiny)
    build_flux.stage_flux(tmp_path / "b", 3, 2, 2, encoder, log, tiny)
    resumed = build_flux.stage_flux(tmp_path / "b", 3, 4, 2, encoder, log, tiny)
    fresh, again = torch.load(tmp_path / "a" / "flux.pt"), torch.load(tmp_path / "b" / "flux.pt")
    assert fresh["step"] == again["step"] == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    for key, value in fresh["model"].items():
        assert torch.equal(value, again["model"][key]), key
    assert fresh["opt"]["state"][0]["exp_avg"].equal(again["opt"]["state"][0]["exp_avg"])
    torch.manual_seed(3)
    assert not torch.equal(fresh["model"]["txt_in.weight"], ToyFlux(tiny).state_dict()["txt_in.weight"])  # it trained


def test_the_shipped_model_is_toyworld_flux_with_one_word_level_encoder():
    from concept_eraser.checkpoint import CheckpointModel
    from concept_eraser.models.arch import CONTEXT, POOLED
    from concept_eraser.toyworld.pipeline import FLUX_CHECKPOINT, ToyWorldPipeline

    assert FLUX_CHECKPOINT.stat().st_size < 10e6
    model = CheckpointModel(FLUX_CHECKPOINT)
    assert (model.arch.family, model.arch.denoiser) == ("toyworld_flux", "mmdit")
    assert model.arch.map_keys(CONTEXT) == ("model.diffusion_model.txt_in.weight",)
    assert model.arch.map_keys(POOLED) == ("model.diffusion_model.vector_in.in_layer.weight",)
    assert [(e.name, e.tokenizer, e.pooled, e.projection) for e in model.arch.encoders] == \
        [("toy_clip", "word", True, "none")]
    pipe = ToyWorldPipeline(model)
    assert isinstance(pipe.denoiser, ToyFlux) and pipe.denoiser.cfg == build_flux.FLUX
    # The solver's features are the ones the model was trained on (build_flux.encode, transformers' CLIP).
    prompts = ["a red circle on a striped background", "", "a sun"]
    encoded = pipe.encode(prompts)
    context, pooled = build_flux.encode(build_flux.frozen_text_encoder(), prompts)
    assert torch.allclose(encoded.features, context, atol=1e-5) and torch.allclose(encoded.pooled, pooled, atol=1e-5)


def test_uce_on_toyworld_flux_erases_circles_and_keeps_the_other_shapes():
    """circle → square with UCE editing both maps (txt_in and, `pooled_edit`, vector_in), judged on 8 circle prompts
    and 8 triangle/ring prompts, 10 Euler steps. Measured: circles 7/8 → 0/8 (all squares), the others 8/8 → 8/8;
    txt_in alone (`pooled_edit=false`) turned only half of the circles into squares: the pooled path carries the
    rest."""
    from concept_eraser import erase
    from concept_eraser.checkpoint import CheckpointModel
    from concept_eraser.concepts import Concepts
    from concept_eraser.toyworld import benchmark, judge
    from concept_eraser.toyworld.pipeline import FLUX_CHECKPOINT, ToyWorldPipeline

    model, the_judge = CheckpointModel(FLUX_CHECKPOINT), judge.load()
    circles = [p for p, _ in benchmark.prompts_for("shape", "circle", 8)]
    others = [p for v in ("triangle", "ring") for p, _ in benchmark.prompts_for("shape", v, 4)]
    expected = ["triangle"] * 4 + ["ring"] * 4
    concepts = Concepts.build(["circle"], ["square"], ["triangle", "cross", "ring", "diamond"])
    result = erase(model, "uce", concepts, {"pooled_edit": True})
    assert set(result.patch.edits) == {"model.diffusion_model.txt_in.weight",
                                       "model.diffusion_model.vector_in.in_layer.weight"}
    shown = {}
    for name, pipe in (("before", ToyWorldPipeline(model)), ("after", ToyWorldPipeline(model, result.patch))):
        shown[name] = ([v["shape"] for v in the_judge.verdicts(pipe.sample(circles, seed=0, steps=10))],
                       [v["shape"] for v in the_judge.verdicts(pipe.sample(others, seed=1, steps=10))])
    assert shown["before"][0].count("circle") >= 6 and shown["after"][0].count("circle") <= 1, shown
    assert shown["after"][0].count("square") >= 6, shown
    assert sum(a == e for a, e in zip(shown["after"][1], expected)) >= 7, shown
