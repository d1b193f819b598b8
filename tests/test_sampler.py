"""The flow solvers, CFG, I2V conditioning and prompts files of wan_model.sampler/schedulers."""
import math

import numpy as np
import pytest
import torch

from wan_model import sampler as S
from wan_model.schedulers import make_scheduler, official_sigmas

GRIDS = [(50, 5.0), (40, 3.0), (30, 8.0), (10, 1.0), (4, 12.0), (2, 5.0), (1, 5.0)]


def _official_grid(steps, shift):
    """The official grid, recomputed here from the formula with plain Python floats."""
    sigma_max = float(np.float32(0.999))  # the official scheduler reads it from a float32 table
    raw = [sigma_max - sigma_max * i / steps for i in range(steps)]
    shifted = [shift * s / (1 + (shift - 1) * s) for s in raw]
    return shifted, [int(s * 1000) for s in shifted]


@pytest.mark.parametrize("steps,shift", GRIDS)
def test_grid_matches_official_formula(steps, shift):
    sigmas, timesteps = official_sigmas(steps, shift)
    want_sigmas, want_t = _official_grid(steps, shift)
    assert timesteps.dtype == torch.int64 and timesteps.tolist() == want_t
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert sigmas[-1].item() == 0.0
    np.testing.assert_allclose(sigmas[:-1].numpy(), want_sigmas, rtol=1e-6)


def test_grid_golden_shift5_50_steps():
    sigmas, t = official_sigmas(50, 5.0)
    assert t[:5].tolist() == [999, 995, 991, 987, 982]
    assert t[-3:].tolist() == [241, 172, 92]
    assert round(sigmas[0].item(), 5) == 0.99980
    assert abs(sigmas[-2].item() - 0.0925) < 1e-4  # the spec's last non-zero sigma


def _diffusers_unipc(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
        num_train_timesteps=1000)
    # Feed diffusers the official unshifted grid; it applies flow_shift itself.
    sched.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
    sched.set_begin_index(0)
    return sched


def _analytic_model(x0, eps):
    """A fixed nonlinear velocity field, so the multistep history and corrector matter."""
    def v(x, sigma):
        return 0.5 * torch.sin(3 * x) + eps - x0 * (1 + sigma)
    return v


@pytest.mark.parametrize("steps,shift", GRIDS)
def test_unipc_matches_diffusers_on_official_grid(steps, shift):
    ref = _diffusers_unipc(steps, shift)
    ours = make_scheduler("unipc", steps, shift)
    assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
    g = torch.Generator().manual_seed(steps)
    x0, eps = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 3, 4, 6, generator=g)
    v = _analytic_model(x0, eps)
    a = b = eps.clone()
    for i, t in enumerate(ours.timesteps):
        a = ours.step(v(a, ours.sigmas[i]), i, a)
        b = ref.step(v(b, ref.sigmas[i]), t, b).prev_sample
    # Same float32 operations in the same order: equal up to einsum's rounding.
    assert (a - b).abs().max().item() <= 1e-6


def test_unipc_first_steps_follow_official_algebra():
    """Step 0 is the order-1 UniP; step 1 applies the order-1 UniC with rho = 0.5."""
    sched = make_scheduler("unipc", 6, 3.0)
    s = sched.sigmas.double()
    lam = lambda sig: math.log(1 - sig) - math.log(sig)  # noqa: E731
    x = torch.randn(1, 16, 2, 2, 2, dtype=torch.float64)
    v0, v1 = torch.randn_like(x), torch.randn_like(x)
    x1 = sched.step(v0.float(), 0, x.float()).double()
    m0 = x - s[0] * v0
    h = lam(s[1]) - lam(s[0])
    want_x1 = s[1] / s[0] * x - (1 - s[1]) * math.expm1(-h) * m0
    assert torch.allclose(x1, want_x1, atol=1e-5)
    sched.step(v1.float(), 1, x1.float())
    # The corrected x1 is kept as the sample the next predictor starts from.
    m1 = x1 - s[1] * v1
    corrected = want_x1 - (1 - s[1]) * math.expm1(-h) * 0.5 * (m1 - m0)
    assert torch.allclose(sched.last_sample.double(), corrected, atol=1e-5)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_exact_on_straight_paths(solver):
    """When v = eps - x0 exactly (a straight path), both solvers land on x0."""
    sched = make_scheduler(solver, 7, 5.0)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 16, 2, 3, 3, generator=g), torch.randn(1, 16, 2, 3, 3, generator=g)
    s0 = sched.sigmas[0]
    x = (1 - s0) * x0 + s0 * eps
    for i in range(len(sched.timesteps)):
        x = sched.step(eps - x0, i, x)
    assert (x - x0).abs().max().item() < 1e-5


def test_euler_is_exact_on_a_linear_ode():
    """dx/dσ = a (constant): Euler is exact, x_end = x_start + a·(σ_end − σ_start)."""
    sched = make_scheduler("euler", 9, 3.0)
    a, x = torch.tensor([0.7, -2.0]), torch.tensor([1.0, 3.0])
    start = x.clone()
    for i in range(9):
        x = sched.step(a, i, x)
    want = start + a * (sched.sigmas[-1] - sched.sigmas[0])
    assert torch.allclose(x, want, atol=1e-6)


def test_scheduler_errors():
    with pytest.raises(ValueError, match="unknown solver 'ddim'"):
        make_scheduler("ddim", 10, 5.0)
    sched = make_scheduler("unipc", 4, 5.0)
    with pytest.raises(RuntimeError, match="expected 0"):
        sched.step(torch.zeros(1), 1, torch.zeros(1))


# ---- the sampling loop and CFG ----

class RecordingModel(torch.nn.Module):
    """v = w·x + (mean of the text embedding) + t/1000; records every call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.1))
        self.calls = []

    def forward(self, x, t, context, clip_fea=None, y=None):
        self.calls.append({"batch": x.shape[0], "t": t.clone(), "ctx": [c.clone() for c in context],
                           "clip_fea": clip_fea, "y": y})
        bias = torch.stack([c.mean() for c in context]).view(-1, 1, 1, 1, 1)
        return self.w * x + bias + t.view(-1, 1, 1, 1, 1) / 1000


def _ctx(value, length=3, dim=8):
    return [torch.full((length, dim), float(value))]


SMALL = dict(frames=5, height=32, width=48, steps=4, shift=5.0, progress=False)


def test_noise_shape_seed_and_device():
    noise = S.make_noise([3, 4], 5, 32, 48, "cpu")
    assert noise.shape == (2, 16, 2, 4, 6) and noise.dtype == torch.float32
    g = torch.Generator(device="cpu").manual_seed(4)
    assert torch.equal(noise[1], torch.randn(16, 2, 4, 6, generator=g))


def test_guidance_one_is_cond_only_and_skips_uncond():
    m = RecordingModel()
    out = S.sample(m, _ctx(1.0), None, guidance=1.0, **SMALL)
    assert len(m.calls) == SMALL["steps"]
    m2 = RecordingModel()
    out2 = S.sample(m2, _ctx(1.0), _ctx(-5.0), guidance=1.0, **SMALL)
    assert len(m2.calls) == SMALL["steps"] and torch.equal(out, out2)


def test_cfg_formula_and_timesteps():
    m = RecordingModel()
    g = 3.5
    out = S.sample(m, _ctx(1.0), _ctx(-2.0), guidance=g, seed=7, **SMALL)
    assert len(m.calls) == 2 * SMALL["steps"]
    sched = make_scheduler("unipc", SMALL["steps"], SMALL["shift"])
    assert [c["t"].item() for c in m.calls[::2]] == [float(t) for t in sched.timesteps]
    # Replay by hand: uncond + g·(cond − uncond) with the same noise.
    x = S.make_noise([7], 5, 32, 48, "cpu")
    for i, t in enumerate(sched.timesteps):
        tt = torch.full((1,), float(t))
        cond = 0.1 * x + 1.0 + tt.view(-1, 1, 1, 1, 1) / 1000
        uncond = 0.1 * x - 2.0 + tt.view(-1, 1, 1, 1, 1) / 1000
        x = sched.step(uncond + g * (cond - uncond), i, x)
    assert torch.allclose(out, x, atol=1e-6)


def test_cfg_batched_equals_two_passes():
    a = S.sample(RecordingModel(), _ctx(1.0) + _ctx(0.5), _ctx(-2.0), guidance=4.0, **SMALL)
    m = RecordingModel()
    b = S.sample(m, _ctx(1.0) + _ctx(0.5), _ctx(-2.0), guidance=4.0, cfg_batch=True, **SMALL)
    assert m.calls[0]["batch"] == 4 and len(m.calls) == SMALL["steps"]
    assert torch.allclose(a, b, atol=1e-6)
    # Sample i uses seed + i: the second video equals a lone run with seed 1.
    c = S.sample(RecordingModel(), _ctx(0.5), _ctx(-2.0), guidance=4.0, seed=1, **SMALL)
    assert torch.allclose(a[1:], c, atol=1e-6)


def test_sample_passes_i2v_conditioning_to_both_passes():
    m = RecordingModel()
    clip_fea, y = torch.randn(1, 257, 8), torch.randn(1, 20, 2, 4, 6)
    S.sample(m, _ctx(1.0), _ctx(0.0), clip_fea=clip_fea, y=y, **SMALL)
    assert all(torch.equal(c["y"], y) and torch.equal(c["clip_fea"], clip_fea) for c in m.calls)


def test_sample_argument_errors():
    with pytest.raises(ValueError, match=r"width 50 is not a multiple of 16 \(nearest: 48 or 64\)"):
        S.sample(RecordingModel(), _ctx(1), None, guidance=1.0, frames=5, height=32, width=50)
    with pytest.raises(ValueError, match=r"frames 80 is not of the form 4k\+1 \(nearest: 77 or 81\)"):
        S.sample(RecordingModel(), _ctx(1), None, guidance=1.0, frames=80, height=32, width=48)
    with pytest.raises(ValueError, match="needs negative_context"):
        S.sample(RecordingModel(), _ctx(1), None, guidance=5.0, **SMALL)


# ---- constants and defaults ----

def test_defaults_and_negative_prompts():
    assert S.DEFAULT_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕")
    assert S.DEFAULT_NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")
    assert len(S.DEFAULT_NEGATIVE_PROMPT.split("，")) == 28
    assert S.default_negative_prompt("i2v") == "镜头晃动，" + S.DEFAULT_NEGATIVE_PROMPT
    assert S.DEFAULTS["t2v"]["steps"] == 50 and S.DEFAULTS["i2v"]["steps"] == 40
    assert S.default_shift("i2v", 832, 480) == 3.0 == S.default_shift("i2v", 480, 832)
    assert S.default_shift("i2v", 1280, 720) == 5.0 == S.default_shift("t2v", 832, 480)


# ---- I2V conditioning layout ----

def test_i2v_size_official_rounding():
    # The official float arithmetic: sqrt(480*832 * 480/832) = 479.99999999999994, which
    # floors to 58 latent rows, so an 832x480 image at the 480p budget gives 464x832.
    assert S.i2v_size(832, 480, 480 * 832) == (464, 832)
    assert S.i2v_size(480, 832, 480 * 832) == (832, 480)
    assert S.i2v_size(1280, 720, 720 * 1280) == (720, 1280)
    # A square image at the 480p budget: sqrt(399360) = 631.9 -> 78 latents -> even 78 -> 624.
    assert S.i2v_size(512, 512, 480 * 832) == (624, 624)
    h, w = S.i2v_size(1000, 600, 480 * 832)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 480 * 832


def test_i2v_mask_layout():
    mask = S.i2v_mask(9, 2, 3)
    assert mask.shape == (4, 3, 2, 3)
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)


class FakeVAE(torch.nn.Module):
    """encode: average 1+4k frame groups and pool 8x8, then repeat to 16 channels."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def encode(self, video):
        self.seen = video.clone()
        first = video[:, :, :1]
        rest = video[:, :, 1:].unflatten(2, (-1, 4)).mean(3)
        lat = torch.cat([first, rest], dim=2)
        lat = torch.nn.functional.avg_pool3d(lat, (1, 8, 8))
        return lat.repeat(1, 6, 1, 1, 1)[:, :16] + 10.0

    def decode(self, latents):
        video = latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
        video = torch.cat([video[:, :, :1], video[:, :, 1:].repeat_interleave(4, 2)], dim=2)
        return video.clamp(-1, 1)


class FakeCLIP(torch.nn.Module):
    def encode(self, images):
        self.seen = images.clone()
        return images.mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, 257, 8)


def test_i2v_condition_layout():
    vae, clip = FakeVAE(), FakeCLIP()
    image = torch.rand(3, 40, 60) * 2 - 1
    clip_fea, y = S.i2v_condition(vae, clip, image, frames=9, height=32, width=48)
    assert torch.equal(clip.seen[0], image)  # CLIP sees the original image
    assert clip_fea.shape == (1, 257, 8)
    assert vae.seen.shape == (1, 3, 9, 32, 48)
    want_first = torch.nn.functional.interpolate(image[None], size=(32, 48), mode="bicubic")[0]
    assert torch.equal(vae.seen[0, :, 0], want_first)
    assert torch.all(vae.seen[0, :, 1:] == 0)  # F-1 mid-gray frames
    assert y.shape == (1, 20, 3, 4, 6)
    assert torch.all(y[0, :4, 0] == 1) and torch.all(y[0, :4, 1:] == 0)  # mask first
    assert torch.all(y[0, 4:] > 5)  # then the 16 latent channels


def test_image_to_tensor_range(tmp_path):
    from PIL import Image

    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 128)
    Image.fromarray(arr).save(tmp_path / "im.png")
    t = S.image_to_tensor(tmp_path / "im.png")
    assert t.shape == (3, 4, 6)
    assert t[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, (128 / 255 - 0.5) / 0.5], abs=1e-6)


# ---- WanSampler with stand-in components ----

class FakeTextEncoder:
    def __init__(self):
        self.batches = []

    def encode(self, prompts):
        self.batches.append(list(prompts))
        return [torch.full((len(p) % 5 + 1, 8), float(len(p))) for p in prompts]


def test_wan_sampler_encodes_once_and_releases():
    te = FakeTextEncoder()
    ws = S.WanSampler(RecordingModel(), FakeVAE(), te)
    ws.encode_prompts(["a cat", "a dog", S.DEFAULT_NEGATIVE_PROMPT])
    ws.release_text_encoder()
    video = ws.generate(["a cat", "a dog"], frames=5, height=32, width=48, steps=3,
                        progress=False)
    assert te.batches == [["a cat", "a dog", S.DEFAULT_NEGATIVE_PROMPT]]
    assert video.shape == (2, 3, 5, 32, 48) and video.min() >= -1 and video.max() <= 1
    with pytest.raises(RuntimeError, match="before release_text_encoder"):
        ws.generate("a bird", frames=5, height=32, width=48, steps=2, progress=False)


def test_wan_sampler_matches_sample():
    te = FakeTextEncoder()
    model = RecordingModel()
    ws = S.WanSampler(model, FakeVAE(), te)
    lat = ws.generate("a cat", seed=3, guidance=2.0, return_latents=True, frames=5, height=32,
                      width=48, steps=3, progress=False)
    ctx = te.encode(["a cat", S.DEFAULT_NEGATIVE_PROMPT])
    want = S.sample(RecordingModel(), ctx[:1], ctx[1:], seed=3, guidance=2.0, frames=5,
                    height=32, width=48, steps=3, shift=5.0, progress=False)
    assert torch.equal(lat, want)


# ---- prompts files ----

def test_prompts_text_file(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n# a comment\n  a dog on a skateboard  \n", encoding="utf-8")
    specs = S.load_prompts_file(p)
    assert [s.prompt for s in specs] == ["a cat", "a dog on a skateboard"]
    assert specs[0].seed is None and specs[0].width is None


def test_prompts_yaml_overrides(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("- a plain prompt\n"
                 "- prompt: a cat\n  size: 480x832\n  frames: 33\n  seed: 7\n  guidance: 6\n"
                 "  steps: 20\n  negative_prompt: blurry\n", encoding="utf-8")
    a, b = S.load_prompts_file(p)
    assert a.prompt == "a plain prompt" and a.frames is None
    assert (b.width, b.height, b.frames, b.seed, b.guidance, b.steps) == (480, 832, 33, 7, 6.0, 20)
    assert b.negative_prompt == "blurry"


@pytest.mark.parametrize("body,message", [
    ("- prompt: x\n  sead: 3\n", r"unknown key\(s\) 'sead' \(did you mean 'seed'\?\)"),
    ("- prompt: x\n  size: 500x480\n", r"entry 0 size 500x480: width 500 is not a multiple of 16"),
    ("- prompt: x\n  frames: 32\n", r"entry 0 frames 32 is not of the form 4k\+1 \(nearest: 29 or 33\)"),
    ("- prompt: x\n  width: 480\n", "give both width and height"),
    ("- seed: 3\n", "needs a non-empty 'prompt'"),
    ("prompt: x\n", "expected a list of prompts"),
])
def test_prompts_yaml_errors(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        S.load_prompts_file(p)
