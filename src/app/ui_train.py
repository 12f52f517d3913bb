"""The Train tab: settings -> train.start_run; a timer reads the run's files every few
seconds (train.run_status), so the page shows the run however it was opened."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from ..backends.registry import backend_names
from . import train
from .ui_errors import shows_errors
from .workspace import Workspace

REFRESH_SECONDS = 2.0


def train_tab(ws: Workspace) -> None:
    folders = ws.folders()
    with gr.Row():
        backend = gr.Radio(list(backend_names()), value="sdxl", label="Backend", elem_id="train_backend")
        model = gr.Textbox(label="Base model (blank: the script's default)", elem_id="train_model",
                           placeholder="tiny-sdxl, stabilityai/stable-diffusion-xl-base-1.0 or a folder")
        config = gr.Textbox(label="YAML config (optional; the fields below override it)", elem_id="train_config",
                            placeholder="examples/sdxl_2x2.yaml")
    with gr.Row():
        data = gr.Dropdown(folders, value=None, allow_custom_value=True, label="Data folder", elem_id="train_data")
        output = gr.Textbox("output/run1", label="Output folder", elem_id="train_output")
    with gr.Row():
        steps = gr.Number(None, precision=0, label="Max train steps", elem_id="train_steps")
        epochs = gr.Number(None, precision=0, label="Epochs", elem_id="train_epochs")
        batch = gr.Number(None, precision=0, label="Batch size", elem_id="train_batch")
        lr = gr.Number(None, label="Learning rate", elem_id="train_lr")
        rank = gr.Number(None, precision=0, label="LoRA rank", elem_id="train_rank")
        size = gr.Number(None, precision=0, label="Image size", elem_id="train_size")
    with gr.Row():
        grid = gr.Textbox(label="Grid", placeholder="2x2", elem_id="train_grid")
        conditioning = gr.Dropdown(["", "concat", "context", "blend"], value="", label="Conditioning")
        validation = gr.Number(None, precision=0, label="Sample sheets every N steps", elem_id="train_validation")
        save = gr.Number(None, precision=0, label="Checkpoint every N steps", elem_id="train_save")
        seed = gr.Number(None, precision=0, label="Seed (0: the default)")
        overwrite = gr.Checkbox(False, label="Overwrite an earlier run's results")
    extra = gr.Textbox(label="More flags (as on the command line)", elem_id="train_extra",
                       placeholder="--lora_alpha 16 --mask_probability 0.7 --validation_inference_steps 20")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train_start")
        stop = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train_stop")
        resume = gr.Button("Resume", elem_id="train_resume")
    status = gr.Textbox(label="Status", interactive=False, elem_id="train_status")
    with gr.Row():
        curve = gr.LinePlot(x="step", y="loss", title="Loss (train_log.jsonl)", elem_id="loss_curve", height=280)
        samples = gr.Gallery(label="Sample sheets (input | mask | completion)", format="png", columns=2, height=280,
                             object_fit="contain",
                             elem_id="samples")
    log = gr.Textbox(label="Output of the run", lines=8, max_lines=12, interactive=False, elem_id="train_log")
    command = gr.Code(label="The same on the command line", language="shell", interactive=False)
    timer = gr.Timer(REFRESH_SECONDS)

    @shows_errors(1)
    def do_start(*values):
        return train.start_run(ws, _settings(*values))

    @shows_errors(1)
    def do_stop(output_v):
        return train.stop_run(ws, output_v)

    @shows_errors(1)
    def do_resume(output_v):
        return train.resume_run(ws, output_v)

    def refresh(output_v, status_v):
        try:
            run = train.run_status(ws, output_v)
        except (ValueError, OSError) as error:
            return f"error: {error}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
        message = run.message
        if status_v and status_v.startswith("error:") and run.state != "running":
            message = status_v  # a refusal stays in view until something runs
        frame = pd.DataFrame(run.losses, columns=["step", "loss"])
        return message, frame, [str(p) for p in run.samples], run.log_tail, run.command

    fields = [backend, model, config, data, output, steps, epochs, batch, lr, rank, size, grid, conditioning,
              validation, save, seed, overwrite, extra]
    start.click(do_start, fields, status)
    stop.click(do_stop, output, status)
    resume.click(do_resume, output, status)
    timer.tick(refresh, [output, status], [status, curve, samples, log, command], show_progress="hidden")


def _settings(backend, model, config, data, output, steps, epochs, batch, lr, rank, size, grid, conditioning,
              validation, save, seed, overwrite, extra) -> train.TrainSettings:
    return train.TrainSettings(
        data_dir=data or "", output_dir=output or "", backend=backend, model_id=model or "", config=config or "",
        max_train_steps=steps, num_epochs=epochs, batch_size=batch, learning_rate=lr, lora_rank=rank,
        image_size=size, grid=grid or "", conditioning=conditioning or "", validation_every=validation,
        save_every=save, seed=seed, overwrite_output_dir=bool(overwrite), extra_flags=extra or "")
