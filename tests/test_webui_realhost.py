"""Helpers for the tests that run the real WebUIs (test_webui_a1111.py, test_webui_forge.py); no tests here.

`MAKER` builds a random SD1-layout checkpoint with the WebUI's own ldm code (as
../shared/hosts/a1111/make_tiny_a1111_checkpoint.py does): "tiny" (text encoder 64 wide with one head,
so the solver's own encoder rebuilds it exactly; 1/10-width U-Net; A1111 loads it with the .yaml
written beside it) or "full" (the real CLIP-L text encoder and VAE sizes and a 320-wide U-Net: what
Forge's loader recognises as SD 1.5). Random init is not a trained model in two ways that matter here, which
the maker corrects: ldm zero-initialises every SpatialTransformer's proj_out and the U-Net's last conv (then
nothing the text or cross-attention does reaches the image), and transformers gives LayerNorms weight 1 and
bias 0 (then A1111's emphasis divides 0 by 0 for some prompts: see MAKER). `WebUIServer` starts a WebUI
headless on the CPU from a temporary data folder with this repository linked into its extensions/. `BROWSER`
drives the tab in headless Chromium (selenium) in both WebUIs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API = "/concept-eraser/v1"
K0 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"

MAKER = r'''
import gzip, json, os, sys
out, webui = sys.argv[1], sys.argv[2]
full = len(sys.argv) > 3 and sys.argv[3] == "full"
name = sys.argv[4] if len(sys.argv) > 4 else "tiny-sd1"
W, L, H, M = (768, 12, 12, 3072) if full else (64, 2, 1, 128)  # text width, layers, heads, MLP
import open_clip
bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, [chr(c) for c in cs]))
merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
vocab = list(bytes_to_unicode().values()); vocab += [v + "</w>" for v in vocab]
vocab += ["".join(m.split(" ")) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
clip = os.path.join(out, "tiny-clip-text"); os.makedirs(clip, exist_ok=True)
with open(os.path.join(clip, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
open(os.path.join(clip, "merges.txt"), "w", encoding="utf-8").write("#version: 0.2\n" + "\n".join(merges) + "\n")
special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>"}
json.dump(special, open(os.path.join(clip, "special_tokens_map.json"), "w"))
json.dump(dict(special, model_max_length=77, do_lower_case=True, errors="replace", add_prefix_space=False,
               tokenizer_class="CLIPTokenizer"), open(os.path.join(clip, "tokenizer_config.json"), "w"))
json.dump({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": W,
           "intermediate_size": M, "projection_dim": W, "num_hidden_layers": L, "num_attention_heads": H,
           "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
           "initializer_range": 0.02, "initializer_factor": 1.0, "bos_token_id": 49406, "eos_token_id": 49407,
           "pad_token_id": 1, "torch_dtype": "float32"}, open(os.path.join(clip, "config.json"), "w"))
yaml = f"""model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: {320 if full else 32}
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: {'[ 1, 1, 1, 1 ]' if full else '[ 1, 2, 4, 4 ]'}
        num_heads: {8 if full else 2}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {W}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: {128 if full else 32}
          ch_mult: {'[ 1, 2, 4, 4 ]' if full else '[ 1, 1, 1, 1 ]'}
          num_res_blocks: {2 if full else 1}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {clip}
"""
open(os.path.join(out, name + ".yaml"), "w").write(yaml)
sys.path.insert(0, os.path.join(webui, "repositories", "stable-diffusion-stability-ai"))
import torch
from omegaconf import OmegaConf
from ldm.util import instantiate_from_config
from safetensors.torch import save_file
import ldm.modules.encoders.modules as enc
from transformers import CLIPTextConfig, CLIPTextModel
enc.CLIPTextModel.from_pretrained = classmethod(
    lambda cls, path, *a, **k: CLIPTextModel(CLIPTextConfig.from_pretrained(path)))
torch.manual_seed(1234)
model = instantiate_from_config(OmegaConf.load(os.path.join(out, name + ".yaml")).model)
# ldm zero-initialises every SpatialTransformer's proj_out and the U-Net's last conv: then nothing the text
# or cross-attention does reaches the image. Give them small random values so edits are visible.
# transformers initialises LayerNorms to weight 1, bias 0: then every token's features after the final norm sum
# to zero, the prompt's mean is ~1e-8, and A1111's emphasis (z * mean / mean after weighting) divides 0 by 0
# whenever rounding makes it exactly 0.0 (a NaN conditioning, a black image; 4 of 20 prompts on an unerased
# model). Trained encoders have learned affine norms: give the text encoder's norms such values.
with torch.no_grad():
    for param_name, p in model.named_parameters():
        if p.dim() >= 2 and not p.any():
            p.normal_(0, 0.05)
        elif param_name.startswith("cond_stage_model.") and "layer_norm" in param_name:
            p.normal_(1.0 if param_name.endswith(".weight") else 0.0, 0.1)
sd = {k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v.contiguous()
      for k, v in model.state_dict().items()}
save_file(sd, os.path.join(out, name + ".safetensors"))
print("ok", len(sd))
'''

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(python: str, webui: str, folder: Path, size: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([python, "-c", MAKER, str(folder), webui, size, name], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert made.returncode == 0, made.stderr[-3000:]
    return folder / f"{name}.safetensors"


A1111_FLAGS = ("--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--precision",
               "full", "--no-download-sd-model", "--do-not-download-clip", "--skip-version-check",
               "--disable-console-progressbars", "--disable-nan-check")
FORGE_FLAGS = ("--skip-prepare-environment", "--skip-install", "--always-cpu", "--skip-torch-cuda-test",
               "--skip-version-check", "--no-download-sd-model")


class WebUIServer:
    """A WebUI (`kind` "a1111" or "forge") in `webui_dir`, run by `python` from the data folder `data`."""

    def __init__(self, kind: str, webui_dir: str, python: str, data: Path, checkpoint: str):
        self.kind, self.webui_dir, self.python, self.data = kind, webui_dir, python, data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ckpt_dir = data / "models" / "Stable-diffusion"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = checkpoint
        self.log = data / "server.log"
        self.process: subprocess.Popen | None = None
        (data / "extensions").mkdir(exist_ok=True)
        link = data / "extensions" / "concept-eraser"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)

    def start(self, timeout: float = 400, extra: tuple[str, ...] = ()) -> float:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        flags = A1111_FLAGS if self.kind == "a1111" else FORGE_FLAGS
        args = [self.python, "launch.py", *flags, "--data-dir", str(self.data), "--ckpt-dir", str(self.ckpt_dir),
                "--server-name", "127.0.0.1", "--port", str(self.port), "--api",
                "--ckpt", str(self.ckpt_dir / self.checkpoint), *extra]
        start = time.monotonic()
        self.process = subprocess.Popen(args, cwd=self.webui_dir, env=env, stdout=open(self.log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the WebUI exited:\n{self.log.read_text()[-4000:]}")
            # A1111 loads the checkpoint at start-up; Forge at the first generation (or erase)
            log = self.log.read_text()
            if "Stable diffusion model failed to load" in log:
                raise RuntimeError(f"the WebUI could not load the checkpoint:\n{log[-6000:]}")
            if self.kind != "a1111" or "Model loaded in" in log:
                try:
                    if self.request("GET", f"{API}/status", timeout=10)[0] == 200:
                        return time.monotonic() - start
                except OSError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"the WebUI did not start in {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def request(self, method: str, path: str, body=None, timeout: float = 900) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str):
        status, payload = self.request("GET", path)
        assert status == 200, (path, status, payload)
        return payload

    def post(self, path: str, body=None):
        return self.request("POST", path, body if body is not None else {})

    def txt2img(self, prompt: str, seed: int = 5, size: int = 64, negative: str = ""):
        """One small 3-step image through the WebUI's own API (the negative prompt empty by default, as in the
        WebUI), as a float array."""
        import base64
        import io

        import numpy as np
        from PIL import Image

        status, out = self.post("/sdapi/v1/txt2img", {"prompt": prompt, "negative_prompt": negative, "seed": seed,
                                                      "steps": 3, "width": size, "height": size,
                                                      "sampler_name": "Euler", "cfg_scale": 5})
        assert status == 200, out
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))), dtype=np.float64)


# Settings that erase with every method in seconds on the CPU (the closed-form methods at their defaults; KPOP a
# few steps, with a learning rate large enough that three steps show in a 3-step image)
QUICK = {"uce": {}, "rece": {}, "space": {}, "erasepro": {},
         "kpop": {"steps": 3, "ddim_steps": 4, "lr": 1e-3, "prompt_lr": 1e-3, "resolution": 64}}


def check_erase_changes_the_image_and_restore_gives_it_back(webui, method: str, prompt: str = "van gogh") -> dict:
    """txt2img of the target prompt before, after an erase, and after Restore: the erased image differs, the
    restored one is the original bit for bit, and no image is black (NaN). Returns the erase's answer."""
    import numpy as np

    before = webui.txt2img(prompt)
    status, erased = webui.post(f"{API}/erase", {"method": method, "erase": prompt, "preserve": "monet",
                                                 "params": QUICK[method]})
    assert status == 200, erased
    after = webui.txt2img(prompt)
    restore_status, restored = webui.post(f"{API}/restore")
    assert restore_status == 200 and restored["restored_tensors"] > 0, restored
    again = webui.txt2img(prompt)
    for image in (before, after):
        assert image.std() > 1.0, f"{method}: a flat (black: NaN) image"
    assert np.abs(after - before).mean() > 1.0, f"{method}: the erasure did not change the image"
    assert np.array_equal(again, before), f"{method}: restore did not give the original image back"
    return erased


BROWSER = r'''
import json, sys, time
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
url, shots = sys.argv[1], sys.argv[2]
o = Options()
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1250"):
    o.add_argument(a)
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
result = {}
def el(css): return d.find_element(By.CSS_SELECTOR, css)
def wait(cond, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = cond()
            if v: return v
        except Exception: pass
        time.sleep(0.5)
    raise TimeoutError(d.page_source[-2000:])
def message(): return el("#concept_eraser_message").text
def toggle(css):
    d.execute_script("var e = document.querySelector(arguments[0]);"
                     " (e.querySelector('.label-wrap') || e.firstElementChild).click();", css)
def set_value(css, value):
    box = el(css)
    d.execute_script("arguments[0].value = arguments[1];"
                     " arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, value)
try:
    d.get(url)
    wait(lambda: d.find_elements(By.CSS_SELECTOR, "#tabs button"))
    # txt2img settings the Preview uses: small and fast on the CPU
    set_value("#txt2img_steps input[type=number]", "3")
    set_value("#txt2img_width input[type=number]", "64")
    set_value("#txt2img_height input[type=number]", "64")
    set_value("#txt2img_seed input", "777")
    tab = wait(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, "#tabs button")
                        if b.text.strip() == "Concept Eraser"])
    tab[0].click()
    wait(lambda: el("#concept_eraser_erase textarea").is_displayed())
    result["status_initial"] = el("#concept_eraser_status textarea").get_attribute("value")
    # bad input: lam = -1
    toggle("#concept_eraser_parameters")  # open the method parameters
    wait(lambda: el("#concept_eraser_uce_lam input").is_displayed())
    set_value("#concept_eraser_uce_lam input", "-1")
    set_value("#concept_eraser_erase textarea", "van gogh")
    el("#concept_eraser_erase_button").click()
    result["bad_message"] = wait(lambda: "params.lam" in message() and message())
    set_value("#concept_eraser_uce_lam input", "0.5")
    set_value("#concept_eraser_preserve textarea", "monet")
    el("#concept_eraser_erase_button").click()
    result["erase_message"] = wait(lambda: "erased" in message() and message())
    result["status_erased"] = el("#concept_eraser_status textarea").get_attribute("value")
    set_value("#concept_eraser_prompts textarea", "a painting by van gogh\na cat")
    el("#concept_eraser_preview_button").click()
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#concept_eraser_gallery img")) >= 4)
    result["preview_message"] = wait(lambda: "seed" in message() and message())
    captions = "#concept_eraser_gallery .caption-label, #concept_eraser_gallery figcaption"
    result["captions"] = [c.text for c in d.find_elements(By.CSS_SELECTOR, captions)]
    toggle("#concept_eraser_parameters")  # fold the parameters away for the screenshot
    d.execute_script("window.scrollTo(0, 0)")
    time.sleep(1)
    d.save_screenshot(shots + "/concept_eraser_tab.png")
    set_value("#concept_eraser_name textarea, #concept_eraser_name input", "browser-erased")
    el("#concept_eraser_save_button").click()
    result["save_message"] = wait(lambda: "saved" in message() and message())
    el("#concept_eraser_restore_button").click()
    result["restore_message"] = wait(lambda: "restored" in message() and message())
    result["status_restored"] = el("#concept_eraser_status textarea").get_attribute("value")
    d.save_screenshot(shots + "/concept_eraser_restored.png")
    # KPOP, chosen by its display name, a few steps
    el("#concept_eraser_method input").click()
    wait(lambda: [o for o in d.find_elements(By.CSS_SELECTOR, "ul.options li") if o.text.strip() == "KPOP"])[0].click()
    result["method_help"] = wait(lambda: "prompt" in el("#concept_eraser_method_help").text and
                                 el("#concept_eraser_method_help").text)
    toggle("#concept_eraser_parameters")
    wait(lambda: el("#concept_eraser_kpop_steps textarea, #concept_eraser_kpop_steps input").is_displayed())
    for name, value in (("steps", "3"), ("ddim_steps", "4"), ("lr", "0.001"), ("resolution", "64")):
        set_value("#concept_eraser_kpop_{0} textarea, #concept_eraser_kpop_{0} input".format(name), value)
    el("#concept_eraser_erase_button").click()
    result["kpop_message"] = wait(lambda: ("erased" in message() or "⚠" in message()) and message(), 900)
    el("#concept_eraser_restore_button").click()
    result["kpop_restore_message"] = wait(lambda: "restored" in message() and message())
finally:
    d.quit()
print(json.dumps(result))
'''
