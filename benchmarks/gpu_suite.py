"""A real run's memory, phase by phase, on one GPU: the training and inference CLIs a user
runs, on full-size models with random weights, measured beside the dry run's estimate.

    python benchmarks/gpu_suite.py --workdir /tmp/suite --out gpu_suite.json   # CUDA: full size
    python benchmarks/gpu_suite.py --tiny --out gpu_suite.json                 # CPU: tiny models

Full size: SDXL and FLUX.1-dev pipeline folders at their public configs (inference_models.py,
the models drawn on the GPU and saved: ~7 GB + ~34 GB under --workdir), then each run of
RUNS through the real CLI in its own process (so its peaks are its own): training writes
output_dir/memory_phases.json (peak reserved / allocated GPU memory and host RSS per phase:
load, caching, first step, sample sheet, checkpoint, final save), inference writes its own
(--memory_log: load, text encoding, then denoising and VAE decode per pipeline call) and its
process's peaks. Beside each phase: the estimate of `--dry_run` on the same command line.
Then the training step against diffusers' reference step (memory_measure.run_setting), and
with two GPUs or more DDP against FSDP2 (--distributed fsdp) across them (gpu_suite_multi.py).
One JSON file holds it all; a markdown table of it is printed.

--tiny runs the same on the CPU with the tiny models, in-process, in well under a minute
(tests/test_gpu_suite.py): no NF4 or 8-bit Adam there (CUDA only), no GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything loads from the folders this script writes
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from PIL import Image

if __package__ in (None, ""):  # run by path from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_suite_multi  # noqa: E402

sys.path.pop(0)
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "flux_storyboard_3x1.yaml"
GIB = 2**30
ENTRIES = {"train-sdxl": "iclora.training.train_sdxl_ic_lora", "train-flux": "iclora.training.train_flux_ic_lora",
           "infer-sdxl": "iclora.inference.sdxl_ic_lora_inference", "infer-flux": "iclora.inference.flux_ic_lora_inference"}
# What a run's phase is estimated as (prepare/memory.py's phases).
ESTIMATED_AS = {"load": "load", "caching text embeddings": "caching", "caching latents": "caching",
                "first step": "first step", "train": "first step", "checkpoint": "first step",
                "final save": "first step", "sample sheet": "sample sheet"}
GOALS = {"flux": 15.0, "sdxl": 12.0}  # GiB reserved in every phase (SDXL: batch 1)
HOST_GOAL_GB = 32.0


def runs(tiny: bool) -> list[dict]:
    """Every training run (and the inference after some), as command-line flags."""
    steps = ["--max_train_steps", "2", "--save_every", "2", "--validation_every", "2",
             "--validation_inference_steps", "2" if tiny else "4", "--gradient_accumulation_steps", "1",
             "--lr_warmup_steps", "0"]
    cuda = [] if tiny else ["--use_8bit_adam"]
    sdxl = ["--grid", "2x2", "--image_size", "64" if tiny else "1024", "--lora_rank", "64", "--gradient_checkpointing",
            "--cache_text_embeddings", "--cache_latents", *cuda, *steps]
    flux = ["--config", str(EXAMPLE), *([] if not tiny else ["--quantize", "none", "--no_use_8bit_adam"]), *steps]
    square = ["--grid", "2x2", "--image_size", "64" if tiny else "1024", "--validation_panels", "2", "3"]
    return [
        {"name": "sdxl concat bs1", "model": "sdxl", "data": "square", "flags": [*sdxl, "--conditioning", "concat",
                                                                              "--batch_size", "1"], "infer": [1, 4]},
        {"name": "sdxl concat bs4", "model": "sdxl", "data": "square", "flags": [*sdxl, "--conditioning", "concat",
                                                                              "--batch_size", "4"]},
        {"name": "sdxl context bs1", "model": "sdxl", "data": "square", "flags": [*sdxl, "--conditioning", "context",
                                                                               "--batch_size", "1"]},
        {"name": "sdxl context bs4", "model": "sdxl", "data": "square", "flags": [*sdxl, "--conditioning", "context",
                                                                               "--batch_size", "4"]},
        {"name": "flux context nf4 1024²", "model": "flux", "data": "square", "flags": [*flux, *square],
         "infer": [1, 4]},
        {"name": "flux context nf4 1024×1536", "model": "flux", "data": "storyboard",
         "flags": [*flux, "--image_size", "96" if tiny else "1536"]},
    ]


def write_data(folder: Path, kind: str, tiny: bool) -> Path:
    """Four toy composites: 2x2 squares, or 3x1 storyboards at 2:3 (1024x1536 full size)."""
    from iclora.toy import make_dataset

    if kind == "square":
        make_dataset(folder, n=4, panel_size=32 if tiny else 512)
    else:
        make_dataset(folder, n=4, panel_size=32 if tiny else 512, grid=(3, 1))
        size = (64, 96) if tiny else (1024, 1536)
        for path in folder.glob("*.png"):
            with Image.open(path) as image:
                image.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(path)
    return folder


def build_models(work: Path, tiny: bool) -> dict[str, Path]:
    """A diffusers folder per model: the tiny ones, or every component at its public size."""
    folders = {}
    for model in ("sdxl", "flux"):
        folder = folders[model] = work / f"{model}-model"
        if (folder / "model_index.json").is_file():
            continue
        if tiny:
            from iclora.backends.tiny import save_tiny_model

            save_tiny_model(f"tiny-{model}", folder)
            continue
        sys.path.insert(0, str(HERE))
        from inference_models import pipeline_components, save_base

        sys.path.pop(0)
        dtype = {"sdxl": torch.float16, "flux": torch.bfloat16}[model]
        save_base(model, pipeline_components(model, False, torch.device("cuda"), dtype), folder)
        torch.cuda.empty_cache()
    return folders


def child(kind: str, stats: Path, argv: list[str]) -> None:
    """One CLI call in this process, then its peaks into `stats` (JSON)."""
    import importlib

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    importlib.import_module(ENTRIES[kind]).main(argv)
    result = {"seconds": round(time.monotonic() - start, 1),
              "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}
    if torch.cuda.is_available():
        result["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        result["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    stats.write_text(json.dumps(result))


def call(kind: str, argv: list[str], stats: Path, in_process: bool) -> dict:
    if in_process:
        try:
            child(kind, stats, argv)
        except (SystemExit, Exception) as error:  # one run's failure is a row, not the suite's end
            return {"error": f"{type(error).__name__}: {error}"}
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--stats", str(stats), "--", *argv]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            return {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
    return json.loads(stats.read_text())


def dry_run(kind: str, argv: list[str]):
    """The estimate `--dry_run` prints for this command line (prepare/memory.py's Estimate)."""
    import contextlib
    import io
    import importlib

    with contextlib.redirect_stdout(io.StringIO()):
        report = importlib.import_module(ENTRIES[kind]).main([*argv, "--dry_run"])
    return report.memory


def inference_row(model: str, argv: list[str], log: Path, work: Path, tiny: bool) -> dict:
    """One inference run: its process's peaks, and per phase of its memory plan (load, text
    encoding, then denoising and VAE decode per pipeline call; --memory_log) the peaks beside
    the dry run's estimate of that phase."""
    estimate = dry_run(f"infer-{model}", argv)
    row = call(f"infer-{model}", [*argv, "--memory_log", str(log)], work / "stats.json", tiny)
    row["estimate"] = {"gpu": estimate.gpu, "host_gib": round(estimate.host, 2), "line": estimate.line()}
    row["phases"] = json.loads(log.read_text()) if log.is_file() else []
    for record in row["phases"]:
        record["estimate_gib"] = estimate.gpu.get(record["phase"])
        del record["models"]  # where each model was: tests/test_inference_memory_plan.py checks it
    return row


def run_one(spec: dict, folders: dict, work: Path, tiny: bool) -> dict:
    model, name = spec["model"], spec["name"]
    data = work / f"data-{spec['data']}"
    if not data.is_dir():
        write_data(data, spec["data"], tiny)
    out = work / "runs" / name.replace(" ", "_").replace("²", "").replace("×", "x")
    argv = ["--data_dir", str(data), "--output_dir", str(out), "--overwrite_output_dir", "--backend", model,
            "--model_id", str(folders[model]), *spec["flags"]]
    print(f"[{name}] python src/training/train_{model}_ic_lora.py {shlex.join(argv)}", file=sys.stderr, flush=True)
    estimate = dry_run(f"train-{model}", argv)
    result = {"name": name, "model": model, "argv": argv,
              "estimate": {"gpu": estimate.gpu, "host_gib": round(estimate.host, 2), "line": estimate.line()}}
    process = call(f"train-{model}", argv, work / "stats.json", tiny)
    result["process"] = process
    phases = out / "memory_phases.json"
    result["phases"] = json.loads(phases.read_text()) if phases.is_file() else []
    for record in result["phases"]:
        record["estimate_gib"] = estimate.gpu.get(ESTIMATED_AS[record["phase"]])
        if record["step"] > 0 and record["phase"] == "sample sheet":  # the allocator keeps what training reserved
            record["estimate_gib"] = max(record["estimate_gib"], estimate.gpu["first step"])
        del record["models"]  # where each model was: tests/test_memory_plan.py checks it; the file keeps it
    result["inference"] = []
    for batch in spec.get("infer", []) if "error" not in process else []:
        composite = sorted(data.glob("*.png"))[0]
        infer = ["--lora_path", str(out / "final_model"), "--input_image", str(composite), "--panels_to_inpaint", "1",
                 "--prompt", composite.with_suffix(".txt").read_text(),
                 "--num_images", str(batch), "--batch_size", str(batch), "--num_inference_steps", "2" if tiny else "4",
                 "--output_dir", str(out / f"infer_bs{batch}"), "--base_model", str(folders[model])]
        if model == "flux" and not tiny:
            infer += ["--quantize", "nf4"]
        row = inference_row(model, infer, out / f"infer_bs{batch}_memory.json", work, tiny)
        result["inference"].append({"batch_size": batch, **row})
    return result


def reference_steps(tiny: bool) -> list[dict]:
    """Our training step against diffusers' reference step, SDXL 1024² bs 1 and FLUX NF4 1024²
    (train_memory.py's target rows; tiny configs on the CPU)."""
    sys.path.insert(0, str(HERE))
    from memory_measure import RunOptions, Setting, run_setting

    sys.path.pop(0)
    side = 64 if tiny else 1024
    settings = [Setting("sdxl", (side, side), 1, 64, True, not tiny, "bf16" if tiny else "fp16", False),
                Setting("flux", (side, side), 1, 16, True, not tiny, "bf16", not tiny)]
    opts = RunOptions(tiny=tiny, device="cuda" if torch.cuda.is_available() else "cpu", warmup=1 if tiny else 2,
                      steps=1 if tiny else 5, lora_dropout=0.1, compile=False, channels_last=False, reference=True,
                      cpu_threads=None)
    rows = []
    for setting in settings:
        result = run_setting(setting, opts)
        row = {"model": setting.model, "size": setting.size, "nf4": setting.nf4}
        for side_name in ("ours", "reference"):
            got = result.get(side_name, {})
            row[side_name] = {"s_per_step": got.get("s_per_step"), "error": got.get("error"),
                              "peak_reserved_gib": round(got["peak_reserved"] / GIB, 3) if "peak_reserved" in got else None}
        rows.append(row)
    return rows


def goals(results: list[dict]) -> list[str]:
    """The whole-run goals, each PASS / FAIL on what was measured (nothing on the CPU)."""
    lines = []
    for run in results:
        # Every phase of the run: training's, and those of the inference after it.
        phases = [*run["phases"], *(r for row in run["inference"] for r in row.get("phases", []))]
        peaks = [r["gpu_peak_reserved_gib"] for r in phases if "gpu_peak_reserved_gib" in r]
        if not peaks:
            continue
        limit = GOALS[run["model"]]
        if run["model"] == "sdxl" and "bs1" not in run["name"]:
            limit = None
        if limit:
            lines.append(f"{run['name']}: every phase ≤ {limit:g} GiB reserved: {max(peaks):.2f} "
                         f"{'PASS' if max(peaks) <= limit else 'FAIL'}")
        if run["model"] == "flux":
            host = run["process"].get("host_peak_rss_gib", 0) * GIB / 1e9
            lines.append(f"{run['name']}: host RAM ≤ {HOST_GOAL_GB:g} GB: {host:.1f} GB "
                         f"{'PASS' if host <= HOST_GOAL_GB else 'FAIL'}")
        off = [abs(r["estimate_gib"] - r["gpu_peak_reserved_gib"]) / r["gpu_peak_reserved_gib"]
               for r in phases if r.get("estimate_gib") and r.get("gpu_peak_reserved_gib")]
        if off:
            lines.append(f"{run['name']}: estimate within 10 % of each phase's peak: worst {max(off):.0%} "
                         f"{'PASS' if max(off) <= 0.10 else 'FAIL'}")
    return lines


def render(report: dict) -> str:
    lines = [f"gpu_suite {report['date']} on {report['device']} ({report['command']})", "",
             "| run | phase | step | GPU peak resv GiB | estimate GiB | host RSS GiB (peak) |", "|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for r in run["phases"]:
            gpu = r.get("gpu_peak_reserved_gib")
            lines.append(f"| {run['name']} | {r['phase']} | {r['step']} | {'—' if gpu is None else f'{gpu:.2f}'} | "
                         f"{r['estimate_gib']} | {r['host_rss_gib']:.1f} ({r['host_peak_rss_gib']:.1f}) |")
        for row in run["inference"]:
            for r in row.get("phases", []):  # the step column: the pipeline call
                gpu = r.get("gpu_peak_reserved_gib")
                lines.append(f"| {run['name']} | inference bs {row['batch_size']}: {r['phase']} | {r['step']} | "
                             f"{'—' if gpu is None else f'{gpu:.2f}'} | {r['estimate_gib']} | "
                             f"{r['host_rss_gib']:.1f} ({r['host_peak_rss_gib']:.1f}) |")
            gpu = row.get("gpu_peak_reserved_gib")
            lines.append(f"| {run['name']} | inference bs {row['batch_size']} (process) | — | {'—' if gpu is None else gpu} "
                         f"| — | ({row.get('host_peak_rss_gib', row.get('error'))}) |")
        if "error" in run["process"]:
            lines.append(f"| {run['name']} | error | — | {run['process']['error']} | | |")
    if report.get("reference"):
        lines += ["", "| step | W×H | nf4 | ours s/step | ref s/step | ours resv GiB | ref resv GiB |",
                  "|---|---|---|---|---|---|---|"]
        for row in report["reference"]:
            ours, ref = row["ours"], row["reference"]
            cells = [f"{x:.3f}" if isinstance(x, float) else str(x) for x in
                     (ours["s_per_step"], ref["s_per_step"], ours["peak_reserved_gib"], ref["peak_reserved_gib"])]
            lines.append(f"| {row['model']} | {row['size'][0]}×{row['size'][1]} | {row['nf4']} | " + " | ".join(cells) + " |")
    lines += gpu_suite_multi.render(report.get("multi_gpu", {"skipped": "not measured"}))
    lines += ["", *report["goals"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU, in-process (the test)")
    parser.add_argument("--workdir", type=Path, help="model folders, data and runs (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="the results file (JSON); its table goes beside it as .md")
    parser.add_argument("--only", nargs="+", help="run only the RUNS whose name contains one of these words")
    parser.add_argument("--no_reference", action="store_true", help="skip the reference-step comparison")
    parser.add_argument("--processes", type=int,
                        help="processes of the DDP / FSDP2 rows (default: every GPU; --tiny: 1, none run)")
    parser.add_argument("--child", choices=sorted(ENTRIES), help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.child:
        child(args.child, args.stats, args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
        return {}
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: the full-size suite needs a CUDA GPU; --tiny runs it on the CPU")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else f"CPU ({platform.processor() or platform.machine()})"
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
              "command": "python benchmarks/gpu_suite.py " + shlex.join(argv), "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        folders = build_models(work, args.tiny)
        for spec in runs(args.tiny):
            if args.only and not any(word in spec["name"] for word in args.only):
                continue
            report["runs"].append(run_one(spec, folders, work, args.tiny))
            if args.out:  # after each run: a suite cut short keeps what it measured
                args.out.write_text(json.dumps(report, indent=1))
        processes = args.processes or (1 if args.tiny else torch.cuda.device_count())
        data = work / "data-square"
        if not data.is_dir():
            write_data(data, "square", args.tiny)
        report["multi_gpu"] = gpu_suite_multi.measure(folders, data, work, processes, args.tiny, args.only)
    report["reference"] = [] if args.no_reference else reference_steps(args.tiny)
    report["goals"] = goals(report["runs"])
    table = render(report)
    print(table)
    if args.out:
        from iclora.backends.lora_files import atomic_write_text

        atomic_write_text(json.dumps(report, indent=1), args.out)
        atomic_write_text(table + "\n", args.out.with_suffix(".md"))
    return report


if __name__ == "__main__":
    main()
