"""``finegrain info``: this machine's versions, CPU, threads, precision and inference speed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from finegrain.cli.common import JsonOpt, console, err_console, print_json, stdout_for


def info(
    as_json: JsonOpt = False,
    no_bench: Annotated[bool, typer.Option("--no-bench", help="Skip the inference speed measurement.")] = False,
    seconds: Annotated[
        float, typer.Option(min=0.0, help="Time for the speed measurement, shared by fp32 and bf16.")
    ] = 5.0,
    workers: Annotated[int, typer.Option(min=0, help="Loader workers to plan threads for (the configs' default).")] = 2,
) -> None:
    """Versions, CPU and its vector features, threads, GPU, the precision `auto` picks and why.

    Then EfficientNet-Lite0's inference speed here in fp32 and in bf16 autocast (not with --no-bench)."""
    facts = machine_facts(workers=workers, bench_seconds=None if no_bench else seconds, quiet=as_json)
    if as_json:
        print_json(facts)
    else:
        console.print(render_info(facts))


def machine_facts(workers: int = 2, bench_seconds: float | None = 5.0, quiet: bool = False) -> dict:
    """:func:`finegrain.machine.machine_info` plus torch's threads, the thread plan for ``workers``
    loader workers, and (unless ``bench_seconds`` is None) the measured inference speed."""
    # optional: the train extra (torch), loaded only where this runs
    import torch

    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain import machine
    from finegrain.tasks.budget import BUDGET_CLOCK

    facts = machine.machine_info()
    planned_workers, planned_threads = machine.plan_threads(workers)
    facts.update(
        {
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "thread_plan": {"workers_asked": workers, "workers": planned_workers, "torch_threads": planned_threads},
            "inference_speed": None,
            "budget_clock": BUDGET_CLOCK,
        }
    )
    if bench_seconds is not None:
        facts["inference_speed"] = inference_speed(bench_seconds, quiet)
    return facts


def inference_speed(seconds: float, quiet: bool = False) -> dict:
    """Images per second of the bench backbone in fp32 and bf16 autocast, measured for about ``seconds``."""
    from finegrain.inference import speed  # torch and the model: only when --bench asks

    batch, size = 8, 224
    if not quiet:
        err_console.print(
            f"measuring {speed.BENCH_BACKBONE} inference (batches of {batch} at {size}x{size}) "
            f"in fp32 and bf16 autocast for about {seconds:g} s...",
            highlight=False,
        )
    with stdout_for(True):
        speeds = speed.measure_inference_speed(seconds, ("32", "bf16-mixed"), batch, size)
    return {
        "model": speed.BENCH_BACKBONE,
        "weights": "random",
        "batch_size": batch,
        "image_size": [size, size],
        "input": "uint8, channels-last",
        "seconds": seconds,
        "images_per_second": speeds,
    }


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def render_info(facts: dict):
    """A rich table of :func:`machine_facts` for the terminal."""

    t = Table(show_header=False, title="finegrain on this machine", title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    for name, version in facts["versions"].items():
        t.add_row(name, version or Text("not installed", style="dim"))
    t.add_row("python", facts["python"])
    t.add_row("platform", facts["platform"])
    t.add_section()
    add_cpu_rows(t, facts)
    speed = facts.get("inference_speed")
    if speed:
        t.add_section()
        add_speed_rows(t, speed)
    return t


def add_cpu_rows(t, facts: dict) -> None:
    """The CPU, threads, GPU, precision and engine rows of :func:`render_info`."""

    t.add_row("cpu", facts["cpu"])
    t.add_row("vector features", " ".join(facts["cpu_flags"]) or "none known")
    t.add_row("native bf16", "yes" if facts["native_bf16"] else "no")
    t.add_row("cores", str(facts["cores"]))
    t.add_row("torch threads", f"{facts['torch_threads']} intra-op, {facts['torch_interop_threads']} inter-op")
    plan = facts["thread_plan"]
    t.add_row(
        "thread plan",
        f"{_n(plan['workers_asked'], 'loader worker')} asked: {_n(plan['workers'], 'worker')} "
        f"+ {_n(plan['torch_threads'], 'torch thread')} (plan_threads)",
    )
    t.add_row("gpu", facts.get("gpu") or "none")
    t.add_row("precision auto", Text.assemble((facts["auto_precision"], "bold"), f": {facts['auto_precision_reason']}"))
    if facts["auto_precision"] == "bf16-mixed" and not facts["cuda"]:
        t.add_row(
            "",
            "a run on the frozen cache builds it in its evaluation's precision (fp32 on an ONNX "
            "export, else bf16) and trains in whichever of bf16 and fp32 a probe at its start finds faster",
        )
    t.add_row("--budget", facts["budget_clock"])
    t.add_row(
        "engines",
        ", ".join(
            f"{e} ({facts['versions'].get(p) or 'not installed'})"
            for e, p in (("torch", "torch"), ("onnx", "onnxruntime"))
        )
        + "; --engine auto: onnx for a run "
        "with an export of its current checkpoint",
    )


def add_speed_rows(t, speed: dict) -> None:
    """The measured fp32 and bf16 inference speed rows of :func:`render_info`."""
    ips = speed["images_per_second"]
    fp32, bf16 = ips.get("32"), ips.get("bf16-mixed")
    where = (
        f"{speed['model']}, random weights, batches of {speed['batch_size']} at "
        f"{speed['image_size'][0]}x{speed['image_size'][1]}"
    )
    t.add_row("inference fp32", f"{fp32:.1f} images/s ({where})")
    if bf16 is not None:
        ratio = f"{fp32 / bf16:.1f}x slower than fp32" if bf16 < fp32 else f"{bf16 / fp32:.1f}x faster than fp32"
        t.add_row("inference bf16 autocast", f"{bf16:.1f} images/s ({ratio})")
