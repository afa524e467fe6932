"""KPOP: the losses' gradients, the prompt injection, the ablation, which tensors change, named errors.

References are independent of the code under test: finite differences for the gradients, the paper's
identity for concatenation (a prompt made of copies of the text leaves attention unchanged), and a plain
PyTorch fine-tuning loop (module.parameters(), loss.backward(), Adam) for the prompt-free ablation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from concept_eraser import CheckpointModel, Concepts, InvalidParameterError, UnsupportedModelError, erase
from concept_eraser.denoiser import (
    ModuleDenoiser,
    PromptInjection,
    injection_keys,
    ldm_inputs,
    partial_ddim,
    sd_alphas_cumprod,
)
from concept_eraser.methods.kpop import TrainBatch, removal_loss, trainable_keys, transfer_loss
from concept_eraser.models.arch import UNET_PREFIX
from concept_eraser.toyworld.pipeline import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {"steps": 3, "ddim_steps": 4, "prompt_size": 1, "lr": 1e-3, "prompt_lr": 1e-2, "wordings": "as_given"}


@pytest.fixture(scope="module")
def toyworld():
    return CheckpointModel(CHECKPOINT)


def float64_denoiser(model: CheckpointModel) -> ModuleDenoiser:
    """ToyWorld's U-Net in float64, for finite differences."""
    plain = model.denoiser()
    return ModuleDenoiser(copy.deepcopy(plain.module).double(), UNET_PREFIX, ldm_inputs("toyworld", 16),
                          device=torch.device("cpu"), dtype=torch.float64, latent_shape=plain.latent_shape,
                          alphas_cumprod=plain.alphas_cumprod)


def test_loss_gradients_match_finite_differences(toyworld, rng):
    den = float64_denoiser(toyworld)
    features = toyworld.text_encoder.encode(["a red circle", "a square"]).features.double()
    z = torch.randn(1, 3, 16, 16, generator=rng, dtype=torch.float64)
    t = torch.tensor([700])
    with torch.no_grad():
        e_e, e_n = den.eps(z, t, features[:1]), den.eps(z, t, features[1:])
    batch = TrainBatch(z, t, features[:1], None, e_e, e_n - (e_e - e_n))
    params = den.parameters()
    keys = [k for k in trainable_keys(params, "xattn") if "middle_block" in k]
    weights = {k: (params[k].double() + 0.01 * torch.randn(params[k].shape, generator=rng, dtype=torch.float64))
               .requires_grad_(True) for k in keys}
    layers = injection_keys(toyworld.arch.map_keys(), "mid")
    window, dim = features.shape[1:]
    def random_tokens():
        return (0.5 * torch.randn(window, dim, generator=rng, dtype=torch.float64)).requires_grad_()

    prompt = PromptInjection(layers, random_tokens(), random_tokens())

    def directional(loss_fn, tensors):
        """⟨∇L, d⟩ by autograd and by central differences along a random direction d."""
        loss = loss_fn()
        grads = torch.autograd.grad(loss, tensors)
        directions = [torch.randn(x.shape, generator=rng, dtype=torch.float64) for x in tensors]
        analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
        h = 1e-5
        with torch.no_grad():
            for x, d in zip(tensors, directions):
                x += h * d
            plus = loss_fn().item()
            for x, d in zip(tensors, directions):
                x -= 2 * h * d
            minus = loss_fn().item()
            for x, d in zip(tensors, directions):
                x += h * d
        return analytic, (plus - minus) / (2 * h)

    a, fd = directional(lambda: transfer_loss(den, batch, {k: w.detach() for k, w in weights.items()}, prompt),
                        [prompt.k, prompt.v])
    assert a != 0 and abs(a - fd) <= 1e-6 * abs(a)
    a, fd = directional(lambda: removal_loss(den, batch, weights, prompt, 0.1)[0], list(weights.values()))
    assert a != 0 and abs(a - fd) <= 1e-6 * abs(a)


def test_concatenated_copies_of_the_text_change_nothing(toyworld, rng):
    """The paper's identity: with p = c (here: k copies of C) concatenated attention gives the same output;
    an additive prompt of zeros too. A different prompt does change it, and the hooks are gone afterwards."""
    den = toyworld.denoiser()
    features = toyworld.text_encoder.encode(["a red circle"]).features
    z, t = torch.randn(1, 3, 16, 16, generator=rng), torch.tensor([600])
    plain = den.eps(z, t, features)
    layers = injection_keys(toyworld.arch.map_keys(), "all")
    copies = features[0].repeat(3, 1)
    same = den.eps(z, t, features, prompt=PromptInjection(layers, copies, copies))
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    zeros = torch.zeros_like(features[0])
    torch.testing.assert_close(den.eps(z, t, features, prompt=PromptInjection(layers, zeros, zeros, "additive")), plain)
    other = torch.randn(copies.shape, generator=rng)
    assert (den.eps(z, t, features, prompt=PromptInjection(layers, other, other)) - plain).abs().max() > 1e-3
    assert all(not m._forward_hooks for m in den.module.modules())


def test_injection_blocks_follow_the_paper():
    keys = [f"{UNET_PREFIX}{b}.1.transformer_blocks.0.attn2.to_{p}.weight"
            for b in ("input_blocks.1", "middle_block", "output_blocks.3") for p in "kv"]
    assert [k.split(".")[2] for k in injection_keys(keys, "mid")] == ["middle_block"] * 2
    assert {k.split(".")[2] for k in injection_keys(keys, "mid_up")} == {"middle_block", "output_blocks"}
    assert len(injection_keys(keys, "all")) == 6


@pytest.mark.parametrize("train", ["xattn", "kv", "noxattn"])
def test_patch_touches_only_the_chosen_modules(toyworld, train):
    result = erase(toyworld, "kpop", Concepts.build(["circle"]), {**QUICK, "steps": 1, "train": train})
    unet = [k for k in toyworld.keys() if k.startswith(UNET_PREFIX)]
    inner = lambda k: k[len(UNET_PREFIX):]  # noqa: E731
    expected = {
        "xattn": {k for k in unet if ".attn2." in k},
        "kv": {k for k in unet if inner(k).endswith(("attn2.to_k.weight", "attn2.to_v.weight"))},
        "noxattn": {k for k in unet if ".attn2." not in k and not inner(k).startswith(("time_embed.", "out."))},
    }[train]
    assert set(result.patch.edits) == expected
    changed = {k for k, (edit,) in result.patch.edits.items() if not torch.equal(edit.new, toyworld.weight(k))}
    # one Adam step moves every tensor by about lr, except where the gradient is far below Adam's ε
    assert changed <= expected and len(changed) >= 0.9 * len(expected)
    assert all(result.patch.edits[k][0].new.dtype == toyworld.weight(k).dtype for k in expected)


def test_prompt_free_ablation_equals_plain_fine_tuning(toyworld):
    """use_prompt=false is ESD-style fine-tuning (plus the held empty prompt, `preserve_empty`): compare with a
    loop written the ordinary way."""
    values = {**QUICK, "use_prompt": False, "steps": 3}
    concepts = Concepts.build(["circle"], ["square"])
    result = erase(toyworld, "kpop", concepts, values)

    den = toyworld.denoiser()
    reference = copy.deepcopy(den.module).train(False)
    frozen = copy.deepcopy(den.module)
    trained = [p for n, p in reference.named_parameters() if ".attn2." in n]
    for p in reference.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=values["lr"])
    features = toyworld.text_encoder.encode(["circle", "square", ""]).features
    gen = torch.Generator().manual_seed(0)
    for _ in range(values["steps"]):  # the same draws, in the same order, as the method documents
        torch.randint(1, (1,), generator=gen)
        done = int(torch.randint(values["ddim_steps"], (1,), generator=gen))
        noise = torch.randn(1, 3, 16, 16, generator=gen)
        [(z_t, t)] = partial_ddim(den, features[:1], features[2:], noise, [done], values["ddim_steps"], 3.0)
        with torch.no_grad():  # one pass, as documented: c_e, c_n and the held empty prompt
            e_e, e_n, e_0 = frozen(z_t.repeat(3, 1, 1, 1), t.repeat(3), features).chunk(3)
        loss = F.mse_loss(reference(z_t, t, features[:1]), e_n - (e_e - e_n)) + \
            F.mse_loss(reference(z_t, t, features[2:]), e_0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = {UNET_PREFIX + n: p.detach() for n, p in reference.named_parameters() if ".attn2." in n}
    assert set(result.patch.edits) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result.patch.edits[key][0].new, value, rtol=1e-5, atol=1e-7)
    assert not result.artifacts


def test_deterministic_and_prompt_returned(toyworld):
    concepts = Concepts.build(["circle"])
    first = erase(toyworld, "kpop", concepts, QUICK)
    second = erase(toyworld, "kpop", concepts, QUICK)
    for key, (edit,) in first.patch.edits.items():
        assert torch.equal(edit.new, second.patch.edits[key][0].new)
    assert torch.equal(first.artifacts["prompt_k"], second.artifacts["prompt_k"])
    window = toyworld.text_encoder.encode([""]).features.shape[1]
    assert first.artifacts["prompt_k"].shape[0] == window  # prompt_size 1 × the text window
    assert first.report["prompt_layers"] == list(injection_keys(toyworld.arch.map_keys(), "mid"))
    assert first.patch.steps[0]["results"]["steps"] == QUICK["steps"]


def test_a_short_toyworld_run_at_the_defaults_erases_and_keeps_the_others(toyworld):
    """ToyWorld, judged, at KPOP's defaults (auto: ToyWorld's learning rates, sampler steps and wordings) cut from
    200 to 40 steps: "circle" prompts stop showing circles and the other shapes stay. Measured (seed 0, one thread)
    at the former defaults (five short wordings, the empty prompt not held): circles shown 100 % → 4 %, other shapes
    100 % → 92 % (the full 200 steps: 100 % erased at 100 % preserved on the benchmark). The bounds leave room for a
    few samples' change (one sample is 4 points): erased ≥ 75 %, at most four more of the 25 other shapes lost. The
    former settings fail it: 200 steps at lr 3e-4 erased 25 %, on the bare word "circle" 0 %."""
    from concept_eraser.toyworld import judge, world
    from concept_eraser.toyworld.benchmark import prompts_for
    from concept_eraser.toyworld.pipeline import ToyWorldPipeline

    the_judge = judge.load()
    result = erase(toyworld, "kpop", Concepts.build(["circle"], ["square"]), {"steps": 40})

    def shown(pipe, shapes, n):
        rows = [r for s in shapes for r in prompts_for("shape", s, n // len(shapes))]
        verdicts = the_judge.verdicts(pipe.sample([p for p, _ in rows], seed=1))
        return sum(v["shape"] == e["shape"] for v, (_, e) in zip(verdicts, rows)) / len(rows)

    others = [s for s in world.SHAPES if s != "circle"]
    before, after = ToyWorldPipeline(toyworld), ToyWorldPipeline(toyworld, result.patch)
    target_before, target_after = shown(before, ["circle"], 24), shown(after, ["circle"], 24)
    others_before, others_after = shown(before, others, 25), shown(after, others, 25)
    assert target_before >= 0.9 and target_after <= 0.25, (target_before, target_after)
    assert others_after >= others_before - 0.17, (others_before, others_after)


def test_auto_settings_follow_the_model_family(toyworld):
    """Left on auto, the learning rates and step counts are the paper's SD1.4 values on every Stable Diffusion
    family and the measured ones on ToyWorld; a value given is kept; a bad one is refused by name."""
    from concept_eraser.methods import get_method
    from concept_eraser.methods.kpop import resolve_auto
    from concept_eraser.params import resolve

    values = resolve(get_method("kpop").params, {}, "kpop")
    paper = {"steps": 1000, "lr": 1e-5, "prompt_lr": 1e-5, "ddim_steps": 50}
    for family in ("sd1", "sd2", "sdxl"):
        assert {k: resolve_auto(values, family)[k] for k in paper} == paper
    toy = resolve_auto(values, "toyworld")
    assert (toy["steps"], toy["lr"], toy["prompt_lr"], toy["ddim_steps"]) == (200, 1e-3, 1e-2, 20)
    given = resolve(get_method("kpop").params, {"lr": "1e-5", "steps": "auto"}, "kpop")
    assert resolve_auto(given, "toyworld")["lr"] == 1e-5 and resolve_auto(given, "toyworld")["steps"] == 200
    result = erase(toyworld, "kpop", Concepts.build(["circle"]), {"steps": 1, "prompt_size": 1})
    summary = result.patch.steps[0]["results"]
    assert (summary["steps"], summary["lr"], summary["prompt_lr"], summary["ddim_steps"]) == (1, 1e-3, 1e-2, 20)
    for name in ("lr", "steps"):
        with pytest.raises(InvalidParameterError) as err:
            erase(toyworld, "kpop", Concepts.build(["circle"]), {name: "fast"})
        assert err.value.field == name


@pytest.mark.parametrize("name, value", [
    ("steps", 0), ("lr", 0), ("prompt_lr", -1), ("lam", 0), ("injection", "prepend"), ("inject_blocks", "down"),
    ("train", "everything"), ("prompt_size", 0), ("batch", 0), ("resolution", 18), ("ddim_steps", 1),
    ("latents_per_trajectory", 0), ("wordings", "a photo of circles"), ("preserve_weight", -1),
])
def test_bad_parameters_name_the_field(toyworld, name, value):
    with pytest.raises(InvalidParameterError) as err:
        erase(toyworld, "kpop", Concepts.build(["circle"]), {**QUICK, name: value})
    assert err.value.field == name


def test_host_without_a_unet_is_refused(tiny_checkpoints):
    class TextOnly:  # an adapter that offers no denoiser
        def __init__(self, model):
            self.inner = model

        def __getattr__(self, name):
            if name == "denoiser":
                raise AttributeError(name)
            return getattr(self.inner, name)

    with pytest.raises(UnsupportedModelError, match="U-Net"):
        erase(TextOnly(CheckpointModel(tiny_checkpoints["sd1"])), "kpop", Concepts.build(["cat"]), QUICK)


class GaussianOracle(torch.nn.Module):
    """The exact denoiser of Gaussian data x0 ~ N(0, s² I) under the schedule ᾱ: E[ε | z_t] = √(1−ᾱ) z / v and
    E[x0 | z_t] = √ᾱ s² z / v with v = ᾱ s² + 1 − ᾱ, output as ε or as v = √ᾱ ε − √(1−ᾱ) x0 (in float64, so the
    reference is exact). Its sampler is known in closed form: z_t keeps the standard deviation √v_t."""

    def __init__(self, alphas: torch.Tensor, s: float, prediction: str):
        super().__init__()
        self.alphas, self.s, self.prediction = alphas.double(), s, prediction

    def forward(self, x, timesteps, context):
        a = self.alphas[timesteps].view(-1, 1, 1, 1)
        z = x.double()
        var = a * self.s ** 2 + 1 - a
        eps, x0 = (1 - a).sqrt() * z / var, a.sqrt() * self.s ** 2 * z / var
        return (eps if self.prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0).to(x.dtype)


@pytest.mark.parametrize("prediction, zsnr", [("eps", False), ("v", False), ("v", True)])
def test_sampled_latents_keep_the_schedules_statistics_on_sd(prediction, zsnr, rng):
    """SD's schedules (also zero terminal SNR, v-prediction) need no clipping: with the exact denoiser of Gaussian
    data, z_t after every number of DDIM steps has the standard deviation √(ᾱ s² + 1 − ᾱ) the schedule implies."""
    alphas = sd_alphas_cumprod(zero_terminal_snr=zsnr)
    s, total = 0.5, 50
    den = ModuleDenoiser(GaussianOracle(alphas, s, prediction), UNET_PREFIX, ldm_inputs("sd1", 256),
                         device=torch.device("cpu"), dtype=torch.float32, latent_shape=(4, 32, 32),
                         alphas_cumprod=alphas, prediction=prediction)
    assert den.x0_clip is None
    context = torch.zeros(1, 2, 8)
    noise = torch.randn(2, 4, 32, 32, generator=rng)
    for z_t, t in partial_ddim(den, context.expand(2, -1, -1), context, noise, list(range(total)), total, 3.0):
        a = alphas[t[0]].double()
        expected = (a * s ** 2 + 1 - a).sqrt().item()
        assert 0.9 <= z_t.std().item() / expected <= 1.03, (int(t[0]), z_t.std().item(), expected)


def test_zero_terminal_snr_schedule():
    """Lin et al.'s rescaling as ComfyUI applies it: √ᾱ an affine map of SD's √ᾱ that keeps the first value and
    ends (almost) at zero."""
    plain, zsnr = sd_alphas_cumprod().double(), sd_alphas_cumprod(zero_terminal_snr=True).double()
    assert zsnr[0] == pytest.approx(plain[0].item(), rel=1e-6) and zsnr[-1].item() == pytest.approx(4.8973e-8, rel=1e-4)
    slope = (zsnr[0].sqrt() - zsnr[500].sqrt()) / (plain[0].sqrt() - plain[500].sqrt())
    torch.testing.assert_close(zsnr[:-1].sqrt(), zsnr[0].sqrt() + slope * (plain[:-1].sqrt() - plain[0].sqrt()),
                               rtol=1e-5, atol=1e-6)


def test_toyworld_latents_stay_on_distribution(toyworld, rng):
    """ToyWorld's cosine schedule (ᾱ₉₉₉ ≈ 2.4e-9) needs its sampler's x0 clipping: with it, z_t after every number
    of the 20 DDIM steps stays unit-order; DDIM without it ends with a standard deviation in the hundreds."""
    den = toyworld.denoiser()
    assert den.x0_clip == 1.0
    features = toyworld.text_encoder.encode(["a red circle", ""]).features
    noise = torch.randn(4, 3, 16, 16, generator=rng)
    latents = partial_ddim(den, features[:1].expand(4, -1, -1), features[1:], noise, list(range(20)), 20, 3.0)
    stds = [z.std().item() for z, _ in latents]
    assert all(0.3 <= s <= 1.2 for s in stds) and max(z.abs().max().item() for z, _ in latents) < 6, stds
    den.x0_clip = None
    unclipped = partial_ddim(den, features[:1].expand(4, -1, -1), features[1:], noise, [1, 5], 20, 3.0)
    assert all(z.std().item() > 50 for z, _ in unclipped)


def test_one_sampling_run_serves_several_steps(toyworld, monkeypatch):
    """latents_per_trajectory = 3: one sampling run per three steps, each z_t what a run stopped there gives."""
    from concept_eraser.methods import get_method, kpop
    from concept_eraser.params import resolve

    values = resolve(get_method("kpop").params, {**QUICK, "latents_per_trajectory": 3, "ddim_steps": 10}, "kpop")
    den = toyworld.denoiser()
    runs = []
    monkeypatch.setattr(kpop, "partial_ddim", lambda *a, **k: runs.append(a) or partial_ddim(*a, **k))
    trainer = kpop.Trainer(den, toyworld, Concepts.build(["circle"]), values, trainable_keys(den.parameters(), "kv"))
    batches = [trainer.sample_batch() for _ in range(3)]
    assert len(runs) == 1
    _, cond, uncond, noise, stops, total, guidance, *_ = runs[0]
    for batch, stop in zip(batches, stops):
        [(z_t, t)] = partial_ddim(den, cond, uncond, noise, [stop], total, guidance)
        torch.testing.assert_close(batch.z_t, z_t)
        assert torch.equal(batch.t, t)
    trainer.sample_batch()
    assert len(runs) == 2


def test_a_cancel_stops_the_sampling_between_guided_passes(toyworld):
    """Hosts cancel from the progress callback. Sampling z_t is up to ddim_steps guided passes (50 on Stable
    Diffusion, half a minute on a CPU), so the callback is called before each of them, not only after a step."""
    from concept_eraser.errors import Cancelled

    passes, calls = [], []
    eps = ModuleDenoiser.eps

    def counted_eps(self, *args, **kwargs):
        passes.append(len(calls))
        return eps(self, *args, **kwargs)

    def progress(done, total, message):
        calls.append(message)
        if len(calls) == 4:  # "preparing", then before the first three passes of step 1's sampling
            raise Cancelled("cancelled")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModuleDenoiser, "eps", counted_eps)
        with pytest.raises(Cancelled):
            erase(toyworld, "kpop", Concepts.build(["circle"]), {**QUICK, "steps": 1, "ddim_steps": 20,
                                                                 "latents_per_trajectory": 8}, progress)
    assert calls[1:] == ["KPOP step 1/1"] * 3 and passes == [2, 3]  # stopped before the third pass


def test_each_step_trains_every_concept_once_by_default(toyworld):
    """batch auto = one sample per concept, the concepts in turn: three concepts, three samples per step, one of
    each (a random wording of it); a batch of 2 takes them in turn across steps."""
    from concept_eraser.methods import get_method, kpop
    from concept_eraser.params import resolve

    concepts = Concepts.build(["circle", "cross", "ring"])
    den = toyworld.denoiser()
    for batch, expected in ((None, [["circle", "cross", "ring"]] * 2), (2, [["circle", "cross"], ["ring", "circle"]])):
        values = resolve(get_method("kpop").params, {**QUICK, "wordings": "a {}; the {}", "batch": batch}, "kpop")
        trainer = kpop.Trainer(den, toyworld, concepts, values, trainable_keys(den.parameters(), "kv"))
        rows = {toyworld.text_encoder.encode([p]).features[0]: p for pair in trainer.pairs for p in pair}
        for want in expected:
            context = trainer.sample_batch().context
            words = [next(p for f, p in rows.items() if torch.equal(f, c)).split()[-1] for c in context]
            assert words == want
    assert erase(toyworld, "kpop", concepts, QUICK).patch.steps[0]["results"]["batch"] == 3


def test_training_wordings():
    from concept_eraser.methods.kpop import training_wordings

    assert training_wordings(["circle"], ["square"], "as_given") == [("circle", "square")]
    pairs = training_wordings(["Van Gogh", "cat"], ["", "dog"], "art")
    assert len(pairs) == 12 and ("painting by Van Gogh", "") in pairs and ("style of cat", "style of dog") in pairs
    assert training_wordings(["circle"], [""], "a {}; a picture of a {}") == [("a circle", ""),
                                                                           ("a picture of a circle", "")]
    with pytest.raises(InvalidParameterError) as err:
        training_wordings(["circle"], [""], "a circle")
    assert err.value.field == "wordings"


def test_preservation_term_uses_the_preserve_list(toyworld):
    """preserve_weight > 0: ESD's term joins the removal loss and keeps a preserved concept's noise prediction
    closer to the original than the same training without it; at 0 the list is unused, with a warning."""
    concepts = Concepts.build(["circle"], ["square"], ["triangle"])
    values = {**QUICK, "steps": 12, "ddim_steps": 10, "use_prompt": False, "seed": 3}
    with pytest.warns(UserWarning, match="preserve_weight"):
        plain = erase(toyworld, "kpop", concepts, values)
    kept = erase(toyworld, "kpop", concepts, {**values, "preserve_weight": 10.0})
    assert "Lp" in kept.patch.steps[0]["results"]["final_losses"]

    den = toyworld.denoiser()
    features = toyworld.text_encoder.encode(["triangle"]).features.expand(8, -1, -1)
    z, t = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.arange(900, 100, -100)
    original = den.eps(z, t, features)
    moved = [(den.eps(z, t, features, {k: e[0].new for k, e in r.patch.edits.items()}) - original).norm()
             for r in (plain, kept)]
    assert moved[1] < 0.6 * moved[0], moved  # measured: 1.66 against 4.52


@pytest.mark.filterwarnings("ignore::FutureWarning")  # new torch deprecates torch.cuda.amp.GradScaler
def test_without_torch_amp_grad_scaler(toyworld, monkeypatch):
    """torch < 2.3 (A1111 1.10 ships 2.1.2) has no torch.amp.GradScaler, only torch.cuda.amp.GradScaler."""
    from concept_eraser.methods.kpop import grad_scaler

    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    scaler = grad_scaler(torch.device("cpu"), enabled=True)
    assert isinstance(scaler, torch.cuda.amp.GradScaler) and not scaler.is_enabled()
    assert erase(toyworld, "kpop", Concepts.build(["circle"]), {**QUICK, "steps": 1}).patch.edits


def test_the_empty_prompt_is_held(toyworld):
    """preserve_empty (the default) holds ε(z_t, "") in the removal step. Without it (the paper's loss) the empty
    prompt's noise prediction moves with the target's (their text features are close), and classifier-free guidance,
    which subtracts it, cancels the erasure: on the benchmark red → "" was 4 % erased, 33 % with it held (same
    wordings, 24 samples). Measured here (20 steps): the empty prompt's prediction moves 1.75 held, 2.76 not."""
    concepts = Concepts.build(["red"])
    values = {**QUICK, "steps": 20, "ddim_steps": 4, "wordings": "a {}"}
    den = toyworld.denoiser()
    empty = toyworld.text_encoder.encode([""]).features.expand(8, -1, -1)
    z, t = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.arange(900, 100, -100)
    original = den.eps(z, t, empty)

    def moved(result):
        return (den.eps(z, t, empty, {k: e[0].new for k, e in result.patch.edits.items()}) - original).norm()

    held = erase(toyworld, "kpop", concepts, values)
    assert "L_empty" in held.patch.steps[0]["results"]["final_losses"]
    free = erase(toyworld, "kpop", concepts, {**values, "preserve_empty": False})
    assert moved(held) < 0.8 * moved(free), (moved(held), moved(free))
