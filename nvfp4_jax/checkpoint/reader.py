"""Lazy reader for Hugging Face safetensors checkpoints (SPEC section 8).

Source encodings, decided per module from the tensors present and checked against config.json's
``quantization_config``:

- ``plain``: bf16 / fp16 / fp32 (or any other safetensors dtype), returned cast to the requested
  dtype.
- ``fp8_block`` (DeepSeek-V3, Kimi-K2-Instruct; ``quant_method: "fp8"``): ``weight`` F8_E4M3
  ``[N, K]`` and ``weight_scale_inv`` f32 ``[ceil(N/bn), ceil(K/bk)]``; value = f32(fp8) * scale of
  its block (edge blocks partial), computed in float32, rounded to bf16.
- ``int4_pack`` (Kimi-K2-Thinking experts; ``quant_method: "compressed-tensors"``, format
  ``pack-quantized``): ``weight_packed`` int32 ``[N, K/8]`` (element i of a word in bits 4i..4i+3,
  stored as value + 8), ``weight_scale`` bf16 ``[N, K/group]``, ``weight_shape`` ``[2]``;
  value = (nibble - 8) * scale, computed in float32, rounded to bf16.

Decoded fp8/int4 weights are always rounded to bf16 first (that is the source's value, SPEC
section 8) and then cast to the requested dtype, so ``get(name, jnp.float32)`` equals
``get(name).astype(jnp.float32)``.

Every structural check (index vs files, headers vs file sizes, quantization config vs tensors)
happens in the constructor, before a caller writes any output.

    r = CheckpointReader("/models/Kimi-K2-Thinking")
    for name in r.names():
        w = r.get(name)        # jax.Array, bf16
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .safetensors_io import CheckpointError, FileCache, TensorEntry, scan_checkpoint

# Files that are weights, or that the converter rewrites, and so are never copied verbatim.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")
_NOT_COPIED = {"config.json", "hf_quant_config.json"}

PLAIN, FP8_BLOCK, INT4_PACK = "plain", "fp8_block", "int4_pack"
# 8-bit float dtypes: only block-scaled F8_E4M3 weights are a source encoding we decode
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0")


@dataclass(frozen=True)
class TensorInfo:
    """One logical tensor of the source.

    shape: the decoded shape (for int4 from ``weight_shape``).
    source_dtype: safetensors dtype of the stored tensor ("BF16", "F32", "F8_E4M3", ...), or
        "INT4" for compressed-tensors pack-quantized weights.
    encoding: "plain", "fp8_block" or "int4_pack".
    parts: the stored tensors behind it (role -> stored name), e.g. {"weight": ..., "scale": ...}.
    """

    shape: tuple[int, ...]
    source_dtype: str
    encoding: str
    parts: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# decoders (pure jnp)


@partial(jax.jit, static_argnames=("block",))
def decode_fp8_block(weight, scale_inv, block=(128, 128)):
    """f32(weight) * scale_inv of its block, in float32, rounded to bf16.

    weight: float8_e4m3fn [N, K]; scale_inv: float32 [ceil(N/bn), ceil(K/bk)].
    """
    n, k = weight.shape
    bn, bk = block
    s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), bn, axis=0)[:n], bk, axis=1)[:, :k]
    return (weight.astype(jnp.float32) * s).astype(jnp.bfloat16)


@partial(jax.jit, static_argnames=("k", "group"))
def decode_int4_pack(packed, scale, k, group):
    """(nibble - 8) * scale, in float32, rounded to bf16.

    packed: int32 [N, ceil(K/8)], element i of a word in bits 4i..4i+3 (value + 8);
    scale: bf16/f16/f32 [N, ceil(K/group)]; returns bf16 [N, K].
    """
    n = packed.shape[0]
    shifts = jnp.arange(8, dtype=jnp.int32) * 4
    nib = (packed[:, :, None] >> shifts) & 0xF  # arithmetic shift is harmless after the mask
    q = nib.reshape(n, -1)[:, :k].astype(jnp.float32) - 8.0
    s = jnp.repeat(scale.astype(jnp.float32), group, axis=1)[:, :k]
    return (q * s).astype(jnp.bfloat16)


# ---------------------------------------------------------------------------------------------


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from None


def _int4_group_size(qc: dict, path: Path) -> int:
    """Validate a compressed-tensors config for int4 pack-quantized and return its group size."""
    groups = qc.get("config_groups") or {}
    fmt_top = qc.get("format")
    found = []
    for gname, g in groups.items():
        if not isinstance(g, dict):
            continue
        w = g.get("weights")
        if not w:
            continue
        fmt = g.get("format") or fmt_top
        ok = (
            fmt == "pack-quantized"
            and w.get("num_bits") == 4
            and w.get("type", "int") == "int"
            and w.get("symmetric", True) is True
            and w.get("strategy", "group") == "group"
            and isinstance(w.get("group_size"), int)
        )
        if not ok:
            raise CheckpointError(
                f"{path}: quantization_config config_groups.{gname} is not a supported compressed-tensors "
                f"scheme (need format pack-quantized, int 4-bit, symmetric, group strategy; got format "
                f"{fmt!r}, weights {json.dumps(w, sort_keys=True)})"
            )
        found.append(w["group_size"])
    if not found:
        raise CheckpointError(f"{path}: compressed-tensors quantization_config has no config_groups with weights")
    if len(set(found)) != 1:
        raise CheckpointError(f"{path}: compressed-tensors config_groups use different group sizes {found}")
    return found[0]


def _parse_quant_block(qc, cfg_path: Path, where: str) -> dict:
    """One ``quantization_config`` block of config.json (``where`` names it in errors)."""
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: {where} is not an object")
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block is None or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise CheckpointError(
                f"{cfg_path}: quant_method 'fp8' needs weight_block_size [bn, bk] (got {block!r}); "
                "only block-wise FP8 (DeepSeek-V3 style) is supported"
            )
        return {"method": "fp8", "block": (block[0], block[1])}
    if method == "compressed-tensors":
        return {"method": "compressed-tensors", "group": _int4_group_size(qc, cfg_path)}
    raise CheckpointError(
        f"{cfg_path}: unknown {where}.quant_method {method!r}; supported source formats are "
        "unquantized, 'fp8' (block-wise) and 'compressed-tensors' (pack-quantized int4)"
    )


class CheckpointReader:
    """Lazy view of an HF checkpoint directory; see the module docstring."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config: dict = _load_json(self.path / "config.json", "config file")
        self._files = FileCache()
        self._stored: dict[str, TensorEntry] = scan_checkpoint(self.path).tensors
        self._quant = self._parse_quant_config()
        self._logical: dict[str, TensorInfo] = self._fold()

    # -- construction ---------------------------------------------------------------------------

    def _parse_quant_config(self) -> dict:
        """The source's quantization: config.json's top-level ``quantization_config`` or, in a
        wrapper (Kimi-K2.5), its ``text_config``'s; where both exist they must agree."""
        cfg_path = self.path / "config.json"
        tc = self.config.get("text_config")
        found = [(where, _parse_quant_block(qc, cfg_path, where)) for where, qc in (
            ("quantization_config", self.config.get("quantization_config")),
            ("text_config.quantization_config", tc.get("quantization_config") if isinstance(tc, dict) else None))
            if qc]
        if len({json.dumps(q, sort_keys=True) for _, q in found}) > 1:
            raise CheckpointError(f"{cfg_path}: {found[0][0]} ({found[0][1]}) and {found[1][0]} ({found[1][1]}) "
                                  "declare different source quantizations")
        return found[0][1] if found else {"method": None}

    def _fold(self) -> dict[str, TensorInfo]:
        st = self._stored
        used: set[str] = set()
        out: dict[str, TensorInfo] = {}
        cfg_path = self.path / "config.json"
        method = self._quant["method"]

        for name in st:
            if name.endswith(".weight_packed"):
                mod = name[: -len(".weight_packed")]
                if method != "compressed-tensors":
                    raise CheckpointError(
                        f"tensor {name!r} ({st[name].file}) is compressed-tensors pack-quantized, but {cfg_path} "
                        f"does not declare quant_method 'compressed-tensors' (found {method!r})"
                    )
                out[mod + ".weight"] = self._int4_info(mod)
                used.update(out[mod + ".weight"].parts.values())
            elif name.endswith(".weight_scale_inv"):
                mod = name[: -len(".weight_scale_inv")]
                if mod + ".weight" not in st:
                    raise CheckpointError(f"tensor {name!r} ({st[name].file}) has no matching {mod}.weight")
        for name, e in st.items():
            if name in used or name.endswith(".weight_scale_inv"):
                continue
            if e.dtype in _FP8_DTYPES and name.endswith(".weight"):
                out[name] = self._fp8_info(name)
                continue
            if e.dtype in _FP8_DTYPES:
                raise CheckpointError(f"tensor {name!r} ({e.file}) is {e.dtype} but is not a block-quantized weight")
            if name.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
                raise CheckpointError(
                    f"tensor {name!r} ({e.file}) is a compressed-tensors parameter without a matching "
                    f"{name.rsplit('.', 1)[0]}.weight_packed"
                )
            out[name] = TensorInfo(e.shape, e.dtype, PLAIN, {"weight": name})
        return dict(sorted(out.items()))

    def _fp8_info(self, name: str) -> TensorInfo:
        st = self._stored
        e = st[name]
        cfg_path = self.path / "config.json"
        if self._quant["method"] != "fp8":
            raise CheckpointError(
                f"tensor {name!r} ({e.file}) is {e.dtype}, but {cfg_path} does not declare quant_method 'fp8' "
                f"(found {self._quant['method']!r})"
            )
        if e.dtype != "F8_E4M3":
            raise CheckpointError(f"tensor {name!r} ({e.file}) is {e.dtype}; only F8_E4M3 block weights are supported")
        sname = name[: -len("weight")] + "weight_scale_inv"
        s = st.get(sname)
        if s is None:
            raise CheckpointError(f"FP8 tensor {name!r} ({e.file}) has no {sname}")
        if len(e.shape) != 2:
            raise CheckpointError(f"FP8 tensor {name!r} ({e.file}) has shape {list(e.shape)}; expected 2-D")
        bn, bk = self._quant["block"]
        want = (math.ceil(e.shape[0] / bn), math.ceil(e.shape[1] / bk))
        if s.shape != want or s.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(
                f"{sname} ({s.file}) is {s.dtype} {list(s.shape)}; for weight {list(e.shape)} with blocks "
                f"{bn}x{bk} it must be a float [{want[0]}, {want[1]}]"
            )
        return TensorInfo(e.shape, e.dtype, FP8_BLOCK, {"weight": name, "scale": sname})

    def _int4_info(self, mod: str) -> TensorInfo:
        st = self._stored
        pname, sname, shname = mod + ".weight_packed", mod + ".weight_scale", mod + ".weight_shape"
        p = st[pname]
        for n in (sname, shname):
            if n not in st:
                raise CheckpointError(f"INT4 tensor {pname!r} ({p.file}) has no {n}")
        if mod + ".weight_zero_point" in st:
            raise CheckpointError(f"{mod}.weight_zero_point ({st[mod + '.weight_zero_point'].file}): asymmetric int4 is not supported")
        s, sh = st[sname], st[shname]
        if p.dtype != "I32" or len(p.shape) != 2:
            raise CheckpointError(f"{pname} ({p.file}) is {p.dtype} {list(p.shape)}; expected I32 [N, K/8]")
        if sh.dtype not in ("I64", "I32") or sh.shape != (2,):
            raise CheckpointError(f"{shname} ({sh.file}) is {sh.dtype} {list(sh.shape)}; expected an int [2]")
        shape = tuple(int(x) for x in self._files.read(sh))
        n, k = shape
        group = self._quant["group"]
        if p.shape != (n, math.ceil(k / 8)):
            raise CheckpointError(f"{pname} ({p.file}) has shape {list(p.shape)}, but {shname} says {list(shape)}")
        if s.shape != (n, math.ceil(k / group)) or s.dtype not in ("BF16", "F16", "F32"):
            raise CheckpointError(
                f"{sname} ({s.file}) is {s.dtype} {list(s.shape)}; for weight {list(shape)} with group {group} "
                f"it must be a float [{n}, {math.ceil(k / group)}]"
            )
        return TensorInfo(shape, "INT4", INT4_PACK, {"packed": pname, "scale": sname, "shape": shname})

    # -- queries --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Logical tensor names, sorted."""
        return list(self._logical)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._logical[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.path}") from None

    def entry(self, stored_name: str) -> TensorEntry:
        """Where a stored (not logical) tensor lives."""
        return self._stored[stored_name]

    @property
    def bytes_read(self) -> int:
        """Tensor bytes this reader has read so far (headers aside)."""
        return self._files.bytes_read

    def read_raw(self, stored_name: str) -> np.ndarray:
        """A stored tensor exactly as in the file (numpy, memory-mapped, no decoding)."""
        return self._files.read(self._stored[stored_name])

    def get(self, name: str, dtype=jnp.bfloat16) -> jax.Array:
        """The decoded tensor as a JAX array of ``dtype``."""
        info = self.info(name)
        if info.encoding == PLAIN:
            return jnp.asarray(self.read_raw(info.parts["weight"])).astype(dtype)
        if info.encoding == FP8_BLOCK:
            w = jnp.asarray(self.read_raw(info.parts["weight"]))
            s = jnp.asarray(self.read_raw(info.parts["scale"]))
            return decode_fp8_block(w, s, block=self._quant["block"]).astype(dtype)
        p = jnp.asarray(self.read_raw(info.parts["packed"]))
        s = jnp.asarray(self.read_raw(info.parts["scale"]))
        return decode_int4_pack(p, s, k=info.shape[1], group=self._quant["group"]).astype(dtype)

    def get_many(self, names, dtype=jnp.bfloat16) -> dict[str, jax.Array]:
        return {n: self.get(n, dtype) for n in names}

    def extra_files(self) -> list[Path]:
        """Top-level non-weight files to copy to the output (tokenizer, generation config, remote
        code, license, ...).  Weights, index files, config.json and hf_quant_config.json are left out
        (the writer produces its own)."""
        out = []
        for p in sorted(self.path.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.name in _NOT_COPIED or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
                continue
            out.append(p)
        return out

    def close(self):
        self._files.close()
