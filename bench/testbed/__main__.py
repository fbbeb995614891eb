"""python -m bench.testbed {train,accuracy,classifier,words,erase,benchmark,demo} ...

Run from the repository root; --help on each."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _read_lines(path: str | None) -> list[str] | None:
    if not path:
        return None
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


WORLD_HELP = (
    "base model: plain (the committed model; every caption named every value) or defaults (also trained on captions"
    " that leave the colour / pattern out, drawn grey / solid)"
)


def cmd_train(a) -> None:
    from . import model as base_model
    from . import train_base

    train_base.train(
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        seed=a.seed,
        hidden=a.hidden,
        heads=a.heads,
        depth=a.depth,
        depth_single=a.depth_single,
        pooled_drop=a.pooled_drop,
        ema_decay=a.ema_decay,
        warmup=a.warmup,
        threads=a.threads,
        out=Path(a.out or (base_model.DEFAULTS_MODEL_FILE if a.defaults else base_model.MODEL_FILE)),
        save_every=a.save_every,
        defaults=a.defaults,
    )


def cmd_classifier(a) -> None:
    from .report import classifier_accuracy

    print(classifier_accuracy(a.count, a.seed))


def cmd_accuracy(a) -> None:
    from .report import base_accuracy

    print(
        base_accuracy(
            Path(a.model) if a.model else None, a.steps, a.per_prompt, a.seed, a.templates, a.synonyms, a.threads
        )
    )


def cmd_words(a) -> None:
    from .report import word_following

    print(word_following(a.steps, a.per_prompt, a.seed, a.threads, _load_model(a.model)))


def cmd_benchmark(a) -> None:
    from .benchmark import benchmark

    rows = {"only_default_pack": a.only_default_pack, "single_guards": a.single_guards}
    print(benchmark(a.targets, a.jobs, a.threads, a.objective, a.name, a.world, a.seeds, resume=a.resume, **rows))


def cmd_erase(a) -> None:
    from . import erase

    torch.set_num_threads(a.threads)
    s = erase.EraseSettings(
        target=a.target,
        seed=a.seed,
        world=a.world,
        sample_steps=a.steps,
        per_prompt=a.per_prompt,
        max_prompts=a.max_prompts,
        paraphrases=_read_lines(a.paraphrases),
        held_out=_read_lines(a.held_out),
        subjects=_read_lines(a.subjects) or [],
        modifiers=_read_lines(a.modifiers) or [],
        max_unsafe=a.max_unsafe,
        max_safe=a.max_safe,
        sigmas=a.sigmas,
        reservoir=a.reservoir,
        rank=a.rank,
        lrs_threshold=a.lrs_threshold,
        hds_threshold=a.hds_threshold,
        train_steps=a.train_steps,
        learning_rate=a.lr,
        unlearn_weight=a.unlearn_weight,
        preserve_weight=a.preserve_weight,
        safe_images=a.safe_images,
        objective=a.objective,
        anchor=a.anchor,
        gradient_checkpointing=a.gradient_checkpointing,
        strength=a.strength,
        apply_to=a.apply_to,
        rand_seed=a.rand_seed,
        skip_rand=a.skip_rand,
        uvr_block=a.uvr_block,
        uvr_sigmas=a.uvr_sigmas,
        uvr_anchors=a.uvr_anchors,
        uvr_strength=a.uvr_strength,
        uvr_threshold=a.uvr_threshold,
        uvr_sigma_start=a.uvr_sigma_start,
        skip_uvr=a.skip_uvr,
        redirector_steps=a.redirector_steps,
        redirector_lr=a.redirector_lr,
        skip_redirector=a.skip_redirector,
        skip_stacks=a.skip_stacks,
        skip_default_pack=a.skip_default_pack,
        only_default_pack=a.only_default_pack,
        skip_attack=a.skip_attack,
        attack_budget=a.attack_budget,
    )
    start = time.perf_counter()
    result, _, trained = erase.run(s, model=_load_model(a.model))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["command"] = "python -m bench.testbed " + " ".join(sys.argv[1:])
    name = a.name or f"erase_{a.target}"
    path = erase.save_result(result, name)
    if a.save_pack:
        trained.save(erase.OUT_DIR / f"{name}.safetensors")
    print(result["table"])
    print(f"\n(wall {result['wall_s']:.0f} s; results in {path})")


def cmd_demo(a) -> None:
    from .report import demo

    torch.set_num_threads(a.threads)
    print(
        demo(
            a.target,
            Path(a.out),
            a.steps,
            a.train_steps,
            a.seed,
            a.rank,
            a.lrs_threshold,
            a.hds_threshold,
            a.strength,
            _load_model(a.model),
            a.lr,
        )
    )


def _load_model(path):
    if not path:
        return None
    from . import model as base_model
    from .env import comfy_and_pack

    comfy_and_pack()
    return base_model.load(Path(path), check_sha=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.testbed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the base model on the world (CPU) and save it with its sha256")
    t.add_argument("--steps", type=int, default=1500, help="training steps")
    t.add_argument("--batch", type=int, default=48, help="images per step")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and data")
    t.add_argument("--hidden", type=int, default=128, help="hidden size")
    t.add_argument("--heads", type=int, default=4, help="attention heads")
    t.add_argument("--depth", type=int, default=2, help="double-stream blocks")
    t.add_argument("--depth-single", type=int, default=2, help="single-stream blocks")
    t.add_argument("--pooled-drop", type=float, default=0.5, help="share of samples trained with pooled vector 0")
    t.add_argument(
        "--ema-decay", type=float, default=0.995, help="decay of the weights' moving average (the saved weights)"
    )
    t.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    t.add_argument(
        "--defaults",
        action="store_true",
        help="also train on captions that leave the colour / pattern out, drawn grey / solid (world with defaults)",
    )
    t.add_argument("--out", default="", help="where the weights are written (default: the committed model's file)")
    t.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots every N steps")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("classifier", help="the classifier's accuracy on rendered ground truth (clean, blurred, noisy)")
    c.add_argument("--count", type=int, default=1500, help="rendered images per condition")
    c.add_argument("--seed", type=int, default=1, help="seed of the rendered images")
    c.set_defaults(func=cmd_classifier)

    ac = sub.add_parser("accuracy", help="attribute accuracy of the base model's samples, judged by the classifier")
    ac.add_argument("--model", default="", help="weights file (default: the committed model)")
    ac.add_argument("--steps", type=int, default=20, help="Euler steps")
    ac.add_argument("--per-prompt", type=int, default=2, help="images per prompt")
    ac.add_argument("--seed", type=int, default=0, help="noise seed")
    ac.add_argument(
        "--templates",
        choices=["pack", "all"],
        default="all",
        help="caption templates: the pack's (pack) or every one (all)",
    )
    ac.add_argument("--synonyms", action="store_true", help="also every synonym word of every value")
    ac.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    ac.set_defaults(func=cmd_accuracy)

    w = sub.add_parser("words", help="which unseen words (never in training or pack prompts) the base model follows")
    w.add_argument("--model", default="", help="weights file (default: the committed model)")
    w.add_argument("--steps", type=int, default=20, help="Euler steps")
    w.add_argument("--per-prompt", type=int, default=2, help="images per prompt")
    w.add_argument("--seed", type=int, default=0, help="noise seed")
    w.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    w.set_defaults(func=cmd_words)

    b = sub.add_parser("benchmark", help="every colour and pattern with the node defaults: one table each + summary")
    b.add_argument("--targets", nargs="+", default=None, help="targets (default: the six colours, striped, dotted)")
    b.add_argument("--jobs", type=int, default=2, help="erase runs at a time (each its own process)")
    b.add_argument("--threads", type=int, default=1, help="torch threads per run")
    b.add_argument("--objective", choices=["redirect", "deviate"], default="redirect", help="the default objective")
    b.add_argument("--name", default="benchmark", help="report name: bench/out/testbed/<name>.md")
    b.add_argument("--world", choices=["plain", "defaults"], default="plain", help=WORLD_HELP)
    b.add_argument("--seeds", type=int, default=1, help="runs per target (seeds 0, 1, ...): summary mean ± std")
    b.add_argument(
        "--only-default-pack", action="store_true", help="rows base and default pack only (erase --only-default-pack)"
    )
    b.add_argument(
        "--single-guards",
        action="store_true",
        help="rows base, SafeRoPE, UVR, prompt redirector and default pack (no Rand, stacks or other objective)",
    )
    b.add_argument("--resume", action="store_true", help="keep the runs whose result file exists")
    b.set_defaults(func=cmd_benchmark)

    e = sub.add_parser(
        "erase", help="build a pack and UVR anchors through the nodes; measure base, Rand, SafeRoPE, UVR and both"
    )
    e.add_argument("--target", required=True, help="attribute value to erase, e.g. red, circle, striped")
    e.add_argument("--world", choices=["plain", "defaults"], default="plain", help=WORLD_HELP)
    e.add_argument("--model", default="", help="weights file (default: the committed model)")
    e.add_argument(
        "--paraphrases",
        default="",
        help="file: paraphrase prompts, one per line (default: the target's other words in the pack templates)",
    )
    e.add_argument(
        "--held-out",
        default="",
        help="file: compositional prompts, one per line (default: the target in templates the pack never saw)",
    )
    e.add_argument("--subjects", default="", help="file: pack subjects, one per line (default: the target)")
    e.add_argument("--modifiers", default="", help="file: pack modifiers, one per line (default: none)")
    e.add_argument("--seed", type=int, default=0, help="seed of prompts, training and noise")
    e.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    e.add_argument("--per-prompt", type=int, default=2, help="images per prompt")
    e.add_argument("--max-prompts", type=int, default=24, help="prompts per family")
    e.add_argument("--max-unsafe", type=int, default=200, help="Prompt Set max_unsafe")
    e.add_argument("--max-safe", type=int, default=200, help="Prompt Set max_safe")
    e.add_argument("--sigmas", default="1.0, 0.8, 0.6", help="Collect Q/K sigmas")
    e.add_argument("--reservoir", type=int, default=1024, help="Collect Q/K reservoir_size")
    e.add_argument("--rank", type=int, default=5, help="Build Subspaces rank")
    e.add_argument("--lrs-threshold", type=float, default=0.7, help="Build Subspaces lrs_threshold")
    e.add_argument("--hds-threshold", type=float, default=0.5, help="Build Subspaces hds_threshold")
    e.add_argument("--train-steps", type=int, default=1000, help="Train Risk Rotations steps")
    e.add_argument("--lr", type=float, default=1e-2, help="Train Risk Rotations learning_rate")
    e.add_argument("--unlearn-weight", type=float, default=1.0, help="Train Risk Rotations unlearn_weight")
    e.add_argument("--preserve-weight", type=float, default=1.0, help="Train Risk Rotations preserve_weight")
    e.add_argument("--safe-images", type=int, default=64, help="rendered safe images for the preserve term")
    e.add_argument(
        "--objective",
        choices=["redirect", "deviate"],
        default="redirect",
        help="Train Risk Rotations objective: draw the anchor instead (redirect) or move away (deviate)",
    )
    e.add_argument("--anchor", default="", help="the target's safe counterpart in prompts ('': the word removed)")
    e.add_argument("--gradient-checkpointing", action="store_true", help="Train Risk Rotations gradient_checkpointing")
    e.add_argument("--strength", type=float, default=1.0, help="Apply Risk Rotation strength")
    e.add_argument("--apply-to", choices=["both", "text", "image"], default="both", help="Apply Risk Rotation apply_to")
    e.add_argument(
        "--rand-seed",
        type=int,
        default=1234,
        help="seed of the Rand row's random pack (same heads, random bases and W)",
    )
    e.add_argument("--skip-rand", action="store_true", help="skip the Rand row")
    e.add_argument("--uvr-block", type=int, default=0, help="UVR detection single block")
    e.add_argument("--uvr-sigmas", default="1.0, 0.95, 0.9", help="Collect UVR Anchors sigmas")
    e.add_argument("--uvr-anchors", type=int, default=4, help="anchors per head")
    e.add_argument("--uvr-strength", type=float, default=1.0, help="Restrict Unsafe Flow strength")
    e.add_argument("--uvr-threshold", type=float, default=-1.0, help="-1: the anchors' calibrated threshold")
    e.add_argument("--uvr-sigma-start", type=float, default=0.85, help="Restrict Unsafe Flow sigma_start")
    e.add_argument("--skip-uvr", action="store_true", help="skip the UVR rows")
    e.add_argument("--redirector-steps", type=int, default=400, help="Train Prompt Redirector steps")
    e.add_argument("--redirector-lr", type=float, default=1e-3, help="Train Prompt Redirector learning_rate")
    e.add_argument("--skip-redirector", action="store_true", help="skip the prompt redirector rows")
    e.add_argument(
        "--skip-stacks", action="store_true", help="the single guards alone: no stacked rows, no detection table"
    )
    e.add_argument("--skip-default-pack", action="store_true", help="skip the default pack row (Apply Safety Pack)")
    e.add_argument(
        "--only-default-pack", action="store_true", help="rows base and default pack only (no single guards)"
    )
    e.add_argument("--skip-attack", action="store_true", help="skip the word-substitution attack column")
    e.add_argument("--attack-budget", type=int, default=16, help="attack queries per attacked prompt")
    e.add_argument("--save-pack", action="store_true", help="also write the trained pack to bench/out/testbed")
    e.add_argument("--name", default="", help="result file name (default erase_<target>)")
    e.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    e.set_defaults(func=cmd_erase)

    d = sub.add_parser("demo", help="before/after image grid (base vs SafeRoPE) as a PNG under bench/out")
    d.add_argument("--target", default="red", help="attribute value to erase")
    d.add_argument("--out", default="bench/out/testbed_demo.png", help="where the PNG is written")
    d.add_argument("--model", default="", help="weights file (default: the committed model)")
    d.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    d.add_argument("--train-steps", type=int, default=1000, help="Train Risk Rotations steps")
    d.add_argument("--seed", type=int, default=0, help="seed of prompts, training and noise")
    d.add_argument("--rank", type=int, default=5, help="Build Subspaces rank")
    d.add_argument("--lrs-threshold", type=float, default=0.7, help="Build Subspaces lrs_threshold")
    d.add_argument("--hds-threshold", type=float, default=0.5, help="Build Subspaces hds_threshold")
    d.add_argument("--strength", type=float, default=1.0, help="Apply Risk Rotation strength")
    d.add_argument("--lr", type=float, default=0.01, help="Train Risk Rotations learning_rate")
    d.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    d.set_defaults(func=cmd_demo)

    a = p.parse_args(argv)
    a.func(a)


if __name__ == "__main__":
    main()
