"""IC-LoRA nodes for ComfyUI: context completion as iclora trains it, panel masks, composites.

Install: copy or link this folder into ComfyUI/custom_nodes/. The nodes import ComfyUI's
`comfy` package, so they load only inside ComfyUI; `completion.py` (the math) and
`panels.py` need only torch and PIL.
"""

try:
    import comfy.patcher_extension  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported for its pure modules, outside ComfyUI
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
