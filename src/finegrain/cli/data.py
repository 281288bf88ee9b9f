"""``finegrain data``: check, prepare, synthesise and download datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finegrain.cli.common import JsonOpt, ProfileOpt, SetOpt, console, print_json, stdout_for
from finegrain.errors import FinegrainError


def data_check(
    path: Annotated[Path, typer.Argument(help="Dataset folder (or CSV file).")],
    format: Annotated[str, typer.Option(help="Dataset format, or auto.")] = "auto",
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the train/test duplicate search.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Detect the format, count images and classes, and list every problem file."""
    # optional: SciPy (the train extra), imported only when this runs
    from finegrain.data.check import check_dataset, check_to_dict, render_check

    with stdout_for(as_json):
        report = check_dataset(path, format=format, hash_duplicates=not no_hash)
    if as_json:
        print_json(check_to_dict(report))
    else:
        console.print(render_check(report))
    if not report.ok:
        raise typer.Exit(1)


def data_prepare(
    source: Annotated[str, typer.Argument(help="A config (file or shipped name) or a dataset folder.")],
    size: Annotated[tuple[int, int] | None, typer.Option(help="HEIGHT WIDTH (default: the config's).")] = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache root (default ~/.cache/finegrain).")] = None,
    workers: Annotated[int, typer.Option(help="Decoding workers.")] = 2,
) -> None:
    """Decode and resize a dataset once into memory-mapped uint8 arrays."""
    # optional: torch, Lightning (the train extra), imported only when this runs
    from finegrain.data.module import prepare_for_config

    cfg = config_for_data(source, profile, set_ or [], size)
    for line in prepare_for_config(cfg, cache_dir=cache_dir, workers=workers):
        console.print(line)


def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    format: Annotated[str, typer.Option(help="stanford_cars, tiny_imagenet or image_folder.")] = "stanford_cars",
    layout: Annotated[str, typer.Option(help="Stanford Cars layout: devkit, all_images or kaggle.")] = "devkit",
    classes: Annotated[int, typer.Option(help="Number of classes.")] = 12,
    train_per_class: Annotated[int, typer.Option(help="Training images per class.")] = 24,
    test_per_class: Annotated[int, typer.Option(help="Test images per class.")] = 12,
    size: Annotated[tuple[int, int], typer.Option(help="HEIGHT WIDTH of the images.")] = (96, 128),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
) -> None:
    """Write a deterministic synthetic fine-grained dataset in a real format."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.data.synth import make_synthetic

    root = make_synthetic(
        out,
        format=format,
        num_classes=classes,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        size=size,
        seed=seed,
        layout=layout,
    )
    console.print(f"wrote a synthetic {format} dataset to [bold]{root}[/]")


def data_download(
    dataset: Annotated[str, typer.Argument(help="tiny-imagenet or stanford-cars.")],
    dest: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("data"),
    url: Annotated[str | None, typer.Option(help="Override the archive URL (a mirror).")] = None,
) -> None:
    """Download and unpack a dataset (resumable, checksum verified)."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.data import download

    if dataset in ("stanford-cars", "stanford_cars", "cars"):
        console.print(download.stanford_cars_instructions())
        return
    if dataset not in ("tiny-imagenet", "tiny_imagenet", "tiny-imagenet-200"):
        raise FinegrainError(f"unknown dataset '{dataset}'; valid: tiny-imagenet, stanford-cars")
    root = download.download_tiny_imagenet(dest, url=url, md5=None) if url else download.download_tiny_imagenet(dest)
    console.print(f"Tiny ImageNet is ready at [bold]{root}[/]")


def config_for_data(source: str, profile: str | None, sets: list[str], size: tuple[int, int] | None):
    """A config from a config name/file, or a default config over a dataset folder."""
    # start-up: loaded when the command runs, so `finegrain --help` stays fast
    from finegrain.config import build_config, load_config

    p = Path(source)
    if p.exists() and (p.is_dir() or p.suffix.lower() == ".csv"):
        cfg = build_config({"data": {"root": str(p)}}, overrides=sets)
    else:
        cfg = load_config(source, profile=profile, overrides=sets)
    if size is not None:
        cfg.data.image_size = size
    return cfg
