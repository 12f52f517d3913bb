"""The harder known-answer benchmark over a distribution of toy bases and toy settings.

One fitted base says how completion works on that base. This script fits several bases per
backend (other seeds, capacities, fit lengths) on more than one setting of the toy generator
(hard_toy.Toy: panel size, fixed or per-composite background, object size, colours), and
runs the harder known-answer benchmark (known_answer_hard.py) on each at the shipped
training defaults of the backend's script:

    python benchmarks/known_answer_dist.py fit                      # every base not yet cached
    python benchmarks/known_answer_dist.py fit --only sdxl-lpb2-s1  # one (comma list)
    python benchmarks/known_answer_dist.py report --backend sdxl    # per base + mean ± sd
    python benchmarks/known_answer_dist.py report --backend flux --out /tmp/flux_dist.md
    python benchmarks/known_answer_dist.py report --backend sdxl --mask_probability 0.9 --max_masked_panels 3
    python benchmarks/known_answer_dist.py list                     # the bases and their settings

Bases are cached under benchmarks/assets/ (float16, 1-4 MB each, a fit_report.json beside
the weights); `fit` rebuilds a missing one deterministically from its seed (`--refit`: all
of them). Per base, `report` trains (b) the IC-LoRA at the script's defaults (or at the
masking --mask_probability / --max_masked_panels give) and (c) the same on whole
composites (`--mask_probability 0`), and scores the hidden panels' object colour (mean
absolute RGB error 0-255) for (a) the untrained base, (b), (c) and the blind guess (the
colour distribution's median). The goal it checks per base: (b) < 60 % of (a)
and < 85 % of (c). Each base's full report (tables, timings, the training logs with the
masked and visible losses per step) goes to --out_dir as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from iclora.logs import setup_logging  # noqa: E402

setup_logging()  # the stack's known noise filtered as in the CLIs, before the imports that print it

from hard_toy import Toy  # noqa: E402

ASSETS = HERE / "assets"
UNTRAINED, WHOLE, BLIND = "(a) untrained base", "(c) LoRA, --mask_probability 0", "blind guess (mean colour)"
GOAL_UNTRAINED, GOAL_WHOLE = 0.60, 0.85  # (b) must stay under these shares of (a) and of (c)

# The backend scripts' shipped defaults (train_sdxl_ic_lora.py / train_flux_ic_lora.py) and
# the benchmark's recipe: SDXL concat, 0.7 / 2 masking, visible panels at the concat
# default weight, visible latents reset at inference; FLUX context with clean context tokens
# (timestep zero), 1.0 / 3 masking. Steps x batch as in RESULTS.md's harder-toy tables.
DEFAULTS = {
    "sdxl": ["--conditioning", "concat", "--mask_probability", "0.7", "--max_masked_panels", "2",
             "--steps", "1500", "--batch_size", "8"],
    "flux": ["--conditioning", "context", "--context_timestep", "zero", "--mask_probability", "1.0",
             "--max_masked_panels", "3", "--steps", "1650", "--batch_size", "4"],
}
DEFAULTS["flux2"] = DEFAULTS["flux"]  # train_flux2_ic_lora.py ships FLUX.1's context defaults

STANDARD = Toy()  # the toy every single-base figure was measured on
# Data that differ the way users' data differ from the standard toy: every composite has its
# own dark background, objects are smaller.
ASIDE = Toy(background="per_composite", scale=(0.2, 0.5))
# The standard toy with colours far from grey (uniform hue, saturation 0.5-1): a colour
# distribution whose blind guess is far from every colour.
VIVID = Toy(colours="vivid")
# The aside data at twice the panel side: 16x16 latents per panel where 64-px panels give 8x8.
ASIDE_128 = Toy(panel_size=128, background="per_composite", scale=(0.2, 0.5))


@dataclass(frozen=True)
class Base:
    """A member of the distribution: a fitted base (folder, fit settings, the toy it was fitted
    on) and the toy data the benchmark runs on (`data`; default: the fit's toy)."""

    name: str
    backend: str
    folder: str  # under ASSETS
    toy: Toy  # the fit's
    seed: int
    steps: int
    batch_size: int
    layers_per_block: int = 1  # SDXL UNet
    flux_blocks: tuple[int, int] = (2, 4)  # FLUX (double, single) blocks
    data: Toy | None = None

    @property
    def data_toy(self) -> Toy:
        return self.data or self.toy

    def describe(self) -> str:
        size = f"layers_per_block {self.layers_per_block}" if self.backend == "sdxl" else \
            f"{self.flux_blocks[0]}+{self.flux_blocks[1]} blocks"
        fitted_on = "" if self.data_toy == self.toy else ", fitted on the standard toy" if self.toy == STANDARD else \
            f", fitted on {self.toy.describe()}"
        return f"{size}, seed {self.seed}, fit {self.steps} x {self.batch_size}{fitted_on}"

    def fit_argv(self) -> list[str]:
        t = self.toy
        return ["--backend", self.backend, "--seed", str(self.seed), "--steps", str(self.steps),
                "--batch_size", str(self.batch_size), "--layers_per_block", str(self.layers_per_block),
                "--flux_blocks", ",".join(map(str, self.flux_blocks)), *toy_argv(t)]


def toy_argv(toy: Toy) -> list[str]:
    return ["--panel_size", str(toy.panel_size), "--background", toy.background,
            "--object_scale", f"{toy.scale[0]},{toy.scale[1]}", "--colours", toy.colours]


BASES = [
    # The shipped hard-toy bases (fit_hard_toy.py's defaults): the first member of each.
    Base("sdxl-hard", "sdxl", "toy_sdxl_unet_hard", STANDARD, seed=0, steps=4000, batch_size=16),
    Base("sdxl-hard-aside", "sdxl", "toy_sdxl_unet_hard", STANDARD, seed=0, steps=4000, batch_size=16, data=ASIDE),
    Base("sdxl-hard-vivid", "sdxl", "toy_sdxl_unet_hard", STANDARD, seed=0, steps=4000, batch_size=16, data=VIVID),
    Base("sdxl-lpb2-s1", "sdxl", "toy_dist/sdxl_lpb2_s1", ASIDE, seed=1, steps=1500, batch_size=16, layers_per_block=2),
    Base("sdxl-lpb1-s2", "sdxl", "toy_dist/sdxl_lpb1_s2", ASIDE, seed=2, steps=1000, batch_size=16),
    # sdxl-lpb1-s2 with one thing changed: the toy it is fitted on, or the length of the fit.
    Base("sdxl-lpb1-s2-std", "sdxl", "toy_dist/sdxl_lpb1_s2_std", STANDARD, seed=2, steps=1000, batch_size=16,
         data=ASIDE),
    Base("sdxl-lpb1-s2-long", "sdxl", "toy_dist/sdxl_lpb1_s2_long", ASIDE, seed=2, steps=4000, batch_size=16),
    # ... and both: the shipped base's fit (standard toy, 4000 x 16) at another seed.
    Base("sdxl-lpb1-s2-std-long", "sdxl", "toy_dist/sdxl_lpb1_s2_std_long", STANDARD, seed=2, steps=4000,
         batch_size=16, data=ASIDE),
    # Fitted on 128-px panels: does SDXL's weakness on the aside data follow the latent size?
    Base("sdxl-lpb1-s3-128", "sdxl", "toy_dist/sdxl_lpb1_s3_128", ASIDE_128, seed=3, steps=1000, batch_size=8),
    Base("flux-hard", "flux", "toy_flux_transformer_hard", STANDARD, seed=0, steps=2000, batch_size=8),
    Base("flux-hard-aside", "flux", "toy_flux_transformer_hard", STANDARD, seed=0, steps=2000, batch_size=8, data=ASIDE),
    Base("flux-hard-vivid", "flux", "toy_flux_transformer_hard", STANDARD, seed=0, steps=2000, batch_size=8, data=VIVID),
    Base("flux-b13-s1", "flux", "toy_dist/flux_b13_s1", ASIDE, seed=1, steps=1000, batch_size=8, flux_blocks=(1, 3)),
    Base("flux-b24-s2", "flux", "toy_dist/flux_b24_s2", ASIDE, seed=2, steps=1200, batch_size=8),
    Base("flux-b13-s3-128", "flux", "toy_dist/flux_b13_s3_128", ASIDE_128, seed=3, steps=1000, batch_size=8,
         flux_blocks=(1, 3)),
    Base("flux2-hard", "flux2", "toy_flux2_transformer_hard", STANDARD, seed=0, steps=2000, batch_size=8),
    Base("flux2-hard-aside", "flux2", "toy_flux2_transformer_hard", STANDARD, seed=0, steps=2000, batch_size=8,
         data=ASIDE),
    Base("flux2-b13-s1", "flux2", "toy_dist/flux2_b13_s1", ASIDE, seed=1, steps=1000, batch_size=8,
         flux_blocks=(1, 3)),
    Base("flux2-b24-s2", "flux2", "toy_dist/flux2_b24_s2", ASIDE, seed=2, steps=1200, batch_size=8),
]


def select(only: str | None, backend: str | None, parser) -> list[Base]:
    names = {b.name for b in BASES}
    wanted = [n for n in (only or "").split(",") if n]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        parser.error(f"--only: unknown base(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return [b for b in BASES if (not wanted or b.name in wanted) and (not backend or b.backend == backend)]


def weights(base: Base, assets: Path) -> Path:
    return assets / base.folder / "diffusion_pytorch_model.safetensors"


def fit(bases: list[Base], assets: Path, refit: bool, extra: list[str]) -> None:
    from fit_hard_toy import main as fit_main

    fitted = set()
    for base in bases:
        if base.folder in fitted:  # another member's data on the same base
            continue
        fitted.add(base.folder)
        if weights(base, assets).is_file() and not refit:
            print(f"{base.name}: cached ({assets / base.folder})", flush=True)
            continue
        print(f"{base.name}: fitting ({base.describe()}; {base.toy.describe()})", flush=True)
        fit_main([*base.fit_argv(), "--out", str(assets / base.folder), *extra])


def masking_argv(backend: str, mask_probability: float | None, max_masked_panels: int | None) -> list[str]:
    """The backend's defaults with (b)'s masking replaced where given."""
    argv = list(DEFAULTS[backend])
    for flag, value in (("--mask_probability", mask_probability), ("--max_masked_panels", max_masked_panels)):
        if value is not None:
            argv[argv.index(flag) + 1] = f"{value:g}"
    return argv


def report_one(base: Base, assets: Path, out_dir: Path, extra: list[str], train_args: str = "",
               mask_probability: float | None = None, max_masked_panels: int | None = None) -> dict:
    from known_answer_hard import main as hard_main

    result = hard_main([*masking_argv(base.backend, mask_probability, max_masked_panels), "--backend", base.backend,
                        "--base", str(assets / base.folder), *toy_argv(base.data_toy), "--n_sets", "0", "--skip_free",
                        f"--train_args={train_args}", "--json", str(out_dir / f"{base.name}.json"), *extra])
    table = result["table"]
    (masked,) = [name for name in table if name.startswith("(b) IC-LoRA")]
    row = {"untrained": table[UNTRAINED]["colour_error"], "masked": table[masked]["colour_error"],
           "blind": table[BLIND]["colour_error"], "masked_close": table[masked]["close"]}
    row["whole"] = table[WHOLE]["colour_error"] if WHOLE in table else None
    row["goal"] = meets_goal(row)
    return row


def meets_goal(row: dict) -> bool | None:
    if row["whole"] is None:
        return None
    return row["masked"] < GOAL_UNTRAINED * row["untrained"] and row["masked"] < GOAL_WHOLE * row["whole"]


def spread(values: list[float]) -> str:
    import numpy as np

    values = np.array([v for v in values if v is not None], dtype=float)
    if not len(values):
        return "n/a"
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.1f} ± {sd:.1f}"


def format_report(rows: dict[str, dict], masked: str = "defaults") -> str:
    by_name = {b.name: b for b in BASES}
    lines = [f"| base | toy | untrained | masked ({masked}) | whole composites | blind guess | masked / untrained "
             "| masked / whole | goal |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        base = by_name[name]
        whole = "n/a" if r["whole"] is None else f"{r['whole']:.1f}"
        to_whole = "n/a" if r["whole"] is None else f"{r['masked'] / r['whole']:.0%}"
        goal = {True: "met", False: "**not met**", None: "n/a"}[r["goal"]]
        lines.append(f"| {name} ({base.describe()}) | {base.data_toy.describe()} | {r['untrained']:.1f} | {r['masked']:.1f} "
                     f"| {whole} | {r['blind']:.1f} | {r['masked'] / r['untrained']:.0%} | {to_whole} | {goal} |")
    column = lambda key: [r[key] for r in rows.values()]  # noqa: E731
    ratios = [r["masked"] / r["untrained"] for r in rows.values()]
    to_whole = [r["masked"] / r["whole"] for r in rows.values() if r["whole"]]
    lines.append(f"| mean ± sd over {len(rows)} | | {spread(column('untrained'))} | {spread(column('masked'))} "
                 f"| {spread(column('whole'))} | {spread(column('blind'))} | {spread([100 * x for x in ratios])} % "
                 f"| {spread([100 * x for x in to_whole])} % | {sum(bool(r['goal']) for r in rows.values())} of "
                 f"{len(rows)} met |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["fit", "report", "list"])
    parser.add_argument("--backend", choices=["sdxl", "flux", "flux2"], default=None, help="only this backend's bases")
    parser.add_argument("--only", default=None, help="comma list of base names (see `list`)")
    parser.add_argument("--assets", default=str(ASSETS), help="where the bases are cached")
    parser.add_argument("--refit", action="store_true", help="fit: refit bases that are cached")
    parser.add_argument("--out", default=None, help="report: also write the table here (markdown)")
    parser.add_argument("--out_dir", default=None, help="report: per-base JSON reports (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--train_args", default="",
                        help="report: training flags added to the defaults for (b) and (c), e.g. --train_args=--lora_convs")
    parser.add_argument("--mask_probability", type=float, default=None,
                        help="report: (b)'s masking instead of the backend script's default (SDXL 0.7, FLUX 1.0)")
    parser.add_argument("--max_masked_panels", type=int, default=None,
                        help="report: (b)'s most masked panels instead of the script's default (SDXL 2, FLUX 3)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings for a quick check of the plumbing (fit 2 steps; report 2 training "
                             "steps, 1 evaluation composite, 2 inference steps): its figures mean nothing")
    args = parser.parse_args(argv)
    bases = select(args.only, args.backend, parser)
    if args.command == "list":
        for b in bases:
            print(f"{b.name}: {b.backend}, {b.describe()}; data: {b.data_toy.describe()} -> {Path(args.assets) / b.folder}")
        return {"bases": [asdict(b) for b in bases]}
    threads = ["--threads", str(args.threads)] if args.threads else []
    assets = Path(args.assets)
    if args.command == "fit":
        fit(bases, assets, args.refit, threads + (["--steps", "2", "--pool", "8"] if args.smoke else []))
        return {"fitted": [b.name for b in bases]}
    for base in bases:  # before any work: a report is all of its bases or nothing
        if not weights(base, assets).is_file():
            print(f"error: {assets / base.folder}: base {base.name} is not fitted; "
                  f"run benchmarks/known_answer_dist.py fit --only {base.name}", file=sys.stderr)
            raise SystemExit(2)
    smoke = ["--steps", "2", "--n_train", "4", "--n_eval", "1", "--inference_steps", "2", "--warmup", "0"]
    out_dir = Path(args.out_dir or os.environ.get("TMPDIR", "/tmp")) / ("known_answer_dist" if not args.out_dir else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    masking = [f"--{k} {v:g}" for k, v in (("mask_probability", args.mask_probability),
                                           ("max_masked_panels", args.max_masked_panels)) if v is not None]
    label = " ".join(masking) or "defaults"
    rows = {}
    for base in bases:
        rows[base.name] = report_one(base, assets, out_dir, threads + (smoke if args.smoke else []), args.train_args,
                                     args.mask_probability, args.max_masked_panels)
        print(format_report(rows, label), flush=True)  # so far: a run cut short keeps what it measured
    text = format_report(rows, label)
    if args.out:
        partial = Path(args.out).with_name(Path(args.out).name + ".partial")
        partial.write_text(text + "\n")
        shutil.move(partial, args.out)
    summary = {"rows": rows, "table": text, "out_dir": str(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
