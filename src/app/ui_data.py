"""The Data tab: a folder's dry-run report, each composite with its grid, caption and checks,
captions saved in place, and composites built from photo sets (data.py does the work)."""

from __future__ import annotations

import gradio as gr

from ..backends.registry import backend_names
from . import data
from .ui_errors import shows_errors
from .workspace import Workspace


def data_tab(ws: Workspace) -> None:
    with gr.Row():
        folder = gr.Dropdown(ws.folders(), value=None, allow_custom_value=True, label="Data folder", elem_id="data_dir")
        grid = gr.Textbox("2x2", label="Grid", elem_id="data_grid")
        backend = gr.Radio(list(backend_names()), value="sdxl", label="Backend (its text encoders count the tokens)")
        model = gr.Textbox(label="Base model (blank: the script's default)", placeholder="tiny-sdxl", elem_id="data_model")
        size = gr.Number(None, precision=0, label="Image size (0: the default)", elem_id="data_size")
        load = gr.Button("Load", variant="primary", elem_id="data_load")
    status = gr.Textbox(label="Status", interactive=False, elem_id="data_status")
    report = gr.Textbox(label="What training would see (the dry run)", lines=8, interactive=False,
                        elem_id="data_report")
    with gr.Row():
        with gr.Column(scale=1):
            names = gr.Dropdown([], label="Composite", elem_id="data_image")
            picture = gr.Image(interactive=False, format="png", label="Composite with its panel grid", height=360,
                               elem_id="data_picture")
        with gr.Column(scale=1):
            caption = gr.Textbox(label="Caption", lines=6, elem_id="data_caption")
            checks = gr.Textbox(label="Checks: tokens per text encoder, markers", lines=4, interactive=False,
                                elem_id="data_checks")
            save = gr.Button("Save caption", elem_id="data_save")
    with gr.Accordion("Build composites from photo sets (the compose command)", open=False):
        with gr.Row():
            photos = gr.Textbox(label="Photo sets folder (one sub-folder per composite)", elem_id="compose_input")
            composed = gr.Textbox(label="Output folder", elem_id="compose_output")
            compose_grid = gr.Textbox("2x2", label="Grid", elem_id="compose_grid")
        with gr.Row():
            width = gr.Number(512, precision=0, label="Panel width")
            height = gr.Number(None, precision=0, label="Panel height (0: the width)")
            fit = gr.Radio(["letterbox", "crop"], value="letterbox", label="Fit")
            background = gr.Textbox("white", label="Letterbox colour")
        with gr.Row():
            grouping = gr.Radio(["folders", "names"], value="folders", label="Groups")
            order = gr.Textbox(label="Panel order (names, optional)")
            markers = gr.Radio(["image", "position", "scene"], value="image", label="Caption markers")
            fmt = gr.Radio(["png", "jpg"], value="png", label="Format")
            overwrite = gr.Checkbox(False, label="Overwrite")
        build = gr.Button("Compose", elem_id="compose_run")
        compose_report = gr.Textbox(label="Compose report", lines=4, interactive=False, elem_id="compose_report")

    @shows_errors(3)
    def do_load(folder_v, grid_v, backend_v, model_v, size_v):
        found = data.list_images(ws, folder_v)
        if not found:
            return f"no images in {folder_v}", gr.update(choices=[], value=None), ""
        try:
            text = data.folder_report(ws, folder_v, grid_v, backend_v, model_v, size_v)
        except (ValueError, OSError) as error:  # the folder would be refused: still browse and fix it
            text = f"error: {error}".replace(f"{ws.root}/", "")
        return f"{len(found)} composites in {folder_v}", gr.update(choices=found, value=found[0]), text

    @shows_errors(4)
    def do_show(folder_v, name, grid_v, backend_v, model_v):
        if not name:
            return "", None, "", ""
        text = data.read_image_caption(ws, folder_v, name)
        check = data.check_caption(text, grid_v, backend_v, model_v, name)
        return "", data.show_image(ws, folder_v, name, grid_v), text or "", check.text()

    @shows_errors(2)
    def do_save(folder_v, name, text, grid_v, backend_v, model_v):
        target = data.save_caption(ws, folder_v, name, text)
        check = data.check_caption(data.read_image_caption(ws, folder_v, name), grid_v, backend_v, model_v, name)
        return f"saved {ws.relative(target)}", check.text()

    @shows_errors(2)
    def do_compose(*values):
        settings = data.ComposeSettings(*values)
        text, command = data.compose_folder(ws, settings)
        return "", f"{text}\n{command}"

    load.click(do_load, [folder, grid, backend, model, size], [status, names, report])
    shown = [folder, names, grid, backend, model]
    names.change(do_show, shown, [status, picture, caption, checks])
    grid.change(do_show, shown, [status, picture, caption, checks])
    save.click(do_save, [folder, names, caption, grid, backend, model], [status, checks])
    build.click(do_compose, [photos, composed, compose_grid, width, height, fit, background, grouping, order, markers,
                             fmt, overwrite], [status, compose_report])
