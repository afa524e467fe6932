"""The example workflows (ComfyUI's UI format) and their conversion to the API format the server runs.

`python tests/comfy_workflows.py` rewrites example_workflows/*.json from the definitions below; the
host tests check that the shipped files are what these definitions give, and run them. The pack's
nodes save their widget values by name (see javascript/comfyui/concept_eraser.js), so a workflow lists
only the values it sets; every other method parameter keeps its default.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "example_workflows"

# The socket inputs of each node (inputs that take a link, not widgets), in declared order. The frontend lists
# them first in a node's `inputs` and a link's target_slot indexes them (widget inputs come after them).
SOCKETS = {
    "UNETLoader": [], "DualCLIPLoader": [], "VAELoader": [], "CheckpointLoaderSimple": [], "TripleCLIPLoader": [],
    "ConceptEraserLoadCheckpoint": [],
    "ConceptEraserErase": [("model", "MODEL"), ("clip", "CLIP")],
    "ConceptEraserPreview": [("model", "MODEL"), ("clip", "CLIP"), ("erased_model", "MODEL"),
                             ("erased_clip", "CLIP"), ("vae", "VAE"), ("erasure", "ERASURE")],
    "ConceptEraserSave": [("erasure", "ERASURE"), ("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
    "ConceptEraserReport": [("erasure", "ERASURE")],
}
OUTPUTS = {
    "UNETLoader": [("MODEL", "MODEL")], "DualCLIPLoader": [("CLIP", "CLIP")], "VAELoader": [("VAE", "VAE")],
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "TripleCLIPLoader": [("CLIP", "CLIP")],
    "ConceptEraserLoadCheckpoint": [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("layout", "STRING")],
    "ConceptEraserErase": [("model", "MODEL"), ("clip", "CLIP"), ("erasure", "ERASURE")],
    "ConceptEraserPreview": [("grid", "IMAGE")],
    "ConceptEraserSave": [("path", "STRING")],
    "ConceptEraserReport": [("text", "STRING"), ("plot", "IMAGE")],
}
SIZES = {
    "UNETLoader": [320, 90], "DualCLIPLoader": [320, 130], "VAELoader": [320, 60],
    "CheckpointLoaderSimple": [320, 100], "TripleCLIPLoader": [320, 110],
    "ConceptEraserLoadCheckpoint": [340, 170],
    "ConceptEraserErase": [360, 520],
    "ConceptEraserPreview": [420, 560],
    "ConceptEraserSave": [340, 200],
    "ConceptEraserReport": [420, 480],
}

# ComfyUI's own nodes save their widget values as a list, in the order of their inputs (`input_order`).
WIDGETS = {
    "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "VAELoader": ["vae_name"],
    "CheckpointLoaderSimple": ["ckpt_name"],
    "TripleCLIPLoader": ["clip_name1", "clip_name2", "clip_name3"],
}


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos, widgets: dict, title: str | None = None, size=None) -> int:
        node_id = len(self.nodes) + 1
        node = {
            "id": node_id, "type": node_type, "pos": list(pos), "size": list(size or SIZES[node_type]), "flags": {},
            "order": node_id - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in SOCKETS[node_type]],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(OUTPUTS[node_type])],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": [widgets[n] for n in WIDGETS[node_type]] if node_type in WIDGETS else dict(widgets),
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def link(self, source: int, output: str, target: int, input_name: str) -> None:
        src, dst = self.nodes[source - 1], self.nodes[target - 1]
        slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        kind = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        target_slot = [name for name, _ in SOCKETS[dst["type"]]].index(input_name)
        self.links.append([link_id, source, slot, target, target_slot, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target_slot]["link"] = link_id

    def workflow(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}


def erase_preview_save_graph(g: Graph, model: tuple[int, str], clip: tuple[int, str], vae: tuple[int, str],
                             sampling: dict, save_format: str, prefix: str) -> dict:
    """UCE on Van Gogh (Monet and Picasso kept) → Preview before/after → Save and Report, fed by loader outputs
    already in `g` (`model`, `clip`, `vae`: node id and output name); `sampling`: the Preview's sampler widgets."""
    erase = g.add("ConceptEraserErase", (420, 160), {
        "method": "uce", "targets": "Van Gogh", "guides": "", "preserve": "Claude Monet\nPablo Picasso",
        "strength": 1.0})
    preview = g.add("ConceptEraserPreview", (820, 60), {
        "prompts": "a painting in the style of Van Gogh, starry night over a village\n"
                   "a painting in the style of Claude Monet, water lilies", **sampling})
    save = g.add("ConceptEraserSave", (420, 860),
                 {"format": save_format, "folder": "models", "filename_prefix": prefix})
    report = g.add("ConceptEraserReport", (1280, 60), {})
    for name, (source, output) in (("model", model), ("clip", clip)):
        g.link(source, output, erase, name)
        g.link(source, output, preview, name)
        g.link(erase, name, preview, f"erased_{name}")
    g.link(*vae, preview, "vae")
    g.link(erase, "erasure", preview, "erasure")
    g.link(erase, "erasure", save, "erasure")
    if save_format == "checkpoint":
        g.link(erase, "model", save, "model")
        g.link(erase, "clip", save, "clip")
        g.link(*vae, save, "vae")
    g.link(erase, "erasure", report, "erasure")
    return g.workflow()


def erase_preview_save(ckpt: str, size: int, steps: int, save_format: str, prefix: str) -> dict:
    g = Graph()
    load = g.add("ConceptEraserLoadCheckpoint", (40, 160), {"ckpt_name": ckpt})
    sampling = {"negative": "blurry, low quality", "seed": 42, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                "scheduler": "normal", "width": size, "height": size}
    return erase_preview_save_graph(g, (load, "model"), (load, "clip"), (load, "vae"), sampling, save_format, prefix)


def chain_two_methods() -> dict:
    g = Graph()
    load = g.add("ConceptEraserLoadCheckpoint", (40, 160), {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"})
    first = g.add("ConceptEraserErase", (420, 160), {
        "method": "uce", "targets": "Van Gogh", "guides": "", "preserve": "Claude Monet", "strength": 1.0},
        title="Erase Concept (UCE: Van Gogh)")
    second = g.add("ConceptEraserErase", (820, 160), {
        "method": "rece", "targets": "Pablo Picasso", "guides": "", "preserve": "Claude Monet", "strength": 1.0,
        "rece_epochs": 2}, title="Erase Concept (RECE: Pablo Picasso)", size=[360, 600])
    preview = g.add("ConceptEraserPreview", (1220, 60), {
        "prompts": "a painting in the style of Van Gogh\na painting by Pablo Picasso\na painting by Claude Monet",
        "negative": "blurry, low quality", "seed": 7, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "width": 512, "height": 512})
    save = g.add("ConceptEraserSave", (820, 960), {"format": "checkpoint", "folder": "models",
                                                   "filename_prefix": "concept_eraser/sd15_no_van_gogh_picasso"})
    report = g.add("ConceptEraserReport", (1680, 60), {})
    for name in ("model", "clip"):
        g.link(load, name, first, name)
        g.link(first, name, second, name)
        g.link(load, name, preview, name)
        g.link(second, name, preview, f"erased_{name}")
        g.link(second, name, save, name)
    g.link(load, "vae", preview, "vae")
    g.link(load, "vae", save, "vae")
    g.link(second, "erasure", preview, "erasure")
    g.link(second, "erasure", save, "erasure")
    g.link(second, "erasure", report, "erasure")
    return g.workflow()


def kpop_erase() -> dict:
    """KPOP with its defaults (the settings for a real model; CI overrides the steps and size), saving the
    erasure as a patch and the learned prompt beside it."""
    g = Graph()
    load = g.add("ConceptEraserLoadCheckpoint", (40, 160), {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"})
    erase = g.add("ConceptEraserErase", (420, 160), {
        "method": "kpop", "targets": "Van Gogh", "guides": "", "preserve": "", "strength": 1.0},
        title="Erase Concept (KPOP: Van Gogh)", size=[360, 640])
    preview = g.add("ConceptEraserPreview", (820, 60), {
        "prompts": "a painting in the style of Van Gogh\na painting in the style of Claude Monet",
        "negative": "blurry, low quality", "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "width": 512, "height": 512})
    patch = g.add("ConceptEraserSave", (420, 960), {"format": "patch", "folder": "models",
                                                    "filename_prefix": "concept_eraser/sd15_kpop_no_van_gogh"})
    learned = g.add("ConceptEraserSave", (820, 960), {"format": "learned_prompt", "folder": "output",
                                                      "filename_prefix": "concept_eraser/sd15_kpop_prompt"})
    report = g.add("ConceptEraserReport", (1280, 60), {})
    for name in ("model", "clip"):
        g.link(load, name, erase, name)
        g.link(load, name, preview, name)
        g.link(erase, name, preview, f"erased_{name}")
    g.link(load, "vae", preview, "vae")
    for target in (preview, patch, learned, report):
        g.link(erase, "erasure", target, "erasure")
    return g.workflow()


def flux_erase_preview_save() -> dict:
    """Flux.1 dev as its users load it (diffusion model, CLIP-L + T5-XXL, VAE, each with its own loader): UCE on
    txt_in and, by default (pooled_edit auto), vector_in; the erasure saved as a LoRA for any LoRA loader."""
    g = Graph()
    unet = g.add("UNETLoader", (40, 60), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"})
    clip = g.add("DualCLIPLoader", (40, 200), {"clip_name1": "clip_l.safetensors",
                                               "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                               "device": "default"})
    vae = g.add("VAELoader", (40, 380), {"vae_name": "ae.safetensors"})
    sampling = {"negative": "", "seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                "width": 1024, "height": 1024}
    return erase_preview_save_graph(g, (unet, "MODEL"), (clip, "CLIP"), (vae, "VAE"), sampling, "lora",
                                    "concept_eraser/flux_no_van_gogh")


def sd3_erase_preview_save() -> dict:
    """SD3.5 as its users load it: the release file (transformer and VAE) with Load Checkpoint, CLIP-L, CLIP-G and
    T5-XXL with TripleCLIPLoader; UCE on context_embedder and, by default (pooled_edit auto), y_embedder; saved as
    a patch."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (40, 60), {"ckpt_name": "sd3.5_large.safetensors"})
    clip = g.add("TripleCLIPLoader", (40, 220), {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                                 "clip_name3": "t5xxl_fp16.safetensors"})
    sampling = {"negative": "blurry, low quality", "seed": 42, "steps": 28, "cfg": 4.5, "sampler_name": "euler",
                "scheduler": "sgm_uniform", "width": 1024, "height": 1024}
    return erase_preview_save_graph(g, (ckpt, "MODEL"), (clip, "CLIP"), (ckpt, "VAE"), sampling, "patch",
                                    "concept_eraser/sd35_no_van_gogh")


def examples() -> dict[str, dict]:
    return {
        "concept_eraser_sd15_erase_preview_save.json": erase_preview_save(
            "v1-5-pruned-emaonly-fp16.safetensors", 512, 20, "checkpoint", "concept_eraser/sd15_no_van_gogh"),
        "concept_eraser_sdxl_erase_preview_save.json": erase_preview_save(
            "sd_xl_base_1.0.safetensors", 1024, 25, "lora", "concept_eraser/sdxl_no_van_gogh"),
        "concept_eraser_chain_uce_then_rece.json": chain_two_methods(),
        "concept_eraser_sd15_kpop.json": kpop_erase(),
        "concept_eraser_flux_erase_preview_save.json": flux_erase_preview_save(),
        "concept_eraser_sd35_erase_preview_save.json": sd3_erase_preview_save(),
    }


def to_api(workflow: dict, overrides: dict[str, dict] | None = None) -> dict:
    """UI-format workflow → API format ({id: {class_type, inputs}}). Widget values are taken by name (the
    pack's nodes save them so) or, for ComfyUI's own nodes, by position (WIDGETS); `overrides` maps node type →
    {input: value} for every node of that type."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        values = node.get("widgets_values") or {}
        if not isinstance(values, dict):
            if node["type"] not in WIDGETS:
                raise ValueError(f"node {node['id']} ({node['type']}) has positional widget values")
            values = dict(zip(WIDGETS[node["type"]], values))
        inputs = dict(values)
        inputs.update((overrides or {}).get(node["type"], {}))
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                _, source, slot, _target, _tslot, _kind = links[entry["link"]]
                inputs[entry["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def main() -> int:
    EXAMPLES.mkdir(exist_ok=True)
    for name, workflow in examples().items():
        (EXAMPLES / name).write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {EXAMPLES / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
