"""The sections of a run's report page: header, test metrics, training, most confused
classes, per-class accuracy and retrieval examples, each drawn from :class:`RunInputs` as the
values (text and figures) that ``templates/run_report.html.j2`` lays out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finegrain.report import figures
from finegrain.report.page_parts import Figure, skipped, try_figure
from finegrain.report.run_inputs import RunInputs, examples_by_class
from finegrain.report.tables import (
    MISSING,
    data_words,
    fmt_seconds,
    protocol_words,
    sizes_words,
)


def config_brief(cfg, metrics: dict | None) -> list[tuple[str, str]]:
    """The config in words, one (label, value) row per setting."""
    if cfg is None:
        return [("config", "config.yaml missing or invalid")]
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    head = ("cosine classifier" if m.head == "cosine" else m.head) + (
        f" ({m.embedding_dim}-d embedding{', L2-normalised' if m.normalize_embedding else ''})"
        if m.has_embedder
        else ""
    )
    if m.dropout:
        head += f", dropout {m.dropout}"
    backbone = m.backbone
    if m.cubs != "none":
        backbone += f" + {m.cubs} on stage(s) {', '.join(map(str, m.cubs_stages))}"
    if m.freeze != "none":
        backbone += f" (frozen: {m.freeze})"
    if m.freeze_stages:
        backbone += f" (stem and first {m.freeze_stages} stages frozen)"
    if m.drop_path:
        backbone += f", stochastic depth up to {m.drop_path:g}"
    if m.global_pool != "avg":
        backbone += f", {m.global_pool} pooling"
    opt = o.name + (f", weight decay {o.weight_decay:g}" if o.weight_decay else "")
    if o.name == "sgd":
        opt += f", momentum {o.momentum:g}{' (Nesterov)' if o.nesterov else ''}"
    if t.ema_decay:
        opt += f"; the model is the moving average of its weights (EMA, decay {t.ema_decay:g})"
    lr = f"{o.lr:g}" + (f" (backbone × {o.backbone_lr_mult:g})" if o.backbone_lr_mult != 1 else "")
    sch = cfg.schedule
    if sch.name == "step":
        lr += f"; StepLR γ={sch.gamma:g} every {sch.step_size} epochs"
    elif sch.name != "none":
        lr += f"; {sch.name} schedule" + (
            f", {sch.warmup_epochs:g} warm-up epoch{'' if sch.warmup_epochs == 1 else 's'}" if sch.warmup_epochs else ""
        )
    aug = d.augment + "".join(f", {k} {v:g}" for k, v in (("mixup", t.mixup), ("cutmix", t.cutmix)) if v)
    if t.frozen_cache_views:
        aug += (
            f"; trained on {t.frozen_cache_views} cached view(s) per image of the frozen stages' outputs, "
            "feature maps cropped to 75-100%"
        )
    epochs = f"{t.epochs}" + (f" (first {t.head_epochs} head only)" if t.head_epochs else "")
    if d.progressive_sizes:
        epochs += " (progressive resizing: " + ", ".join(f"{n} at {h}x{w}" for h, w, n in d.progressive_sizes)
        epochs += f", then {t.epochs - sum(n for *_, n in d.progressive_sizes)} at {d.image_size[0]}x{d.image_size[1]})"
    size = list(d.image_size)
    tested = [list(t) for t in ((metrics or {}).get("protocol", {}).get("eval_image_sizes") or d.eval_image_sizes)]
    rows = [
        ("task", cfg.task),
        ("data", f"{d.root} (format {d.format}, protocol {d.protocol})"),
        ("backbone", backbone),
        ("weights", m.weights),
        ("head", head),
        ("image size", sizes_words(size, tested)),
        ("epochs", epochs),
        ("optimiser", opt),
        ("learning rate", lr),
        (
            "batch size",
            f"{d.batch_size}" + (f", sampler {d.sampler} (m={d.m_per_class})" if d.sampler == "m_per_class" else ""),
        ),
        ("augmentation", aug),
        (
            "loss",
            cfg.loss.name
            + "".join(
                f", {k.replace('_', ' ')} {v:g}"
                for k, v in cfg.loss.model_dump().items()
                if k != "name" and isinstance(v, (int, float)) and v
            ),
        ),
        ("precision", precision_words(t.precision, (metrics or {}).get("training_precision"))),
        ("seed", str(t.seed)),
    ]
    if not cfg.trains:
        e = cfg.eval
        rows.append(("kNN", f"k={e.k}, {e.metric}, {e.weights} votes, embeddings of run {e.source_run}"))
    return rows


def precision_name(p: Any) -> str:
    """Lightning's precision names ("32", "bf16-mixed") as people say them (fp32, bf16)."""
    return {"32": "fp32", "bf16-mixed": "bf16"}.get(str(p), str(p))


def precision_words(requested: str, phases: Any) -> str:
    """The configured precision, with what ``auto`` chose for each phase where it chose per phase."""
    if not isinstance(phases, dict) or not isinstance(phases.get("images_per_second"), dict):
        return requested
    speeds = ", ".join(f"{precision_name(p)} {v}" for p, v in phases["images_per_second"].items())
    return (
        f"{requested}: frozen cache in {precision_name(phases.get('cache', '?'))}, training steps in "
        f"{precision_name(phases.get('steps', '?'))} "
        f"(the faster cached step on {phases.get('cpu') or 'the training CPU'}, "
        f"images/s: {speeds})"
    )


def definition_for(key: str, definitions: dict[str, str]) -> str:
    """The definition text of a metric key, matching grouped keys such as
    ``precision/recall/f1_macro`` or ``precision@1 / r_precision / map@r``."""
    if key in definitions:
        return definitions[key]
    if key.startswith("recall@") and "recall@k" in definitions:
        return definitions["recall@k"]
    for dk, text in definitions.items():
        parts = [p.strip() for p in dk.split("/")]
        names = set(parts)
        last = parts[-1]
        if "_" in last and len(parts) > 1:
            suffix = "_" + last.split("_", 1)[1]
            names |= {p + suffix for p in parts[:-1]}
        if key in names:
            return text
    return ""


PRETTY = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "loss": "loss",
    "precision_macro": "precision (macro)",
    "recall_macro": "recall (macro)",
    "f1_macro": "F1 (macro)",
    "precision_weighted": "precision (weighted)",
    "recall_weighted": "recall (weighted)",
    "f1_weighted": "F1 (weighted)",
    "n": "test images",
    "prediction_seconds": "prediction time",
    "n_gallery": "gallery images",
    "n_queries": "queries",
    "map@r": "MAP@R",
    "r_precision": "R-precision",
    "precision@1": "precision@1",
    "nmi": "NMI",
}


def format_metric(key: str, v: Any) -> str:
    """A metric value as shown: counts with separators, seconds, losses, else a percentage."""
    if isinstance(v, bool) or v is None:
        return MISSING if v is None else str(v)
    if isinstance(v, int) or (key.startswith("n") and isinstance(v, float) and v.is_integer() and key != "nmi"):
        return f"{int(v):,}"
    if isinstance(v, float):
        if "seconds" in key:
            return f"{fmt_seconds(v)} s"
        if "loss" in key:
            return f"{v:.4f}"
        if key == "nmi":
            return f"{v:.4f}"
        return f"{100 * v:.2f}%"
    return str(v)


def metrics_section(metrics: dict) -> dict[str, Any]:
    """The test metrics with their definitions (``rows``: label, value, definition; None when
    metrics.json has neither kind), then the data, protocol and machine (``info``)."""
    kind = "classification" if "classification" in metrics else "retrieval" if "retrieval" in metrics else None
    proto = metrics.get("protocol") or {}
    defs = metrics.get("definitions") or {}
    partial = (
        {"done": metrics.get("epochs_done"), "planned": metrics.get("epochs_planned")}
        if metrics.get("partial")
        else None
    )
    rows: list[tuple[str, str, str]] | None = None
    if kind is not None:
        rows = []
        for k, v in metrics[kind].items():
            if isinstance(v, (dict, list)):
                continue
            label = PRETTY.get(k) or (k.replace("recall@", "Recall@") if k.startswith("recall@") else k)
            rows.append((label, format_metric(k, v), definition_for(k, defs)))
        timing = metrics.get("timing") or {}
        if timing.get("images_per_second") is not None:
            rows.append(
                (
                    "throughput",
                    f"{timing['images_per_second']:.1f} images/s",
                    f"model forward passes over {timing.get('n_images', '?')} test images"
                    f" ({fmt_seconds(timing.get('model_seconds'))} s), excluding decoding",
                )
            )
    counts = ", ".join(
        f"{proto[k]:,} {k.removeprefix('n_')}" for k in ("n_train", "n_val", "n_test") if isinstance(proto.get(k), int)
    )
    tested = metrics.get("tested_on") or {}
    info = [
        (
            "tested on",
            tested.get("words")
            or "not recorded (evaluated before runs said which images they were tested on: see the protocol)",
        ),
        ("data", data_words(proto) if proto else MISSING),
        ("protocol", protocol_words(proto)),
        ("images", counts or MISSING),
        ("classes", str(proto.get("num_classes", MISSING))),
    ]
    mach = metrics.get("machine") or {}
    if mach:
        cpu = mach.get("cpu") or mach.get("platform", "?")
        flags = f" ({', '.join(mach['cpu_flags'])})" if mach.get("cpu_flags") else ""
        bf16 = "" if "native_bf16" not in mach else f", native bf16 {'yes' if mach['native_bf16'] else 'no'}"
        info.append(
            (
                "machine",
                f"{cpu}{flags}, {mach.get('cores', mach.get('cpus', '?'))} CPU cores{bf16}, "
                f"CUDA {'yes' if mach.get('cuda') else 'no'}",
            )
        )
    run_with = metrics.get("inference") or {}
    if run_with:
        precision = precision_name(run_with.get("precision", "?"))
        info.append(("inference", f"{run_with.get('engine', '?')} engine, {precision}"))
    if metrics.get("checkpoint"):
        checksum = str(metrics.get("model_checksum") or "")[:12]
        info.append(("checkpoint", f"{metrics['checkpoint']}" + (f" (sha256 {checksum}…)" if checksum else "")))
    if metrics.get("evaluated_at"):
        info.append(("evaluated at", metrics["evaluated_at"]))
    return {"missing": None, "partial": partial, "rows": rows, "info": info}


def per_class_rows(per_class_csv: Path) -> list[dict[str, str]]:
    """Every class's support, accuracy, precision and F1, as shown."""

    def pct(v: float | None) -> str:
        return MISSING if v is None else f"{100 * v:.1f}%"

    return [
        {
            "name": str(r["class"]),
            "support": MISSING if r["support"] is None else str(int(r["support"])),
            "accuracy": pct(r["accuracy"]),
            "precision": pct(r["precision"]),
            "f1": pct(r["f1"]),
        }
        for r in figures.read_per_class_csv(per_class_csv)
    ]


def header_section(inp: RunInputs) -> dict[str, Any]:
    """The run's name, description and config in words."""
    return {"title": inp.title, "description": inp.description, "config": config_brief(inp.cfg, inp.metrics)}


def metrics_or_note(inp: RunInputs) -> dict[str, Any]:
    """The metrics section, or a note on how to produce metrics.json."""
    if inp.metrics is None:
        why = f"{inp.run.metrics.name} not found (run `finegrain evaluate {inp.run.path}`)"
        return {"missing": skipped("Metrics", why)}
    return metrics_section(inp.metrics)


def training_section(inp: RunInputs) -> Figure:
    """The learning curves from history.csv."""
    run, cfg = inp.run, inp.cfg
    png = inp.out_dir / "learning_curves.png"
    if run.history.is_file():
        return try_figure(
            "Learning curves",
            lambda: figures.learning_curves(run.history, png),
            png,
            figures.learning_curves_caption(run.history),
        )
    why = "history.csv not found" + (" (a kNN row is not trained)" if cfg is not None and not cfg.trains else "")
    return skipped("Learning curves", why)


def confused_section(inp: RunInputs) -> dict[str, Any] | None:
    """The most confused class pairs with example images (classification runs only, else None)."""
    metrics, emb = inp.metrics, inp.emb
    if metrics is None or "classification" not in metrics:
        return None
    pairs = metrics.get("confused_pairs") or []
    shown = [{k: str(p.get(k)) for k in ("true", "predicted", "count")} for p in pairs]
    if not pairs:
        return {"pairs": [], "figure": None}
    if emb is None:
        return {
            "pairs": shown,
            "figure": skipped("Example images of confused pairs", "embeddings/test.npz (image paths) not found"),
        }
    wanted = [str(p.get(k)) for p in pairs[:5] for k in ("true", "predicted")]
    ex = examples_by_class(wanted, emb[1], emb[2], inp.names, resolve=inp.resolve)
    png = inp.out_dir / "confused_pairs.png"
    caption = (
        "Two test images of the true class (blue frame) beside two of the "
        "class it was most often mistaken for (orange frame)."
    )
    return {
        "pairs": shown,
        "figure": try_figure("Confused pairs", lambda: figures.confused_pairs_figure(pairs, ex, png), png, caption),
    }


def per_class_section(inp: RunInputs) -> dict[str, Any] | None:
    """The per-class accuracy figure and table from per_class.csv (None for a run without either)."""
    per_class_csv, metrics = inp.per_class_csv, inp.metrics
    if per_class_csv.is_file():
        png = inp.out_dir / "per_class_accuracy.png"
        figure = try_figure(
            "Per-class accuracy",
            lambda: figures.per_class_accuracy(per_class_csv, png),
            png,
            "Test accuracy (= recall) of the worst and best classes, with correct / test images.",
        )
        return {"figure": figure, "rows": per_class_rows(per_class_csv)}
    if metrics is not None and "classification" in metrics:
        return {"figure": skipped("Per-class accuracy", "per_class.csv not found"), "rows": None}
    return None


def retrieval_section(inp: RunInputs) -> Figure:
    """The retrieval gallery drawn from the test embeddings."""
    emb = inp.emb
    if emb is None:
        return skipped("Retrieval gallery", "embeddings/test.npz not found")
    png = inp.out_dir / "retrieval_gallery.png"
    paths = [str(inp.resolve(p)) for p in emb[2]]
    return try_figure(
        "Retrieval gallery",
        lambda: figures.retrieval_gallery(emb[0], emb[1], paths, png, class_names=inp.names),
        png,
        "Seeded random test queries and their 5 nearest test images by cosine similarity of the embeddings "
        "(the query itself excluded); green frame = same class, red = another class.",
    )
