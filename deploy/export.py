"""Deployable models and their exports: TorchScript, ONNX (dynamic batch) and safetensors (weights plus the metadata
that rebuilds the module), each read back and checked against the eager model.

The input contract of every export (:func:`input_contract`): uint8 images [N, 3, S, S] at the encoder's image size,
RGB, 0..255, any N; the normalization the encoder was trained with happens inside, so a deployment needs no constants
from this repository. Every format is serialized in memory and written atomically (``core.files.atomic_write``): a
full disk is an OSError and leaves no partial file, and files get the umask's permissions.
The output is features [N, D] (a pretraining run's encoder) or logits [N, C] (an evaluation run's encoder + head).
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from core.errors import UserError
from core.files import atomic_write
from core.names import EXPORT_FORMATS
from rundir.checkpoint import EncoderFile, load_strict

METADATA_KEY = "simclr_cifar"  # where each format keeps the JSON metadata (TorchScript extra file, ONNX property)
# What each format needs beyond torch (setup.cfg's [export] extra)
REQUIREMENTS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "onnx_int8": ("onnx", "onnxscript", "onnxruntime"),
                "safetensors": ("safetensors",), "torchscript": ()}


class Deployable(nn.Module):
    """uint8 images [N, 3, H, W] -> features [N, D] (no head) or logits [N, C]: scaling to [0, 1] and the encoder's
    input normalization are part of the module."""

    def __init__(self, encoder: nn.Module, mean: Sequence[float], std: Sequence[float],
                 head: Optional[nn.Linear] = None) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        # not persistent: the normalization is named in the metadata, the state dict holds learned weights only
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        features = self.encoder(x)
        return features if self.head is None else self.head(features)


def build_deployable(encoder_file: EncoderFile, head: Optional[dict] = None) -> Deployable:
    """The eager model of a pretraining run's encoder (``head`` None) or an evaluation's classifier, in eval mode."""
    encoder = encoder_file.build()
    load_strict(encoder, encoder_file.state, f"{str(encoder_file.path)!r}")
    linear = None
    if head is not None:
        linear = nn.Linear(head["weight"].shape[1], head["weight"].shape[0])
        load_strict(linear, head, f"the head in {str(encoder_file.path)!r}")
    return Deployable(encoder, *encoder_file.statistics(), head=linear).eval()


def input_contract(image_size: int) -> str:
    return f"uint8 [N, 3, {image_size}, {image_size}] RGB 0-255, any N; normalization inside"


def metadata(encoder_file: EncoderFile, classes: Optional[list[str]], fmt: str, image_size: int) -> dict:
    """What an export records about itself: enough to rebuild it (safetensors) and to feed it correctly."""
    mean, std = encoder_file.statistics()
    return {"format": fmt, "kind": "classifier" if classes else "encoder", "arch": encoder_file.arch,
            "width": encoder_file.width, "image_size": encoder_file.image_size, "stem": encoder_file.stem,
            "normalize": encoder_file.normalize, "mean": list(mean), "std": list(std), "classes": classes,
            "input": input_contract(image_size), "output": "logits [N, C]" if classes else "features [N, D]",
            "source": str(encoder_file.path)}


def check_requirements(fmt: str) -> None:
    """A UserError naming the packages ``fmt`` needs when one is not installed."""
    import importlib.util

    missing = [name for name in REQUIREMENTS[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"format={fmt} needs {', '.join(missing)}: pip install -e '.[export]'")


@torch.no_grad()
def write_export(module: Deployable, fmt: str, path: Path, example: torch.Tensor, meta: dict,
                 calibration: Optional[torch.Tensor] = None) -> None:
    """Write ``module`` to ``path`` in ``fmt`` (atomically); ``example``: uint8 images [n, 3, S, S] to trace with;
    ``calibration``: uint8 training images that set onnx_int8's activation scales."""
    atomic_write(path, serialize(module, fmt, example, json.dumps(meta), bool(meta["classes"]), calibration))


def serialize(module: Deployable, fmt: str, example: torch.Tensor, meta_text: str, classifier: bool,
              calibration: Optional[torch.Tensor] = None) -> bytes:
    """The export's bytes, built in memory (torch.jit.save into a full file system aborts the interpreter)."""
    if fmt == "onnx_int8":
        return quantize_onnx(serialize(module, "onnx", example, meta_text, classifier), calibration, meta_text)
    if fmt == "torchscript":
        # ignored: tracer warnings about Python values in timm's shape checks, and torch's notice that TorchScript
        # is deprecated in favour of torch.export (asked for by name here; deployments still load it)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(module, (example,)), buffer,
                           _extra_files={f"{METADATA_KEY}.json": meta_text})
        return buffer.getvalue()
    if fmt == "onnx":
        import onnx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), None, input_names=["images"],
                                        output_names=["logits" if classifier else "features"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
        model = program.model_proto
        onnx.helper.set_model_props(model, {METADATA_KEY: meta_text})
        return model.SerializeToString()
    if fmt == "safetensors":
        from safetensors.torch import save

        state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
        return save(state, metadata={METADATA_KEY: meta_text})
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def quantize_onnx(fp32: bytes, calibration: torch.Tensor, meta_text: str, batch: int = 64) -> bytes:
    """Static int8 quantization of an fp32 ONNX export with onnxruntime's tools: QDQ format, per-channel int8
    weights, uint8 activations whose ranges are calibrated (min-max) on ``calibration`` (uint8 images [N, 3, S, S]).
    The graph's per-node debug metadata is dropped (a third of a small model's file); the project's metadata kept."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i:i + batch].numpy()} for i in range(0, len(calibration),
                                                                                            batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        source, prepared, quantized = (Path(tmp) / f"{name}.onnx" for name in ("fp32", "prepared", "int8"))
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared))  # shape inference + graph optimization, as onnxruntime advises
        quantize_static(str(prepared), str(quantized), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        model = onnx.load(str(quantized))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: meta_text})
    return model.SerializeToString()


@torch.no_grad()
def int8_agreement(run: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module, images: torch.Tensor,
                   labels: torch.Tensor, batch: int = 256) -> dict:
    """How far a quantized export strays from the eager model on uint8 images [N, 3, S, S] with labels [N]: a
    classifier's top-1 (%) both ways, the drop and how often the two predictions agree; an encoder's mean cosine
    similarity of features."""
    got = torch.cat([run(images[i:i + batch]).float() for i in range(0, len(images), batch)])
    expected = torch.cat([reference(images[i:i + batch]) for i in range(0, len(images), batch)])
    if reference.head is None:
        return {"feature_cosine_mean": torch.nn.functional.cosine_similarity(got, expected, dim=1).mean().item()}
    top1 = {name: 100.0 * (out.argmax(1) == labels).float().mean().item() for name, out in (("int8", got),
                                                                                          ("fp32", expected))}
    return {"top1_fp32": top1["fp32"], "top1_int8": top1["int8"], "top1_drop": top1["fp32"] - top1["int8"],
            "prediction_agreement": 100.0 * (got.argmax(1) == expected.argmax(1)).float().mean().item()}


def load_export(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported model read back from ``path`` as a function uint8 images [N, 3, 32, 32] -> outputs [N, K]:
    TorchScript with torch.jit.load, ONNX with onnxruntime, safetensors rebuilt from its metadata (strict load).
    A file that cannot be read is a UserError."""
    try:
        if fmt == "torchscript":
            module = _jit_load(path).eval()
            return lambda images: module(images)
        if fmt in ("onnx", "onnx_int8"):
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        module = rebuild_from_safetensors(path)
        return lambda images: module(images)
    except UserError:
        raise
    except Exception as err:  # each runtime has its own errors for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{str(path)!r} is not a readable {fmt} export: {first[:300]}") from None


def rebuild_from_safetensors(path: Path) -> Deployable:
    """The eager model from a safetensors export alone: architecture and normalization from its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "null") or "null")
    if not meta:
        raise UserError(f"{str(path)!r} has no {METADATA_KEY} metadata: not an export of this project")
    state = load_file(str(path))
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")} or None
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    return build_deployable(EncoderFile(encoder, meta["arch"], meta["width"], Path(path), "", meta["normalize"],
                                        meta.get("image_size", 32), meta.get("stem", "auto"), meta.get("mean"),
                                        meta.get("std")), head)


def _jit_load(path: Path, extra_files: Optional[dict] = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # the deprecation notice of TorchScript (see write_export)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)


def read_metadata(path: Path, fmt: str) -> dict:
    """The metadata an export carries (see :func:`metadata`)."""
    if fmt == "torchscript":
        files = {f"{METADATA_KEY}.json": ""}
        _jit_load(path, files)
        return json.loads(files[f"{METADATA_KEY}.json"])
    if fmt in ("onnx", "onnx_int8"):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props[METADATA_KEY])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


@torch.no_grad()
def max_relative_error(run: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module, images: torch.Tensor,
                       batch_sizes: Sequence[int] = (1, 7, 256)) -> float:
    """max |run(x) - reference(x)| / max |reference(x)| over ``images`` (uint8 [N, 3, 32, 32]), fed in batches of
    several sizes (the batch dimension must be dynamic)."""
    expected = torch.cat([reference(images[i:i + 256]) for i in range(0, len(images), 256)])
    worst, start, turn = 0.0, 0, 0
    while start < len(images):
        size = batch_sizes[turn % len(batch_sizes)]
        got = run(images[start:start + size]).float()
        if got.shape != expected[start:start + size].shape or not bool(got.isfinite().all()):
            return float("inf")  # (NaN would slip through max(): every comparison with it is false)
        worst = max(worst, (got - expected[start:start + size]).abs().max().item())
        start, turn = start + size, turn + 1
    return worst / max(expected.abs().max().item(), 1e-12)
