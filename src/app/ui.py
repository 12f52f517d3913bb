"""The page: its tabs wired to the handler modules (inpaint.py, train.py, data.py), which
hold all the work. What is here only moves values between widgets and those functions, and
turns their errors into the command line's one `error:` line in the page (ui_errors.py)."""

from __future__ import annotations

import importlib
import threading

import gradio as gr
from PIL import Image

from ..backends.registry import backend_names
from ..panels import Grid
from . import inpaint
from .ui_data import data_tab
from .ui_errors import shows_errors
from .ui_train import train_tab
from .workspace import Workspace

TITLE = "iclora"


def build_app(ws: Workspace) -> gr.Blocks:
    # diffusers takes ~10 s to import: done while the page loads, not at the first click.
    threading.Thread(target=importlib.import_module, args=("iclora.inference.inpaint",), daemon=True).start()

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## iclora\nWorkspace: `{ws.root}`; every path below is relative to it.")
        with gr.Tabs():
            with gr.Tab("Inpaint", id="inpaint"):
                inpaint_tab(ws)
            with gr.Tab("Train", id="train"):
                train_tab(ws)
            with gr.Tab("Data", id="data"):
                data_tab(ws)
    return demo


# ---- Inpaint ---------------------------------------------------------------------------------


def inpaint_tab(ws: Workspace) -> None:
    loras = inpaint.list_loras(ws)
    with gr.Row():
        lora = gr.Dropdown(loras, value=loras[0], allow_custom_value=True, label="LoRA (final_model or a checkpoint)",
                           elem_id="lora", scale=3)
        other = gr.Dropdown(["", *loras], value="", allow_custom_value=True, elem_id="lora_b", scale=3,
                            label="Compare with (optional: a second LoRA, same input and seeds)")
        refresh = gr.Button("Refresh list", scale=1)
    with gr.Row():
        backend = gr.Radio(list(backend_names()), value="sdxl", label="Backend", elem_id="inpaint_backend")
        base = gr.Textbox(label="Base model (blank: the LoRA's)", placeholder="tiny-sdxl, org/name or a folder",
                          elem_id="base_model")
        grid = gr.Textbox(label="Grid (blank: the LoRA's, else 2x2)", elem_id="grid", placeholder="2x2")
    with gr.Row():
        composite = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], elem_id="composite",
                             label="Composite (drop it here)", height=360)
        preview = gr.Image(interactive=False, format="png", elem_id="panels_preview",
                           label="Click the panels to regenerate (red)", height=360)
    pieces = gr.File(file_count="multiple", file_types=["image"], elem_id="panel_files", height=120,
                     label="...or drop separate panels (composed in the order given, row-major; missing ones white)")
    panels = gr.Textbox("", label="Panels to regenerate (row-major from 0, or 'all')", elem_id="panels_text")
    with gr.Accordion("Paint a free-form mask instead", open=False):
        use_mask = gr.Checkbox(False, label="Use the painted mask (white strokes = regenerate)", elem_id="use_mask")
        painter = gr.ImageMask(type="numpy", label="Paint over the composite", elem_id="mask_painter",
                               sources=[], layers=False, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"))
    prompt = gr.Textbox(label="Prompt (one for all panels: [TOP-LEFT] ... or [IMAGE 1] ...)", lines=2, elem_id="prompt")
    negative = gr.Textbox(label="Negative prompt (optional)")
    with gr.Row():
        strength = gr.Slider(0.05, 1.0, 1.0, step=0.05, label="Strength")
        feather = gr.Slider(0, 128, 0, step=1, label="Feathering (px, 0 = hard edges)")
        defaults = inpaint.script_defaults("sdxl")
        steps = gr.Number(defaults["num_inference_steps"], precision=0, minimum=1, label="Steps", elem_id="steps")
        guidance = gr.Number(defaults["guidance_scale"], minimum=0, label="Guidance", elem_id="guidance")
        seed = gr.Number(42, precision=0, label="Seed", elem_id="seed")
        count = gr.Slider(1, 8, 1, step=1, label="Images")
    out_dir = gr.Textbox("inpaint_output", label="Output folder", elem_id="inpaint_out")
    run = gr.Button("Inpaint", variant="primary", elem_id="inpaint_run")
    status = gr.Textbox(label="Status", interactive=False, elem_id="inpaint_status")
    with gr.Row():
        sheet = gr.Image(label="Comparison", interactive=False, format="png", elem_id="comparison", height=300)
        sheet_b = gr.Image(label="Comparison (second LoRA)", interactive=False, format="png", elem_id="comparison_b",
                           height=300)
    gallery = gr.Gallery(label="Outputs", format="png", columns=4, height=300, elem_id="outputs")
    files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="downloads")
    command = gr.Code(label="The same on the command line", language="shell", interactive=False)

    @shows_errors(2)
    def pick_lora(lora_value, grid_value):
        recorded = inpaint.recorded_grid(ws, lora_value)
        return "", recorded or grid_value

    lora.change(pick_lora, [lora, grid], [status, grid])
    backend.change(lambda b: (inpaint.script_defaults(b)["num_inference_steps"], inpaint.script_defaults(b)["guidance_scale"]),
                   backend, [steps, guidance])
    refresh.click(lambda: (gr.update(choices=inpaint.list_loras(ws)), gr.update(choices=["", *inpaint.list_loras(ws)])),
                  None, [lora, other])

    @shows_errors(3)
    def show_panels(image_path, panels_value, grid_value):
        if not image_path:
            return "", None, gr.skip()
        with Image.open(image_path) as image:
            drawn = inpaint.draw_panels(image, Grid.parse(grid_value or "2x2"), panels_value)
        return "", drawn, gr.update(value=image_path)

    for trigger in (composite.change, panels.change, grid.change):
        trigger(show_panels, [composite, panels, grid], [status, preview, painter])

    @shows_errors(2)
    def compose_pieces(files_v, grid_v, out_v):
        if not files_v:
            return "", gr.skip()
        target = inpaint.compose_panels(list(files_v), grid_v, ws.path(out_v, "output folder"))
        return f"composed {len(files_v)} panels into {ws.relative(target)}", str(target)

    pieces.upload(compose_pieces, [pieces, grid, out_dir], [status, composite])

    @shows_errors(2)
    def click_panel(image_path, panels_value, grid_value, evt: gr.SelectData):
        if not image_path:
            return "error: drop a composite first", gr.skip()
        g = Grid.parse(grid_value or "2x2")
        with Image.open(image_path) as image:
            index = inpaint.panel_at(evt.index[0], evt.index[1], *image.size, g)
        return "", inpaint.toggle_panel(panels_value, index, g)

    preview.select(click_panel, [composite, panels, grid], [status, panels])

    @shows_errors(6)
    def do_inpaint(image_path, lora_v, other_v, backend_v, base_v, grid_v, panels_v, use_mask_v, painted, prompt_v,
                   negative_v, strength_v, feather_v, steps_v, guidance_v, seed_v, count_v, out_v):
        settings = inpaint.InpaintSettings(
            lora=lora_v or "none", prompt=prompt_v, panels=panels_v, backend=backend_v, base_model=base_v or "",
            grid=grid_v or "", strength=strength_v, feather=int(feather_v), steps=steps_v, guidance=guidance_v,
            seed=None if seed_v is None else int(seed_v), num_images=int(count_v), negative_prompt=negative_v or "",
            output_dir=out_v)
        mask = inpaint.painted_mask(painted) if use_mask_v else None
        if other_v:
            first, second = inpaint.run_compare(ws, settings, other_v, image_path, mask)
        else:
            first, second = inpaint.run_inpaint(ws, settings, image_path, mask), None
        written = [str(f) for r in (first, second) if r for f in r.files]
        message = f"wrote {len(written)} files to {ws.relative(first.comparison.parent.parent)}"
        return (message, str(first.comparison), str(second.comparison) if second else None,
                [str(p) for r in (first, second) if r for p in r.outputs], written,
                "\n".join(r.command for r in (first, second) if r))

    run.click(do_inpaint, [composite, lora, other, backend, base, grid, panels, use_mask, painter, prompt, negative,
                           strength, feather, steps, guidance, seed, count, out_dir],
              [status, sheet, sheet_b, gallery, files, command])

