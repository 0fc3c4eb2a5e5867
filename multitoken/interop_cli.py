"""`multitoken import` and `multitoken export`: models in from, and out to, `transformers` directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from multitoken.config import HeadStyle
from multitoken.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
"""What a checkpoint carries from a transformers directory: tokenizer, chat template and special
tokens, and the generation config whose EOS ids end a continuation."""
HUB_PREFIX = "hf:"


def import_cli(
    src: str,
    out: str,
    n_future: int = 1,
    head_style: HeadStyle = "transformer",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> None:
    """Import a Llama, Mistral, Qwen2 or Qwen3 model from `transformers` as a multitoken checkpoint.

    The model's layers become the trunk and the next-token head, with logits equal to transformers'.
    Extra heads (--n-future > 1) are added on top, ready to be trained. The tokenizer files and the
    generation config's EOS ids come along, so `multitoken generate --checkpoint OUT` works at once.

    Args:
        src: a local transformers model directory, or hf:NAME for a model on the Hugging Face Hub
            (through huggingface_hub and its cache; offline once cached).
        out: the new run directory; it must not exist yet, or be empty.
        n_future: number of output heads; heads beyond the first are new.
        head_style: style of the new heads: transformer (copies of the last layer), linear (Medusa's
            x + SiLU(Wx), starting as the identity), medusa (x + SiLU(Wx + b) on the normed output,
            starting as the next-token head; the style `export --format medusa` writes for vLLM),
            conditioned (x + SiLU(W [x; e(next token)]), starting as the identity) or sequential
            (DeepSeek-V3's, random).
        dtype: type the weights are kept in; bfloat16 halves the memory of a bf16 model.
    """
    from multitoken.checkpoint import save_checkpoint
    from multitoken.interop import from_hf
    from multitoken.tokenizer import load_tokenizer

    out_dir = _fresh_out(out)
    path = _resolve_src(src)
    model = from_hf(path, n_future=n_future, head_style=head_style, dtype=dtype)
    has_tokenizer = (path / "tokenizer.json").is_file()
    tokenizer = load_tokenizer(path) if has_tokenizer else None  # fails here, before anything is written
    extra = {name: (path / name).read_text() for name in TOKENIZER_FILES[1:] if (path / name).is_file()}
    created = not out_dir.exists()
    try:
        ckpt = save_checkpoint(out_dir, 0, model, tokenizer=tokenizer, extra_files=extra)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    print(f"imported {path.name or path} ({model.num_params() / 1e6:.1f}M parameters) into {ckpt}")
    if tokenizer is None:
        print("note: no tokenizer.json in the source, so none was carried; generate needs one")


def export_cli(checkpoint: str, out: str, format: Literal["hf", "medusa"] = "hf") -> None:
    """Export a checkpoint as a `transformers` model directory, or its heads as vLLM's Medusa speculator.

    hf: the next-token path as config.json, model.safetensors and the checkpoint's tokenizer files;
    AutoModelForCausalLM.from_pretrained loads it with the same logits. The architecture is Qwen3 for
    models with q/k norms, Qwen2 for models with q/k/v biases, else Llama.

    medusa: the extra heads as config.json (model_type medusa) and model.safetensors
    (blocks.{h}.layers.0.weight/.bias, lm_heads.{h}.weight), for vLLM's --speculative-config
    '{"method": "medusa", "model": OUT, ...}' next to the hf export as the served model. Only heads
    trained with --head-style medusa map exactly.

    Args:
        checkpoint: checkpoint or run directory.
        out: the new directory; it must not exist yet, or be empty.
        format: hf (a transformers directory) or medusa (vLLM's Medusa heads).
    """
    from multitoken.checkpoint import load_model, resolve_checkpoint

    out_dir = _fresh_out(out)
    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt)
    if format == "medusa":
        from multitoken.interop_medusa import to_medusa

        medusa_config, tensors = to_medusa(model)  # refuses other heads before anything is written
        _write_dir(out_dir, lambda tmp: _save_medusa(tmp, medusa_config, tensors))
        print(
            f"exported the {medusa_config['num_heads']} extra heads of {ckpt} as vLLM Medusa heads into {out_dir}"
        )
        return
    from multitoken.interop import to_hf

    hf_model = to_hf(model)

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (ckpt / name).is_file():
                shutil.copyfile(ckpt / name, tmp / name)

    _write_dir(out_dir, write)
    print(f"exported {ckpt} as {type(hf_model).__name__} into {out_dir}")


def _save_medusa(tmp: Path, medusa_config: dict, tensors: dict) -> None:
    import json

    from safetensors.torch import save_file

    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(medusa_config, indent=2) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def _write_dir(out_dir: Path, write) -> None:
    """Run `write(tmp)` into a sibling temporary directory, then rename it to `out_dir` (empty or absent)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except OSError as err:
        raise UserError(f"cannot write {out_dir}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fresh_out(out: str) -> Path:
    """`out` as a path that does not exist or is an empty directory; UserError for anything else."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--out {path} already holds something; give a new or empty directory")
    return path


def _resolve_src(src: str) -> Path:
    """A local directory for SRC: itself, or the hub snapshot of hf:NAME."""
    if src.startswith(HUB_PREFIX):
        from huggingface_hub import snapshot_download

        name = src[len(HUB_PREFIX) :]
        try:
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as err:  # network, auth, unknown repo: all one line for the user
            raise UserError(
                f"cannot fetch {name} from the Hugging Face Hub: {str(err).splitlines()[0]}"
            ) from None
    path = Path(src)
    if not path.is_dir():
        raise UserError(f"{src} is not a directory (give a transformers model directory or hf:NAME)")
    return path
