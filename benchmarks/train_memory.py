"""GPU memory and speed of our training step on full-size SDXL, FLUX.1 and FLUX.2 [klein], against diffusers.

    python benchmarks/train_memory.py                                # the target rows (GPU)
    python benchmarks/train_memory.py --preset full --models sdxl    # the SDXL matrix
    python benchmarks/train_memory.py --tiny                         # CPU smoke run, ~25 s

Per setting, in a fresh process (see --isolate), it
  1. builds the denoiser from its public config with random weights directly on the device
     (meta-device skeleton, then each tensor drawn in place; FLUX optionally NF4-quantized
     tensor by tensor, as diffusers' bitsandbytes loader does), no checkpoint needed;
  2. wraps it into our backend through the backend's own constructor, with the tiny in-code
     VAE and text encoders as stand-ins (never run: latents and text embeddings are random
     tensors of the real shapes, as the trainer's caches hold them);
  3. times N steps of the trainer's step: `diffusion_loss` + accelerator.backward + clip +
     optimizer step, under accelerate mixed precision, in the trainer's set-up order;
  4. does the same for a reference step written as diffusers' train_dreambooth_lora_sdxl.py /
     train_dreambooth_lora_flux.py write theirs, on the same architecture and settings;
  5. reports peak allocated/reserved memory, median s/step after warm-up, images/s, FLOPs per
     step (FlopCounterMode over one step) and MFU against a measured bf16 matmul peak.
Results are a markdown table (stdout, and --out FILE written atomically) with PASS/FAIL on the
target rows. GPU numbers go into benchmarks/RESULTS.md (see benchmarks/README.md).

The code is in three files: memory_models.py builds the denoisers (public configs, random
weights on the device, NF4, our backend around them), memory_measure.py sets up, times and
counts one phase (ours or the reference), and this file holds the settings matrix, the
per-setting processes and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

if __package__ in (None, ""):  # run by path from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from _bootstrap import ensure_package

    sys.path.pop(0)
    ensure_package()

from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

# benchmarks/ is no package: its modules import each other by name from this folder, which
# is on sys.path when a script runs by path but not when the test loads this file by location.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_measure import (  # noqa: E402
    GIB,
    TRAIN_DEFAULTS,
    WEIGHT_DTYPES,
    RunOptions,
    Setting,
    matmul_peak,
    run_setting,
)
from memory_models import FAMILIES  # noqa: E402

sys.path.pop(0)

# Target rows: (what a row must match, peak reserved limit in GiB). Sizes match either way round.
TARGETS = [
    (dict(model="sdxl", size=(1024, 1024), batch_size=1, rank=64, checkpointing=True, adam8bit=True), 9.0),
    (dict(model="sdxl", size=(1024, 1024), batch_size=4, rank=64, checkpointing=True, adam8bit=True), 14.0),
    (dict(model="flux", size=(1024, 1024), batch_size=1, rank=16, nf4=True, checkpointing=True), 12.0),
    (dict(model="flux", size=(1024, 1536), batch_size=1, rank=16, nf4=True, checkpointing=True), 16.0),
    # FLUX.2 [klein]: base-4B in bf16 and base-9B in 8-bit, each in a 16 GB card (not measured yet).
    (dict(model="flux2", size=(1024, 1024), batch_size=1, rank=16, nf4=False, checkpointing=True), 16.0),
    (dict(model="flux2-9b-int8", size=(1024, 1024), batch_size=1, rank=16, nf4=False, checkpointing=True), 16.0),
]

AXES = ("sizes", "batch_sizes", "ranks", "checkpointing", "adam8bit", "precisions", "nf4")
PRESETS: dict[str, dict[str, dict[str, list]]] = {
    "targets": {
        "sdxl": dict(sizes=[(1024, 1024)], batch_sizes=[1, 4], ranks=[64], checkpointing=[True], adam8bit=[True],
                     precisions=["fp16"], nf4=[False]),
        "flux": dict(sizes=[(1024, 1024), (1024, 1536)], batch_sizes=[1], ranks=[16], checkpointing=[True],
                     adam8bit=[True], precisions=["bf16"], nf4=[True]),
        "flux2": dict(sizes=[(1024, 1024)], batch_sizes=[1], ranks=[16], checkpointing=[True], adam8bit=[True],
                      precisions=["bf16"], nf4=[False]),
        "flux2-9b-int8": dict(sizes=[(1024, 1024)], batch_sizes=[1], ranks=[16], checkpointing=[True], adam8bit=[True],
                              precisions=["bf16"], nf4=[False]),
    },
    "full": {
        "sdxl": dict(sizes=[(1024, 1024), (768, 768)], batch_sizes=[1, 2, 4], ranks=[16, 64],
                     checkpointing=[True, False], adam8bit=[True, False], precisions=["fp16", "bf16"], nf4=[False]),
        "flux": dict(sizes=[(1024, 1024), (768, 768), (1024, 1536)], batch_sizes=[1, 2, 4], ranks=[16, 64],
                     checkpointing=[True, False], adam8bit=[True, False], precisions=["bf16"], nf4=[True, False]),
        "flux2": dict(sizes=[(1024, 1024), (768, 768), (1024, 1536)], batch_sizes=[1, 2, 4], ranks=[16, 64],
                      checkpointing=[True, False], adam8bit=[True, False], precisions=["bf16"], nf4=[True, False]),
        "flux2-9b-int8": dict(sizes=[(1024, 1024), (1024, 1536)], batch_sizes=[1, 2], ranks=[16, 64],
                              checkpointing=[True], adam8bit=[True], precisions=["bf16"], nf4=[False]),
    },
    "tiny": {
        "sdxl": dict(sizes=[(64, 64)], batch_sizes=[1, 2], ranks=[4], checkpointing=[True, False], adam8bit=[False],
                     precisions=["bf16"], nf4=[False]),
        "flux": dict(sizes=[(64, 64)], batch_sizes=[1], ranks=[4], checkpointing=[True, False], adam8bit=[True],
                     precisions=["bf16"], nf4=[True]),
        "flux2": dict(sizes=[(64, 64)], batch_sizes=[1], ranks=[4], checkpointing=[True], adam8bit=[True],
                      precisions=["bf16"], nf4=[False]),
        "flux2-9b-int8": dict(sizes=[(64, 64)], batch_sizes=[1], ranks=[4], checkpointing=[True], adam8bit=[True],
                              precisions=["bf16"], nf4=[False]),
    },
}


# ---- isolation: one process per setting ---------------------------------------------------------


@contextlib.contextmanager
def process_state(cpu_threads: int | None):
    """Freeze the import-time heap (so the gc.collect between phases takes milliseconds, not
    half a second) and set torch's CPU threads. On exit both are restored and accelerate's
    process-wide state is cleared, since tests run this in-process."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _worker_call(job: dict, isolate: bool) -> dict:
    """Run a job here, or in a fresh interpreter: then no allocator state, compiled graph or
    leaked reference carries from one setting into the next, a crash costs one row, and
    `import diffusers` (~10 s) is the price. The worker's stderr streams through."""
    if not isolate:
        return _run_job(job)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_job", json.dumps(job), "--_result", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())
    error = {"error": f"worker died (exit {proc.returncode}; see its stderr)"}
    if job["kind"] == "peak":
        return {"peak_flops": None, "device_name": f"{job['options']['device']} (peak measurement failed)"}
    return {"setting": job["setting"], "ours": error, "reference": error}


def _run_job(job: dict) -> dict:
    opts = RunOptions(**job["options"])
    with process_state(opts.cpu_threads):
        if job["kind"] == "peak":
            return matmul_peak(torch.device(opts.device))
        setting = Setting(**{**job["setting"], "size": tuple(job["setting"]["size"])})
        return run_setting(setting, opts)


# ---- the matrix and the report ---------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) % 64 == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--sizes: expected WIDTHxHEIGHT in multiples of 64 (e.g. 1024x1536), got {text!r}")
    return int(parts[0]), int(parts[1])


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _precision(text: str) -> str:
    if text not in WEIGHT_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(WEIGHT_DTYPES)}, got {text!r}")
    return text


def _list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def settings_matrix(args) -> list[Setting]:
    preset = "tiny" if args.tiny else args.preset
    settings = []
    for model in args.models:
        axes = {axis: getattr(args, axis) or PRESETS[preset][model][axis] for axis in AXES}
        for size, bs, rank, ckpt, adam8, precision, nf4 in itertools.product(*(axes[a] for a in AXES)):
            settings.append(Setting(model, size, bs, rank, ckpt, adam8, precision, nf4))
    return settings


def target_limit(setting: Setting, tiny: bool) -> float | None:
    """The peak-reserved limit (GiB) of a target row, None for other rows."""
    if tiny:
        return None
    for match, limit in TARGETS:
        fields = dataclasses.asdict(setting)
        if all(sorted(fields[k]) == sorted(v) if k == "size" else fields[k] == v for k, v in match.items()):
            return limit
    return None


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


COLUMNS = ["model", "W×H", "bs", "rank", "ckpt", "optim", "prec", "nf4", "peak alloc GiB", "peak resv GiB",
           "s/step", "img/s", "TFLOP/step", "step/fwd FLOPs", "MFU", "ref s/step", "ref resv GiB",
           "time ×ref", "resv ×ref", "targets"]


def table_row(result: dict, peak_flops: float | None, tiny: bool) -> list[str]:
    s = Setting(**{**result["setting"], "size": tuple(result["setting"]["size"])})
    ours, ref = result["ours"], result.get("reference") or {}
    head = [s.model, f"{s.size[0]}×{s.size[1]}", str(s.batch_size), str(s.rank), "on" if s.checkpointing else "off",
            ours.get("optimizer", "adamw8bit" if s.adam8bit else "adamw"), s.precision, "on" if s.nf4 else "off"]
    limit = target_limit(s, tiny)
    targets = []
    if "error" in ours:
        cells = [ours["error"]] * 2 + ["-"] * 5
        if limit is not None:
            targets.append(f"resv ≤ {limit:g} GiB FAIL")
    else:
        sec, flops = ours["s_per_step"], ours["step_flops"]
        mfu = "n/a" if not peak_flops else f"{flops / sec / peak_flops:.1%}"
        cells = [_gib(ours.get("peak_allocated")), _gib(ours.get("peak_reserved")), f"{sec:.3f}",
                 f"{s.batch_size / sec:.2f}", f"{flops / 1e12:.3g}", _ratio(flops, ours["forward_flops"]), mfu]
        if limit is not None:
            peak = ours.get("peak_reserved")
            verdict = "n/a" if peak is None else ("PASS" if peak <= limit * GIB else "FAIL")
            targets.append(f"resv ≤ {limit:g} GiB {verdict}")
    if not ref:
        cells += ["-"] * 4
    elif "error" in ref or "error" in ours:
        cells += [ref.get("error", f"{ref.get('s_per_step', 0):.3f}"), _gib(ref.get("peak_reserved")), "-", "-"]
    else:
        time_ratio = ours["s_per_step"] / ref["s_per_step"]
        cells += [f"{ref['s_per_step']:.3f}", _gib(ref.get("peak_reserved")), f"{time_ratio:.3f}",
                  _ratio(ours.get("peak_reserved"), ref.get("peak_reserved"))]
        targets.append(f"time ≤ ref {'PASS' if time_ratio <= 1.0 else 'FAIL'}")
    skipped = ours.get("skipped_steps", 0) + ref.get("skipped_steps", 0)
    if skipped:
        targets.append(f"{skipped} fp16 steps skipped")
    return head + cells + ["; ".join(targets) or "-"]


def render(results: list[dict], peak: dict, command: str, args, notes: list[str]) -> str:
    import accelerate
    import bitsandbytes
    import diffusers
    import peft

    peak_flops = peak["peak_flops"]
    lines = [
        "# iclora training-step benchmark",
        "",
        f"- device: {peak['device_name']}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"accelerate {accelerate.__version__}, bitsandbytes {bitsandbytes.__version__}, python {platform.python_version()}",
        f"- command: `{command}`",
        f"- measured bf16 matmul peak: {'n/a' if not peak_flops else f'{peak_flops / 1e12:.0f} TFLOP/s'}",
        f"- {args.warmup} warm-up + {args.steps} timed steps per setting (median), LoRA alpha = rank, "
        f"dropout {args.lora_dropout}, compile {'on' if args.compile else 'off'}, "
        f"channels_last {'on' if args.channels_last else 'off'}, {'tiny configs' if args.tiny else 'full-size public configs'}",
        "- ours: the trainer's step (diffusion_loss + backward + clip + optimizer step) on cached latents/embeddings;"
        " ref: diffusers' dreambooth LoRA step at equal settings; ×ref = ours / ref",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(table_row(r, peak_flops, args.tiny)) + " |" for r in results]
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny in-code configs, a small matrix, CPU by default (smoke test)")
    p.add_argument("--preset", choices=["targets", "full"], default="targets",
                   help="default axes per model: the target rows, or the full matrix (ignored with --tiny)")
    p.add_argument("--models", type=_list(str), default=["sdxl", "flux", "flux2", "flux2-9b-int8"],
                   help="comma list: sdxl,flux,flux2 (base-4B),flux2-9b-int8 (base-9B, 8-bit)")
    p.add_argument("--sizes", type=_list(parse_size), help="comma list of WIDTHxHEIGHT (or one side), e.g. 1024,768,1024x1536")
    p.add_argument("--batch_sizes", type=_list(int), help="comma list, e.g. 1,2,4")
    p.add_argument("--ranks", type=_list(int), help="comma list of LoRA ranks, e.g. 16,64")
    p.add_argument("--checkpointing", type=_list(_on_off), help="gradient checkpointing: on,off")
    p.add_argument("--adam8bit", type=_list(_on_off), help="bitsandbytes AdamW8bit (else torch AdamW, fused): on,off")
    p.add_argument("--precisions", type=_list(_precision), help="accelerate mixed precision: fp16,bf16 (no = fp32)")
    p.add_argument("--nf4", type=_list(_on_off), help="FLUX transformer quantized to NF4 (bitsandbytes): on,off")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3, tiny 1; raise with --compile)")
    p.add_argument("--steps", type=int, help="timed steps (default 10, tiny 2)")
    p.add_argument("--lora_dropout", type=float, default=TRAIN_DEFAULTS["lora_dropout"],
                   help="LoRA dropout, ours and the reference (default: TrainConfig's)")
    p.add_argument("--compile", action="store_true",
                   help="compile the denoiser's repeated blocks: the trainer's --compile (ours), "
                        "compile_repeated_blocks (reference)")
    p.add_argument("--channels_last", action="store_true", help="denoiser weights in channels_last (ours and reference)")
    p.add_argument("--no_reference", action="store_true", help="skip the diffusers reference step")
    p.add_argument("--device", choices=["cuda", "cpu"], help="cuda or cpu (default: cuda when available, cpu with --tiny)")
    p.add_argument("--cpu_threads", type=int, help="torch CPU threads (default: 1 with --tiny on CPU, else torch's)")
    p.add_argument("--isolate", choices=["auto", "process", "none"], default="auto",
                   help="a fresh process per setting (auto: on CUDA; none: all in this process)")
    p.add_argument("--out", type=Path, help="also write the markdown report here (atomically)")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns one result dict per setting (the test reads them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._job:  # a worker process
        result = _run_job(json.loads(args._job))
        from iclora.backends.lora_files import atomic_write_text

        atomic_write_text(json.dumps(result), args._result)
        return [result]

    unknown = [m for m in args.models if m not in FAMILIES]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(FAMILIES)})")
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --tiny for a CPU run)")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup not negative")
    isolate = args.isolate == "process" or (args.isolate == "auto" and device.startswith("cuda"))
    # Tiny ops gain nothing from threads, and on a shared small CPU OpenMP spin-waits made a
    # tiny step 10-50x slower with 2 threads than with 1.
    threads = args.cpu_threads or (1 if args.tiny and device == "cpu" else None)
    options = dataclasses.asdict(RunOptions(args.tiny, device, args.warmup, args.steps, args.lora_dropout,
                                            args.compile, args.channels_last, not args.no_reference, threads))

    notes, settings = [], []
    for setting in settings_matrix(args):
        problem = _unsupported(setting, args.compile)
        if problem and problem not in notes:
            notes.append(problem)
        if not problem:
            settings.append(setting)
    if device == "cpu" and any(s.precision == "fp16" for s in settings):
        raise SystemExit("--precisions fp16 needs CUDA (accelerate has no fp16 autocast on CPU): use bf16 or no")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    from iclora.backends.lora_files import atomic_write_text

    peak = _worker_call({"kind": "peak", "options": options}, isolate)
    command = ("python benchmarks/train_memory.py " + shlex.join(argv)).strip()
    results = []
    for i, setting in enumerate(settings, 1):
        print(f"[{i}/{len(settings)}] {setting}", file=sys.stderr, flush=True)
        job = {"kind": "setting", "setting": dataclasses.asdict(setting), "options": options}
        results.append(_worker_call(job, isolate))
        # Each row as soon as it is measured: a long matrix cut short keeps what it measured.
        print("| " + " | ".join(table_row(results[-1], peak["peak_flops"], args.tiny)) + " |", file=sys.stderr, flush=True)
        if args.out:
            atomic_write_text(render(results, peak, command, args, notes), args.out)
    report = render(results, peak, command, args, notes)
    print(report)
    if args.out:
        atomic_write_text(report, args.out)
    return results


def _unsupported(setting: Setting, compile_blocks: bool) -> str | None:
    """Why a setting cannot run here (printed as a note), or None."""
    from iclora.compiling import unsupported

    if setting.model == "sdxl" and setting.nf4:
        return "SDXL rows with --nf4 on skipped: the SDXL backend has no quantized loading"
    if compile_blocks and (problem := unsupported("nf4" if setting.nf4 else None, setting.checkpointing)):
        return f"rows with --nf4 on and --checkpointing on skipped, as the trainer refuses them: {problem}"
    if setting.model == "flux2-9b-int8" and setting.nf4:
        return "FLUX.2 9B rows with --nf4 on skipped: that row is the 8-bit one"
    if setting.model != "sdxl":
        try:
            FAMILIES[setting.model].backend_cls()
        except ImportError as error:
            return f"{setting.model} rows skipped: its backend is not importable ({error})"
    return None


if __name__ == "__main__":
    main()
