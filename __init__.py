"""ComfyUI entry point of the Concept Eraser node pack.

ComfyUI imports this file when the repository sits in `custom_nodes/` (as a package under a name of its
own; the pack is not put on sys.path, so everything inside imports relatively). It must import cleanly
without ComfyUI too: the solver and the command line live in `concept_eraser/` and need no host, and
the nodes import the host only when they run.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# ComfyUI serves every .js file under this folder to its frontend (javascript/ itself is the WebUI's).
WEB_DIRECTORY = "./javascript/comfyui"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
