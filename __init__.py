"""ComfyUI entry point of the Concept Eraser node pack.

ComfyUI imports this file when the repository sits in `custom_nodes/`. It must import cleanly
without ComfyUI (the solver and the command line live in `concept_eraser/` and need no host);
the nodes themselves arrive with the ComfyUI node pack.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
