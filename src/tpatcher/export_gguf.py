"""Write a merged model as a GGUF file for llama.cpp, starting from the GGUF it came from.

Every tensor but the last layer's FFN is copied byte for byte, so it keeps its quantisation
and llama.cpp's own conventions (the permuted Q/K rows, the Gemma norm offsets) need no
knowledge here. The last layer's ``ffn_gate``/``ffn_up``/``ffn_down`` are written in float32:
the GGUF's own (dequantised) weights with the patch neurons appended, which is exactly what
the merged ``transformers`` model computes with, since that model was dequantised from the
same file.

Two layouts:

* ``deci``: llama.cpp's ``deci`` architecture (Llama with per-layer sizes) with a per-layer
  ``feed_forward_length`` array, so only the last layer is wider. For ``llama`` sources only.
* ``uniform``: the source's own architecture with every layer widened to one width by zero
  neurons: zero rows appended to ``ffn_gate``/``ffn_up`` and zero blocks to each row of
  ``ffn_down``. All-zero bytes decode to 0 in every block format (checked), so the other
  layers keep their quantisation and compute exactly what they did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

from .errors import TPatcherError
from .merging import round_up

Layout = Literal["auto", "deci", "uniform"]
FFN_PARTS = ("ffn_gate", "ffn_up", "ffn_down")


class GGUFExportError(TPatcherError):
    """The GGUF cannot be written as asked (layout, source file, or model mismatch)."""


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFExportError(f"the source GGUF has no {key!r}")
    return field.contents()


def ffn_widths(reader: GGUFReader, arch: str, n_layer: int) -> list[int]:
    """Each layer's FFN width (the key may be one number or one per layer)."""
    value = _field(reader, f"{arch}.feed_forward_length")
    widths = [int(v) for v in value] if isinstance(value, list) else [int(value)] * n_layer
    if len(widths) != n_layer:
        raise GGUFExportError(f"feed_forward_length has {len(widths)} entries, not {n_layer}")
    return widths


def _block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _check_zero_decodes_to_zero(qtype: GGMLQuantizationType) -> None:
    """Padding writes all-zero bytes; make sure this format decodes them as zeros."""
    block, size = GGML_QUANT_SIZES[qtype]
    try:
        values = dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError) as exc:
        raise GGUFExportError(f"cannot check zero padding of {qtype.name} tensors") from exc
    if values.shape[-1] != block or np.any(values != 0):
        raise GGUFExportError(f"all-zero {qtype.name} blocks do not decode to zeros")


def _zero_rows(data: np.ndarray, extra: int) -> np.ndarray:
    """``data`` (rows, row bytes or values) with ``extra`` zero rows appended."""
    return np.concatenate([data, np.zeros((extra, data.shape[1]), dtype=data.dtype)], axis=0)


def _zero_columns(data: np.ndarray, qtype: GGMLQuantizationType, extra: int) -> np.ndarray:
    """``data`` with ``extra`` zero values appended to every row (whole blocks only)."""
    block, size = GGML_QUANT_SIZES[qtype]
    if extra % block:
        raise GGUFExportError(f"{extra} zero columns are not whole {qtype.name} blocks of {block}")
    width = extra // block * size if data.dtype == np.uint8 else extra
    return np.concatenate([data, np.zeros((data.shape[0], width), dtype=data.dtype)], axis=1)


def check_base_part(reader: GGUFReader, layer: int, ffn: dict[str, np.ndarray]) -> None:
    """Refuse when the model's last FFN is not the GGUF's (another model, or another file)."""
    for part in FFN_PARTS:
        tensor = _tensor(reader, f"blk.{layer}.{part}.weight")
        base = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        merged = ffn[part]
        ours = merged[: base.shape[0]] if part != "ffn_down" else merged[:, : base.shape[1]]
        if ours.shape != base.shape or not np.allclose(ours, base, rtol=0, atol=1e-6):
            raise GGUFExportError(
                f"the model's {part} of layer {layer} is not the one in the source GGUF; "
                "export a model loaded from that GGUF (an embedded model name)"
            )


def _tensor(reader: GGUFReader, name: str) -> Any:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise GGUFExportError(f"the source GGUF has no tensor {name!r}")


def _pad_last(ffn: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    extra = width - ffn["ffn_gate"].shape[0]
    return {
        "ffn_gate": _zero_rows(ffn["ffn_gate"], extra),
        "ffn_up": _zero_rows(ffn["ffn_up"], extra),
        "ffn_down": np.concatenate(
            [ffn["ffn_down"], np.zeros((ffn["ffn_down"].shape[0], extra), dtype=np.float32)], axis=1
        ),
    }


def _copy_fields(
    reader: GGUFReader,
    writer: GGUFWriter,
    arch: str,
    new_arch: str,
    overrides: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]],
) -> None:
    """Every key-value pair, with ``arch.`` keys renamed to ``new_arch.`` and ``overrides``
    (key: value, type, array item type) put in place of (or after) the source's."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key.startswith(f"{arch}."):
            key = f"{new_arch}.{key[len(arch) + 1 :]}"
        if key in overrides:
            continue
        vtype = field.types[0]
        sub_type = None
        if vtype == GGUFValueType.ARRAY:
            if len(field.types) != 2:
                raise GGUFExportError(f"nested arrays ({key}) are not supported")
            sub_type = field.types[-1]
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    for key, (value, vtype, sub_type) in overrides.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)


def write_gguf(
    source: Path,
    target: Path,
    ffn: dict[str, np.ndarray],
    *,
    layout: Layout = "auto",
    pad_to: int = 64,
    name_suffix: str = " (tpatcher export)",
) -> dict[str, Any]:
    """Write ``target`` from ``source`` with the last layer's FFN replaced by ``ffn``.

    ``ffn`` holds float32 ``ffn_gate``/``ffn_up`` (width, d) and ``ffn_down`` (d, width) of the
    merged last layer. Returns what was written (layout, architecture, widths).
    """
    reader = GGUFReader(source)
    arch = str(_field(reader, "general.architecture"))
    n_layer = int(_field(reader, f"{arch}.block_count"))
    widths = ffn_widths(reader, arch, n_layer)
    last = n_layer - 1
    check_base_part(reader, last, ffn)
    if layout == "auto":
        layout = "deci" if arch == "llama" else "uniform"
    if layout == "deci" and arch != "llama":
        raise GGUFExportError(f"the deci layout is for llama GGUFs, not {arch!r}; use uniform")
    if layout not in ("deci", "uniform"):
        raise GGUFExportError(f"unknown GGUF layout {layout!r}; expected auto, deci or uniform")

    merged_width = ffn["ffn_gate"].shape[0]
    if layout == "deci":
        new_arch = "deci"
        width = round_up(merged_width, pad_to)
        widths = [*widths[:last], width]
    else:
        new_arch = arch
        multiple = _padding_multiple(reader, n_layer, pad_to)
        width = round_up(max(merged_width, *widths), multiple)
        widths = [width] * n_layer
    writer = GGUFWriter(target, new_arch)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(_field(reader, "general.alignment"))
    width_key = f"{new_arch}.feed_forward_length"
    overrides: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {
        width_key: (widths, GGUFValueType.ARRAY, GGUFValueType.UINT32)
        if layout == "deci"
        else (width, GGUFValueType.UINT32, None)
    }
    if "general.name" in reader.fields:
        name = f"{_field(reader, 'general.name')}{name_suffix}"
        overrides["general.name"] = (name, GGUFValueType.STRING, None)
    _copy_fields(reader, writer, arch, new_arch, overrides)
    _add_tensors(reader, writer, last, _pad_last(ffn, width), widths, layout)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"layout": layout, "architecture": new_arch, "feed_forward_length": widths}


def _padding_multiple(reader: GGUFReader, n_layer: int, pad_to: int) -> int:
    """A width step that is whole blocks of every ``ffn_down`` (its rows run along the width)."""
    multiple = max(pad_to, 1)
    for layer in range(n_layer - 1):
        qtype = _tensor(reader, f"blk.{layer}.ffn_down.weight").tensor_type
        multiple = math.lcm(multiple, _block_size(qtype))
    return multiple


def _add_tensors(
    reader: GGUFReader,
    writer: GGUFWriter,
    last: int,
    last_ffn: dict[str, np.ndarray],
    widths: Sequence[int],
    layout: str,
) -> None:
    """Copy every tensor, replacing the last FFN and (uniform) zero-padding the others."""
    for tensor in reader.tensors:
        name, data, qtype = tensor.name, tensor.data, tensor.tensor_type
        parts = name.split(".")
        is_ffn = len(parts) == 4 and parts[0] == "blk" and parts[2] in FFN_PARTS
        if is_ffn and int(parts[1]) == last:
            writer.add_tensor(name, np.ascontiguousarray(last_ffn[parts[2]], dtype=np.float32))
            continue
        if is_ffn and layout == "uniform":
            layer = int(parts[1])
            current = int(tensor.shape[1] if parts[2] != "ffn_down" else tensor.shape[0])
            extra = widths[layer] - current
            if extra:
                _check_zero_decodes_to_zero(qtype)
                if parts[2] == "ffn_down":
                    data = _zero_columns(data, qtype, extra)
                else:
                    data = _zero_rows(data, extra)
        writer.add_tensor(name, data, raw_dtype=qtype)
