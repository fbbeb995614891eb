"""LRS Visualize: why a prompt is risky for a pack (which words, where in the image, which heads)."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageDraw, ImageFont

from ..saferope_comfy.editors import RiskObserver
from ..saferope_comfy.flux_adapter import with_qk_editor
from ..saferope_comfy.model_calls import (
    context_token_ids,
    context_tokenizer,
    encode_prompt,
    latent_shape,
    load_model,
    model_inputs,
    velocity,
)
from ..saferope_core import SafeRoPEPack
from ..saferope_core.prompts import content_span
from .common import Pack, checked, require_pack_fits, seed_input
from .errors import SafeRoPEInputError

PANEL = 512


def token_pieces(clip, ids: list[int]) -> list[str]:
    """The context tokenizer's own piece strings for its token ids."""
    hf = context_tokenizer(clip)
    if hf is not None and hasattr(hf, "convert_ids_to_tokens"):
        return [str(p) for p in hf.convert_ids_to_tokens(ids)]
    return [str(i) for i in ids]


WORD_STARTS = ("▁", "Ġ")  # SentencePiece and byte-level BPE mark a word's first piece


def words_of(pieces: list[str], keep: list[bool]) -> list[tuple[str, list[int]]]:
    """Merge SentencePiece ('▁' starts a word), byte-level BPE ('Ġ' starts one) or CLIP BPE ('</w>' ends one)
    pieces into (word, token positions)."""
    words: list[tuple[str, list[int]]] = []
    open_word = False
    for i, (piece, wanted) in enumerate(zip(pieces, keep, strict=True)):
        if not wanted:
            open_word = False
            continue
        starts = piece.startswith(WORD_STARTS) or not open_word
        text = piece.replace("</w>", "")
        for mark in WORD_STARTS:
            text = text.replace(mark, "")
        if starts or not words:
            words.append((text, [i]))
        else:
            words[-1] = (words[-1][0] + text, words[-1][1] + [i])
        open_word = not piece.endswith("</w>")
    merged: list[tuple[str, list[int]]] = []
    for text, positions in words:  # a bare '▁' piece joins the word after it
        if merged and not merged[-1][0]:
            merged[-1] = (text, merged[-1][1] + positions)
        else:
            merged.append((text, positions))
    return [(t, p) for t, p in merged if t]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def risk_colour(value: float) -> tuple[int, int, int]:
    """White (0) -> orange -> red (1)."""
    v = float(min(max(value, 0.0), 1.0))
    return 255, int(255 * (1 - 0.6 * v)), int(255 * (1 - v))


def word_chart(words: list[tuple[str, float]]) -> Image.Image:
    """Horizontal bars, one per word, highest risk first, with its value."""
    rows = sorted(words, key=lambda w: -w[1])[:24]
    img = Image.new("RGB", (PANEL, PANEL), "white")
    draw, font = ImageDraw.Draw(img), _font(16)
    draw.text((10, 6), "word risk (LRS, mean over the pack's heads)", fill="black", font=font)
    row_h = (PANEL - 40) // max(len(rows), 1)
    for i, (word, value) in enumerate(rows):
        y = 34 + i * row_h
        draw.text((10, y), word[:18], fill="black", font=font)
        width = int((PANEL - 230) * min(max(value, 0.0), 1.0))
        draw.rectangle([170, y + 2, 170 + max(width, 1), y + row_h - 4], fill=risk_colour(value))
        draw.text((PANEL - 52, y), f"{value:.2f}", fill="black", font=font)
    return img


def heatmap_overlay(risk: torch.Tensor, hw: tuple[int, int], background: torch.Tensor | None) -> Image.Image:
    """Image-token risk [h*w] as a red heatmap over `background` [H, W, 3] in 0..1 (grey when None)."""
    grid = risk[: hw[0] * hw[1]].reshape(1, 1, *hw)
    if background is None:
        background = torch.full((PANEL, PANEL, 3), 0.5)
    size = background.shape[:2]
    heat = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
    heat = heat.clamp(0, 1).unsqueeze(-1)
    red = torch.tensor([1.0, 0.1, 0.0])
    mixed = background * (1 - 0.6 * heat) + red * 0.6 * heat
    return Image.fromarray((mixed.clamp(0, 1).numpy() * 255).astype(np.uint8))


def head_map(pack: SafeRoPEPack) -> Image.Image:
    """Blocks x heads grid of the head-selection delta; selected heads outlined in black."""
    names = pack.shape.block_names()
    delta = pack.delta if pack.delta is not None else torch.zeros(len(names), pack.shape.heads)
    cell = max(12, min(24, (PANEL - 80) // max(len(names), pack.shape.heads)))
    font = _font(11)
    title = "head selection: delta per block (rows) and head (columns)"
    title_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font)) + 12
    width = max(80 + cell * pack.shape.heads, title_width)
    img = Image.new("RGB", (width, 40 + cell * len(names)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black", font=font)
    for row, name in enumerate(names):
        y = 30 + row * cell
        draw.text((4, y), name, fill="black", font=font)
        selected = pack.blocks[name].heads if name in pack.blocks else torch.zeros(pack.shape.heads, dtype=bool)
        for head in range(pack.shape.heads):
            x = 76 + head * cell
            draw.rectangle(
                [x, y, x + cell - 1, y + cell - 1],
                fill=risk_colour(float(delta[row, head])),
                outline="black" if bool(selected[head]) else (220, 220, 220),
            )
    return img


def to_image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> ComfyUI IMAGE [N, H, W, 3], padded to a common size with white."""
    h = max(i.height for i in images)
    w = max(i.width for i in images)
    out = []
    for img in images:
        canvas = Image.new("RGB", (w, h), "white")
        canvas.paste(img, (0, 0))
        out.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0))
    return torch.stack(out)


class LRSVisualize(io.ComfyNode):
    NODE = "LRS Visualize"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LRSVisualize",
            display_name=cls.NODE,
            category="SafeRoPE",
            description="Shows why a prompt is risky for a pack, without changing anything: runs the model once at "
            "`sigma` and draws (1) each word's risk, (2) a heatmap of the image tokens' risk, (3) the "
            "pack's safety-critical heads. Risk is the Latent Risk Score (0 = nothing of the concept, "
            "1 = all of it) averaged over the pack's heads.",
            inputs=[
                io.Model.Input("model", tooltip="The model the pack was built for"),
                Pack.Input("pack", tooltip="From Load SafeRoPE Pack"),
                io.Clip.Input("clip", tooltip="The model's text encoder: the prompt's words come from its tokenizer"),
                io.String.Input(
                    "text",
                    default="a photo of a nude woman on the beach",
                    multiline=True,
                    tooltip="The prompt to inspect",
                ),
                io.Float.Input(
                    "sigma",
                    default=0.9,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip="Noise level the model is run at (1 = pure noise)",
                ),
                seed_input("Seed of the noise"),
                io.Image.Input("image", optional=True, tooltip="Optional image shown under the heatmap"),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Optional latent noised to sigma (default: noise at 512x512 or the image's size)",
                ),
            ],
            outputs=[
                io.Image.Output(
                    "images", display_name="images", tooltip="Three panels: word risk, image heatmap, head map"
                ),
                io.String.Output("summary", display_name="summary", tooltip="The riskiest words and the image risk"),
            ],
            is_output_node=True,
        )

    @classmethod
    @checked
    def execute(cls, model, pack: SafeRoPEPack, clip, text, sigma, seed, image=None, latent=None) -> io.NodeOutput:
        require_pack_fits(cls.NODE, "pack", pack, model, "Use the pack built for this model")
        if not text.strip():
            raise SafeRoPEInputError(cls.NODE, "text", "the prompt is empty", "Type the prompt to inspect")
        observer = RiskObserver(pack)
        observed = with_qk_editor(model, observer)
        device = load_model(observed)
        prompt = encode_prompt(clip, text)
        generator = torch.Generator().manual_seed(seed)
        if latent is not None and latent["samples"].shape[1] != latent_shape(model, 64, 64)[0]:
            raise SafeRoPEInputError(
                cls.NODE,
                "latent",
                f"the latent has {latent['samples'].shape[1]} channels, this "
                f"model's have {latent_shape(model, 64, 64)[0]}",
                "Use a latent made for this model (its own Empty Latent node or VAE)",
            )
        if latent is not None:
            clean = model.model.process_latent_in(latent["samples"][:1].float())
            x = (1 - sigma) * clean + sigma * torch.randn(clean.shape, generator=generator)
        else:
            height, width = (image.shape[1], image.shape[2]) if image is not None else (512, 512)
            x = torch.randn((1, *latent_shape(model, width, height)), generator=generator)
        with torch.no_grad():
            observer.context = model_inputs(observed, prompt, x.to(device))["c_crossattn"]
            velocity(observed, x.to(device), torch.tensor([sigma]), prompt)
        text_risk, image_risk = observer.mean("txt")[0], observer.mean("img")[0]
        start, end = content_span(prompt.token_ids, context_token_ids(clip, ""))
        shown = list(range(max(start, prompt.cut), end))  # the prompt's own tokens that reach the model
        at = dict(zip(shown, prompt.context_positions(shown, observer.context), strict=True))
        keep = [i in at for i in range(len(prompt.token_ids))]
        pieces = token_pieces(clip, prompt.token_ids)
        words = [(w, float(text_risk[[at[p] for p in pos]].max())) for w, pos in words_of(pieces, keep)]
        hw = observer.layout.img_hw
        background = image[0, :, :, :3].float() if image is not None else None
        panels = [word_chart(words), heatmap_overlay(image_risk, hw, background), head_map(pack)]
        ranked = sorted(words, key=lambda w: -w[1])
        summary = (
            f"pack {pack.name}: riskiest words "
            + ", ".join(f"{w} {v:.2f}" for w, v in ranked[:5])
            + f"; image risk mean {float(image_risk[: hw[0] * hw[1]].mean()):.2f}, "
            f"max {float(image_risk[: hw[0] * hw[1]].max()):.2f}"
        )
        ui = {"text": [summary], "saferope_words": [{"word": w, "risk": round(v, 4)} for w, v in words]}
        return io.NodeOutput(to_image_tensor(panels), summary, ui=ui)
